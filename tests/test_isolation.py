"""Isolation: each template pixel's leave-one-out dissimilarity, added to the similarities it takes part in.

The ground truth here is written with explicit loops over windows (not the feature-channel trick the
implementation uses), so a wrong channel, a wrong sign or a bias on the wrong side fails.
"""

from __future__ import annotations

import pytest
import torch

import hetmm
import hetmm_kernels as hk
from hetmm.bank import BankInvalid, TemplateBank
from hetmm.detector import _without_self
from hetmm.parameters import DEFAULT, parse_params
from hetmm.scoring import LayerMatches, template_isolation
from hetmm_kernels import reference
from helpers import edit_saved_bank, features, random_images, tiny_detector

WITHOUT_ISOLATION = DEFAULT.replace("_i=1", "")


def _window(y, x, radius, height, width):
    return [(v, u) for v in range(y - radius, y + radius + 1) for u in range(x - radius, x + radius + 1)
            if 0 <= v < height and 0 <= u < width]


def _isolation_by_hand(temp, fore):
    count, _, height, width = temp.shape
    out = torch.zeros(count, height, width, dtype=torch.float64)
    t = temp.double()
    for a in range(count):
        for y in range(height):
            for x in range(width):
                best = max(float(t[a, :, y, x] @ t[b, :, v, u]) for b in range(count) if b != a
                           for v, u in _window(y, x, fore // 2, height, width))
                out[a, y, x] = max(0.0, 1 - best)
    return out


def _maxima_by_hand(query, temp, isolation, weight, fore, back):
    """``(fore, back)`` maxima: ``<q, t> + weight * isolation[t]`` over windows and templates, capped at 1."""
    batch, _, height, width = query.shape
    q, t, iso = query.double(), temp.double(), isolation.double()
    fores = torch.empty(batch, height, width, dtype=torch.float64)
    backs = torch.empty_like(fores)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                fores[b, y, x] = max(float(q[b, :, y, x] @ t[n, :, v, u]) + weight * float(iso[n, v, u])
                                     for n in range(t.shape[0]) for v, u in _window(y, x, fore // 2, height, width))
                backs[b, y, x] = max(float(q[b, :, v, u] @ t[n, :, y, x]) + weight * float(iso[n, y, x])
                                     for n in range(t.shape[0]) for v, u in _window(y, x, back // 2, height, width))
    return fores.clamp_max(1), backs.clamp_max(1)


@pytest.mark.parametrize("count,channels,size,fore", [(2, 8, 5, 3), (4, 12, 6, 5), (5, 7, 4, 1), (3, 16, 7, 7)])
def test_isolation_is_the_leave_one_out_dissimilarity(count, channels, size, fore):
    temp = features(count, channels, size, size, seed=count + fore)
    got = template_isolation(temp, fore)
    assert got.dtype == torch.float32 and got.shape == (count, size, size)
    torch.testing.assert_close(got.double(), _isolation_by_hand(temp, fore), atol=1e-5, rtol=0)


def test_isolation_with_given_neighbours_uses_only_them():
    temp = features(5, 8, 5, 5, seed=3)
    neighbours = torch.tensor([[1, 2], [0, 4], [3, 4], [0, 1], [2, 3]])
    got = template_isolation(temp, 3, neighbours)
    for a in range(5):
        best = reference.forward_ATM(temp[a:a + 1], temp[neighbours[a]], 3).amax(1)[0]
        torch.testing.assert_close(got[a], (1 - best).clamp_min(0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="its own neighbour"):
        template_isolation(temp, 3, torch.tensor([[1], [1], [0], [0], [0]]))


def test_one_template_has_no_isolation():
    assert template_isolation(features(1, 8, 4, 4), 3).abs().max() == 0


def test_without_self_drops_each_template_or_its_last_neighbour():
    nearest = torch.tensor([[0, 2, 1], [2, 1, 0], [0, 1, 3], [1, 2, 0]])  # template 2 missed itself (a tie)
    assert _without_self(nearest, 2).tolist() == [[2, 1], [2, 0], [0, 1], [1, 2]]


@pytest.mark.parametrize("weight", [0.1, 0.25, 0.5])  # small: random low-dimensional features are very isolated
# the isolation is kept in float32 (1e-7 for float64 features); bfloat16 rounds every similarity once
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-7), (torch.bfloat16, 2e-2)])
def test_scoring_with_isolation_matches_the_loops(weight, dtype, atol):
    params = f"L1:5x3_a=0.5_l=1_i={weight}|L2:3x5_a=0.3_l=0.8_i={weight}"
    shapes = {"layer1": (9, 7, 7), "layer2": (12, 4, 4)}
    query = {k: features(2, *s, seed=i, dtype=dtype) for i, (k, s) in enumerate(shapes.items())}
    # random templates and one near the first query image, whose maxima may reach the cap (1)
    temp = {k: torch.cat([features(3, *s, seed=9 + i),
                          torch.nn.functional.normalize(query[k][:1].float() + 0.5 * features(1, *s, seed=20 + i),
                                                        dim=1)]).to(dtype)
            for i, (k, s) in enumerate(shapes.items())}
    matches = LayerMatches(query, temp, params)
    for i, (layer, p) in enumerate(parse_params(params).active_layers.items()):
        isolation = template_isolation(temp[layer], p.fore)
        fore, back = _maxima_by_hand(query[layer].float(), temp[layer].float(), isolation, weight, p.fore, p.back)
        torch.testing.assert_close(matches.fores[i].double(), fore, atol=atol, rtol=0)
        torch.testing.assert_close(matches.backs[i].double(), back, atol=atol, rtol=0)
        assert (fore == 1).double().mean() < 0.75 and (back == 1).double().mean() < 0.75  # not all capped


def test_a_template_scores_zero_and_a_stranger_scores_higher_with_isolation():
    temp = {"layer1": features(3, 8, 10, 10), "layer2": features(3, 8, 5, 5, seed=1), "layer3": features(3, 8, 3, 3, seed=2)}
    same = {k: v[1:2] for k, v in temp.items()}
    stranger = {k: features(1, *v.shape[1:], seed=99) for k, v in temp.items()}
    assert parse_params(DEFAULT).layers["layer1"].isolation == 1
    assert hetmm.atmm_score(same, temp, DEFAULT, 20).abs().max() < 1e-5
    assert hetmm.atmm_score(stranger, temp, DEFAULT, 20).min() > 0


def test_the_paper_strings_have_no_isolation():
    for text in hetmm.parameters.MVTEC_AD.values():
        assert all(p.isolation == 0 for p in parse_params(text).layers.values())


# ---------------------------------------------------------------- the detector and its bank
_detector = tiny_detector


_images = random_images


@pytest.fixture(scope="module")
def fitted():
    return _detector().fit(_images(4, 0))


def test_fit_computes_the_isolation_of_every_layer_it_uses(fitted):
    bank = fitted.bank
    for layer, p in fitted.params.active_layers.items():
        expected = template_isolation(bank.features[layer], p.fore)
        torch.testing.assert_close(bank.isolation(layer, p.fore), expected, atol=1e-6, rtol=0)


def test_isolation_is_saved_checked_and_loaded(tmp_path, fitted):
    path = fitted.save(tmp_path / "bank.safetensors")
    loaded = hetmm.HETMM.load(path, precision="fp32")
    images = _images(2, 7)
    assert torch.equal(loaded.predict(images).anomaly_map, fitted.predict(images).anomaly_map)
    for layer, p in fitted.params.active_layers.items():
        assert torch.equal(loaded.bank.isolation(layer, p.fore), fitted.bank.isolation(layer, p.fore))


def test_a_bank_saved_without_isolation_gets_it_on_first_use(tmp_path, fitted):
    bank = TemplateBank(fitted.bank.features, fitted.bank.config)  # as saved before isolation existed
    bank.save(tmp_path / "old.safetensors")
    loaded = hetmm.HETMM.load(tmp_path / "old.safetensors", precision="fp32")
    images = _images(2, 7)
    assert torch.equal(loaded.predict(images).anomaly_map, fitted.predict(images).anomaly_map)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.neg(), r"dissimilarities in \[0, 2\]"),
    (lambda t: t.fill_(float("nan")), r"dissimilarities in \[0, 2\]"),
    (lambda t: t[:, :-1], "one value per template pixel"),
    (lambda t: t.long(), "must be floating"),
])
def test_banks_with_bad_isolation_are_refused_on_load(tmp_path, fitted, edit, message):
    path = fitted.save(tmp_path / "bank.safetensors")
    edit_saved_bank(path, "isolation.", edit)
    with pytest.raises(BankInvalid, match=message):
        TemplateBank.load(path)


def test_hot_update_recomputes_every_isolation(fitted):
    det = _detector().fit(_images(4, 0))
    det.add_templates(_images(2, 5))
    fresh = _detector().fit(torch.cat([_images(4, 0), _images(2, 5)]))
    for layer, p in det.params.active_layers.items():
        torch.testing.assert_close(det.bank.isolation(layer, p.fore), fresh.bank.isolation(layer, p.fore),
                                   atol=1e-6, rtol=0)
    images = _images(2, 7)
    torch.testing.assert_close(det.predict(images).anomaly_map, fresh.predict(images).anomaly_map, atol=1e-5, rtol=0)


def test_shards_carry_their_rows_of_the_isolation(tmp_path, fitted):
    path = fitted.save(tmp_path / "bank.safetensors")
    layer, p = next(iter(fitted.params.active_layers.items()))
    whole = fitted.bank.isolation(layer, p.fore)
    for shard in (fitted.bank.shard(1, 2), TemplateBank.load(path, shard=(1, 2))):
        assert shard.offset == 2 and torch.equal(shard.isolation(layer, p.fore), whole[2:])
    bare = TemplateBank(fitted.bank.features, fitted.bank.config).shard(1, 2)
    det = _detector()
    det.bank, det.group = bare, object()
    with pytest.raises(RuntimeError, match="computed over the whole bank"):
        det.predict(_images(1, 3))


def test_retrieval_isolation_compares_each_template_with_its_retrieved_neighbours():
    det = _detector(retrieval_k=2).fit(_images(5, 0))
    layer, p = next(iter(det.params.active_layers.items()))
    codebook, histogram_bank = det._histogram_bank()
    own = codebook.histograms(det.bank.features[det.retrieval_layer])
    _, nearest = hk.retrieve_topk(own, histogram_bank, 3)
    expected = template_isolation(det.bank.features[layer], p.fore, _without_self(nearest, 2))
    torch.testing.assert_close(det.bank.isolation(layer, p.fore), expected, atol=1e-6, rtol=0)
    all_others = template_isolation(det.bank.features[layer], p.fore)
    assert (det.bank.isolation(layer, p.fore) >= all_others - 1e-6).all()  # fewer templates: never closer


def test_large_banks_compare_each_template_with_its_most_similar_images(monkeypatch):
    from hetmm import detector

    monkeypatch.setattr(detector, "ISOLATION_NEIGHBOURS", 2)
    det = _detector().fit(_images(5, 0))
    nearest = detector._most_similar_images(det.bank.features["layer3"], 2)
    assert nearest.shape == (5, 2) and not (nearest == torch.arange(5)[:, None]).any()
    layer, p = next(iter(det.params.active_layers.items()))
    expected = template_isolation(det.bank.features[layer], p.fore, nearest)
    torch.testing.assert_close(det.bank.isolation(layer, p.fore), expected, atol=1e-6, rtol=0)
    assert not torch.equal(expected, template_isolation(det.bank.features[layer], p.fore))  # a real subset
