"""Parameter strings and ATMM scoring against the reference ops composed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hetmm
from hetmm.parameters import DEFAULT, MVTEC_AD, PostProcess, parse_params, params_for
from hetmm.scoring import gaussian_blur, image_scores
from hetmm_kernels import reference
from helpers import features


@pytest.mark.parametrize("category", sorted(MVTEC_AD))
def test_paper_table_parses(category):
    params = parse_params(MVTEC_AD[category])
    assert list(params.layers) == ["layer1", "layer2", "layer3"]
    assert params_for(category) == MVTEC_AD[category]


def test_table_values():
    p = parse_params(MVTEC_AD["cable"])
    assert p.layers["layer1"] == hetmm.parameters.LayerParams(13, 7, 0.7, 1.0)
    assert p.image == PostProcess("blur", 5.5, 39)
    assert p.pixel == PostProcess("blur", 8.6, 61)
    assert parse_params(MVTEC_AD["pill"]).image == PostProcess("mp", 0.0, 25)
    assert params_for("no-such-category") == DEFAULT


@pytest.mark.parametrize("text,words", [
    ("L1:5x3_a=0.3", "a layer entry"),
    ("L1:5y3_a=0.3_l=1", "a layer entry"),
    ("X1:5x3_a=0.3_l=1", "a layer entry"),
    ("L1:5x3_a=0.3_l=1;img_AUC:blur_s=3", "a post-process is"),
    ("L1:5x3_a=0.3_l=1;foo:clean", "metric entries"),
    ("L1:0x3_a=0.3_l=1", "every layer is skipped"),
])
def test_bad_parameter_strings(text, words):
    with pytest.raises(ValueError, match=words):
        parse_params(text)


def _by_hand(query, temp, params, size):
    """The published aggregation, written out with the reference ops."""
    total = 0
    for layer, p in parse_params(params).active_layers.items():
        fore = 1 - reference.forward_ATM(query[layer], temp[layer], p.fore).amax(dim=1, keepdim=True)
        back = 1 - reference.backward_ATM(query[layer], temp[layer], p.back).amax(dim=1, keepdim=True)
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        total = total + p.lda * (up(fore) * p.alpha + (1 - p.alpha) * up(back))
    return total


@pytest.mark.parametrize("params", [MVTEC_AD["bottle"], MVTEC_AD["cable"], "L1:4x0_a=1_l=1|L2:3x2_a=0.2_l=0.7"])
@pytest.mark.parametrize("out_size", [(24, 24), (17, 30)])
def test_atmm_score_matches_the_reference_pipeline(params, out_size):
    shapes = {"layer1": (8, 12, 12), "layer2": (12, 6, 6), "layer3": (16, 3, 3)}
    query = {k: features(2, *s, seed=i) for i, (k, s) in enumerate(shapes.items())}
    temp = {k: features(5, *s, seed=10 + i) for i, (k, s) in enumerate(shapes.items())}
    score = hetmm.atmm_score(query, temp, params, out_size)
    assert score.shape == (2, 1, *out_size)
    assert torch.allclose(score, _by_hand(query, temp, params, out_size), atol=1e-5)


def test_a_template_scores_zero_and_a_stranger_scores_higher():
    temp = {"layer1": features(3, 8, 10, 10), "layer2": features(3, 8, 5, 5, seed=1), "layer3": features(3, 8, 3, 3, seed=2)}
    same = {k: v[1:2] for k, v in temp.items()}
    stranger = {k: features(1, *v.shape[1:], seed=99) for k, v in temp.items()}
    assert hetmm.atmm_score(same, temp, DEFAULT, 20).abs().max() < 1e-5
    assert hetmm.atmm_score(stranger, temp, DEFAULT, 20).min() > 0.1


def test_gaussian_blur_keeps_mass_and_shape():
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1
    for k in (5, 6, 11):
        out = gaussian_blur(impulse, 2.0, k)
        assert out.shape == impulse.shape
        assert abs(out.sum().item() - 1) < 1e-5
        assert out[0, 0, 15, 15] == out.max()


def test_image_scores():
    maps = torch.zeros(2, 1, 8, 8)
    maps[0, 0, 2, 3] = 4.0
    maps[1, 0] = 1.0
    assert image_scores(maps, PostProcess()).tolist() == [4.0, 1.0]
    # mean of a 4x4 max-pool (stride 4): one of the four cells holds the 4
    assert image_scores(maps, PostProcess("mp", 0, 4)).tolist() == [1.0, 1.0]
    assert image_scores(maps, PostProcess("blur", 1.0, 5))[0] < 4.0
