"""Shared benchmark machinery: devices, the matmul roofline, and the summary table.

Each benchmark records its useful GFLOP/s (``2*B*T*H*W*k^2*C``, k the larger window)
and its fraction of a plain ``torch.matmul`` measured in the same run; the table at the
end also gives each backend's speed-up over the reference on the same problem.
Set ``HETMM_BENCH_REPORT=path.md`` to also write the table as markdown.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS: list[dict] = []
ROOFLINE: dict[str, float] = {}


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def backends() -> list[str]:
    """The backends to time, in order; ``HETMM_BENCH_BACKENDS=triton,torch`` picks and orders them."""
    available = ["reference", "torch", "triton"] if torch.cuda.is_available() else ["reference", "torch"]
    chosen = os.environ.get("HETMM_BENCH_BACKENDS")
    return [b for b in chosen.split(",") if b in available] if chosen else available


def run(benchmark, fn, rounds: int) -> None:
    """Time ``fn`` (synchronised on a GPU) for ``rounds`` rounds, with one warm-up round when rounds > 1."""

    def timed():
        out = fn()
        synchronize()
        return out

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1 if rounds > 1 else 0, iterations=1)


def matmul_shape() -> tuple[int, int, int]:
    """(M, K, N) of the roofline matmul: large enough to reach the device's peak."""
    return (8192, 8192, 8192) if torch.cuda.is_available() else (2048, 512, 2048)


def measure_matmul(dtype: torch.dtype, repeats: int = 20) -> float:
    """FLOP/s of the roofline ``[M, K] @ [K, N]`` (best of ``repeats``) on the benchmark device."""
    m, k, n = matmul_shape()
    a = torch.randn(m, k, device=device()).to(dtype)
    b = torch.randn(k, n, device=device()).to(dtype)
    for _ in range(3):
        a @ b
    synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


@pytest.fixture(scope="session")
def matmul_rate() -> dict[str, float]:
    if not ROOFLINE:
        ROOFLINE["float32"] = measure_matmul(torch.float32)
        ROOFLINE["bfloat16"] = measure_matmul(torch.bfloat16)
        if torch.cuda.is_available():
            ROOFLINE["float16"] = measure_matmul(torch.float16, repeats=50)
        else:  # int8 products with int32 accumulation (torch._int_mm), what the CPU's int8 matching is held to
            from cpu_rates import SHAPES, product_rate

            ROOFLINE["int8"] = max(product_rate(torch.int8, shape) for shape in SHAPES) * 1e9
    return ROOFLINE


def record(benchmark, flops: float, rate: dict[str, float], dtype: torch.dtype, model_ms: float | None = None,
           **key) -> None:
    """Attach GFLOP/s and the roofline fraction to a finished benchmark and keep it for the table.

    The fraction is of the matmul rate in the same dtype (float32 on the CPU paths,
    which compute float16 in float32). ``model_ms``: the traffic model's prediction
    (``hetmm_kernels.traffic``) for this launch on this GPU, printed beside the time.
    """
    seconds = benchmark.stats.stats.median
    roofline = rate.get(str(dtype).replace("torch.", ""), rate["float32"])
    row = dict(key, dtype=str(dtype).replace("torch.", ""), ms=seconds * 1e3, model_ms=model_ms,
               gflops=flops / seconds / 1e9 if flops else None, fraction=flops / seconds / roofline if flops else None)
    benchmark.extra_info.update(row)
    RESULTS.append(row)
    report = os.environ.get("HETMM_BENCH_REPORT")
    if report:  # row by row, so a run cut short by a time limit still leaves its figures
        with open(os.path.splitext(report)[0] + ".rows.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(dict(row, roofline=ROOFLINE)) + "\n")


def _table() -> list[str]:
    if not RESULTS:
        return []
    def key_of(r):
        return tuple((k, v) for k, v in r.items()
                     if k not in ("backend", "ms", "gflops", "fraction", "mode", "model_ms"))

    # speed-ups are against the slow implementations of the same problem in the same run
    ref_ms = {key_of(r): r["ms"] for r in RESULTS if r["backend"] == "reference"}
    naive_ms = {key_of(r): r["ms"] for r in RESULTS if r["backend"] == "naive"}
    if torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        from cpu_rates import cpu_identity

        cpu = cpu_identity()
        where = f"{cpu['model name']} (family {cpu['family']}, model {cpu['model']}, {cpu['mhz']} MHz; {cpu['isa']})"
    lines = [
        "matmul roofline: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in ROOFLINE.items())
        + f" on {where}",
        "",
        "| op | layer | windows | B | T | dtype | backend | mode | ms | model ms | GFLOP/s | of matmul | vs reference "
        "| vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(RESULTS, key=lambda r: (r["op"], r["layer"], r["windows"], r["batch"], r["backend"], r["mode"])):
        key = key_of(r)
        speedup = f"{ref_ms[key] / r['ms']:.1f}x" if key in ref_ms and r["backend"] != "reference" else ""
        over_naive = f"{naive_ms[key] / r['ms']:.1f}x" if key in naive_ms and r["backend"] != "naive" else ""
        gflops = "-" if r["gflops"] is None else f"{r['gflops']:.1f}"
        fraction = "-" if r["fraction"] is None else f"{r['fraction']:.3f}"
        model = "-" if r.get("model_ms") is None else f"{r['model_ms']:.3f}"
        lines.append(
            f"| {r['op']} | {r['layer']} | {r['windows']} | {r['batch']} | {r['templates']} | {r['dtype']} | "
            f"{r['backend']} | {r['mode']} | {r['ms']:.2f} | {model} | {gflops} | {fraction} | {speedup} | {over_naive} |"
        )
    return lines


def pytest_terminal_summary(terminalreporter):
    lines = _table()
    if not lines:
        return
    terminalreporter.write_sep("=", "useful GFLOP/s as a fraction of torch.matmul, same run")
    for line in lines:
        terminalreporter.write_line(line)
    report = os.environ.get("HETMM_BENCH_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.splitext(report)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump({"roofline": ROOFLINE, "results": RESULTS}, f, indent=1)
