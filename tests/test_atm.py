"""Every ATM op on every backend against the naive reference."""

from __future__ import annotations

import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import reference
from hetmm_kernels.torch_ops import atm as torch_atm
from helpers import BACKENDS, assert_matches, device_for, features, skip_reason, tolerance

# (B, T, C, H, W, fore window, back window)
SHAPES = [
    pytest.param(1, 1, 3, 1, 1, 3, 3, id="1x1-map"),
    pytest.param(2, 3, 8, 4, 5, 13, 9, id="window-larger-than-map"),
    pytest.param(2, 2, 16, 7, 6, 4, 2, id="even-windows"),
    pytest.param(2, 3, 8, 5, 5, 1, 0, id="windows-1-and-0"),
    pytest.param(1, 2, 70, 6, 6, 5, 3, id="C-not-a-block-multiple"),
    pytest.param(1, 1, 16, 9, 9, 3, 5, id="T=1"),
    pytest.param(5, 2, 4, 6, 7, 3, 3, id="B-greater-than-a-block"),
    pytest.param(3, 2, 5, 3, 9, 3, 5, id="non-square"),
    pytest.param(2, 3, 24, 13, 11, 5, 3, id="many-tiles"),
    pytest.param(1, 4, 12, 10, 10, 7, 7, id="equal-windows"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(backend, dtype, b, t, c, h, w, seed=0):
    reason = skip_reason(backend, dtype)
    if reason:
        pytest.skip(reason)
    device = device_for(backend)
    query = features(b, c, h, w, dtype=dtype, device=device, seed=seed)
    temp = features(t, c, h, w, dtype=dtype, device=device, seed=seed + 1)
    return query, temp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,t,c,h,w,kf,kb", SHAPES)
@pytest.mark.parametrize("op", ["forward_ATM", "backward_ATM"])
def test_drop_in_op(op, backend, dtype, b, t, c, h, w, kf, kb):
    """The published per-template maps; forward uses the fore window, backward the back window."""
    query, temp = _inputs(backend, dtype, b, t, c, h, w)
    window = kf if op == "forward_ATM" else kb
    out = getattr(hk, op)(query, temp, window, backend=backend)
    assert_matches(out, getattr(reference, op)(query.cpu(), temp.cpu(), window), c)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,t,c,h,w,kf,kb", SHAPES)
def test_mutual_match(backend, dtype, b, t, c, h, w, kf, kb):
    query, temp = _inputs(backend, dtype, b, t, c, h, w)
    fore, back = hk.mutual_match(query, temp, kf, kb, backend=backend)
    ref_fore, ref_back = reference.mutual_match(query.cpu(), temp.cpu(), kf, kb)
    assert_matches(fore, ref_fore, c)
    assert_matches(back, ref_back, c)


def _products_at(query: torch.Tensor, temp: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, W]``: the float64 product of each query pixel with template pixel ``where`` of each template."""
    q, t = query.double().cpu(), temp.double().cpu().flatten(2)  # [T, C, H*W]
    batch, _, height, width = q.shape
    picked = torch.stack([t[k][:, where[:, k].cpu().flatten(1)] for k in range(t.shape[0])], 1)  # [C, T, B, HW]
    return torch.einsum("bchw,ctbhw->bthw", q, picked.view(q.shape[1], t.shape[0], batch, height, width))


def _window_holds(where: torch.Tensor, patch: int, width: int) -> bool:
    rows, cols = torch.meshgrid(torch.arange(where.shape[2]), torch.arange(where.shape[3]), indexing="ij")
    radius = patch // 2
    return bool((((where // width) - rows).abs() <= radius).all() and (((where % width) - cols).abs() <= radius).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,t,c,h,w,kf,kb", SHAPES)
def test_forward_argmax(backend, dtype, b, t, c, h, w, kf, kb):
    """The maps as forward_ATM's, and each place inside its window holding the window's largest product: the
    reference's place, or where float32 sums in another order tie it, one as large to the maps' tolerance."""
    query, temp = _inputs(backend, dtype, b, t, c, h, w)
    out, where = hk.forward_ATM(query, temp, kf, backend=backend, return_argmax=True)
    ref_out, ref_where = reference.forward_argmax(query.cpu(), temp.cpu(), kf)
    assert_matches(out, ref_out, c)
    assert torch.equal(ref_out, reference.forward_ATM(query.cpu(), temp.cpu(), kf))
    assert where.dtype == torch.int64 and where.shape == ref_where.shape and _window_holds(where.cpu(), kf, w)
    differ = where.cpu() != ref_where
    at_place = _products_at(query, temp, where)
    gap = (at_place - ref_out.double()).abs()[differ]
    assert not gap.numel() or gap.max() <= tolerance(dtype, c)
    assert differ.float().mean() <= 0.02, f"{int(differ.sum())} of {differ.numel()} places differ"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_argmax_ties_go_to_the_first_place(backend, dtype):
    """Features of -1, 0 and 1 make every product exact and ties common: the place must be the reference's, the
    first of the window's equal maxima in row-major order, and that is checked by hand on a flat template."""
    reason = skip_reason(backend, dtype)
    if reason:
        pytest.skip(reason)
    device = device_for(backend)
    generator = torch.Generator().manual_seed(3)
    query = torch.randint(-1, 2, (2, 6, 7, 9), generator=generator).to(device, dtype)
    temp = torch.randint(-1, 2, (3, 6, 7, 9), generator=generator).to(device, dtype)
    for patch in (3, 4, 7):
        out, where = hk.forward_ATM(query, temp, patch, backend=backend, return_argmax=True)
        ref_out, ref_where = reference.forward_argmax(query.cpu(), temp.cpu(), patch)
        assert torch.equal(out.cpu(), ref_out) and torch.equal(where.cpu(), ref_where), patch
    flat = torch.ones(1, 2, 5, 6, device=device, dtype=dtype)  # every window position ties
    _, where = hk.forward_ATM(flat, flat, 3, backend=backend, return_argmax=True)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    assert torch.equal(where[0, 0].cpu(), (rows - 1).clamp_min(0) * 6 + (cols - 1).clamp_min(0))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_forward_argmax_of_some_pixels_is_theirs_of_the_whole_map(backend):
    device = device_for(backend) if backend != "reference" else torch.device("cpu")
    query, temp = features(2, 20, 9, 11, device=device), features(4, 20, 9, 11, device=device, seed=1)
    out, where = reference.forward_argmax(query.cpu(), temp.cpu(), 7)
    pixels = torch.tensor([0, 5, 13, 50, 98], device=device)
    some, some_where = hk.forward_ATM(query, temp, 7, backend=backend, return_argmax=True, pixels=pixels)
    assert some.shape == some_where.shape == (2, 4, 5)
    assert_matches(some, out.flatten(2)[:, :, pixels.cpu()], 20)
    assert torch.equal(some_where.cpu(), where.flatten(2)[:, :, pixels.cpu()])
    for bad in (torch.tensor([99]), torch.tensor([-1]), torch.tensor([1.0]), torch.zeros(2, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"pixels must be a 1-D int64 tensor of flat query pixels in \[0, 99\)"):
            hk.forward_ATM(query, temp, 7, backend=backend, return_argmax=True, pixels=bad.to(device))
    with pytest.raises(ValueError, match="pixels selects query pixels of return_argmax=True"):
        hk.forward_ATM(query, temp, 7, backend=backend, pixels=pixels)


def test_reference_mutual_is_the_max_of_the_maps():
    query, temp = features(2, 8, 6, 5), features(3, 8, 6, 5, seed=1)
    fore, back = reference.mutual_match(query, temp, 5, 3)
    assert torch.equal(fore, reference.forward_ATM(query, temp, 5).amax(1))
    assert torch.equal(back, reference.backward_ATM(query, temp, 3).amax(1))


def test_hand_computed_single_channel():
    """One channel: a dot product is a plain product, so the maps can be written down."""
    query = torch.ones(1, 1, 3, 4)
    temp = torch.full((1, 1, 3, 4), -5.0)
    temp[0, 0, 0, 0] = 2.0
    expected_fore = torch.full((1, 1, 3, 4), -1.0)  # -5 is floored at -1
    expected_fore[0, 0, :2, :2] = 2.0  # pixels whose 3x3 window holds (0, 0)
    expected_back = torch.full((1, 1, 3, 4), -1.0)
    expected_back[0, 0, 0, 0] = 2.0  # only template pixel (0, 0) holds a 2
    for backend in ["reference", *BACKENDS]:
        device = device_for(backend) if backend != "reference" else torch.device("cpu")
        q, t = query.to(device), temp.to(device)
        assert torch.equal(hk.forward_ATM(q, t, 3, backend=backend).cpu(), expected_fore), backend
        assert torch.equal(hk.backward_ATM(q, t, 3, backend=backend).cpu(), expected_back), backend
        fore, back = hk.mutual_match(q, t, 3, 3, backend=backend)
        assert torch.equal(fore.cpu(), expected_fore[:, 0]), backend
        assert torch.equal(back.cpu(), expected_back[:, 0]), backend


def test_asymmetric_window_relation():
    """Forward and backward differ exactly by which side the window slides on."""
    query = torch.zeros(1, 1, 1, 5)
    temp = torch.zeros(1, 1, 1, 5)
    query[0, 0, 0, 0] = 1.0
    temp[0, 0, 0, 2] = 1.0
    # forward: query pixel 0 sees template pixels 0..2 (window 5) -> 1 at pixel 0 only
    fore = reference.forward_ATM(query, temp, 5)[0, 0, 0]
    assert fore.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    # backward: template pixel 2 sees query pixels 0..4 -> 1 at pixel 2 only
    back = reference.backward_ATM(query, temp, 5)[0, 0, 0]
    assert back.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    base_q = features(2, 10, 9, 8, device=device)
    base_t = features(3, 10, 9, 8, device=device, seed=1)
    query = base_q.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)[:, ::2]  # strided channels, odd strides
    temp = base_t.flip(0)[:, ::2]
    assert not query.is_contiguous() and not temp.is_contiguous()
    fore, back = hk.mutual_match(query, temp, 5, 3, backend=backend)
    ref_fore, ref_back = reference.mutual_match(query.contiguous().cpu(), temp.contiguous().cpu(), 5, 3)
    assert_matches(fore, ref_fore, 5)
    assert_matches(back, ref_back, 5)
    assert_matches(hk.forward_ATM(query, temp, 3, backend=backend), reference.forward_ATM(query.cpu(), temp.cpu(), 3), 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_templates_match_raw(backend):
    device = device_for(backend)
    query, temp = features(2, 12, 7, 7, device=device), features(4, 12, 7, 7, device=device, seed=1)
    bank = hk.prepare_templates(temp)
    assert hk.prepare_templates(bank) is bank
    for _ in range(2):  # second call reuses the cached layout
        fore, back = hk.mutual_match(query, bank, 5, 3, backend=backend)
        ref_fore, ref_back = hk.mutual_match(query, temp, 5, 3, backend=backend)
        assert torch.equal(fore, ref_fore) and torch.equal(back, ref_back)
    assert torch.equal(hk.forward_ATM(query, bank, 3, backend=backend), hk.forward_ATM(query, temp, 3, backend=backend))
    assert torch.equal(hk.backward_ATM(query, bank, 3, backend=backend), hk.backward_ATM(query, temp, 3, backend=backend))


def test_triton_template_chunks_merge_with_atomics():
    """Templates split over programs (T > templates per program) merge to the same maxima."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend on this machine")
    from hetmm_kernels.triton_ops import atm as triton_atm

    device = device_for("triton")
    query, temp = features(2, 16, 6, 7, device=device), features(7, 16, 6, 7, device=device, seed=1)
    ref_fore, ref_back = reference.mutual_match(query.cpu(), temp.cpu(), 5, 3)
    for per_program in (1, 3, 7):
        fore, back = triton_atm.mutual_match(query, triton_atm.pixel_major(temp), 5, 3, templates_per_program=per_program)
        assert_matches(fore, ref_fore, 16)
        assert_matches(back, ref_back, 16)


def test_torch_template_groups_and_batch_chunks(monkeypatch):
    """More templates than one BLAS group and more queries than one row block."""
    monkeypatch.setattr(torch_atm, "MAX_ROWS", 8)
    query, temp = features(7, 6, 5, 6), features(70, 6, 5, 6, seed=1)
    assert len(torch_atm.template_groups(temp)) == 2
    fore, back = hk.mutual_match(query, temp, 3, 5, backend="torch")
    ref_fore, ref_back = reference.mutual_match(query, temp, 3, 5)
    assert_matches(fore, ref_fore, 6)
    assert_matches(back, ref_back, 6)
    assert_matches(hk.forward_ATM(query, temp, 3, backend="torch"), reference.forward_ATM(query, temp, 3), 6)
    assert_matches(hk.backward_ATM(query, temp, 5, backend="torch"), reference.backward_ATM(query, temp, 5), 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("b,t,c,h,w,kf,kb", [
    pytest.param(2, 3, 20, 16, 16, 31, 3, id="whole-map-fore"),
    pytest.param(3, 2, 9, 16, 16, 15, 3, id="masked-fore"),
    pytest.param(2, 2, 6, 5, 7, 3, 9, id="wide-back"),
    pytest.param(1, 5, 17, 6, 6, 13, 1, id="back-1"),
    pytest.param(2, 4, 8, 4, 9, 2, 4, id="even-windows"),
])
def test_torch_dense_and_tiled_paths(monkeypatch, dtype, b, t, c, h, w, kf, kb):
    """Both CPU layouts against the reference whichever the size rule picks; a small product block makes
    the dense path merge several template groups."""
    monkeypatch.setattr(torch_atm, "TILE_BLOCK", 2 * h * w * b * h * w)
    monkeypatch.setattr(torch_atm, "DENSE_BLOCK", h * w * h * w)  # one query a call: the batch split merges
    query, temp = features(b, c, h, w, dtype=dtype), features(t, c, h, w, dtype=dtype, seed=1)
    ref_fore, ref_back = reference.mutual_match(query, temp, kf, kb)
    bank = hk.prepare_templates(temp)
    fr, br = kf // 2, kb // 2
    dense = torch_atm.mutual_max_dense(query, torch_atm.DenseTemplates(temp), fr, br)
    tiled = torch_atm.mutual_max_tiled(query, torch_atm.tiled_layout(bank, max(fr, br), b), fr, br)
    for fore, back in (dense, tiled):
        assert fore.dtype == back.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches(fore.to(dtype), ref_fore, c)  # results are float32 inside, the caller's dtype outside
        assert_matches(back.to(dtype), ref_back, c)


def test_torch_dense_path_is_chosen_for_wide_windows():
    assert torch_atm.prefers_dense(16, 16, 15, 8) and torch_atm.prefers_dense(16, 16, 7, 1)
    assert not torch_atm.prefers_dense(16, 16, 3, 8) and not torch_atm.prefers_dense(32, 32, 4, 8)
    assert not torch_atm.prefers_dense(32, 32, 15, 8) and torch_atm.prefers_dense(32, 32, 31, 8)


@pytest.mark.parametrize("height,width,radius,batch", [(64, 64, 2, 8), (16, 16, 3, 1), (1, 1, 6, 32), (5, 64, 1, 4)])
def test_torch_tile_choice_is_valid(height, width, radius, batch):
    th, tw = torch_atm.pick_tile(height, width, radius, batch)
    assert th in (1, 2, 4, 8) and tw in (1, 2, 4, 8)


def test_empty_query_batch():
    temp = features(2, 4, 3, 3)
    query = temp[:0]
    assert hk.forward_ATM(query, temp, 3).shape == (0, 2, 3, 3)
    fore, back = hk.mutual_match(query, temp, 3, 3)
    assert fore.shape == back.shape == (0, 3, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("b,t,c,h,w,kf,kb", SHAPES)
def test_triton_kernels_and_union_parts(dtype, b, t, c, h, w, kf, kb):
    """Both matching kernels (streaming; resident, its union split into 16- and 32-position parts)."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton backend on this machine")
    from hetmm_kernels.triton_ops import atm as triton_atm

    query, temp = _inputs("triton", dtype, b, t, c, h, w)
    ref_fore, ref_back = reference.mutual_match(query.cpu(), temp.cpu(), kf, kb)
    reach = max(kf // 2, kb // 2)
    stream = triton_atm.tile_config(h, w, reach, b, c, dtype=dtype)
    configs = [stream] + [dict(KERNEL="resident", TILE_H=stream["TILE_H"], TILE_W=stream["TILE_W"],
                               BLOCK=stream["BLOCK"], BLOCK_U=part, num_warps=4, num_stages=2) for part in (16, 32)]
    q, t_pm = triton_atm.pixel_major(query), triton_atm.pixel_major(temp)
    for config in configs:
        for per_program in (None, 1):
            fore, back = triton_atm.mutual_max(q, t_pm, kf // 2, kb // 2, per_program, config=config)
            assert_matches(fore.to(dtype), ref_fore, c)
            assert_matches(back.to(dtype), ref_back, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_dtype_keeps_float32_maxima(backend):
    """16-bit features with out_dtype=float32: maps come back float32, as close to the reference as the
    float32-accumulated products allow (no rounding to the query's dtype on the way out)."""
    query, temp = _inputs(backend, torch.float16, 2, 3, 24, 7, 6)
    fore, back = hk.mutual_match(query, temp, 5, 3, out_dtype=torch.float32, backend=backend)
    ref_fore, ref_back = reference.mutual_match(query.cpu().float(), temp.cpu().float(), 5, 3)
    assert fore.dtype == back.dtype == torch.float32
    rounded, _ = hk.mutual_match(query, temp, 5, 3, backend=backend)
    assert rounded.dtype == torch.float16 and torch.equal(rounded, fore.to(torch.float16))
    if backend == "triton":  # fp32 accumulation of fp16 products: far below fp16's own rounding
        assert (fore.cpu() - ref_fore).abs().max() < 1e-5 and (back.cpu() - ref_back).abs().max() < 1e-5
    with pytest.raises(TypeError, match="out_dtype"):
        hk.mutual_match(query, temp, 5, 3, out_dtype=torch.int32, backend=backend)
