"""The fused multi-layer aggregation against the reference composed of torch.nn.functional calls."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import reference
from helpers import BACKENDS, device_for

LAYER_SHAPES = [(12, 12), (6, 6), (3, 3), (1, 2)]  # the last one: smaller than any block


def _maps(layers, batch=2, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    fores = [torch.rand(batch, *LAYER_SHAPES[l], generator=g) * 2 - 1 for l in range(layers)]
    backs = [torch.rand(batch, *LAYER_SHAPES[l], generator=g) * 2 - 1 for l in range(layers)]
    return [f.to(device) for f in fores], [b.to(device) for b in backs]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("out_size,blur,image_score", [
    ((24, 24), None, "max"),
    ((17, 31), (2.5, 9), "max"),  # odd sizes
    ((5, 7), (1.0, 3), 2),  # smaller than a layer map, max-pool score
    ((20, 20), (3.0, 6), None),  # even kernel
    ((9, 9), (4.1, 39), 4),  # kernel larger than the map
])
def test_aggregate_matches_reference(backend, layers, out_size, blur, image_score):
    device = device_for(backend)
    fores, backs = _maps(layers, device=device)
    alphas, ldas = [0.3, 0.7, 0.5, 0.1][:layers], [1.0, 0.8, 0.5, 0.3][:layers]
    maps, scores = hk.aggregate_maps(fores, backs, alphas, ldas, out_size, blur=blur, image_score=image_score,
                                     backend=backend)
    ref_maps, ref_scores = reference.aggregate_maps([f.cpu() for f in fores], [b.cpu() for b in backs],
                                                    alphas, ldas, out_size, blur, image_score)
    assert maps.shape == (2, 1, *out_size) and maps.dtype == torch.float32
    # float32 sums of at most a few thousand terms of size <= 2: 1e-5 absolute
    assert torch.allclose(maps.cpu(), ref_maps, atol=1e-5)
    if image_score is None:
        assert scores is None
    else:
        assert torch.allclose(scores.cpu(), ref_scores, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_maps(backend):
    device = device_for(backend)
    fores, backs = _maps(2, device=device)
    half = hk.aggregate_maps([f.half() for f in fores], [b.half() for b in backs], [0.5, 0.5], [1, 1], 16,
                             backend=backend).maps
    ref = reference.aggregate_maps([f.half().cpu() for f in fores], [b.half().cpu() for b in backs],
                                   [0.5, 0.5], [1, 1], (16, 16))[0]
    assert torch.allclose(half.cpu(), ref, atol=1e-5)


def test_reference_blur_is_a_normalised_gaussian():
    impulse = torch.zeros(1, 1, 31, 31)
    impulse[0, 0, 15, 15] = 1
    for k in (5, 6, 11):
        out = reference.gaussian_blur(impulse, 2.0, k)
        assert out.shape == impulse.shape
        assert abs(out.sum().item() - 1) < 1e-5
        assert out[0, 0, 15, 15] == out.max()


@pytest.mark.parametrize("call,error,words", [
    (lambda f, b: hk.aggregate_maps([], [], [], [], 8), ValueError, "one entry per layer"),
    (lambda f, b: hk.aggregate_maps(f, b, [0.5], [1, 1], 8), ValueError, "one entry per layer"),
    (lambda f, b: hk.aggregate_maps([f[0][0]], b[:1], [0.5], [1], 8), TypeError, r"fores\[0\] must be a float tensor"),
    (lambda f, b: hk.aggregate_maps(f[:1], [b[1]], [0.5], [1], 8), ValueError, "same shape"),
    (lambda f, b: hk.aggregate_maps(f[:1], b[:1], [0.5], [1], 0), ValueError, "out_size"),
    (lambda f, b: hk.aggregate_maps(f[:1], b[:1], [0.5], [1], 8, blur=(0, 3)), ValueError, "blur"),
    (lambda f, b: hk.aggregate_maps(f[:1], b[:1], [0.5], [1], 8, image_score="mean"), ValueError, "image_score"),
    (lambda f, b: hk.aggregate_maps([f[0] * float("nan")], b[:1], [0.5], [1], 8), ValueError, "NaN"),
])
def test_bad_aggregate_input(call, error, words):
    fores, backs = _maps(2)
    with pytest.raises(error, match=words):
        call(fores, backs)
