"""Every Triton kernel, as its launcher runs it at the paper's shapes, compiles for sm_80 and sm_90
(without a GPU) without spills, within shared memory, on the tensor cores and with 16-byte loads.

``tests/kernel_stats.py`` records the launchers' real launches and compiles them through the JIT's
own binder; this runs it once per architecture (in parallel: CI has two cores) and checks its rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([str(HERE.parent), *sys.path]))
    env.pop("TRITON_CACHE_DIR", None)  # a fresh cache each run: the register report comes from ptxas
    runs = {arch: subprocess.Popen([sys.executable, str(HERE / "kernel_stats.py"), str(arch), "ci"], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for arch in ARCHS}
    outputs = {arch: run.communicate(timeout=900) for arch, run in runs.items()}
    return {arch: (runs[arch].returncode, outputs[arch][0], outputs[arch][1]) for arch in ARCHS}


def _rows(compiled, arch):
    returncode, stdout, stderr = compiled[arch]
    rows = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert rows and "compilations" in rows[-1], stdout[-2000:] + stderr[-4000:]
    return returncode, rows[:-1], rows[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_keeps_the_rules(compiled, arch):
    returncode, rows, summary = _rows(compiled, arch)
    broken = [(row["kernel"], row["cases"][0], row["problems"]) for row in rows if row["problems"]]
    assert returncode == 0 and not broken and summary["failures"] == 0, broken
    assert {row["kernel"] for row in rows} >= {
        "_mutual_kernel", "_mutual_resident_kernel", "_window_max_kernel", "_aggregate_kernel",
        "_block_histogram_kernel", "_trimmed_topk_kernel", "_pts_select_kernel", "_naive_window_max_kernel",
        "_window_argmax_kernel"}
    assert all(row["spill_bytes"] == 0 and row["registers"] <= 255 for row in rows
               if row["kernel"] != "_naive_window_max_kernel")


@pytest.mark.parametrize("arch", ARCHS)
def test_matching_on_tensor_cores_and_few_compilations(compiled, arch):
    _, rows, _ = _rows(compiled, arch)
    matching = [row for row in rows if row["kernel"] in ("_mutual_kernel", "_mutual_resident_kernel")]
    sixteen = [row for row in matching if row["dtype"] in ("float16", "bfloat16")]
    assert sixteen and all(row["wgmma"] or row["mma_sync"] for row in sixteen)
    if arch == 90:  # batch 32 at layer 1: 128 rows a program, wgmma
        goal = [row for row in sixteen if any(case.startswith("mutual layer1 b32") for case in row["cases"])]
        assert goal and all(row["wgmma"] for row in goal)
    assert not any(row["wgmma"] or row["mma_sync"] for row in matching if row["dtype"] == "float32")  # IEEE
    # window radii are run-time values: the paper's 15 strings at one layer, batch and dtype share few kernels
    layer1 = [row for row in matching if any(c.startswith("mutual layer1 b32 fp16 ") for c in row["cases"])]
    windows = {case for row in layer1 for case in row["cases"] if case.startswith("mutual layer1 b32 fp16 ")}
    assert len(windows) >= 7 and len(layer1) <= 3  # one kernel per config the model picks, not per window
