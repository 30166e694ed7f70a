"""Images and the MVTec AD folder layout.

``<root>/<category>/train/good/*.png`` are normal training images;
``<root>/<category>/test/<defect>/*.png`` test images (``good`` is normal);
``<root>/<category>/ground_truth/<defect>/<name>_mask.png`` their masks.
VisA, BTAD and MVTec LOCO can be arranged the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ImageError(ValueError):
    """An image or mask that cannot be used, named by its file."""


def read_image(path, size: int) -> torch.Tensor:
    """RGB image resized to ``size x size``: float ``[3, size, size]`` in [0, 1]."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except Exception as error:
        raise ImageError(f"cannot read image {path}: {error}") from None
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def read_mask(path, size: int, image_size: tuple | None = None) -> torch.Tensor:
    """Binary mask resized (nearest) to ``size x size``; ``image_size`` (w, h) must match the mask's."""
    try:
        with Image.open(path) as img:
            if image_size is not None and img.size != tuple(image_size):
                raise ImageError(f"mask {path} is {img.size[0]}x{img.size[1]}, its image is {image_size[0]}x{image_size[1]}")
            img = img.convert("L").resize((size, size), Image.NEAREST)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"cannot read mask {path}: {error}") from None
    return torch.from_numpy((np.asarray(img) > 127).astype(np.float32))


def image_files(folder) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


@dataclass
class Sample:
    path: Path
    label: int  # 1 = anomalous
    defect: str
    mask: Path | None


class MVTecCategory:
    """One category of an MVTec-layout dataset."""

    def __init__(self, root, category: str):
        self.root = Path(root) / category
        self.category = category
        if not (self.root / "train" / "good").is_dir():
            raise FileNotFoundError(f"data: {self.root / 'train' / 'good'} does not exist (expected the MVTec AD layout)")

    @property
    def train(self) -> list[Path]:
        files = image_files(self.root / "train" / "good")
        if not files:
            raise FileNotFoundError(f"data: no images in {self.root / 'train' / 'good'}")
        return files

    @property
    def test(self) -> list[Sample]:
        samples = []
        test_root = self.root / "test"
        for defect in sorted(p.name for p in test_root.iterdir() if p.is_dir()) if test_root.is_dir() else []:
            for path in image_files(test_root / defect):
                if defect == "good":
                    samples.append(Sample(path, 0, defect, None))
                    continue
                mask = self.root / "ground_truth" / defect / f"{path.stem}_mask.png"
                samples.append(Sample(path, 1, defect, mask if mask.is_file() else None))
        if not samples:
            raise FileNotFoundError(f"data: no test images under {test_root}")
        return samples

    def load_masks(self, samples: list[Sample], size: int) -> torch.Tensor:
        """Masks ``[N, size, size]`` for ``samples`` (zeros for normal images)."""
        out = torch.zeros(len(samples), size, size)
        for i, s in enumerate(samples):
            if s.mask is not None:
                with Image.open(s.path) as img:
                    image_size = img.size
                out[i] = read_mask(s.mask, size, image_size)
        return out
