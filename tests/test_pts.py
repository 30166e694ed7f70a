"""PTS on every backend against the reference, and its selection rules on hand-made cases."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import reference
from helpers import BACKENDS, device_for, features

# (N, C, H, W, number of cluster ids (0: all noise), tsize)
CASES = [
    pytest.param(10, 8, 3, 4, 3, 4, id="clusters-and-hard-normals"),
    pytest.param(12, 5, 2, 2, 12, 3, id="more-clusters-than-slots"),
    pytest.param(6, 4, 3, 3, 0, 10, id="all-noise-global-centre-zero-slots"),
    pytest.param(20, 16, 4, 4, 4, 8, id="larger"),
    pytest.param(1, 3, 2, 3, 1, 2, id="one-template"),
    pytest.param(17, 6, 1, 1, 2, 17, id="tsize-equals-N"),
]


def _inputs(n, c, h, w, ids, dtype=torch.float32, device="cpu", seed=0):
    temp = features(n, c, h, w, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    clus = torch.randint(-1, ids, (n, h, w), generator=g) if ids else torch.full((n, h, w), -1)
    return temp, clus.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,h,w,ids,tsize", CASES)
def test_pts_matches_reference(backend, dtype, n, c, h, w, ids, tsize):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes 16- and 32-bit floats (float64 runs on the torch path)")
    temp, clus = _inputs(n, c, h, w, ids, dtype, device_for(backend))
    out = hk.PTS(temp, clus, tsize, backend=backend)
    expected = reference.PTS(temp.cpu(), clus.cpu(), tsize)
    assert out.dtype == temp.dtype and out.shape == (tsize, c, h, w)
    assert torch.equal(out.cpu(), expected)  # a selection: the picked features are copied exactly


def test_rules_by_hand():
    """Three 1-D features at one pixel: +1, +1 (a cluster), -1 (noise)."""
    temp = torch.tensor([[1.0], [0.9], [-1.0], [0.1]]).view(4, 1, 1, 1)
    clus = torch.tensor([5, 5, -1, 7]).view(4, 1, 1)
    out = reference.PTS(temp, clus, 4)[:, 0, 0, 0].tolist()
    # cluster 5 first: 1.0 has the larger member sum (1 + 0.9); cluster 7: its only member 0.1;
    # then the candidate least similar to {1.0, 0.1} is -1.0 (sum -1.1), then 0.9
    assert out == pytest.approx([1.0, 0.1, -1.0, 0.9])
    # all noise: the global centre (largest sum of similarities) first
    out = reference.PTS(temp, torch.full((4, 1, 1), -1), 2)[:, 0, 0, 0].tolist()
    assert out == pytest.approx([1.0, -1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_first_index(backend):
    temp = torch.ones(4, 2, 1, 1, device=device_for(backend)) / 2**0.5
    temp[2] *= -1
    clus = torch.zeros(4, 1, 1, dtype=torch.long, device=temp.device)
    clus[2] = -1
    picked = hk.PTS(temp, clus, 3, backend=backend)
    # members 0, 1, 3 tie: 0 is the centre; then -x (index 2) is least similar; then 1 before 3
    assert torch.equal(picked.cpu(), temp.cpu()[[0, 2, 1]])


@pytest.mark.parametrize("call,error,words", [
    (lambda t, c: hk.PTS(t, c.float(), 2), TypeError, "clus must be an integer tensor"),
    (lambda t, c: hk.PTS(t, c[:, :1], 2), ValueError, r"clus must be \[N, H, W\]"),
    (lambda t, c: hk.PTS(t, c - 5, 2), ValueError, ">= 0, or -1"),
    (lambda t, c: hk.PTS(t, c, 0), ValueError, "tsize must be a positive int"),
    (lambda t, c: hk.PTS(t.long(), c, 2), TypeError, "temp must be float32"),
    (lambda t, c: hk.PTS(t, c.to("meta"), 2), ValueError, "same device"),
])
def test_bad_pts_input(call, error, words):
    temp, clus = _inputs(4, 3, 2, 2, 2)
    with pytest.raises(error, match=words):
        call(temp, clus)
