"""What every CPU speed table starts with: the CPU (family / model / MHz, the ISA that decides hetmm's precision)
and its matrix-product rates in float32, bfloat16 and int8, measured in the same run.

Ratios between systems depend on the CPU: hetmm's matching runs at its product rates, the OpenVINO networks it is
compared with at oneDNN's convolution rates. A table read on another CPU is read through these numbers.

    python benchmarks/cpu_rates.py          # one line
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

# (M, K, N) of the measured products: the shapes of lite0's layer 3 at batch 1 ([256 query px, 112 ch] against
# 40 x 256 template px) and of a square block that reaches the BLAS peak.
SHAPES = ((256, 112, 10240), (1024, 256, 4096))


def cpu_identity() -> dict:
    """``{"model name", "family", "model", "mhz", "isa"}`` from /proc/cpuinfo (Linux), else what platform says."""
    info = {"model name": platform.processor() or platform.machine(), "family": "?", "model": "?", "mhz": "?", "isa": ""}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    info.update({"model name": fields.get("model name", info["model name"]), "family": fields.get("cpu family", "?"),
                 "model": fields.get("model", "?"), "mhz": fields.get("cpu MHz", "?").split(".")[0],
                 "isa": " ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni", "amx_int8")
                                 if f in flags)})
    return info


def product_rate(dtype: torch.dtype, shape: tuple, repeats: int = 5, calls: int = 10) -> float:
    """GFLOP/s (GOP/s for int8: ``torch._int_mm``, int32 accumulation) of ``[M, K] @ [K, N]``, best of ``repeats``."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.int8:
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=generator)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=generator)
        product = lambda: torch._int_mm(a, b)  # noqa: E731
    else:
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        product = lambda: a @ b  # noqa: E731
    for _ in range(3):
        product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            product()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * m * k * n / best / 1e9


def matmul_rates() -> dict:
    """``{"float32": ..., "bfloat16": ..., "int8": ...}``: the best GFLOP/s over ``SHAPES`` (int8: GOP/s)."""
    rates = {}
    for dtype in (torch.float32, torch.bfloat16, torch.int8):
        try:
            rates[str(dtype).replace("torch.", "")] = max(product_rate(dtype, shape) for shape in SHAPES)
        except RuntimeError:  # no int8 product kernel in this torch build
            continue
    return rates


def header(rates: dict | None = None) -> str:
    """One line: the CPU, its threads and its product rates."""
    cpu = cpu_identity()
    rates = matmul_rates() if rates is None else rates
    measured = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
    return (f"CPU: {cpu['model name']} (family {cpu['family']}, model {cpu['model']}, {cpu['mhz']} MHz; "
            f"{cpu['isa'] or 'no bf16/VNNI flags'}), {torch.get_num_threads()} threads; "
            f"matmul GFLOP/s (int8: GOP/s): {measured}")


if __name__ == "__main__":
    print(header())
