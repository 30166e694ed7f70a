"""Aggregation, PTS and the per-pixel OPTICS on the paper's shapes.

Aggregation: three layer maps (64, 32, 16) of a batch of 8 into 256x256 with the published
pixel blur (sigma 4.1, k 39) and the image maximum. PTS: N = 200 templates into 60 sheets.
OPTICS: the per-pixel clustering that feeds PTS, against scikit-learn's OPTICS per pixel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import hetmm_kernels as hk
from conftest import backends, device, record, run


@pytest.mark.parametrize("backend", backends())
def test_aggregate_maps(benchmark, matmul_rate, backend):
    g = torch.Generator().manual_seed(0)
    fores = [torch.rand(8, s, s, generator=g).to(device()) for s in (64, 32, 16)]
    backs = [torch.rand(8, s, s, generator=g).to(device()) for s in (64, 32, 16)]
    args = (fores, backs, [0.3, 0.3, 0.3], [1.0, 1.0, 0.8], 256)
    run(benchmark, lambda: hk.aggregate_maps(*args, blur=(4.1, 39), image_score="max", backend=backend),
         1 if backend == "reference" else 5)
    record(benchmark, None, matmul_rate, torch.float32, op="aggregate_maps", layer="1-3", windows="blur 39",
           batch=8, templates="-", backend=backend, mode="fused")


@pytest.mark.parametrize("side", [16, 64])
@pytest.mark.parametrize("backend", backends())
def test_pts(benchmark, matmul_rate, backend, side):
    if backend == "reference" and side == 64:
        pytest.skip("the reference loops over pixels in Python: timed on 16x16 only")
    g = torch.Generator().manual_seed(0)
    channels = 256 if side == 64 else 1024
    temp = F.normalize(torch.randn(200, channels, side, side, generator=g), dim=1).to(device())
    clus = torch.randint(-1, 6, (200, side, side), generator=g).to(device())
    run(benchmark, lambda: hk.PTS(temp, clus, 60, backend=backend), 1 if backend == "reference" else 3)
    record(benchmark, None, matmul_rate, torch.float32, op="PTS", layer=f"{side}x{side}", windows="-", batch="-",
           templates="200->60", backend=backend, mode="-")


@pytest.mark.parametrize("side", [16, 64])
def test_optics_all_pixels(benchmark, matmul_rate, side):
    from hetmm.clustering import optics_labels

    g = torch.Generator().manual_seed(0)
    temp = F.normalize(torch.randn(200, 256, side, side, generator=g), dim=1).to(device())
    run(benchmark, lambda: optics_labels(temp, 60), 1)
    record(benchmark, None, matmul_rate, torch.float32, op="OPTICS (ours)", layer=f"{side}x{side}", windows="-",
           batch="-", templates=200, backend="torch", mode="all pixels")


def test_optics_sklearn_one_pixel(benchmark, matmul_rate):
    """scikit-learn's OPTICS at one pixel (multiply by H*W for a map)."""
    from sklearn.cluster import OPTICS

    x = F.normalize(torch.randn(200, 256, generator=torch.Generator().manual_seed(0)), dim=1).double().numpy()

    def fit():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            OPTICS(min_samples=3, metric="cosine").fit(x)

    benchmark.pedantic(fit, rounds=3, iterations=1)
    record(benchmark, None, matmul_rate, torch.float32, op="OPTICS (sklearn)", layer="1 pixel", windows="-",
           batch="-", templates=200, backend="sklearn", mode="per pixel")
