"""The benchmarks' one-thread-per-output baseline computes what the reference computes.

A speed-up over a wrong baseline would mean nothing, so the baseline is held to the
same reference as the ops (fp32, odd/even windows, a window larger than the map).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hetmm_kernels import reference

from helpers import BACKENDS, assert_matches, device_for, features

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from naive_atm import naive_mutual_match, naive_window_max  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or the Triton interpreter")


@pytest.mark.parametrize("shape,fore,back", [((2, 3, 5, 6, 4), 3, 1), ((1, 2, 3, 3, 16), 4, 9)])
def test_naive_baseline_matches_the_reference(shape, fore, back):
    batch, templates, height, width, channels = shape
    device = device_for("triton")
    query = features(batch, channels, height, width, seed=1)
    temp = features(templates, channels, height, width, seed=2)
    got = naive_window_max(query.to(device), temp.to(device), fore)
    assert_matches(got.cpu(), reference.forward_ATM(query, temp, fore), channels)
    got_fore, got_back = naive_mutual_match(query.to(device), temp.to(device), fore, back)
    ref_fore, ref_back = reference.mutual_match(query, temp, fore, back)
    assert_matches(got_fore.cpu(), ref_fore, channels)
    assert_matches(got_back.cpu(), ref_back, channels)
