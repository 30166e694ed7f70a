"""Parameter strings and ATMM scoring against the reference ops composed by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hetmm
from hetmm.parameters import DEFAULT, MVTEC_AD, PostProcess, parse_params, params_for
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
    # values that used to give NaN scores, an inverted detector or a bank predict refuses
    ("L1:5x3_a=nan_l=1", r"alpha \(a=\) .* \[0, 1\]; got nan"),
    ("L1:5x3_a=1.5_l=1", r"alpha .* got 1.5"),
    ("L1:5x3_a=-0.1_l=1", r"alpha .* got -0.1"),
    ("L1:5x3_a=0.5_l=inf", r"lambda \(l=\) .* got inf"),
    ("L1:5x3_a=0.5_l=1e308", r"lambda .* got 1e\+308"),
    ("L1:5x3_a=0.5_l=-1", r"lambda .* got -1"),
    ("L1:5x3_a=0.5_l=0", r"lambda .* got 0"),
    ("L4:5x3_a=0.5_l=1", "the layers are L1 to L3"),
    ("L0:5x3_a=0.5_l=1", "the layers are L1 to L3"),
    ("L1:5x3_a=0.5_l=1|L1:3x3_a=0.5_l=1", "L1 is given twice"),
    ("L1:5x3_a=0.5_l=1;img_AUC:blur_s=nan_k=3", r"sigma s must be in \(0, 256\]; got nan"),
    ("L1:5x3_a=0.5_l=1;img_AUC:blur_s=4_k=1e308", "a whole number from 1 to 1025"),
    ("L1:5x3_a=0.5_l=1;img_AUC:blur_s=4_k=3.5", "a whole number"),
    ("L1:5x3_a=0.5_l=1;img_AUC:mp_k=0", "a whole number"),
    ("L1:5x3_a=0.5_l=1;img_AUC:blur_s=x_k=3", "'x' is not a number"),
    # a metric's layer choice (_L=)
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_L=2", "img_AUC sums L2, which the string skips or lacks"),
    ("L1:5x3_a=0.5_l=1|L2:0x0_a=0.5_l=1;pix_AUC:clean_L=12", "pix_AUC sums L2"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_L=4", "L= names layers by their digits"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_L=11", "once each"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_L=", "L= names layers"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_L=1_L=1", "then optionally _top=<percent> .* and _L=<layers>"),
    # the image score's top percentage (_top=)
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_top=0", r"top= .* in \(0, 100\]; got 0"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_top=101", r"top= .* got 101"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_top=nan", r"top= .* got nan"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_top=x", "'x' is not a number"),
    ("L1:5x3_a=0.5_l=1;img_AUC:mp_k=3_top=1", "top= belongs to an img_AUC entry that is clean or blur"),
    ("L1:5x3_a=0.5_l=1;pix_AUC:blur_s=4_k=9_top=1", "top= belongs to an img_AUC entry"),
    ("L1:5x3_a=0.5_l=1;PRO:clean_top=1", "top= belongs to an img_AUC entry"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_L=1_top=1", "then optionally _top=<percent>"),
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_top=1_top=1", "then optionally _top=<percent>"),
])
def test_bad_parameter_strings(text, words):
    with pytest.raises(ValueError, match=words):
        parse_params(text)


def test_every_published_string_and_the_default_pass_the_value_checks():
    for text in (*MVTEC_AD.values(), DEFAULT):
        assert parse_params(text).active_layers


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
    plain = DEFAULT.replace("_i=1", "")  # random templates are all isolated: tests/test_isolation.py has that case
    assert hetmm.atmm_score(same, temp, plain, 20).abs().max() < 1e-5
    assert hetmm.atmm_score(stranger, temp, plain, 20).min() > 0.1


def test_detector_post_processing_per_metric():
    """mp scores the mean of a k x k max-pool; blur scores the maximum of the blurred map."""
    from hetmm.scoring import LayerMatches

    temp = {"layer1": features(3, 8, 8, 8)}
    query = {"layer1": features(2, 8, 8, 8, seed=7)}
    matches = LayerMatches(query, temp, "L1:3x3_a=0.5_l=1")
    raw = matches.aggregate(16).maps
    assert torch.equal(matches.image_scores(16, PostProcess()), raw.amax(dim=(1, 2, 3)))
    mp = matches.image_scores(16, PostProcess("mp", 0, 4))
    assert torch.allclose(mp, F.max_pool2d(raw, 4).mean(dim=(1, 2, 3)))
    blurred = matches.image_scores(16, PostProcess("blur", 2.0, 9))
    assert torch.allclose(blurred, reference.gaussian_blur(raw, 2.0, 9).amax(dim=(1, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("text,expected", [
    ("L1:5x3_a=0.5_l=1;img_AUC:clean_top=1", PostProcess(top=1.0)),
    ("L1:5x3_a=0.5_l=1;img_AUC:blur_s=8_k=33_top=2.5_L=1", PostProcess("blur", 8.0, 33, ("layer1",), 2.5)),
    ("L1:5x3_a=0.5_l=1;img_AUC:blur_s=8_k=33_top=100", PostProcess("blur", 8.0, 33, top=100.0)),
])
def test_top_percent_image_entries_parse(text, expected):
    assert parse_params(text).image == expected


@pytest.mark.parametrize("size,percent,count", [(16, 1.0, 3), (16, 0.01, 1), (16, 100.0, 256), (20, 5.0, 20),
                                                (24, 2.5, 15)])
@pytest.mark.parametrize("post", [PostProcess(), PostProcess("blur", 2.0, 9)])
def test_top_percent_image_score_is_the_mean_of_the_highest_pixels(size, percent, count, post):
    """The mean of the ceil(percent% of the pixels) highest values of the same (blurred) map, by sorting."""
    from dataclasses import replace

    from hetmm.scoring import LayerMatches

    temp = {"layer1": features(3, 8, 8, 8)}
    query = {"layer1": features(3, 8, 8, 8, seed=7)}
    matches = LayerMatches(query, temp, "L1:3x3_a=0.5_l=1")
    maps = matches.aggregate(size, post).maps.flatten(1)
    expected = maps.sort(dim=1, descending=True).values[:, :count].double().mean(1).float()
    scores = matches.image_scores(size, replace(post, top=percent))
    assert torch.allclose(scores, expected, rtol=1e-6, atol=0)
    if count > 1:  # not the maximum, which is what the entry scores without top=
        assert (scores < maps.amax(1)).all()


@pytest.mark.parametrize("text,layers", [
    ("L1:5x3_a=0.5_l=1|L2:3x3_a=0.5_l=1;img_AUC:blur_s=4_k=9_L=2", ("layer2",)),
    ("L1:5x3_a=0.5_l=1|L2:3x3_a=0.5_l=1;img_AUC:clean_L=21", ("layer1", "layer2")),
    ("L1:5x3_a=0.5_l=1|L2:3x3_a=0.5_l=1;img_AUC:mp_k=3_L=1", ("layer1",)),
])
def test_a_metric_may_sum_some_layers(text, layers):
    params = parse_params(text)
    assert params.image.layers == layers and params.pixel.layers == ()


@pytest.mark.parametrize("post", [PostProcess(), PostProcess("blur", 2.0, 9), PostProcess("mp", 0, 4)])
def test_an_image_score_of_some_layers_equals_the_score_of_a_string_without_the_others(post):
    from dataclasses import replace

    from hetmm.scoring import LayerMatches

    shapes = {"layer1": (8, 12, 12), "layer2": (12, 6, 6), "layer3": (16, 3, 3)}
    query = {k: features(2, *s, seed=i) for i, (k, s) in enumerate(shapes.items())}
    temp = {k: features(4, *s, seed=10 + i) for i, (k, s) in enumerate(shapes.items())}
    every = LayerMatches(query, temp, "L1:5x3_a=0.5_l=1|L2:3x3_a=0.9_l=0.8|L3:3x1_a=0.7_l=0.5")
    deep = LayerMatches(query, temp, "L2:3x3_a=0.9_l=0.8|L3:3x1_a=0.7_l=0.5")
    chosen = every.image_scores(24, replace(post, layers=("layer2", "layer3")))
    assert torch.equal(chosen, deep.image_scores(24, post))
    assert not torch.equal(chosen, every.image_scores(24, post))
    with pytest.raises(KeyError, match="layer4"):
        every.aggregate(24, PostProcess(layers=("layer4",)))
