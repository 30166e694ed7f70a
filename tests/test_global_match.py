"""global_match on every backend against the naive reference."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import reference
from helpers import BACKENDS, assert_matches, device_for, features, skip_reason

# (B, C, H, W, rows)
SHAPES = [
    pytest.param(1, 3, 1, 1, 1, id="one-pixel-one-row"),
    pytest.param(2, 8, 4, 5, 7, id="rows-below-a-block"),
    pytest.param(1, 41, 8, 8, 300, id="C-not-a-block-multiple"),
    pytest.param(3, 16, 5, 7, 129, id="rows-one-past-a-block"),
    pytest.param(2, 70, 6, 6, 64, id="C-above-a-block"),
    pytest.param(1, 24, 3, 9, 2100, id="many-row-blocks"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,c,h,w,n", SHAPES)
def test_global_match_matches_the_reference(backend, dtype, b, c, h, w, n):
    reason = skip_reason(backend, dtype)
    if reason:
        pytest.skip(reason)
    device = device_for(backend)
    query = features(b, c, h, w, dtype=dtype, device=device)
    rows = features(n, c, 1, 1, dtype=dtype, device=device, seed=1)[:, :, 0, 0].contiguous()
    out = hk.global_match(query, rows, backend=backend)
    assert_matches(out, reference.global_match(query.cpu(), rows.cpu()), c)
    wide = hk.global_match(query, rows, out_dtype=torch.float32, backend=backend)
    assert wide.dtype == torch.float32 and (wide.cpu() - out.float().cpu()).abs().max() <= 2 ** -8 + 1e-6


def test_a_query_pixel_among_the_rows_scores_one_and_the_floor_holds():
    query = features(2, 16, 4, 4)
    rows = query[1].permute(1, 2, 0).reshape(16, 16)
    out = hk.global_match(query, rows)
    assert torch.allclose(out[1], torch.ones(4, 4), atol=1e-5)
    assert (out[0] < 1 - 1e-3).all()  # random unit vectors in 16 dimensions are not that close
    opposite = hk.global_match(query, -query[0, :, 0, 0][None].contiguous())
    assert opposite[0, 0, 0] == pytest.approx(-1, abs=1e-5) and (opposite >= -1).all()


def test_global_match_is_the_window_covering_the_map():
    """A window wide enough to hold the whole map, over every template, is the same maximum."""
    query, temp = features(2, 8, 5, 6), features(3, 8, 5, 6, seed=1)
    rows = temp.permute(0, 2, 3, 1).reshape(-1, 8)
    fore, _ = hk.mutual_match(query, temp, 11, 1)
    assert torch.allclose(hk.global_match(query, rows), fore, atol=1e-6)


@pytest.mark.parametrize("rows,words", [
    (torch.zeros(0, 8), r"rows must be a tensor \[N >= 1, C\]"),
    (torch.zeros(4, 8, 1), r"rows must be a tensor \[N >= 1, C\]"),
    (torch.zeros(4, 7), "rows must match the query's channels"),
    (torch.zeros(4, 8, dtype=torch.float64), "rows must match the query's channels, dtype"),
    (torch.full((4, 8), float("nan")), "rows contains NaN"),
])
def test_bad_rows(rows, words):
    with pytest.raises(ValueError, match=words):
        hk.global_match(features(1, 8, 3, 3), rows)


def test_empty_batch():
    out = hk.global_match(features(1, 8, 3, 3)[:0], torch.ones(2, 8), out_dtype=torch.float32)
    assert out.shape == (0, 3, 3) and out.dtype == torch.float32
