"""Property-based: random shapes, windows and dtypes agree with the reference."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hetmm_kernels as hk
from hetmm_kernels import reference
from helpers import BACKENDS, assert_matches, device_for, features, skip_reason

shapes = st.fixed_dictionaries(
    dict(
        b=st.integers(1, 3), t=st.integers(1, 4), c=st.integers(1, 40),
        h=st.integers(1, 9), w=st.integers(1, 9),
        kf=st.integers(0, 11), kb=st.integers(0, 11),
        dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
        backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**16),
    )
)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_random_shapes_match_reference(s):
    if skip_reason(s["backend"], s["dtype"]):
        s["dtype"] = torch.float16
    device = device_for(s["backend"])
    query = features(s["b"], s["c"], s["h"], s["w"], dtype=s["dtype"], device=device, seed=s["seed"])
    temp = features(s["t"], s["c"], s["h"], s["w"], dtype=s["dtype"], device=device, seed=s["seed"] + 1)
    fore, back = hk.mutual_match(query, temp, s["kf"], s["kb"], backend=s["backend"])
    ref_fore, ref_back = reference.mutual_match(query.cpu(), temp.cpu(), s["kf"], s["kb"])
    assert_matches(fore, ref_fore, s["c"])
    assert_matches(back, ref_back, s["c"])
    forward = hk.forward_ATM(query, temp, s["kf"], backend=s["backend"])
    assert_matches(forward, reference.forward_ATM(query.cpu(), temp.cpu(), s["kf"]), s["c"])
    backward = hk.backward_ATM(query, temp, s["kb"], backend=s["backend"])
    assert_matches(backward, reference.backward_ATM(query.cpu(), temp.cpu(), s["kb"]), s["c"])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 7), st.integers(0, 2**16))
def test_a_template_matches_itself_perfectly(h, w, k, seed):
    """A query that is one of the templates has fore = back = 1 everywhere (unit features)."""
    temp = features(3, 8, h, w, seed=seed)
    fore, back = hk.mutual_match(temp[1:2], temp, k, k)
    assert torch.allclose(fore, torch.ones_like(fore), atol=1e-5)
    assert torch.allclose(back, torch.ones_like(back), atol=1e-5)
