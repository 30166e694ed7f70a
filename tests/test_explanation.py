"""Explained verdicts: each region's nearest template and place, against a planted truth and against the reference
on whole maps; the bank's template sources and thumbnails through fit, hot update, selection, save and load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import hetmm
from hetmm import explanation
from hetmm.bank import THUMBNAIL, THUMBNAILS, TemplateBank
from hetmm_kernels import reference
from helpers import random_images

SIZE = 128
SHIFT = (16, -8)  # (x, y) pixels from a query pixel to the same content in its template: within layer 2's window
# (at 128 px, layer 2's cells are 8 px and its 9 x 9 window reaches 32 px)


def _iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.fixture(scope="module")
def surface():
    """A large surface that repeats nowhere (smoothed colour noise at two scales), as uint8 ``[H, W, 3]``."""
    generator = torch.Generator().manual_seed(7)
    coarse = F.interpolate(torch.rand(1, 3, 24, 24, generator=generator), size=(480, 480), mode="bicubic")
    fine = F.interpolate(torch.rand(1, 3, 120, 120, generator=generator), size=(480, 480), mode="bilinear")
    image = (0.6 * coarse + 0.4 * fine).clamp(0, 1)[0].permute(1, 2, 0)
    return (image * 255).round().byte().numpy()


@pytest.fixture(scope="module")
def fitted(surface, tmp_path_factory):
    """A lite0 detector whose 12 templates are 128 px crops of the surface, saved as files; their corners."""
    folder = tmp_path_factory.mktemp("crops")
    corners = [(x, y) for y in (40, 180, 320) for x in (30, 170, 300, 330)]
    files = []
    for index, (x, y) in enumerate(corners):
        files.append(folder / f"crop{index:02d}.png")
        Image.fromarray(surface[y:y + SIZE, x:x + SIZE]).save(files[-1])
    det = hetmm.HETMM("tf_efficientnet_lite0", image_size=SIZE, out_size=SIZE, fpr=0.05, pixel_fpr=0.01)
    return det.fit(files), files, corners


def test_a_planted_defect_is_explained_by_its_template_and_the_shifted_place(fitted, surface):
    """The query is template k's crop moved by SHIFT with a dark blot planted: every region names template k
    (and its file), and its place there is the region's box moved by SHIFT (IoU >= 0.5)."""
    det, files, corners = fitted
    for k in (1, 6, 10):
        x, y = corners[k][0] + SHIFT[0], corners[k][1] + SHIFT[1]  # query pixel p shows template pixel p + SHIFT
        query = surface[y:y + SIZE, x:x + SIZE].copy()
        query[50:74, 40:60] = (query[50:74, 40:60] * 0.25).astype(np.uint8)  # the defect
        result = det.predict(torch.from_numpy(query).permute(2, 0, 1)[None].float() / 255, explain=True)
        assert bool(result.pred_label[0]) and result.regions[0], "the blot must be found"
        for region in result.regions[0]:
            near = region["nearest"]
            assert near["template"] == k and near["source"] == str(files[k].resolve()), (k, near)
            x0, y0, x1, y1 = region["box"]
            truth = [min(max(v, 0), SIZE) for v in (x0 + SHIFT[0], y0 + SHIFT[1], x1 + SHIFT[0], y1 + SHIFT[1])]
            assert _iou(near["box"], truth) >= 0.5, (k, region["box"], near["box"], truth)
            assert 0 < near["similarity"] <= 1


def test_explanations_leave_the_verdict_alone_and_only_flagged_images_get_them(fitted, surface):
    det, _, corners = fitted
    x, y = corners[2]
    clean = torch.from_numpy(surface[y + 4:y + 4 + SIZE, x:x + SIZE].copy()).permute(2, 0, 1).float() / 255
    blotted = clean.clone()
    blotted[:, 60:90, 30:60] *= 0.2
    images = torch.stack([clean, blotted])
    plain, explained = det.predict(images), det.predict(images, explain=True)
    assert torch.equal(plain.pred_score, explained.pred_score) and torch.equal(plain.pred_mask, explained.pred_mask)
    assert not explained.pred_label[0] and explained.pred_label[1]
    assert all("nearest" not in r for regions in plain.regions for r in regions)
    assert explained.regions[1] and all("nearest" in r for r in explained.regions[1])


@pytest.mark.parametrize("seed", range(3))
def test_the_crop_gives_what_whole_maps_give(seed):
    """``explain_regions`` matches a crop around the regions; the reference's argmax over the whole maps must
    name the same template, similarity and box for every region."""
    generator = torch.Generator().manual_seed(seed)
    query = F.normalize(torch.randn(1, 12, 16, 16, generator=generator), dim=1)
    templates = F.normalize(torch.randn(5, 12, 16, 16, generator=generator), dim=1)
    templates[3, :, 2:9, 4:12] = query[0, :, 4:11, 2:10]  # template 3 holds the query's content, moved
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 18:40, 10:36] = True
    mask[0, 50:60, 50:62] = True
    from hetmm.calibration import Regions

    result = hetmm.detector.Prediction(torch.ones(1), torch.zeros(1, 64, 64), torch.zeros(1, 64, 64),
                                       pred_label=torch.ones(1, dtype=torch.bool), pred_mask=mask)
    result.regions = Regions(mask, mask.float())
    sources = [f"t{i}" for i in range(5)]
    explanation.explain_regions(result, query, templates, 9, sources)
    values, where = reference.forward_argmax(query, templates, 9)
    for region in result.regions[0]:
        cells = explanation.region_cells(mask[0], region["box"], (16, 16))
        rows, cols = torch.nonzero(cells, as_tuple=True)
        similarity = values[0][:, rows, cols].mean(1)
        template = int(similarity.argmax())
        places = where[0, template, rows, cols]
        dy, dx = int(torch.median(places // 16 - rows)), int(torch.median(places % 16 - cols))
        x0, y0, x1, y1 = region["box"]
        box = [min(max(v, 0), 64) for v in (x0 + 4 * dx, y0 + 4 * dy, x1 + 4 * dx, y1 + 4 * dy)]
        near = region["nearest"]
        assert (near["template"], near["source"], near["box"]) == (template, sources[template], box)
        assert near["similarity"] == pytest.approx(float(similarity[template]), abs=1e-5)
    assert result.regions[0][0]["nearest"]["template"] == 3  # the large region lies on the moved content


def test_sources_and_thumbnails_follow_the_templates(tmp_path):
    """Fit from files records each file and a thumbnail; tensors record None; hot update, automatic selection,
    save, load and shards keep sources, thumbnails and templates aligned."""
    files = []
    for i, image in enumerate(random_images(5, 3)):
        files.append(tmp_path / f"good{i}.png")
        Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(files[-1])
    det = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision="fp32").fit(files[:3])
    bank = det.bank
    assert bank.sources == [str(f.resolve()) for f in files[:3]]
    assert bank.extras[THUMBNAILS].shape == (3, 3, THUMBNAIL, THUMBNAIL) and bank.extras[THUMBNAILS].dtype == torch.uint8
    expected = F.interpolate(hetmm.data.read_image(files[1], 64)[None], size=(THUMBNAIL, THUMBNAIL), mode="bilinear",
                             antialias=True)
    assert (bank.extras[THUMBNAILS][1].float() / 255 - expected[0]).abs().max() <= 1 / 255
    det.add_templates([files[3]])
    det.add_templates(random_images(1, 9))
    assert bank.sources[3:] == [str(files[3].resolve()), None] and len(bank.extras[THUMBNAILS]) == 5
    loaded = hetmm.HETMM.load(det.save(tmp_path / "bank.safetensors"))
    assert loaded.bank.sources == bank.sources and torch.equal(loaded.bank.extras[THUMBNAILS], bank.extras[THUMBNAILS])
    shard = bank.shard(1, 2)
    assert shard.sources == bank.sources[shard.offset:shard.offset + len(shard)]
    assert torch.equal(shard.extras[THUMBNAILS], bank.extras[THUMBNAILS][shard.offset:shard.offset + len(shard)])
    kept = bank.copy()
    kept.keep(torch.tensor([0, 3, 4]))
    assert kept.sources == [bank.sources[i] for i in (0, 3, 4)] and len(bank.sources) == 5
    assert torch.equal(kept.extras[THUMBNAILS], bank.extras[THUMBNAILS][[0, 3, 4]])
    auto = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision="fp32", templates="auto",
                       max_templates=3).fit(files)
    chosen = [files.index(next(f for f in files if str(f.resolve()) == s)) for s in auto.bank.sources]
    features = auto.extract([files[i] for i in chosen])
    assert torch.allclose(auto.bank.features["layer3"], features["layer3"].float(), atol=1e-5)


def test_a_bank_of_format_1_loads_without_sources_and_is_explained_by_index(tmp_path):
    det = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision="fp32", threshold=0.0)
    det.fit(random_images(3, 4))
    path = det.save(tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["extra/" + THUMBNAILS]
    metadata = {k: v for k, v in metadata.items() if k != "sources"} | {"format": "hetmm-bank/1"}
    metadata["checksum"] = hetmm.bank.checksum(tensors)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=metadata)
    old = hetmm.HETMM.load(tmp_path / "old.safetensors", threshold=0.0)
    assert old.bank.sources == [None] * 3 and THUMBNAILS not in old.bank.extras
    result = old.predict(random_images(1, 5), explain=True)
    assert result.regions[0] and all(r["nearest"]["source"] is None and 0 <= r["nearest"]["template"] < 3
                                     for r in result.regions[0])
    bad = dict(metadata, format="hetmm-bank/2", sources=json.dumps(["a.png"]))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(hetmm.bank.BankInvalid, match="sources must be 3 file names"):
        TemplateBank.load(tmp_path / "bad.safetensors")
