"""hetmm inside anomalib: ``Hetmm``, a model anomalib's ``Engine`` fits, tests and predicts with as it does PatchCore.

>>> from anomalib.data import Folder                                         # doctest: +SKIP
>>> from anomalib.engine import Engine                                      # doctest: +SKIP
>>> from hetmm.anomalib import Hetmm                                        # doctest: +SKIP
>>> engine, model = Engine(), Hetmm(backbone="tf_efficientnet_lite0")       # doctest: +SKIP
>>> engine.fit(model=model, datamodule=Folder(name="parts", root="data", normal_dir="good",
...                                           abnormal_dir="defect", mask_dir="mask"))  # doctest: +SKIP

Training-free like PatchCore: one epoch without an optimiser collects the features of the normal
images, the template bank is built at the end of it, and validation, test and predict steps give
``InferenceBatch(pred_score, anomaly_map)``. Everything else (templates, PTS, retrieval, isolation,
precision, the Triton and torch backends) is ``hetmm.HETMM``'s, so scores equal ``hetmm evaluate``'s.
Needs anomalib 2.7 (``pip install -e ".[anomalib]"``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:
    from anomalib import LearningType
    from anomalib.data import Batch, Folder, InferenceBatch
    from anomalib.models.components import AnomalibModule, MemoryBankMixin
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
except ImportError as error:  # pragma: no cover - depends on what is installed
    raise ImportError("hetmm.anomalib needs anomalib 2.7: pip install -e '.[anomalib]' "
                      "(or pip install 'anomalib>=2.7,<2.8')") from error
from torchvision.transforms.v2 import Resize

from .bank import TemplateBank
from .detector import HETMM

def mvtec_folder(category_root, **kwargs) -> Folder:
    """anomalib's ``Folder`` datamodule over one category in the MVTec AD layout, as ``hetmm evaluate`` reads it.

    train/good are the normal training images, test/good and test/<defect> the test images, masks from
    ground_truth/<defect>; validation is the test split (``val_split_mode="same_as_test"``). ``kwargs``
    go to ``Folder`` (batch sizes, workers, ...).
    """
    base = Path(category_root).resolve()  # Folder joins relative folders to its root
    defects = [p for p in sorted((base / "test").iterdir()) if p.is_dir() and p.name != "good"]
    masks = [base / "ground_truth" / p.name for p in defects]
    options = dict(val_split_mode="same_as_test", normal_test_dir=base / "test" / "good", **kwargs)
    return Folder(name=base.name, root=base, normal_dir=base / "train" / "good", abnormal_dir=defects or None,
                  mask_dir=[m for m in masks if m.is_dir()] or None, **options)


# The checkpoint key holding the bank as hetmm's safetensors bytes (checked like a bank file on load).
CHECKPOINT_BANK = "hetmm_bank"


def _checked_images(images: torch.Tensor) -> torch.Tensor:
    """anomalib batches are [B, 3, H, W]; hetmm takes them in [0, 1] (it normalises inside its backbone)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"Hetmm: batch.image must be [B, 3, H, W]; got {tuple(images.shape)}")
    low, high = torch.aminmax(images.detach())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"Hetmm: images must be in [0, 1] (got {low.item():.3g} to {high.item():.3g}); its "
                         "pre-processor only resizes: hetmm normalises inside its backbone. Use "
                         "Hetmm.configure_pre_processor(image_size) rather than one with Normalize")
    return images


def _same_device(a: torch.device, b: torch.device) -> bool:
    """'cuda' and 'cuda:0' are one device (the current one is 0 under Lightning's single-device strategy)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


class HetmmModel(nn.Module):
    """The torch model anomalib calls: images in [0, 1] -> ``InferenceBatch(pred_score, anomaly_map)``.

    The detector is held as a plain attribute, not a submodule: Lightning would move a registered
    network to its device while hetmm's bank and kernels stay where hetmm put them; ``Hetmm``
    moves the whole detector to the trainer's device instead.
    """

    def __init__(self, detector: HETMM) -> None:
        super().__init__()
        self.detector = detector
        self.collected: list[dict] = []

    @torch.no_grad()
    def collect(self, images: torch.Tensor) -> None:
        """Keep the features of a batch of normal images (on the host) for ``build_bank``."""
        features = self.detector.extract(_checked_images(images), progress=False)
        self.collected.append({layer: value.cpu() for layer, value in features.items()})

    def build_bank(self) -> None:
        if not self.collected:
            raise RuntimeError("Hetmm saw no training images: the datamodule's train split must hold the normal images")
        layers = self.collected[0]
        self.detector.fit_features({layer: torch.cat([part[layer] for part in self.collected]) for layer in layers})
        self.collected = []

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        result = self.detector.predict(_checked_images(images))
        maps = result.anomaly_map[:, None]
        if maps.shape[-2:] != images.shape[-2:]:  # anomalib compares maps with masks at the input's size
            maps = F.interpolate(maps, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=result.pred_score.to(images.device), anomaly_map=maps.to(images.device))


class Hetmm(MemoryBankMixin, AnomalibModule):
    """hetmm as an anomalib model: template mutual matching against a bank of normal images.

    Args:
        backbone: a timm model name (``tf_efficientnet_lite0`` has offline ImageNet weights).
        weights: ``"imagenet"``, a checkpoint path, or ``None`` for a seeded random network.
        bank: a bank saved by hetmm (``hetmm fit --out``, ``HETMM.save``, ``Hetmm.save_bank``) to start
            from instead of fitting; it must have been made with this configuration.
        image_size: the side the pre-processor resizes to, and the anomaly map's size.
        **options: any other ``hetmm.DetectorOptions`` field (``params``, ``templates``, ``tsize``,
            ``retrieval_k``, ``precision``, ``batch_size``, ``device``, ...). Without ``device``, hetmm
            runs on the trainer's device.
        pre_processor, post_processor, evaluator, visualizer: as for every anomalib model.
    """

    def __init__(self, backbone: str = "tf_efficientnet_lite0", weights: str | None = "imagenet",
                 bank: str | Path | None = None, image_size: int = 256,
                 pre_processor: nn.Module | bool = True, post_processor: nn.Module | bool = True,
                 evaluator: bool | Any = True, visualizer: bool | Any = True, **options) -> None:
        if pre_processor is True:  # the base class would configure it at anomalib's default size
            pre_processor = self.configure_pre_processor((int(image_size), int(image_size)))
        super().__init__(pre_processor=pre_processor, post_processor=post_processor, evaluator=evaluator,
                         visualizer=visualizer)
        options = {"out_size": int(image_size), **options, "image_size": int(image_size)}
        self._device_pinned = options.get("device") is not None
        if not self._device_pinned:
            options["device"] = "cpu"  # until the trainer says where it runs (_follow_trainer)
        self.model = HetmmModel(HETMM(backbone, weights, **options))
        if bank is not None:
            self.load_bank(bank)

    @property
    def detector(self) -> HETMM:
        return self.model.detector

    # ------------------------------------------------------------------ anomalib's conventions
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize only: hetmm takes images in [0, 1] and normalises inside its backbone."""
        size = tuple(image_size or (256, 256))
        if size[0] != size[1]:
            raise ValueError(f"Hetmm: image_size must be square (hetmm matches square maps); got {size}")
        return PreProcessor(transform=Resize(size, antialias=True))

    @staticmethod
    def configure_post_processor() -> PostProcessor:
        return PostProcessor()

    @staticmethod
    def configure_optimizers() -> None:
        return None  # training-free: nothing to optimise

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        return {"gradient_clip_val": 0, "max_epochs": 1, "num_sanity_val_steps": 0, "devices": 1}

    @property
    def learning_type(self) -> LearningType:
        return LearningType.ONE_CLASS

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> torch.Tensor:
        del args, kwargs
        if not self._is_fitted:  # a bank given at construction (or by a checkpoint) is kept
            self.model.collect(batch.image)
        return torch.tensor(0.0, requires_grad=True, device=self.device)  # Lightning wants a loss

    def fit(self) -> None:
        """Build the template bank from the features the training steps collected (end of the epoch)."""
        self.model.build_bank()

    def validation_step(self, batch: Batch, *args, **kwargs):
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())

    # ------------------------------------------------------------------ device
    def _follow_trainer(self) -> None:
        """Run the detector on the trainer's device (built on the CPU until the trainer has placed us)."""
        if self._device_pinned or _same_device(self.detector.device, self.device):
            return
        old = self.detector
        self.model.detector = HETMM(old.backbone.name, old.backbone.weights, options=old.options, device=self.device)
        self.model.detector.bank = old.bank

    def on_fit_start(self) -> None:
        self._follow_trainer()

    def on_validation_start(self) -> None:
        self._follow_trainer()
        super().on_validation_start()

    def on_test_start(self) -> None:
        self._follow_trainer()

    def on_predict_start(self) -> None:
        self._follow_trainer()

    # ------------------------------------------------------------------ the bank
    def save_bank(self, path) -> Path:
        """Save the template bank as hetmm's safetensors file (``hetmm predict --bank`` reads it)."""
        return self.detector.save(path)

    def load_bank(self, path) -> None:
        """Use a saved bank; it must have been made with this model's configuration (``BankMismatch``)."""
        self.detector.bank = TemplateBank.load(path, expected=self.detector.config)
        self._is_fitted = torch.tensor([True], device=self._is_fitted.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.detector.bank is not None:
            with tempfile.TemporaryDirectory(prefix="hetmm-") as folder:
                checkpoint[CHECKPOINT_BANK] = self.save_bank(Path(folder) / "bank.safetensors").read_bytes()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if CHECKPOINT_BANK in checkpoint:
            with tempfile.TemporaryDirectory(prefix="hetmm-") as folder:
                path = Path(folder) / "bank.safetensors"
                path.write_bytes(checkpoint[CHECKPOINT_BANK])
                self.load_bank(path)

    # ------------------------------------------------------------------ export
    def _refuse_export(self, *_, **__):
        raise NotImplementedError(
            "Hetmm cannot be exported by anomalib (to_torch / to_onnx / to_openvino): its matching runs custom "
            "kernels over a template bank that tracing does not capture. Save the bank (model.save_bank(path)) "
            "and serve it with hetmm (hetmm.HETMM.load(path), or `hetmm predict --bank path`)")

    to_torch = to_onnx = to_openvino = _refuse_export
