"""ATM matching on the paper's layer shapes (Wide-ResNet-101-2 at 256x256), T = 60 templates.

``pytest benchmarks --benchmark-only``. Steady state uses a prepared template bank
(laid out once, as the detector does); cold passes the raw template tensor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hetmm_kernels as hk
from conftest import backends, device, matmul_shape, record, run

LAYERS = {"layer1": (256, 64), "layer2": (512, 32), "layer3": (1024, 16)}  # channels, side
TEMPLATES = 60
BACK_WINDOW = 3


def _features(n, channels, side, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, channels, side, side, generator=g), dim=1).to(device=device(), dtype=dtype)


def _dtype_for(backend):
    # the GPU fast path multiplies half precision; the CPU paths compute in float32
    return torch.float16 if backend == "triton" else torch.float32


def _model_ms(backend, query, fore_window, back_window):
    """The traffic model's time for the Triton launch ``mutual_match`` makes here (GPU runs only)."""
    if backend != "triton" or query.device.type != "cuda":
        return None
    from hetmm_kernels import traffic
    from hetmm_kernels.triton_ops import atm

    batch, channels, height, width = query.shape
    fore, back = fore_window // 2, back_window // 2
    config = atm.mutual_config(query.permute(0, 2, 3, 1), TEMPLATES, fore, back, False)
    return traffic.matching(config, batch, height, width, channels, TEMPLATES, fore, back, query.dtype,
                            traffic.gpu_for(query.device)).seconds * 1e3


def _rounds(backend):
    return 1 if backend == "reference" else 3


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("window", [3, 5, 7, 13])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("backend", backends())
def test_mutual_match(benchmark, matmul_rate, backend, layer, window, batch):
    """mutual_match with forward window k and backward window 3, steady state."""
    if backend == "reference" and (window == 13 or (batch == 8 and window != {"layer1": 5}.get(layer, 7))):
        pytest.skip("the reference runs on the goal shapes only (it takes seconds per call)")
    channels, side = LAYERS[layer]
    dtype = _dtype_for(backend)
    query = _features(batch, channels, side, dtype, 0)
    bank = hk.prepare_templates(_features(TEMPLATES, channels, side, dtype, 1))
    run(benchmark, lambda: hk.mutual_match(query, bank, window, BACK_WINDOW, backend=backend), _rounds(backend))
    k = max(window, BACK_WINDOW)
    flops = 2 * batch * TEMPLATES * side * side * (k | 1) ** 2 * channels
    record(benchmark, flops, matmul_rate, dtype, _model_ms(backend, query, window, BACK_WINDOW), op="mutual_match",
           layer=layer, windows=f"{window}x{BACK_WINDOW}", batch=batch, templates=TEMPLATES, backend=backend,
           mode="steady")


@pytest.mark.parametrize("layer,window", [("layer1", 5), ("layer2", 7), ("layer3", 7)])
@pytest.mark.parametrize("backend", [b for b in backends() if b != "reference"])
def test_mutual_match_cold(benchmark, matmul_rate, backend, layer, window):
    """The same at batch 8, but with the raw templates: their layout is rebuilt on every call."""
    channels, side = LAYERS[layer]
    dtype = _dtype_for(backend)
    query = _features(8, channels, side, dtype, 0)
    temp = _features(TEMPLATES, channels, side, dtype, 1)
    run(benchmark, lambda: hk.mutual_match(query, temp, window, BACK_WINDOW, backend=backend), _rounds(backend))
    flops = 2 * 8 * TEMPLATES * side * side * window**2 * channels
    record(benchmark, flops, matmul_rate, dtype, _model_ms(backend, query, window, BACK_WINDOW), op="mutual_match",
           layer=layer, windows=f"{window}x{BACK_WINDOW}", batch=8, templates=TEMPLATES, backend=backend, mode="cold")


@pytest.mark.parametrize("layer,window", [("layer1", 5), ("layer2", 7), ("layer3", 7)])
@pytest.mark.parametrize("backend", [b for b in backends() if b != "reference"])
def test_mutual_match_bfloat16(benchmark, matmul_rate, backend, layer, window):
    """bfloat16 features at batch 8, steady state (the CPU path multiplies them natively)."""
    channels, side = LAYERS[layer]
    query = _features(8, channels, side, torch.bfloat16, 0)
    bank = hk.prepare_templates(_features(TEMPLATES, channels, side, torch.bfloat16, 1))
    run(benchmark, lambda: hk.mutual_match(query, bank, window, BACK_WINDOW, backend=backend), _rounds(backend))
    flops = 2 * 8 * TEMPLATES * side * side * window**2 * channels
    record(benchmark, flops, matmul_rate, torch.bfloat16, _model_ms(backend, query, window, BACK_WINDOW),
           op="mutual_match", layer=layer, windows=f"{window}x{BACK_WINDOW}", batch=8, templates=TEMPLATES,
           backend=backend, mode="steady")


@pytest.mark.parametrize("op,window", [("forward_ATM", 5), ("backward_ATM", 3)])
@pytest.mark.parametrize("backend", backends())
def test_drop_in_ops(benchmark, matmul_rate, backend, op, window):
    """The published ops on layer 1 at batch 8 (they write the full [B, T, H, W] map)."""
    channels, side = LAYERS["layer1"]
    dtype = _dtype_for(backend)
    query = _features(8, channels, side, dtype, 0)
    bank = hk.prepare_templates(_features(TEMPLATES, channels, side, dtype, 1))
    fn = getattr(hk, op)
    run(benchmark, lambda: fn(query, bank, window, backend=backend), _rounds(backend))
    flops = 2 * 8 * TEMPLATES * side * side * (window | 1) ** 2 * channels
    record(benchmark, flops, matmul_rate, dtype, op=op, layer="layer1", windows=str(window), batch=8,
           templates=TEMPLATES, backend=backend, mode="steady")


GOAL = dict(layer="layer1", window=13, batch=32)  # the target shape: 40% of fp16 matmul, 20x naive


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the goal shape is a GPU benchmark (seconds per call here)")
@pytest.mark.parametrize("backend", ["triton", "naive"])
def test_goal_shape(benchmark, matmul_rate, backend):
    """Layer 1, 13x13 windows both ways, batch 32, 60 templates, fp16: fused kernel vs one thread per output."""
    from naive_atm import naive_mutual_match

    channels, side = LAYERS[GOAL["layer"]]
    query = _features(GOAL["batch"], channels, side, torch.float16, 0)
    temp = _features(TEMPLATES, channels, side, torch.float16, 1)
    window = GOAL["window"]
    if backend == "naive":
        fn = lambda: naive_mutual_match(query, temp, window, window)  # noqa: E731
    else:
        bank = hk.prepare_templates(temp)
        fn = lambda: hk.mutual_match(query, bank, window, window, backend="triton")  # noqa: E731
    run(benchmark, fn, 3)
    flops = 2 * GOAL["batch"] * TEMPLATES * side * side * window**2 * channels
    record(benchmark, flops, matmul_rate, torch.float16, _model_ms(backend, query, window, window),
           op="mutual_match", layer=GOAL["layer"], windows=f"{window}x{window}", batch=GOAL["batch"],
           templates=TEMPLATES, backend=backend, mode="steady")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matmul_roofline(benchmark, matmul_rate, dtype):
    """The plain matmul every fraction is measured against (float16 on a GPU only)."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        pytest.skip("the CPU paths compute float16 in float32")
    m, k, n = matmul_shape()
    a = torch.randn(m, k, device=device()).to(dtype)
    b = torch.randn(k, n, device=device()).to(dtype)
    run(benchmark, lambda: a @ b, 10)
    record(benchmark, 2 * m * k * n, matmul_rate, dtype, op="torch.matmul", layer="-",
           windows=f"{m}x{k}x{n}", batch="-", templates="-", backend="torch", mode="-")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("window", [7, 15, 23, 31])
@pytest.mark.parametrize("path", ["tiled", "dense"])
def test_cpu_wide_windows(benchmark, matmul_rate, path, window, batch):
    """The CPU path's two layouts on lite0's layer 3 as ``DEFAULT`` matches it (112 channels + isolation,
    16 x 16 at 256 px, 40 templates, bfloat16), forward window k, backward 3; ``prefers_dense`` picks
    between them. GFLOP/s counts every template pixel against every query pixel (the dense product)."""
    from hetmm_kernels.torch_ops import atm as torch_atm

    if torch.cuda.is_available():
        pytest.skip("a CPU-path benchmark: not timed on the GPU machine's short device budget")
    channels, side, templates = 113, 16, 40
    query = _features(batch, channels, side, torch.bfloat16, 0).cpu()
    bank = hk.prepare_templates(_features(templates, channels, side, torch.bfloat16, 1).cpu())
    fore, back = window // 2, BACK_WINDOW // 2
    if path == "dense":
        layout = bank.layout("torch-dense", torch_atm.DenseTemplates)
        run(benchmark, lambda: torch_atm.mutual_max_dense(query, layout, fore, back), 5)
    else:
        layout = torch_atm.tiled_layout(bank, max(fore, back), batch)
        run(benchmark, lambda: torch_atm.mutual_max_tiled(query, layout, fore, back), 5)
    flops = 2 * batch * templates * (side * side) ** 2 * channels
    record(benchmark, flops, matmul_rate, torch.bfloat16, None, op="mutual_match", layer="lite0 layer3",
           windows=f"{window}x{BACK_WINDOW}", batch=batch, templates=templates, backend=f"torch-{path}",
           chosen=torch_atm.prefers_dense(side, side, max(fore, back), batch) == (path == "dense"), mode="steady")


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("percent", [5, 10, 20, 100])
def test_layer2_coreset_fallback(benchmark, matmul_rate, percent, batch):
    """``DEFAULT``'s layer-2 coreset fallback (``_c=``) on lite0's layer 2 (40 channels + isolation,
    32 x 32 at 256 px, 40 templates, bfloat16): ``global_match`` against ``percent``% of the 40,960
    template pixels; 100% is a forward window over the whole map (``r15-L2-63x3``), which costs 10x."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-path benchmark: not timed on the GPU machine's short device budget")
    channels, side, templates = 41, 32, 40
    query = _features(batch, channels, side, torch.bfloat16, 0).cpu()
    rows = _features(templates, channels, side, torch.bfloat16, 1).cpu().permute(0, 2, 3, 1).reshape(-1, channels)
    rows = rows[:max(1, len(rows) * percent // 100)].contiguous()
    run(benchmark, lambda: hk.global_match(query, rows, out_dtype=torch.float32), 5)
    record(benchmark, 2 * batch * side * side * len(rows) * channels, matmul_rate, torch.bfloat16, None,
           op="global_match", layer="lite0 layer2", windows=f"coreset {percent}%", batch=batch, templates=templates,
           backend="torch", mode="steady")


LITE0_LAYERS = {"layer1": (24, 64, 5), "layer2": (40, 32, 9), "layer3": (112, 16, 23)}  # channels, side, fore window


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layer", [*LITE0_LAYERS, "layer2 coreset"])
@pytest.mark.parametrize("products", ["bfloat16", "int8"])
def test_cpu_int8_against_bfloat16(benchmark, matmul_rate, products, layer, batch):
    """``DEFAULT``'s matching of lite0 at 256 px on the CPU, 40 templates with isolation, as the detector runs it:
    bfloat16 products (the isolation as one more channel) against int8 ones (``QuantizedTemplates``, the isolation
    as a bias); ``layer2 coreset``: its 10% coreset (4,096 rows). Useful products only: the pairs inside the
    larger window (clipped at the borders), or every query pixel against every row."""
    if torch.cuda.is_available():
        pytest.skip("a CPU-path benchmark: not timed on the GPU machine's short device budget")
    channels, side, fore = LITE0_LAYERS[layer.split()[0]]
    templates, g = 40, torch.Generator().manual_seed(2)
    query = _features(batch, channels, side, torch.float32, 0).cpu()
    temp = _features(templates, channels, side, torch.float32, 1).cpu()
    isolation = torch.rand(templates, side, side, generator=g)
    if layer.endswith("coreset"):
        rows = temp.permute(0, 2, 3, 1).reshape(-1, channels)
        chosen = torch.randperm(len(rows), generator=g)[:len(rows) // 10]
        if products == "int8":
            coreset = hk.QuantizedRows(rows[chosen], isolation.reshape(-1)[chosen])
            q = query
        else:
            coreset = torch.cat([rows[chosen], isolation.reshape(-1)[chosen, None]], 1).to(torch.bfloat16)
            q = torch.cat([query, torch.ones(batch, 1, side, side)], 1).to(torch.bfloat16)
        run(benchmark, lambda: hk.global_match(q, coreset, out_dtype=torch.float32), 5)
        flops, windows = 2 * batch * side * side * len(chosen) * channels, "coreset 10%"
    else:
        if products == "int8":
            bank, q = hk.QuantizedTemplates(temp, isolation), query
        else:
            bank = hk.prepare_templates(torch.cat([temp, isolation[:, None]], 1).to(torch.bfloat16))
            q = torch.cat([query, torch.ones(batch, 1, side, side)], 1).to(torch.bfloat16)
        run(benchmark, lambda: hk.mutual_match(q, bank, fore, BACK_WINDOW, out_dtype=torch.float32), 5)
        reach = fore // 2
        span = sum(min(side - 1, i + reach) - max(0, i - reach) + 1 for i in range(side))
        flops, windows = 2 * batch * templates * span * span * channels, f"{fore}x{BACK_WINDOW}"
    record(benchmark, flops, matmul_rate, torch.int8 if products == "int8" else torch.bfloat16, None,
           op="lite0 DEFAULT match", layer=layer, windows=windows, batch=batch, templates=templates,
           backend=f"torch-{products}", mode="steady")
