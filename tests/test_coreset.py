"""The layer coreset (``_c=``): its selection, the forward fallback it adds, and how the bank keeps it."""

from __future__ import annotations

import pytest
import torch

import hetmm
import hetmm_kernels as hk
from hetmm.bank import BankInvalid, TemplateBank
from hetmm.parameters import parse_params
from hetmm.scoring import LayerMatches, coreset_rows, coreset_size, template_coreset
from helpers import edit_saved_bank, features, random_images, tiny_detector


def _greedy_by_hand(temp: torch.Tensor, count: int) -> list:
    """k-centre greedy written out: each next pixel is the one whose nearest kept pixel is least similar."""
    rows = temp.permute(0, 2, 3, 1).reshape(-1, temp.shape[1]).double()
    kept = [int((rows @ rows.mean(0)).argmin())]
    while len(kept) < count:
        nearest = (rows @ rows[kept].T).amax(1)
        kept.append(int(nearest.argmin()))
    return kept


@pytest.mark.parametrize("count,channels,size,percent", [(3, 8, 4, 10), (5, 16, 6, 25), (2, 4, 3, 50), (4, 12, 5, 2)])
def test_coreset_is_greedy_k_centre_selection(count, channels, size, percent):
    temp = features(count, channels, size, size, seed=count)
    chosen = template_coreset(temp, percent)
    assert chosen.dtype == torch.int64
    assert chosen.tolist() == _greedy_by_hand(temp, coreset_size(count * size * size, percent))


@pytest.mark.parametrize("pixels,percent,size", [(40960, 10, 4096), (100, 0.5, 1), (100, 100, 100), (7, 50, 4),
                                                 (200, 5, 10)])
def test_coreset_size(pixels, percent, size):
    assert coreset_size(pixels, percent) == size


def test_the_coreset_does_not_depend_on_the_templates_order():
    temp = features(5, 8, 4, 4, seed=3)
    order = torch.tensor([3, 0, 4, 1, 2])
    pixels = torch.arange(5 * 16).view(5, 16)
    chosen = template_coreset(temp, 20)
    shuffled = template_coreset(temp[order], 20)
    assert sorted(pixels[order].flatten()[shuffled].tolist()) == sorted(chosen.tolist())


@pytest.mark.parametrize("count, group", [(7, 3), (12, 5), (9, 9)])
def test_a_grouped_coreset_is_each_groups_own_selection(count, group):
    from hetmm.scoring import similar_groups

    temp = features(count, 8, 4, 4, seed=count)
    chosen = template_coreset(temp, 25, group=group)
    pixels = 16
    assert len(chosen) == coreset_size(count * pixels, 25) and len(set(chosen.tolist())) == len(chosen)
    members = similar_groups(hk.prepare_templates(temp).temp, -(-count // group))
    assert sorted(torch.cat(members).tolist()) == list(range(count))
    assert max(len(m) for m in members) <= group and max(len(m) for m in members) - min(len(m) for m in members) <= 1
    for templates in members:  # each group's pixels are greedy k-centre over that group alone
        mine = [int(i) for i in chosen if int(i) // pixels in templates.tolist()]
        alone = template_coreset(temp[templates], 100 * len(mine) / (len(templates) * pixels), group=count)
        assert sorted(int(templates[i // pixels]) * pixels + i % pixels for i in alone.tolist()) == sorted(mine)
    shuffled = torch.randperm(count, generator=torch.Generator().manual_seed(1))
    again = template_coreset(temp[shuffled], 25, group=group)
    assert sorted(int(shuffled[i // pixels]) * pixels + i % pixels for i in again.tolist()) == sorted(chosen.tolist())


def test_similar_templates_share_a_group():
    from hetmm.scoring import similar_groups

    base = features(2, 8, 4, 4, seed=5)  # two kinds of template, five noisy copies of each, interleaved
    temp = torch.nn.functional.normalize(
        base[torch.arange(10) % 2] + 0.05 * features(10, 8, 4, 4, seed=6), dim=1)
    groups = [sorted(g.tolist()) for g in similar_groups(temp, 2)]
    assert sorted(groups) == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


def test_a_whole_coreset_holds_every_pixel_once():
    temp = features(3, 8, 4, 4)
    assert sorted(template_coreset(temp, 100).tolist()) == list(range(48))


def test_coreset_rows_are_the_named_pixels_and_their_templates():
    temp = hk.prepare_templates(features(3, 8, 4, 5))
    rows, owners = coreset_rows(temp, torch.tensor([0, 21, 59]))
    assert owners.tolist() == [0, 1, 2]
    assert torch.equal(rows[1], temp.temp[1, :, 0, 1]) and torch.equal(rows[2], temp.temp[2, :, 3, 4])


# ---------------------------------------------------------------- scoring
SHAPES = {"layer1": (8, 12, 12), "layer2": (12, 6, 6)}


def _feats(count, seed):
    return {k: features(count, *s, seed=seed + i) for i, (k, s) in enumerate(SHAPES.items())}


@pytest.mark.parametrize("isolation", ["", "_i=1"])
def test_the_fallback_is_the_better_of_window_and_coreset(isolation):
    query, temp = _feats(2, 0), _feats(4, 10)
    plain = LayerMatches(query, temp, f"L1:3x3_a=0.5_l=1{isolation}|L2:3x3_a=0.9_l=1{isolation}")
    with_coreset = LayerMatches(query, temp, f"L1:3x3_a=0.5_l=1{isolation}|L2:3x3_a=0.9_l=1{isolation}_c=20")
    assert torch.equal(with_coreset.fores[0], plain.fores[0]) and torch.equal(with_coreset.backs[1], plain.backs[1])
    # by hand: the coreset's pixels of the (isolated) templates, matched with the query's (unit) channel
    chosen = template_coreset(temp["layer2"], 20)
    isolated = temp["layer2"]
    q = query["layer2"]
    if isolation:
        from hetmm.scoring import isolated_templates, template_isolation, with_unit_channel

        isolated = isolated_templates(temp["layer2"], template_isolation(temp["layer2"], 3), 1.0).temp
        q = with_unit_channel(q, isolated.shape[1])
    rows = isolated.permute(0, 2, 3, 1).reshape(-1, isolated.shape[1])[chosen]
    expected = torch.maximum(plain.fores[1], hk.reference.global_match(q, rows))
    if isolation:
        expected = expected.clamp_max(1)
    torch.testing.assert_close(with_coreset.fores[1], expected, atol=1e-6, rtol=0)
    assert (with_coreset.fores[1] >= plain.fores[1]).all() and (with_coreset.fores[1] > plain.fores[1]).any()


def test_a_whole_coreset_is_a_window_over_the_whole_map():
    query, temp = _feats(2, 0), _feats(3, 10)
    whole = LayerMatches(query, temp, "L2:3x3_a=0.5_l=1_c=100")
    wide = LayerMatches(query, temp, "L2:11x3_a=0.5_l=1")
    torch.testing.assert_close(whole.fores[0], wide.fores[0], atol=1e-6, rtol=0)
    indices = torch.tensor([[0, 2], [1, 1]])  # each query meets only its own templates' coreset pixels
    whole = LayerMatches(query, temp, "L2:3x3_a=0.5_l=1_c=100", indices)
    wide = LayerMatches(query, temp, "L2:11x3_a=0.5_l=1", indices)
    torch.testing.assert_close(whole.fores[0], wide.fores[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("text,words", [
    ("L1:5x3_a=0.5_l=1_c=0", r"coreset \(c=\) .* \(0, 100\]; got 0"),
    ("L1:5x3_a=0.5_l=1_c=101", r"coreset .* got 101"),
    ("L1:5x3_a=0.5_l=1_c=nan", r"coreset .* got nan"),
    ("L1:5x3_a=0.5_l=1_c=10_i=1", "a layer entry is"),
])
def test_bad_coreset_entries(text, words):
    with pytest.raises(ValueError, match=words):
        parse_params(text)


def test_coreset_entries_parse():
    layer = parse_params("L1:5x3_a=0.5_l=1_i=1_c=10|L2:9x3_a=0.9_l=0.8_c=2.5").layers
    assert (layer["layer1"].isolation, layer["layer1"].coreset) == (1.0, 10.0)
    assert (layer["layer2"].isolation, layer["layer2"].coreset) == (0.0, 2.5)


# ---------------------------------------------------------------- the detector and its bank
PARAMS = "L1:3x3_a=0.5_l=1_i=1|L2:3x3_a=0.9_l=0.8_i=1_c=25|L3:3x3_a=0.9_l=0.5;img_AUC:blur_s=2.0_k=9"


def _detector(params=PARAMS, **kw):
    return tiny_detector(params=params, **kw)


_images = random_images


@pytest.fixture(scope="module")
def fitted():
    return _detector().fit(_images(4, 0))


def test_fit_selects_the_coreset_it_uses_and_load_keeps_it(tmp_path, fitted):
    chosen = fitted.bank.coreset("layer2", 25)
    assert torch.equal(chosen, template_coreset(fitted.bank.features["layer2"], 25))
    loaded = hetmm.HETMM.load(fitted.save(tmp_path / "bank.safetensors"), precision="fp32")
    assert torch.equal(loaded.bank.coreset("layer2", 25), chosen)
    images = _images(2, 7)
    assert torch.equal(loaded.predict(images).anomaly_map, fitted.predict(images).anomaly_map)


def test_the_leave_one_out_calibration_leaves_the_image_out_of_the_coreset():
    """With every pixel in the coreset, calibration equals a window over the whole map (no isolation)."""
    images = _images(4, 1)
    whole = _detector("L2:3x3_a=0.5_l=1_c=100;img_AUC:clean").fit(images)
    wide = _detector("L2:15x3_a=0.5_l=1;img_AUC:clean").fit(images)
    torch.testing.assert_close(whole.calibration.image_scores, wide.calibration.image_scores, atol=1e-5, rtol=0)
    assert (whole.calibration.image_scores > 1e-3).all()  # no image found itself


def test_hot_update_selects_the_coreset_again(fitted):
    det = _detector().fit(_images(4, 0))
    det.add_templates(_images(2, 5))
    fresh = _detector().fit(torch.cat([_images(4, 0), _images(2, 5)]))
    assert torch.equal(det.bank.coreset("layer2", 25), fresh.bank.coreset("layer2", 25))
    images = _images(2, 7)
    torch.testing.assert_close(det.predict(images).anomaly_map, fresh.predict(images).anomaly_map, atol=1e-5, rtol=0)


def test_shards_keep_their_own_coreset_pixels(tmp_path, fitted):
    path = fitted.save(tmp_path / "bank.safetensors")
    whole = fitted.bank.coreset("layer2", 25)
    pixels = fitted.bank.features["layer2"].shape[2] * fitted.bank.features["layer2"].shape[3]
    for rank in (0, 1):
        for shard in (fitted.bank.shard(rank, 2), TemplateBank.load(path, shard=(rank, 2))):
            mine = whole[(whole >= shard.offset * pixels) & (whole < (shard.offset + len(shard)) * pixels)]
            assert torch.equal(shard.coreset("layer2", 25), mine - shard.offset * pixels)
    # merged by the maximum, the two shards' fallbacks are the whole bank's
    query = fitted.backbone(_images(2, 3))["layer2"]
    p = fitted.params.layers["layer2"]
    from hetmm.scoring import coreset_match, with_unit_channel

    def fallback(bank):
        rows = bank.coreset_rows("layer2", fitted.device, torch.float32, 25, p.fore, p.isolation)
        return coreset_match(with_unit_channel(query, rows[0].shape[1]), rows)

    halves = torch.maximum(fallback(fitted.bank.shard(0, 2)), fallback(fitted.bank.shard(1, 2)))
    assert torch.equal(halves, fallback(fitted.bank))
    bare = TemplateBank(fitted.bank.features, fitted.bank.config, {k: v for k, v in fitted.bank.extras.items()
                                                                   if not k.startswith("coreset.")}).shard(1, 2)
    det = _detector()
    det.bank, det.group = bare, object()
    with pytest.raises(RuntimeError, match="selected over the whole bank"):
        det.predict(_images(1, 3))


@pytest.mark.parametrize("edit,message", [
    (lambda t: t + 10_000, "int64 template-pixel indices in"),
    (lambda t: t.int(), "int64 template-pixel indices"),
    (lambda t: t[None], "int64 template-pixel indices"),
])
def test_banks_with_bad_coresets_are_refused_on_load(tmp_path, fitted, edit, message):
    path = fitted.save(tmp_path / "bank.safetensors")
    edit_saved_bank(path, "coreset.", edit)
    with pytest.raises(BankInvalid, match=message):
        TemplateBank.load(path)


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "masked"])
def test_an_indexed_query_meets_only_its_own_templates_coreset_pixels(gather):
    from hetmm.scoring import coreset_match

    temp = hk.prepare_templates(features(4, 8, 3, 3, seed=2))
    coreset = coreset_rows(temp, torch.tensor([0, 5, 9, 20, 35]))  # templates 0, 0, 1, 2, 3
    query = features(3, 8, 3, 3, seed=4)
    indices = torch.tensor([[0, 3], [2, 2], [1, 1]])
    got = coreset_match(query, coreset, indices, gather)
    rows, owners = coreset
    for b in range(3):
        own = torch.isin(owners, indices[b])
        expected = hk.reference.global_match(query[b:b + 1], rows[own].contiguous())[0]
        torch.testing.assert_close(got[b], expected, atol=1e-6, rtol=0)
    none = coreset_match(query[:1], coreset_rows(temp, torch.tensor([9])), torch.tensor([[0, 2]]), gather)
    assert torch.equal(none, torch.full((1, 3, 3), -1.0))  # no pixel of its templates: the floor
