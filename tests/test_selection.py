"""templates="auto": beyond max_templates the training images that spread farthest become the bank, so
predict's cost does not grow with the training set; up to it, every image (the same bank as "all")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hetmm
from hetmm.selection import DESCRIPTOR_LAYER, image_descriptors, spread_images


def _features(descriptors: torch.Tensor) -> dict:
    """Layer maps whose layer-3 mean is the given row (a 2 x 2 map of it)."""
    return {DESCRIPTOR_LAYER: descriptors[:, :, None, None].expand(-1, -1, 2, 2).float()}


def _spread_by_hand(descriptors: torch.Tensor, count: int) -> list:
    unit = F.normalize(descriptors.double(), dim=1)
    chosen = [min(range(len(unit)), key=lambda i: (float(unit[i] @ unit.mean(0)), i))]
    while len(chosen) < count:
        rest = [i for i in range(len(unit)) if i not in chosen]
        chosen.append(min(rest, key=lambda i: (max(float(unit[i] @ unit[j]) for j in chosen), i)))
    return sorted(chosen)


@pytest.mark.parametrize("total, count, seed", [(12, 4, 0), (30, 7, 1), (9, 9, 2), (5, 8, 3), (40, 39, 4)])
def test_spread_images_is_greedy_k_centre(total, count, seed):
    descriptors = torch.randn(total, 6, generator=torch.Generator().manual_seed(seed))
    kept = spread_images(_features(descriptors), count)
    assert kept.tolist() == (_spread_by_hand(descriptors, count) if total > count else list(range(total)))


def test_spread_images_keeps_the_odd_one_and_does_not_depend_on_order():
    generator = torch.Generator().manual_seed(7)
    common = F.normalize(torch.tensor([1.0, 0, 0, 0]) + 0.05 * torch.randn(20, 4, generator=generator), dim=1)
    odd = torch.tensor([[0.0, 0, 1, 0]])
    descriptors = torch.cat([common[:11], odd, common[11:]])
    kept = spread_images(_features(descriptors), 3)
    assert 11 in kept.tolist() and len(set(kept.tolist())) == 3
    order = torch.randperm(len(descriptors), generator=generator)
    again = spread_images(_features(descriptors[order]), 3)
    assert sorted(order[again].tolist()) == kept.tolist()


def test_duplicates_are_never_kept_twice():
    descriptors = torch.ones(6, 3)
    descriptors[5] = torch.tensor([1.0, -1, 0])
    kept = spread_images(_features(descriptors), 4)
    assert len(set(kept.tolist())) == 4 and 5 in kept.tolist()


def test_descriptors_are_unit_mean_features():
    maps = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    got = image_descriptors({DESCRIPTOR_LAYER: maps})
    torch.testing.assert_close(got, F.normalize(maps.double().mean((2, 3)), dim=1))
    with pytest.raises(ValueError, match="count"):
        spread_images({DESCRIPTOR_LAYER: maps}, 0)


def _detector(**kw):
    return hetmm.HETMM(backbone="resnet18", weights=None, image_size=64, out_size=64, precision="fp32", **kw)


def _images(n, seed):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_auto_keeps_every_image_up_to_its_cap():
    images, query = _images(5, 0), _images(2, 9)
    auto, every = _detector(max_templates=5).fit(images), _detector(templates="all").fit(images)
    assert auto.templates == "auto" and len(auto.bank) == 5
    assert torch.equal(auto.predict(query).anomaly_map, every.predict(query).anomaly_map)


def test_auto_beyond_its_cap_is_the_spread_images_bank(tmp_path):
    images, query = _images(9, 1), _images(2, 8)
    auto = _detector(max_templates=4).fit(images)
    kept = spread_images(auto.extract(images), 4)
    chosen = _detector(templates="all").fit(images[kept])
    assert len(auto.bank) == 4
    for layer, features in auto.bank.features.items():
        assert torch.equal(features, chosen.bank.features[layer])
    assert torch.equal(auto.predict(query).anomaly_map, chosen.predict(query).anomaly_map)
    loaded = hetmm.HETMM.load(auto.save(tmp_path / "bank.safetensors"), precision="fp32")
    assert (loaded.templates, loaded.max_templates) == ("auto", 4)


def test_hot_update_beyond_the_cap_chooses_again():
    det = _detector(max_templates=3).fit(_images(3, 2))
    before = {k: v.clone() for k, v in det.bank.features.items()}
    new = _images(2, 3)
    det.add_templates(new)
    assert len(det.bank) == 3 and det.calibration is not None
    pool = {k: torch.cat([before[k], det.extract(new)[k].float()]) for k in before}
    kept = spread_images(pool, 3)
    for layer in before:
        assert torch.equal(det.bank.features[layer], pool[layer][kept])


@pytest.mark.parametrize("options, message", [
    (dict(templates="some"), "templates must be 'auto', 'all' or 'pts'"),
    (dict(max_templates=1), "max_templates at least 2"),
    (dict(templates="pts", retrieval_k=2), "retrieval needs templates='all' or 'auto'"),
])
def test_bad_template_options_are_named(options, message):
    with pytest.raises(hetmm.detector.OptionsError, match=message):
        _detector(**options)
