"""The detector end to end: bank persistence, hot update, data errors, scores on real textures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import hetmm
from hetmm.bank import TemplateBank
from hetmm.data import ImageError, MVTecCategory, read_image
from hetmm.demo import build_dataset
from hetmm.evaluation import evaluate_category
from hetmm.parameters import DEFAULT
from helpers import random_images


def _small_detector(**kw):
    # float32: these tests check exact self-matches; precision="auto" is bfloat16 on CPUs that have it
    # (tests/test_cpu_path.py covers it, with bfloat16's tolerance)
    return hetmm.HETMM(backbone="resnet18", weights=None, image_size=64, out_size=64, **{"precision": "fp32", **kw})


_images = random_images


def test_save_load_round_trip_is_bit_exact(tmp_path):
    det = _small_detector().fit(_images(3, 0))
    path = det.save(tmp_path / "bank.safetensors")
    loaded = hetmm.HETMM.load(path, precision="fp32")
    for layer, t in det.bank.features.items():
        assert torch.equal(loaded.bank.features[layer], t)
    assert loaded.bank.config == det.bank.config
    query = _images(2, 5)
    assert torch.equal(loaded.predict(query).anomaly_map, det.predict(query).anomaly_map)


def test_save_is_atomic(tmp_path, monkeypatch):
    det = _small_detector().fit(_images(2, 0))
    path = det.save(tmp_path / "bank.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a bank")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    det.add_templates(_images(1, 9))
    with pytest.raises(KeyboardInterrupt):
        det.save(path)
    assert path.read_bytes() == before  # the old bank is intact
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]  # no temporary left behind


def test_bank_from_another_configuration_is_refused(tmp_path):
    det = _small_detector().fit(_images(2, 0))
    path = det.save(tmp_path / "bank.safetensors")
    bank = TemplateBank.load(path)
    with pytest.raises(hetmm.BankMismatch, match="image_size=64"):
        bank.check(dict(det.config, image_size=256))
    with pytest.raises(hetmm.BankMismatch, match="backbone"):
        TemplateBank.load(path, expected=dict(det.config, backbone="wide_resnet50_2"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a bank")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TemplateBank.load(tmp_path / "junk.safetensors")


# the hot-update tests score a random image against random ones: without isolation, as every such image
# is as far from the others as the newcomer is (tests/test_isolation.py covers isolation's hot update)
WITHOUT_ISOLATION = DEFAULT.replace("_i=1", "")


def test_hot_update_adds_templates_and_lowers_their_scores():
    det = _small_detector(params=WITHOUT_ISOLATION).fit(_images(3, 0))
    newcomer = _images(1, 42)
    before = det.predict(newcomer).pred_score.item()
    det.add_templates(newcomer)
    assert len(det.bank) == 4
    after = det.predict(newcomer).pred_score.item()
    assert after < 1e-4 < before  # an image in the bank matches itself perfectly


def test_hot_update_in_bf16_matches_itself_to_bf16_rounding():
    det = _small_detector(precision="bf16", params=WITHOUT_ISOLATION).fit(_images(3, 0))
    newcomer = _images(1, 42)
    before = det.predict(newcomer).pred_score.item()
    det.add_templates(newcomer)
    after = det.predict(newcomer).pred_score.item()
    assert after < 2 ** -7 < before  # each similarity is rounded to bfloat16 (8 significant bits) once


def test_predict_needs_templates_and_good_images():
    det = _small_detector()
    with pytest.raises(RuntimeError, match="call fit"):
        det.predict(_images(1, 0))
    det.fit(_images(2, 0))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        det.predict(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="images is empty"):
        det.predict([])


def test_images_with_a_side_under_32_pixels_are_refused_by_size(tmp_path):
    """A 1 x 1 upload resized to the network's size is one flat colour: it would be scored as a confident defect
    and accepted as a template. Files and tensors alike are refused, in predict and add_templates."""
    det = _small_detector().fit(_images(2, 0))
    dot, sliver = tmp_path / "dot.png", tmp_path / "sliver.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(dot)
    Image.new("RGB", (200, 31)).save(sliver)
    for call in (det.predict, det.add_templates):
        with pytest.raises(ImageError, match=r"dot.png: 1 x 1 pixels; the shorter side must be at least 32"):
            call([dot])
        with pytest.raises(ImageError, match=r"200 x 31 pixels"):
            call([sliver])
        with pytest.raises(ValueError, match=r"images are 1 x 1 pixels; the shorter side must be at least 32"):
            call(torch.rand(1, 3, 1, 1))
        with pytest.raises(ValueError, match=r"images are 40 x 31 pixels"):
            call([torch.rand(3, 31, 40)])
    assert len(det.bank) == 2
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")  # the documented minimum is accepted
    assert det.predict([tmp_path / "small.png"]).pred_score.shape == (1,)


def test_threshold_gives_labels_and_masks():
    det = _small_detector(threshold=0.0).fit(_images(2, 0))
    result = det.predict(_images(2, 1))
    assert result.pred_label.dtype == torch.bool and result.pred_label.all()
    assert result.pred_mask.shape == (2, 64, 64)


def test_unreadable_and_mis_sized_files_are_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageError, match="broken.png"):
        read_image(bad, 32)
    root = tmp_path / "data"
    build_dataset(root, n_train=2, n_good=1, n_defective=1)
    data = MVTecCategory(root, "brick")
    sample = next(s for s in data.test if s.mask is not None)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(sample.mask)  # a mask of the wrong size
    with pytest.raises(ImageError, match=sample.mask.name):
        data.load_masks([sample], 64)
    with pytest.raises(FileNotFoundError, match="MVTec AD layout"):
        MVTecCategory(root, "no-such-category")


@pytest.fixture(scope="module")
def texture_data(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("textures"), n_train=6, n_good=4, n_defective=4)


def test_real_textures_defects_score_higher(texture_data):
    """Real ImageNet weights on real photographs: painted defects stand out, pixel by pixel too."""
    det = hetmm.HETMM(backbone="tf_efficientnet_lite0", image_size=128, out_size=128)
    data = MVTecCategory(texture_data, "brick")
    det.fit(data.train)
    samples = data.test
    result = det.predict([s.path for s in samples])
    good = [float(r) for r, s in zip(result.pred_score, samples) if s.label == 0]
    bad = [float(r) for r, s in zip(result.pred_score, samples) if s.label == 1]
    assert np.mean(bad) > np.mean(good)
    masks = data.load_masks(samples, 128)
    metrics = evaluate_category(det, data, fit=False)
    assert metrics["pixel_auroc"] > 0.9
    inside = result.anomaly_map[masks > 0].mean()
    outside = result.anomaly_map[masks == 0].mean()
    assert inside > 2 * outside


def test_retrieval_restricted_detector(tmp_path):
    images = _images(6, 0)
    det = _small_detector(retrieval_k=2).fit(images)
    assert det.bank.extras["histogram_counts"].shape[0] == 6
    # a training image retrieves itself, so it still matches perfectly
    assert det.predict(images[4:5]).pred_score.item() < 1e-4
    loaded = hetmm.HETMM.load(det.save(tmp_path / "r.safetensors"), precision="fp32")
    assert loaded.retrieval_k == 2
    assert torch.equal(loaded.bank.extras["codebook_centers"], det.bank.extras["codebook_centers"])
    query = _images(2, 3)
    assert torch.equal(loaded.predict(query).anomaly_map, det.predict(query).anomaly_map)
    newcomer = _images(1, 77)
    det.add_templates(newcomer)
    assert det.bank.extras["histogram_counts"].shape[0] == 7
    assert det.predict(newcomer).pred_score.item() < 1e-4
    with pytest.raises(ValueError, match="retrieval needs templates='all'"):
        _small_detector(retrieval_k=2, templates="pts")


def test_cuda_graph_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        hetmm.HETMM("resnet18", None, image_size=32, device="cpu", cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("half,retrieval_k", [(False, None), (True, None), ("bf16", None), (True, 3)])
def test_cuda_graph_predict_equals_eager(half, retrieval_k):
    normal, test = _images(6, 0), _images(5, 1)  # 5 images in batches of 2: the last batch is padded
    eager = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, device="cuda", half=half, batch_size=2,
                  retrieval_k=retrieval_k).fit(normal)
    graphed = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, device="cuda", half=half, batch_size=2,
                    retrieval_k=retrieval_k, cuda_graph=True)
    graphed.bank = eager.bank
    features = eager.extract(test[:2])
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in features.values())  # pixel-major already
    assert all(f.dtype == eager.feature_dtype for f in features.values())
    want, got = eager.predict(test), graphed.predict(test)
    assert graphed._graphs and next(iter(graphed._graphs.values())).graph is not None, "the capture fell back"
    tol = 1e-5 if half is False else 1e-3  # the same kernels; half precision rounds sums the same way
    torch.testing.assert_close(got.pred_score, want.pred_score, rtol=0, atol=tol)
    torch.testing.assert_close(got.anomaly_map, want.anomaly_map, rtol=0, atol=tol)
    graphed.add_templates(_images(1, 7))  # a grown bank is captured again, not replayed stale
    eager.bank = graphed.bank
    torch.testing.assert_close(graphed.predict(test).pred_score, eager.predict(test).pred_score, rtol=0, atol=tol)


def test_load_takes_every_caller_option_and_keeps_the_banks(tmp_path):
    """HETMM.load builds its options from the bank's configuration (BANK_OPTIONS) and the caller's keywords: any
    other DetectorOptions field passes through, one the bank decides is refused by name."""
    import dataclasses

    from hetmm.detector import BANK_OPTIONS, DetectorOptions

    path = _small_detector(max_templates=7).fit(_images(2, 0)).save(tmp_path / "bank.safetensors")
    callers = {f.name for f in dataclasses.fields(DetectorOptions)} - set(BANK_OPTIONS)
    assert {"precision", "fpr", "threshold", "batch_size", "workers", "prefetch", "cuda_graph"} <= callers
    loaded = hetmm.HETMM.load(path, precision="fp32", prefetch=3, batch_size=5, pixel_fpr=0.2)
    assert (loaded.options.prefetch, loaded.batch_size, loaded.pixel_fpr, loaded.max_templates) == (3, 5, 0.2, 7)
    assert loaded.image_size == 64 and loaded.options.templates == "auto"
    with pytest.raises(TypeError, match=r"\['image_size', 'params'\] are the bank's"):
        hetmm.HETMM.load(path, image_size=128, params=DEFAULT)
    with pytest.raises(TypeError, match="unknown option"):
        hetmm.HETMM.load(path, no_such_option=1)


def test_options_object_and_keyword_overrides():
    options = hetmm.DetectorOptions(image_size=64, out_size=64, precision="fp32", batch_size=3)
    det = hetmm.HETMM("resnet18", None, options, batch_size=2)
    assert (det.image_size, det.out_size, det.precision, det.batch_size) == (64, 64, "fp32", 2)
    assert det.options == hetmm.DetectorOptions(image_size=64, out_size=64, precision="fp32", batch_size=2)
    assert options.batch_size == 3  # the caller's options are not changed
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['imagesize'\].*image_size"):
        hetmm.HETMM("resnet18", None, imagesize=64)


def test_a_16_bit_detector_saves_16_bit_features_and_predicts_the_same(tmp_path):
    det = _small_detector(precision="bf16").fit(_images(4, 0))
    query = _images(2, 5)
    before = det.predict(query)
    path = det.save(tmp_path / "bank.safetensors")
    loaded = hetmm.HETMM.load(path, precision="bf16")
    assert all(t.dtype == torch.bfloat16 for t in loaded.bank.features.values())
    after = loaded.predict(query)
    assert torch.equal(after.pred_score, before.pred_score) and torch.equal(after.anomaly_map, before.anomaly_map)
    float32 = _small_detector().fit(_images(4, 0)).save(tmp_path / "float32.safetensors")
    assert path.stat().st_size < 0.6 * float32.stat().st_size
    loaded.add_templates(_images(1, 7))  # a 16-bit bank grows in its own dtype
    assert len(loaded.bank) == 5 and loaded.bank.features["layer1"].dtype == torch.bfloat16
