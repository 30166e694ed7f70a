"""Images and the MVTec AD folder layout.

``<root>/<category>/train/good/*.png`` are normal training images;
``<root>/<category>/test/<defect>/*.png`` test images (``good`` is normal);
``<root>/<category>/ground_truth/<defect>/<name>_mask.png`` their masks.
VisA, BTAD and MVTec LOCO can be arranged the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


# Shorter sides below this are refused: such an image resized to the network's size is a few flat colours,
# scored as a confident defect when predicted and a meaningless template when added.
MIN_SIDE = 32


class ImageError(ValueError):
    """An image or mask that cannot be used, named by its file."""


# JPEGs at least twice the target size are decoded at a reduced scale (libjpeg's DCT scaling), then
# resized: 2-4x faster for 1024 px JPEGs read at 256 (accuracy effect: README, "Decoding")
JPEG_DRAFT = True
# Pillow modes holding more than 8 bits per pixel, and the value that means white in each
WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


def read_image(path, size: int) -> torch.Tensor:
    """RGB image resized to ``size x size``: float ``[3, size, size]`` in [0, 1].

    EXIF orientation is applied. 16-bit images (Pillow modes ``I;16*``, ``I``) are read at their
    full range (65535 is white; ``convert("RGB")`` would clip them to white), float images (``F``)
    must already lie in [0, 1]; palette, grey and alpha images are converted to RGB.
    """
    try:
        with Image.open(path) as img:
            if min(img.size) < MIN_SIDE:
                raise ImageError(f"image {path}: {img.size[0]} x {img.size[1]} pixels; the shorter side must be at "
                                 f"least {MIN_SIDE}")
            if JPEG_DRAFT and img.format == "JPEG" and min(img.size) >= 2 * size:
                img.draft("RGB", (size, size))  # DCT-scaled decoding: 1/2 to 1/8 of the pixels, still >= size
            img = ImageOps.exif_transpose(img)
            if img.mode in WIDE_MODES or img.mode == "F":
                values = np.asarray(img, dtype=np.float32)
                values = values / WIDE_MODES[img.mode] if img.mode in WIDE_MODES else values
                if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
                    raise ImageError(f"image {path}: {img.mode} pixel values must lie in [0, 1] "
                                     f"(got {values.min():.4g} to {values.max():.4g})")
                grey = Image.fromarray(values, mode="F").resize((size, size), Image.BILINEAR)
                grey = np.clip(np.asarray(grey, dtype=np.float32), 0, 1)
                return torch.from_numpy(np.repeat(grey[None], 3, axis=0))
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"cannot read image {path}: {error}") from None
    # times 1/255 as torchvision's to_dtype(scale=True) does (not / 255, which rounds differently in the last
    # bit): a file read here equals the same file read by torchvision or anomalib, bit for bit. In numpy, not
    # torch: the service decodes on request threads, which must start no OpenMP team (hetmm.serve)
    pixels = np.asarray(img, dtype=np.uint8).astype(np.float32) * np.float32(1.0 / 255)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_mask(path, size: int, image_size: tuple | None = None) -> torch.Tensor:
    """Binary mask resized (nearest) to ``size x size``: every non-zero pixel is defect.

    That reads 0/255, 0/1 and grey-level (anti-aliased) masks alike; palette masks by their index
    (0 is background). ``image_size`` (w, h) must match the mask's; EXIF orientation is applied.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if image_size is not None and img.size != tuple(image_size):
                raise ImageError(f"mask {path} is {img.size[0]}x{img.size[1]}, its image is {image_size[0]}x{image_size[1]}")
            values = np.asarray(img)
            if values.ndim == 3:  # RGB(A) masks: any non-zero colour channel
                values = values[..., :3].max(axis=2) if img.mode != "LA" else values[..., 0]
            defect = Image.fromarray((values > 0).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    except ImageError:
        raise
    except Exception as error:
        raise ImageError(f"cannot read mask {path}: {error}") from None
    return torch.from_numpy((np.asarray(defect) > 0).astype(np.float32))


def prefetched(chunks, load, workers: int = 0, prefetch: int = 2):
    """``load(chunk)`` for each chunk, in order, computed up to ``prefetch`` chunks ahead by ``workers`` threads.

    Pillow releases the GIL while it decodes and resizes, so threads overlap decoding with the model;
    the lookahead is bounded, so memory stays flat however many images there are. ``workers=0`` loads
    in the caller's thread. An error in a load is raised when its chunk's turn comes.
    """
    if workers <= 0:
        for chunk in chunks:
            yield load(chunk)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hetmm-decode") as pool:
        pending = deque()
        iterator = iter(chunks)
        try:
            for chunk in iterator:
                pending.append(pool.submit(load, chunk))
                if len(pending) > prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # stopped early (an error, a closed generator): drop what is queued
                future.cancel()


# Decoding threads are worth their contention only when decoding in the caller's thread leaves the pipeline
# below this share of what the cores allow (measured on 2 cores: a thread cost 9-11% on 256 px PNGs, where
# serial decoding already reaches ~95% of the bound, and gained 15-42% on 1024 px PNGs, where it reaches ~60%).
SERIAL_SHARE = 0.9
PROBE_CHUNKS = 1  # chunks decoded in the caller's thread and timed before the choice, in every call


def choose_workers(decode: float, compute: float, cores: int) -> int:
    """Decoding threads for a pipeline whose model takes ``compute`` seconds an item on all ``cores`` cores and
    whose decoding takes one core ``decode`` seconds an item.

    Perfectly overlapped, the cores allow one item per ``decode / cores + compute`` seconds; decoding in the
    caller's thread gives one per ``decode + compute``. None when that reaches ``SERIAL_SHARE`` of the bound,
    else enough threads to decode at the bound's rate, at most ``cores``.

    >>> choose_workers(decode=0.001, compute=0.008, cores=2), choose_workers(decode=0.025, compute=0.008, cores=2)
    (0, 2)
    """
    if decode <= 0 or cores < 1:
        return 0
    bound = decode / cores + compute
    if bound >= SERIAL_SHARE * (decode + compute):
        return 0
    return max(1, min(cores, math.ceil(decode / bound)))


def measured_prefetched(chunks, load, prefetch: int = 2, cores: int | None = None, report=None):
    """``prefetched`` with its threads chosen from measurement (``choose_workers``).

    The first ``PROBE_CHUNKS`` chunks are loaded in the caller's thread, each timed (one core's seconds per
    item), and so is the time the caller takes before it asks for the next chunk (the model's seconds per
    item, on every core); the smallest of each decides the threads for the rest. (A model's first call
    includes its warm-up: a slower model, so fewer threads than the bound asks for, never more.)
    ``report(decode, compute, workers)`` (optional) hears the choice.
    """
    import os
    import time

    cores = cores or os.cpu_count() or 1
    chunks = iter(chunks)
    decode, compute = [], []
    for _ in range(PROBE_CHUNKS):
        chunk = next(chunks, None)
        if chunk is None:
            return
        start = time.perf_counter()
        loaded = load(chunk)
        decode.append((time.perf_counter() - start) / max(1, len(chunk)))
        start = time.perf_counter()
        yield loaded
        compute.append((time.perf_counter() - start) / max(1, len(chunk)))
    workers = choose_workers(min(decode), min(compute), cores)
    if report is not None:
        report(min(decode), min(compute), workers)
    yield from prefetched(chunks, load, workers, prefetch)


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
                samples.append(Sample(path, 1, defect, self.root / "ground_truth" / defect / f"{path.stem}_mask.png"))
        if not samples:
            raise FileNotFoundError(f"data: no test images under {test_root}")
        return samples

    @staticmethod
    def missing_masks(samples: list[Sample]) -> list[Path]:
        """The mask files of defect samples that do not exist."""
        return [s.mask for s in samples if s.label == 1 and (s.mask is None or not Path(s.mask).is_file())]

    def load_masks(self, samples: list[Sample], size: int, allow_missing: bool = False) -> torch.Tensor:
        """Masks ``[N, size, size]`` for ``samples`` (zeros for normal images).

        A defect image without its mask would count as all-normal pixels: an error naming the file,
        unless ``allow_missing`` (its mask is then all zeros: leave it out of pixel metrics, as
        ``hetmm.evaluation`` does).
        """
        missing = set(self.missing_masks(samples))
        if missing and not allow_missing:
            raise ImageError(missing_masks_message(sorted(missing)))
        out = torch.zeros(len(samples), size, size)
        for i, s in enumerate(samples):
            if s.label == 1 and s.mask not in missing:
                with Image.open(s.path) as img:
                    image_size = ImageOps.exif_transpose(img).size
                out[i] = read_mask(s.mask, size, image_size)
        return out


def missing_masks_message(missing: list) -> str:
    shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"{len(missing)} defect image(s) have no mask ({shown}); every defect image needs "
            "ground_truth/<defect>/<name>_mask.png (or --allow-missing-masks to leave them out of the pixel metrics)")
