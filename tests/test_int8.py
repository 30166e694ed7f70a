"""int8 products (``QuantizedTemplates`` / ``QuantizedRows``) on every path against the reference.

The reference rounds the query as ``quantize_int8`` defines and multiplies the dequantised values in float64
(each product exact). Tolerances: the compiled kernel sums bytes exactly in int32 and scales once in float32
(``dot * (s_t * s_q) + bias``: three roundings of a value below 2 in magnitude, so 1e-6); the dequantised float32
paths accumulate C + 1 products in float32 (``helpers.tolerance``). Against float features, the rounding itself
is bounded by Cauchy-Schwarz: ``|<q, t> - <q8, t8>| <= |q - q8| |t| + |q8| |t - t8|``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hetmm_kernels as hk
from hetmm_kernels import reference
from hetmm_kernels.cpu_ops import int8_match
from hetmm_kernels.quantized import dequantize
from helpers import BACKENDS, device_for, features, tolerance

COMPILED = int8_match.available()
needs_vnni = pytest.mark.skipif(not COMPILED, reason="the compiled int8 kernels need numba and AVX512-VNNI")
KERNEL_TOLERANCE = 1e-6

# (B, T, C, H, W, fore, back)
SHAPES = [
    pytest.param(1, 1, 1, 1, 1, 3, 3, id="one-pixel-one-template-one-channel"),
    pytest.param(2, 3, 5, 4, 5, 3, 1, id="C-not-a-word-multiple"),
    pytest.param(1, 17, 24, 7, 6, 5, 3, id="lanes-one-past-a-vector"),
    pytest.param(3, 40, 40, 9, 9, 9, 3, id="lite0-layer2-like"),
    pytest.param(1, 20, 112, 6, 6, 23, 3, id="window-wider-than-the-map"),
    pytest.param(2, 70, 8, 5, 5, 4, 2, id="more-than-four-vectors-even-windows"),
    pytest.param(9, 2, 16, 3, 11, 1, 5, id="batch-past-a-chunk-back-wider"),
]
PATHS = (["compiled"] if COMPILED else []) + ["dequantized-torch"] + (["triton"] if "triton" in BACKENDS else [])


def _run(path: str, fn):
    """``fn(backend)`` on one of the int8 paths: the compiled kernel, the dequantised torch path (the compiled one
    switched off), or the Triton float32 kernels on dequantised features."""
    if path == "compiled":
        return fn("torch")
    if path == "triton":
        return fn("triton")
    available = int8_match.available
    int8_match.available = lambda: False
    try:
        return fn("torch")
    finally:
        int8_match.available = available


def _tolerance(path: str, channels: int) -> float:
    return KERNEL_TOLERANCE if path == "compiled" else tolerance(torch.float32, channels + 1)


def _bias(t: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(t, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("biased", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("b,t,c,h,w,fore,back", SHAPES)
def test_int8_mutual_match_matches_the_reference(path, biased, b, t, c, h, w, fore, back):
    device = device_for("triton" if path == "triton" else "torch")
    query = features(b, c, h, w, device=device)
    bank = hk.QuantizedTemplates(features(t, c, h, w, seed=1, device=device), _bias(t, h, w, 2).to(device) if biased else None)
    got = _run(path, lambda backend: hk.mutual_match(query, bank, fore, back, backend=backend))
    want = reference.int8_mutual_match(query.cpu(), bank.values.cpu(), bank.scales.cpu(),
                                       None if bank.bias is None else bank.bias.cpu(), fore, back)
    for name, x, y in zip(("fore", "back"), got, want):
        assert x.dtype == torch.float32 and x.shape == (b, h, w), name
        gap = (x.cpu().double() - y).abs().max().item()
        assert gap <= _tolerance(path, c), f"{name}: max |difference| {gap:.3e}"


@pytest.mark.parametrize("path", PATHS)
def test_int8_subsets_match_the_reference(path):
    """``indices``: each query against its own templates (the compiled kernel masks the others' lanes)."""
    b, t, c, h, w = 3, 21, 24, 6, 7
    device = device_for("triton" if path == "triton" else "torch")
    query = features(b, c, h, w, device=device)
    bank = hk.QuantizedTemplates(features(t, c, h, w, seed=1, device=device), _bias(t, h, w, 2).to(device))
    indices = torch.tensor([[0, 20, 5], [7, 16, 17], [3, 3, 19]], device=device)
    got = _run(path, lambda backend: hk.mutual_match(query, bank, 5, 3, indices=indices, backend=backend))
    want = reference.int8_mutual_match(query.cpu(), bank.values.cpu(), bank.scales.cpu(), bank.bias.cpu(), 5, 3,
                                       indices.cpu())
    for x, y in zip(got, want):
        assert (x.cpu().double() - y).abs().max() <= _tolerance(path, c)
    whole = _run(path, lambda backend: hk.mutual_match(query, bank, 5, 3, backend=backend))
    assert (got[0] <= whole[0] + 1e-6).all() and (got[0] < whole[0] - 1e-3).any()  # fewer templates, lower maxima


@pytest.mark.parametrize("query_dtype", [torch.bfloat16, torch.float64])
def test_int8_takes_any_float_query_and_noncontiguous_layouts(query_dtype):
    b, t, c, h, w = 2, 9, 12, 5, 6
    query = features(b, c, h, w).to(query_dtype)
    bank = hk.QuantizedTemplates(features(t, c, h, w, seed=1))
    want = reference.int8_mutual_match(query, bank.values, bank.scales, None, 5, 3)
    for q in (query, query.contiguous(memory_format=torch.channels_last), query.transpose(2, 3).contiguous().transpose(2, 3)):
        got = hk.mutual_match(q, bank, 5, 3)
        assert max((x.double() - y).abs().max().item() for x, y in zip(got, want)) <= _tolerance("compiled", c) * 2


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 300])
@pytest.mark.parametrize("c", [3, 41])
def test_int8_global_match_matches_the_reference(path, n, c):
    device = device_for("triton" if path == "triton" else "torch")
    query = features(2, c, 5, 3, device=device)
    rows = features(n, c, 1, 1, seed=1, device=device)[:, :, 0, 0].contiguous()
    for bias in (None, torch.rand(n, generator=torch.Generator().manual_seed(3)).to(device)):
        quantized = hk.QuantizedRows(rows, bias)
        got = _run(path, lambda backend: hk.global_match(query, quantized, backend=backend))
        want = reference.int8_global_match(query.cpu(), quantized.values.cpu(), quantized.scales.cpu(),
                                           None if bias is None else bias.cpu())
        assert got.dtype == torch.float32 and got.shape == (2, 5, 3)
        assert (got.cpu().double() - want).abs().max() <= _tolerance(path, c)


def test_quantisation_definition():
    x = torch.tensor([[0.5, -0.25, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.3, 0.002]])
    values, scales = hk.quantize_int8(x)
    assert values.dtype == torch.int8 and values.tolist() == [[127, -64, 0], [0, 0, 0], [-127, 38, 0]]
    assert scales.tolist() == pytest.approx([0.5 / 127, 0.0, 1 / 127])
    assert (values.abs() <= 127).all()


@needs_vnni
def test_compiled_quantiser_is_the_definition_value_for_value():
    """The kernel's own pass over the query (float32 division, round half to even) equals ``quantize_int8``."""
    x = torch.randn(3, 37, 7, 5)
    x[0, :, 0, 0] = 0  # an all-zero pixel: scale 0, values 0
    x[1, :5, 1, 1] = torch.tensor([0.5, -0.5, 1.5, 2.5, 127.0]) * (2.0 / 127)  # exact halves
    packed, scales = int8_match.quantized_query(x, int8_match.channel_words(37))
    values, want_scales = hk.quantize_int8(x)
    got = torch.from_numpy(packed.view(np.uint8)[:, :37].astype(np.int16) - int8_match.OFFSET)
    assert torch.equal(got, values.permute(0, 2, 3, 1).reshape(-1, 37).to(torch.int16))
    assert torch.equal(torch.from_numpy(scales), want_scales.reshape(-1))
    assert (packed.view(np.uint8)[:, 37:] == int8_match.OFFSET).all()  # padding channels multiply as zero


@pytest.mark.parametrize("c", [24, 112])
def test_int8_rounding_stays_within_its_bound_of_float_products(c):
    """Against the float reference on the original features: within the Cauchy-Schwarz bound of the rounding,
    and far closer on average (what accuracy depends on)."""
    query, temp = features(2, c, 6, 6), features(12, c, 6, 6, seed=1)
    bank = hk.QuantizedTemplates(temp)
    got = hk.mutual_match(query, bank, 5, 3)
    want = reference.mutual_match(query.double(), temp.double(), 5, 3)
    q8 = dequantize(*hk.quantize_int8(query))
    t8 = bank.dequantized()
    bound = ((query.double() - q8).norm(dim=1).max() * temp.double().norm(dim=1).max()
             + q8.norm(dim=1).max() * (temp.double() - t8).norm(dim=1).max()).item()
    for x, y in zip(got, want):
        gap = (x.double() - y).abs()
        assert gap.max() <= bound + 1e-6
        assert gap.mean() <= bound / 4


def test_int8_inputs_are_checked():
    bank = hk.QuantizedTemplates(features(3, 8, 4, 4))
    with pytest.raises(ValueError, match="channels C"):
        hk.mutual_match(features(1, 9, 4, 4), bank, 3, 3)
    with pytest.raises(ValueError, match=r"bias must be a float tensor \[3, 4, 4\]"):
        hk.QuantizedTemplates(features(3, 8, 4, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="bias contains NaN"):
        hk.QuantizedTemplates(features(3, 8, 4, 4), torch.full((3, 4, 4), float("nan")))
    with pytest.raises(ValueError, match="rows must be a float tensor"):
        hk.QuantizedRows(torch.zeros(0, 8))
    with pytest.raises(ValueError, match="indices must lie in"):
        hk.mutual_match(features(1, 8, 4, 4), bank, 3, 3, indices=torch.tensor([[3]]))
    rows = hk.QuantizedRows(features(5, 8, 1, 1)[:, :, 0, 0])
    with pytest.raises(ValueError, match="rows must match the query's channels"):
        hk.global_match(features(1, 7, 4, 4), rows)


# ---------------------------------------------------------------- the detector in int8
def _detector(precision: str, **options):
    import hetmm

    return hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision=precision, **options)


def test_int8_detector_scores_as_float32_does_within_the_rounding():
    from helpers import random_images

    train, query = random_images(6, 0), random_images(3, 5)
    exact = _detector("fp32").fit(train)
    rounded = _detector("int8").fit(train)
    assert rounded.matching_dtype == torch.int8 and rounded.feature_dtype == torch.float32
    for layer, p in rounded.params.active_layers.items():
        assert isinstance(rounded.bank.prepared(layer, rounded.device, torch.int8, p.fore, p.isolation),
                          hk.QuantizedTemplates)
    a, b = exact.predict(query), rounded.predict(query)
    # every layer's similarities move by the rounding (~0.005 here); the maps sum three layers' dissimilarities
    assert (a.anomaly_map - b.anomaly_map).abs().max() < 0.05
    assert (a.pred_score - b.pred_score).abs().max() < 0.05
    assert (a.anomaly_map - b.anomaly_map).abs().mean() < 0.01


def test_int8_bank_round_trip_hot_update_and_retrieval(tmp_path):
    import hetmm
    from helpers import random_images

    images = random_images(6, 0)
    det = _detector("int8", retrieval_k=2).fit(images)
    # a training image retrieves itself: its int8 self-similarity is 1 to the rounding of its length
    assert det.predict(images[4:5]).pred_score.item() < 0.02
    assert det.thresholds() is not None  # calibrated leave-one-out with the masked int8 kernel
    path = det.save(tmp_path / "int8.safetensors")
    loaded = hetmm.HETMM.load(path, precision="int8")
    assert all(t.dtype == torch.float32 for t in loaded.bank.features.values())  # rounded when matched, not stored
    query = random_images(2, 3)
    before = det.predict(query)
    assert torch.equal(loaded.predict(query).anomaly_map, before.anomaly_map)
    newcomer = random_images(1, 77)
    loaded.add_templates(newcomer)
    assert len(loaded.bank) == 7 and loaded.predict(newcomer).pred_score.item() < 0.02


def test_the_command_line_offers_every_precision():
    from hetmm.cli import PRECISION_CHOICES
    from hetmm.detector import PRECISIONS

    assert set(PRECISION_CHOICES) == {"auto", *PRECISIONS}
