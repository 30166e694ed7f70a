"""The whole predict, end to end: backbone, matching, aggregation, post-processing, results on the host.

On a GPU: Wide-ResNet-101-2 at 256x256 (random weights: the same work as ImageNet ones),
half precision, channels-last, the batch's GPU work replayed from a CUDA graph (and, at batch 1,
without one, to show what the launches cost); against
PTS-60 (60 templates) and all N = 200 templates, at batch 1 and 32. On the CPU, where that
backbone alone takes seconds per batch, tf_efficientnet_lite0 stands in at batch 1 and 8.
Templates are random unit features of the backbone's shapes (what they are does not change
the work). The mode column gives images per second.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import device, record, run
from hetmm.bank import TemplateBank
from hetmm.detector import HETMM

GPU = torch.cuda.is_available()
BACKBONE = "wide_resnet101_2" if GPU else "tf_efficientnet_lite0"
BATCHES = [1, 32] if GPU else [1, 8]
TEMPLATES = {"PTS-60": 60, "all N=200": 200}


def _median(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_DETECTORS: list[HETMM] = []  # one backbone for every case: building Wide-ResNet-101-2 takes seconds


def _detector(batch: int, templates: int) -> HETMM:
    if not _DETECTORS:
        _DETECTORS.append(HETMM(BACKBONE, None, image_size=256, out_size=256, device=device(), half=GPU))
    det = _DETECTORS[0]
    det.batch_size = batch  # a new batch size or bank is captured anew
    shapes = {k: v.shape[1:] for k, v in det.extract(torch.zeros(1, 3, 256, 256, device=device())).items()}
    g = torch.Generator().manual_seed(0)
    det.bank = TemplateBank({k: F.normalize(torch.randn(templates, *s, generator=g), dim=1) for k, s in shapes.items()},
                            det.config)
    return det


@pytest.mark.parametrize("graph", [True, False] if GPU else [False])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("bank", list(TEMPLATES))
def test_predict_end_to_end(benchmark, matmul_rate, bank, batch, graph):
    if GPU and not graph and (batch, bank) != (1, "PTS-60"):
        pytest.skip("eager launches are timed once, where they cost the most: batch 1")
    det = _detector(batch, TEMPLATES[bank])
    det.cuda_graph = graph
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(device())
    det.predict(images)  # capture (GPU) and warm caches outside the timing
    run(benchmark, lambda: det.predict(images), 5 if GPU else 2)
    per_second = batch / benchmark.stats.stats.median
    record(benchmark, None, matmul_rate, det.feature_dtype, op="predict", layer=f"{BACKBONE} 256px",
           windows=det.params_string.split(";")[0], batch=batch, templates=bank, backend="triton" if GPU else "torch",
           mode=f"{per_second:.1f} images/s" + (", CUDA graph" if graph else ""))


@pytest.mark.skipif(GPU, reason="the CPU split; on a GPU the CUDA-graph rows above are the figure")
@pytest.mark.parametrize("batch", [1, 8])
def test_predict_split_on_the_cpu(benchmark, matmul_rate, batch, tmp_path):
    """Where one predict batch's time goes: decode, backbone, matching, aggregation, rest.

    The demo textures (256 px PNGs), 40 normal templates, ``hetmm.DEFAULT`` and the default
    precision (bfloat16 on CPUs that have it). Each part is timed on its own (median of 5);
    "rest" is the whole predict from files less the four parts.
    """
    from hetmm.data import read_image
    from hetmm.demo import build_dataset
    from hetmm.detector import HETMM as Detector

    root = build_dataset(tmp_path, n_train=40, n_good=4, n_defective=4)
    train = sorted((root / "brick" / "train" / "good").glob("*.png"))
    paths = sorted((root / "brick" / "test").rglob("*.png"))[:batch]
    det = Detector("tf_efficientnet_lite0", batch_size=batch).fit(train)

    median = _median

    images = torch.stack([read_image(p, det.image_size) for p in paths])
    features = det.backbone(images)
    matches = det.match(features)
    size = (det.out_size, det.out_size)
    parts = {
        "decode": median(lambda: [read_image(p, det.image_size) for p in paths]),
        "backbone": median(lambda: det.backbone(images)),
        "matching": median(lambda: det.match(features)),
        "aggregation": median(lambda: (matches.image_scores(size, det.params.image),
                                       matches.aggregate(size, det.params.pixel))),
    }
    run(benchmark, lambda: det.predict(paths), 5)
    total = benchmark.stats.stats.median
    parts["rest"] = max(0.0, total - sum(parts.values()))
    split = ", ".join(f"{name} {seconds * 1e3:.1f}" for name, seconds in parts.items())
    record(benchmark, None, matmul_rate, det.feature_dtype, op="predict split", layer="tf_efficientnet_lite0 256px",
           windows=det.params_string.split(";")[0], batch=batch, templates="N=40", backend="torch",
           mode=f"{batch / total:.1f} images/s from files; ms: {split}")


@pytest.mark.skipif(GPU, reason="the CPU decoding rates")
@pytest.mark.parametrize("source", ["256px PNG", "1024px PNG", "1024px JPEG"])
def test_decoding_ahead_of_the_model(benchmark, matmul_rate, source, tmp_path):
    """Decode-only rate per thread count, compute-only rate (pre-decoded tensors) and predict from files
    without (workers=0), with decoding threads and with the measured choice (workers=None, the CPU default),
    batch 8, lite0, 32 images of ``source``; the bound is what the cores allow (``hetmm.data.choose_workers``)."""
    from PIL import Image

    from hetmm.data import prefetched, read_image
    from hetmm.demo import build_dataset
    from hetmm.detector import HETMM as Detector

    root = build_dataset(tmp_path / "demo", n_train=16, n_good=16, n_defective=16)
    train = sorted((root / "brick" / "train" / "good").glob("*.png"))
    side, suffix = (256, ".png") if source.startswith("256") else (1024, ".png" if "PNG" in source else ".jpg")
    paths = []
    for i, p in enumerate(sorted((root / "brick" / "test").rglob("*.png"))[:32]):
        out = tmp_path / f"{i:02d}{suffix}"
        with Image.open(p) as img:
            img.convert("RGB").resize((side, side), Image.BICUBIC).save(out, quality=95)
        paths.append(out)
    det = Detector("tf_efficientnet_lite0", batch_size=8, workers=0).fit(train)

    median = lambda fn: _median(fn, 3)  # noqa: E731

    rates = {}
    for workers in (1, 2):
        chunks = [paths[i:i + 8] for i in range(0, len(paths), 8)]
        seconds = median(lambda: list(prefetched(chunks, lambda c: [read_image(p, 256) for p in c], workers, 2)))
        rates[f"decode {workers} thread{'s' * (workers > 1)}"] = len(paths) / seconds
    images = torch.stack([read_image(p, 256) for p in paths])
    rates["compute only"] = len(paths) / median(lambda: det.predict(images))
    for workers in (0, 1, 2, None):
        det.workers = workers
        rates[f"from files, workers={'auto' if workers is None else workers}"] = \
            len(paths) / median(lambda: det.predict(paths))
    # what the cores allow with decoding perfectly overlapped: cores / (cores / compute rate + one core's decode)
    cores = os.cpu_count() or 1
    rates["bound"] = cores / (cores / rates["compute only"] + 1 / rates["decode 1 thread"])
    rates["auto share of bound %"] = 100 * rates["from files, workers=auto"] / rates["bound"]
    rates["auto chose"] = det.decoding["workers"]
    run(benchmark, lambda: det.predict(paths), 1)
    summary = ", ".join(f"{name} {value:.1f}" for name, value in rates.items())
    record(benchmark, None, matmul_rate, det.feature_dtype, op="decode ahead", layer=source, windows="-", batch=8,
           templates="N=16", backend="torch", mode=f"images/s: {summary}")
