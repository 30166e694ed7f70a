"""CPR retrieval ops on every backend against the reference, and retrieval-restricted matching."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import reference
from helpers import BACKENDS, assert_matches, device_for, features


def _codebook(n, c, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,c,h,w,n,S", [
    pytest.param(2, 8, 13, 13, 12, 5, id="H-not-a-multiple-of-S"),
    pytest.param(1, 70, 10, 10, 12, 5, id="C-over-a-block"),
    pytest.param(2, 3, 1, 1, 4, 5, id="1x1-map-1x1-blocks"),
    pytest.param(1, 5, 3, 4, 5, 7, id="S-larger-than-H"),
    pytest.param(1, 4, 12, 7, 3, 2, id="non-square"),
])
def test_block_histograms(backend, b, c, h, w, n, S):
    device = device_for(backend)
    feats = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    centers = _codebook(n, c).to(device)
    hist, codes = hk.block_histograms(feats, centers, S, return_codes=True, backend=backend)
    ref_hist, ref_codes = reference.block_histograms(feats.cpu(), centers.cpu(), S, return_codes=True)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.allclose(hist.cpu(), ref_hist, atol=1e-6)
    assert torch.allclose(hist.sum(-1).cpu(), torch.ones(hist.shape[:2]), atol=1e-5)


def test_histograms_match_the_published_unfold():
    """The published encoder: nn.Unfold(block, stride=block, padding=block*S-size) of ids + 1, one-hot mean."""
    feats, centers = torch.randn(2, 6, 16, 16), _codebook(12, 6)
    codes = reference.nearest_codes(feats, centers)
    block = -(-16 // 5)
    unfolded = torch.nn.Unfold(block, stride=block, padding=block * 5 - 16)(codes[:, None].float() + 1).long()
    expected = torch.nn.functional.one_hot(unfolded, 13).float().mean(1)
    assert torch.allclose(hk.block_histograms(feats, centers), expected)


def _bank(r=24, q=2, side=10, seed=0):
    centers = _codebook(12, 8, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bank = reference.block_histograms(torch.randn(r, 8, side, side, generator=g), centers)
    query = reference.block_histograms(torch.randn(q, 8, side, side, generator=g), centers)
    return query, bank


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["kl", "l2"])
@pytest.mark.parametrize("compact", [True, False])
def test_retrieve_topk(backend, method, compact):
    query, bank = _bank()
    device = device_for(backend)
    area = 4  # 10x10 map, S = 5: 2x2 blocks
    store = hk.HistogramBank.from_histograms(bank.to(device), area) if compact else bank.to(device)
    dist, idx = hk.retrieve_topk(query.to(device), store, 5, method=method, backend=backend)
    ref_dist, ref_idx = reference.retrieve_topk(query, bank, 5, method=method)
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.allclose(dist.cpu(), ref_dist, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["kl", "l2"])
@pytest.mark.parametrize("l_ratio", [1.0, 0.75, 0.5, 0.25])  # 0, 7, 13 or 19 of the 25 blocks left out
@pytest.mark.parametrize("q,r,k", [(1, 40, 3), (3, 150, 10), (20, 70, 40)])
def test_retrieve_topk_trimmed_and_across_bank_blocks(backend, method, l_ratio, q, r, k):
    """Trimming at every ratio, banks of several kernel blocks, k beyond one block's candidates.

    Histograms of 4-pixel blocks take few values, so many entries lie at (nearly) equal distances and
    rounding may order them differently: a correct top-k is checked instead of equal indices. Every
    returned entry's reference distance equals the distance returned for it, the distances equal the
    reference's k smallest, and no entry comes twice (tolerance 1e-5)."""
    query, bank = _bank(q=q, r=r)
    device = device_for(backend)
    store = hk.HistogramBank.from_histograms(bank.to(device), 4)
    dist, idx = hk.retrieve_topk(query.to(device), store, k, l_ratio=l_ratio, method=method, backend=backend)
    dist, idx = dist.cpu(), idx.cpu()
    every = reference.histogram_distances(query, bank, l_ratio, method)
    ref_dist, _ = reference.retrieve_topk(query, bank, k, l_ratio=l_ratio, method=method)
    assert torch.allclose(dist, ref_dist, rtol=1e-5, atol=1e-5)
    assert torch.allclose(every.gather(1, idx), dist, rtol=1e-5, atol=1e-5)
    assert all(len(set(row)) == k for row in idx.tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_own_histogram_first_and_ties_by_index(backend):
    _, bank = _bank(r=12)
    bank = torch.cat([bank, bank[3:4]])  # entry 12 duplicates entry 3
    device = device_for(backend)
    dist, idx = hk.retrieve_topk(bank[3:4].to(device), bank.to(device), 3, backend=backend)
    assert idx[0, :2].tolist() == [3, 12]  # itself first, the tie after by index
    assert dist[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    dist, idx = hk.retrieve_topk(bank.to(device), bank.to(device), 1, backend=backend)
    assert idx[:12, 0].cpu().tolist() == list(range(12))


def test_compact_bank_is_small():
    _, bank = _bank()
    store = hk.HistogramBank.from_histograms(bank, 4)
    assert store.counts.dtype == torch.uint8 and len(store) == 24
    assert torch.allclose(store.histograms(), bank)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mutual_match_with_per_query_templates(backend):
    device = device_for(backend)
    query, temp = features(3, 12, 7, 6, device=device), features(6, 12, 7, 6, device=device, seed=1)
    indices = torch.tensor([[5, 0], [2, 2], [1, 4]], device=device)
    fore, back = hk.mutual_match(query, temp, 5, 3, indices=indices, backend=backend)
    ref_fore, ref_back = reference.mutual_match_subset(query.cpu(), temp.cpu(), 5, 3, indices.cpu())
    assert_matches(fore, ref_fore, 12)
    assert_matches(back, ref_back, 12)
    # a query matched against only itself among the templates matches perfectly
    same = hk.mutual_match(temp[:2], temp, 3, 3, indices=torch.tensor([[0], [1]], device=device), backend=backend)
    assert torch.allclose(same[0].cpu(), torch.ones(2, 7, 6), atol=1e-5)


@pytest.mark.parametrize("call,error,words", [
    (lambda q, b: hk.retrieve_topk(q, b, 25), ValueError, "between 1 and the bank size 24"),
    (lambda q, b: hk.retrieve_topk(q, b[:0], 1), ValueError, "bank_hist is empty"),
    (lambda q, b: hk.retrieve_topk(q * 2, b, 1), ValueError, "normalised histograms"),
    (lambda q, b: hk.retrieve_topk(q, b[:, :20], 1), ValueError, "L and bins must match"),
    (lambda q, b: hk.retrieve_topk(q[..., :5], b, 1), ValueError, "normalised"),
    (lambda q, b: hk.retrieve_topk(q, b, 1, method="cos"), ValueError, "method must be"),
    (lambda q, b: hk.retrieve_topk(q, b, 1, l_ratio=0.01), ValueError, "l_ratio"),
    (lambda q, b: hk.HistogramBank.from_histograms(b, 3), ValueError, "multiples of 1/area"),
    (lambda q, b: hk.block_histograms(torch.randn(1, 4, 5, 5), torch.randn(3, 5)), ValueError, "centers must be"),
    (lambda q, b: hk.block_histograms(torch.randn(1, 4, 5, 5), torch.randn(3, 4), S=0), ValueError, "S must be"),
])
def test_bad_retrieval_input(call, error, words):
    query, bank = _bank()
    with pytest.raises(error, match=words):
        call(query, bank)


@pytest.mark.parametrize("indices,error,words", [
    (torch.tensor([[0.0]]), TypeError, "integer tensor"),
    (torch.tensor([[0], [1]]), ValueError, r"\[B=1, K >= 1\]"),
    (torch.tensor([[7]]), ValueError, r"\[0, 3\)"),
])
def test_bad_indices(indices, error, words):
    query, temp = features(1, 4, 3, 3), features(3, 4, 3, 3, seed=1)
    with pytest.raises(error, match=words):
        hk.mutual_match(query, temp, 3, 3, indices=indices)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equal_centres_tie_to_the_first(backend):
    device = device_for(backend)
    centers = _codebook(3, 6).repeat(2, 1).to(device)  # centres 3..5 duplicate 0..2
    feats = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(4)).to(device)
    _, codes = hk.block_histograms(feats, centers, return_codes=True, backend=backend)
    assert bool((codes < 3).all())
    assert torch.equal(codes.cpu(), reference.nearest_codes(feats.cpu(), centers.cpu()))


# ----------------------------------------------------------------------------- the compiled CPU scan

needs_numba = pytest.mark.skipif(not __import__("hetmm_kernels.cpu_ops.retrieval").cpu_ops.retrieval.available(),
                                 reason="numba is not installed: the elementwise torch path serves")


def _count_bank(entries: int, blocks: int, bins: int, area: int, seed: int) -> hk.HistogramBank:
    """Random integer histograms: each block's bins sum to ``area``."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, area + 1, (entries, blocks, bins - 1), generator=g).sort(dim=-1).values
    edges = torch.cat([torch.zeros(entries, blocks, 1, dtype=torch.long), cuts,
                       torch.full((entries, blocks, 1), area)], dim=-1)
    return hk.HistogramBank(edges.diff(dim=-1).to(torch.uint8 if area <= 255 else torch.int16), area)


def _scan(query_hist, bank, keep: int, method: str, first_tile: int = 0, tiles: int | None = None):
    from hetmm_kernels.cpu_ops import retrieval as cpu
    from hetmm_kernels.torch_ops.retrieval import count_table, query_terms

    query, own = query_terms(query_hist.float(), method)
    tiled = bank.tiled_counts()
    tiles = tiled.shape[0] - first_tile if tiles is None else tiles
    return cpu.trimmed_distances(query, own, tiled, count_table(bank.area, method), bank.area + 1, first_tile,
                                 tiles, query_hist.shape[1] - keep, method)


@needs_numba
@pytest.mark.parametrize("method", ["kl", "l2"])
@pytest.mark.parametrize("entries,queries,blocks,bins,area", [
    (1, 1, 25, 13, 49), (63, 3, 25, 13, 49), (200, 32, 25, 13, 49), (130, 2, 4, 5, 4), (70, 5, 9, 7, 300),
    # the table sizes of the vector lookups (AVX-512: 64 entries up to area 63, 256 up to 255)
    (40, 2, 25, 13, 63), (40, 2, 25, 13, 64), (90, 3, 9, 13, 169), (20, 1, 4, 3, 255)])
@pytest.mark.parametrize("l_ratio", [1.0, 0.8, 0.3])
def test_compiled_scan_equals_the_elementwise_path(method, entries, queries, blocks, bins, area, l_ratio):
    """KL: bit for bit (the same operations in the same order, logarithms from the same float32 ops).
    L2: the compiled square root is correctly rounded (torch's float32 one on AVX-512 CPUs is not
    always): each block distance (at most sqrt 2) may differ by an ulp or two, 2.4e-7, so the sums of
    up to 25 of them, trimmed, within 6e-6."""
    from hetmm_kernels.torch_ops import retrieval as elementwise

    bank = _count_bank(entries, blocks, bins, area, seed=entries)
    query = _count_bank(queries, blocks, bins, area, seed=1000 + entries).histograms()
    keep = int(blocks * l_ratio)
    expected = elementwise.trimmed_distances(query, bank.counts.permute(1, 2, 0).float() / area, keep, method)
    got = _scan(query, bank, keep, method)[:, :entries]
    if method == "kl":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=6e-6)


@needs_numba
@pytest.mark.parametrize("method", ["kl", "l2"])
def test_compiled_scan_is_the_same_in_every_lane_and_shard(method):
    """A bank entry's distance does not depend on its tile or lane: a shard that starts 17 entries in
    (every entry in another lane) and a scan that starts a tile in give the same floats."""
    from hetmm_kernels.cpu_ops.retrieval import TILE

    bank = _count_bank(3 * TILE + 5, 25, 13, 49, seed=3)
    query = _count_bank(4, 25, 13, 49, seed=4).histograms()
    whole = _scan(query, bank, 20, method)[:, :len(bank)]
    shard = hk.HistogramBank(bank.counts[17:].clone(), bank.area)
    assert torch.equal(_scan(query, shard, 20, method)[:, :len(shard)], whole[:, 17:])
    assert torch.equal(_scan(query, bank, 20, method, first_tile=1, tiles=1), whole[:, TILE:2 * TILE])


@needs_numba
def test_compiled_top_k_across_scan_chunks(monkeypatch):
    """Chunks of the bank (one tile each) merge to the one-call top-K, ties to the lower index."""
    from hetmm_kernels.cpu_ops import retrieval as cpu

    bank = _count_bank(300, 25, 13, 49, seed=5)
    bank = hk.HistogramBank(torch.cat([bank.counts, bank.counts[:40]]), 49)  # exact ties: 300+ repeat 0..39
    query = torch.cat([bank.histograms()[[7, 250]], _count_bank(3, 25, 13, 49, seed=6).histograms()])
    one_call = hk.retrieve_topk(query, bank, 12, backend="torch")
    monkeypatch.setattr(cpu, "SCAN_ELEMENTS", 1)
    chunked = hk.retrieve_topk(query, bank, 12, backend="torch")
    assert torch.equal(one_call[0], chunked[0]) and torch.equal(one_call[1], chunked[1])
    assert one_call[1][0, :2].tolist() == [7, 307]  # itself, then its copy
    ref_dist, ref_idx = reference.retrieve_topk(query, bank.histograms(), 12)
    assert torch.equal(one_call[1], ref_idx)
    torch.testing.assert_close(one_call[0], ref_dist, rtol=1e-5, atol=1e-5)


def test_tiled_counts_refuse_counts_outside_the_area():
    with pytest.raises(ValueError, match=r"bank counts must lie in \[0, area=300\]"):
        hk.HistogramBank(torch.full((2, 3, 4), 301, dtype=torch.int16), 300).tiled_counts()


@needs_numba
def test_compiled_scan_without_vector_lookups():
    """The scalar table lookups (hosts without AVX-512, here forced by compiling for a generic CPU) give
    the same KL floats as the elementwise path, for one query and for a group."""
    import os
    import subprocess
    import sys

    script = """
import sys, torch
sys.path.insert(0, "tests")
from test_retrieval import _count_bank, _scan
from hetmm_kernels.cpu_ops.retrieval import _vector_lookups
from hetmm_kernels.torch_ops import retrieval as elementwise
assert not _vector_lookups()
for queries, area in ((1, 49), (5, 169)):
    bank = _count_bank(130, 25, 13, area, seed=queries)
    query = _count_bank(queries, 25, 13, area, seed=99).histograms()
    expected = elementwise.trimmed_distances(query, bank.counts.permute(1, 2, 0).float() / area, 20, "kl")
    assert torch.equal(_scan(query, bank, 20, "kl")[:, :130], expected)
"""
    env = dict(os.environ, NUMBA_CPU_NAME="generic")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
