"""CPR retrieval: block histograms on the paper's layer-2 shape, top-K over banks of 200 to 1M images.

The bank is compact (uint8 counts: 25 blocks x 13 bins = 325 bytes an image); the table's
GFLOP/s column is left empty and the bank streaming rate is reported in GB/s in the mode column.
"""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
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


@pytest.mark.parametrize("entries", [200, 10_000, 1_000_000])
@pytest.mark.parametrize("queries", [1, 32])
@pytest.mark.parametrize("backend", backends())
def test_retrieve_topk(benchmark, matmul_rate, backend, queries, entries):
    if backend == "reference" and entries > 200:
        pytest.skip("the reference loops over pairs in Python: timed on 200 entries only")
    bank = _random_bank(entries, 0)
    query = _random_bank(queries, 1).histograms()
    run(benchmark, lambda: hk.retrieve_topk(query, bank, 10, backend=backend), 1 if entries > 10_000 else 3)
    seconds = benchmark.stats.stats.median
    rate = bank.counts.numel() / seconds / 1e9
    record(benchmark, None, matmul_rate, torch.uint8, op="retrieve_topk", layer=f"R={entries}", windows="k=10",
           batch=queries, templates="-", backend=backend, mode=f"{rate:.2f} GB/s")
