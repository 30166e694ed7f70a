"""An offline end-to-end demo on real photographs with painted-in defects.

scikit-image ships CC0 texture photographs (``brick``, ``grass``, ``gravel``). Normal
images are crops from the upper part of each photograph, test images crops from the
lower part; half of the test crops get a defect painted in by the code below (a scratch,
a blob of foreign intensity, a patch cut from another texture, or a bright/dark spot),
with its ground-truth mask. The result is written in the MVTec AD layout, so the same
loader, detector and metrics run on it as on the real benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TEXTURES = ("brick", "grass", "gravel")
DEFECTS = ("scratch", "blob", "patch", "spot")
CROP = 176
SPLIT_ROW = 300  # train crops come from rows above, test crops from rows below


def _texture(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)().astype(np.float32) / 255
    return image if image.ndim == 2 else image.mean(axis=2)


def _crop(image: np.ndarray, rng: np.random.Generator, rows: tuple[int, int]) -> np.ndarray:
    y = rng.integers(rows[0], rows[1] - CROP + 1)
    x = rng.integers(0, image.shape[1] - CROP + 1)
    return image[y:y + CROP, x:x + CROP].copy()


def _ellipse_mask(rng, shape, r_min, r_max) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = rng.integers(r_max, shape[0] - r_max, size=2)
    ry, rx = rng.uniform(r_min, r_max, size=2)
    angle = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator, other: np.ndarray):
    """Return (defective image, boolean mask) for one defect ``kind``."""
    out = image.copy()
    h, w = image.shape
    if kind == "scratch":
        yy, xx = np.mgrid[:h, :w]
        y0, x0 = rng.uniform(0.2, 0.8, size=2) * (h, w)
        angle, length, width = rng.uniform(0, np.pi), rng.uniform(0.3, 0.55) * h, rng.uniform(1.5, 3.0)
        along = (xx - x0) * np.cos(angle) + (yy - y0) * np.sin(angle)
        across = -(xx - x0) * np.sin(angle) + (yy - y0) * np.cos(angle)
        mask = (np.abs(along) <= length / 2) & (np.abs(across) <= width)
        out[mask] = 0.95 if image.mean() < 0.5 else 0.05
    elif kind == "blob":
        mask = _ellipse_mask(rng, (h, w), 8, 18)
        out[mask] = np.clip(rng.uniform(0.0, 1.0) + 0.05 * rng.standard_normal(mask.sum()), 0, 1)
    elif kind == "patch":
        mask = _ellipse_mask(rng, (h, w), 12, 24)
        out[mask] = _crop(other, rng, (0, other.shape[0]))[mask]
    elif kind == "spot":
        mask = _ellipse_mask(rng, (h, w), 10, 20)
        out[mask] = np.clip(out[mask] + (0.35 if image.mean() < 0.5 else -0.35), 0, 1)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {DEFECTS}")
    return out, mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).convert("RGB").save(path)


def build_dataset(root, n_train: int = 16, n_good: int = 8, n_defective: int = 12, seed: int = 0) -> Path:
    """Write the demo dataset under ``root`` in the MVTec AD layout; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for index, name in enumerate(TEXTURES):
        image = _texture(name)
        other = _texture(TEXTURES[(index + 1) % len(TEXTURES)])
        base = root / name
        for i in range(n_train):
            _save(_crop(image, rng, (0, SPLIT_ROW)), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good):
            _save(_crop(image, rng, (SPLIT_ROW, image.shape[0])), base / "test" / "good" / f"{i:03d}.png")
        for i in range(n_defective):
            kind = DEFECTS[i % len(DEFECTS)]
            defective, mask = paint_defect(_crop(image, rng, (SPLIT_ROW, image.shape[0])), kind, rng, other)
            _save(defective, base / "test" / kind / f"{i:03d}.png")
            mask_path = base / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    return root
