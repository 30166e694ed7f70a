"""CPR retrieval: block histograms on the paper's layer-2 shape, top-K over banks of 200 to 1M images.

The bank is compact (uint8 counts: 25 blocks x 13 bins = 325 bytes an image); the table's
GFLOP/s column is left empty and the bank streaming rate is reported in GB/s in the mode column, on
the CPU beside the fraction of this machine's read bandwidth measured in the same run (a float32 sum
over 512 MiB, ``read_rate``). ``torch`` on the CPU is the compiled scan (``hetmm_kernels.cpu_ops``);
``torch-elementwise`` the elementwise torch path it replaced (still the path without numba);
``published-style`` the reconstruction of CPR's retrieval in ``published_retrieval.py`` (float bank).
"""

from __future__ import annotations

import time

import pytest
import torch

import hetmm_kernels as hk
import published_retrieval
from conftest import backends, device, record, run

BLOCKS, BINS = 25, 13


@pytest.mark.parametrize("backend", backends())
def test_block_histograms(benchmark, matmul_rate, backend):
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(8, 512, 32, 32, generator=g), dim=1).to(device())
    centers = torch.randn(12, 512, generator=g).to(device())
    run(benchmark, lambda: hk.block_histograms(feats, centers, 5, backend=backend), 1 if backend == "reference" else 3)
    record(benchmark, None, matmul_rate, torch.float32, op="block_histograms", layer="layer2", windows="S=5",
           batch=8, templates="-", backend=backend, mode="-")


def _random_bank(entries: int, seed: int) -> hk.HistogramBank:
    g = torch.Generator().manual_seed(seed)
    area = 49  # 7x7 blocks
    cuts = torch.randint(0, area + 1, (entries, BLOCKS, BINS - 1), generator=g).sort(dim=-1).values
    edges = torch.cat([torch.zeros(entries, BLOCKS, 1, dtype=torch.long), cuts,
                       torch.full((entries, BLOCKS, 1), area)], dim=-1)
    return hk.HistogramBank(edges.diff(dim=-1).to(torch.uint8).to(device()), area)


@pytest.fixture(scope="session")
def read_rate() -> float | None:
    """Bytes/s this CPU reads (median of 5 float32 sums over 512 MiB); None on a GPU run."""
    if device().type != "cpu":
        return None
    data = torch.ones(1 << 27)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / sorted(times)[2]


def _elementwise(query, bank, k):
    from hetmm_kernels.torch_ops import retrieval

    return retrieval.retrieve_topk(query, bank.counts, bank.area, k, 0.8, "kl")


@pytest.mark.parametrize("entries", [200, 10_000, 200_000, 1_000_000])
@pytest.mark.parametrize("queries", [1, 32])
@pytest.mark.parametrize("backend", backends() + (["torch-elementwise", "published-style"] if device().type == "cpu" else []))
def test_retrieve_topk(benchmark, matmul_rate, read_rate, backend, queries, entries):
    if backend == "reference" and entries > 200:
        pytest.skip("the reference loops over pairs in Python: timed on 200 entries only")
    if backend == "published-style" and entries * queries > 200_000:
        pytest.skip("the published-style baseline is timed up to 200,000 pairs")
    bank = _random_bank(entries, 0)
    query = _random_bank(queries, 1).histograms()
    if backend == "torch-elementwise":
        call = lambda: _elementwise(query, bank, 10)  # noqa: E731
    elif backend == "published-style":
        float_bank = bank.histograms()  # the published code keeps float histograms
        call = lambda: published_retrieval.retrieve_topk(query, float_bank, 10)  # noqa: E731
    else:
        call = lambda: hk.retrieve_topk(query, bank, 10, backend=backend)  # noqa: E731
        if backend != "reference":
            call()  # the first call builds the bank's layout (tiles on the CPU, padded blocks on a GPU) and compiles
    run(benchmark, call, 1 if entries > 10_000 else 3)
    if backend in ("torch-elementwise", "published-style"):  # the same top 10 as the op's
        assert torch.equal(call()[1].cpu(), hk.retrieve_topk(query, bank, 10, backend="torch")[1].cpu())
    seconds = benchmark.stats.stats.median
    rate = bank.counts.numel() / seconds
    of_read = f" = {rate / read_rate:.1%} of {read_rate / 1e9:.0f} GB/s read" if read_rate else ""
    record(benchmark, None, matmul_rate, torch.uint8, op="retrieve_topk", layer=f"R={entries}", windows="k=10",
           batch=queries, templates="-", backend=backend, mode=f"{rate / 1e9:.2f} GB/s{of_read}")
