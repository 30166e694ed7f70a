"""Compile every Triton kernel for real NVIDIA targets, ahead of time, without a GPU.

The interpreter forgives what the compiler will not (non-constexpr globals, block
shapes, dot sizes); this lowers each kernel to a cubin with Triton's bundled ptxas.
Run as a script with TRITON_INTERPRET=0 (the tests do it in a subprocess); prints one
line per kernel configuration and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hetmm_kernels.triton_ops import aggregate, atm, pts, retrieval  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
import naive_atm  # noqa: E402

# (height, width, reach, batch, channels): a 1x1 map, the paper's layers, a window larger than the map
PROBLEMS = [(1, 1, 1, 1, 3), (64, 64, 2, 8, 256), (32, 32, 3, 32, 512), (16, 16, 6, 1, 1024), (5, 7, 6, 2, 24)]
DTYPES = ["fp16", "bf16", "fp32"]


def _signature(kernel, pointer, constexprs, pointer_types=None):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = (pointer_types or {}).get(name, f"*{pointer}")
        else:
            sig[name] = "i32"
    return sig


def configurations():
    for height, width, reach, batch, channels in PROBLEMS:
        cfg = atm.tile_config(height, width, reach, batch, channels)
        shared = dict(TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_C=cfg["BLOCK_C"],
                      **atm.union_shape(cfg, height, width, reach))
        for dtype in DTYPES:
            precision = "ieee" if dtype == "fp32" else "tf32"
            window = dict(shared, RADIUS=reach, BLOCK_A=cfg["BLOCK"], DOT_PRECISION=precision)
            yield "window_max", atm._window_max_kernel, dtype, window, None
            mutual = dict(shared, FORE_R=reach, BACK_R=max(0, reach - 1), REACH=reach, BLOCK_B=cfg["BLOCK"],
                          DOT_PRECISION=precision, HAS_INDEX=False)
            outputs = {"fore_ptr": "*fp32", "back_ptr": "*fp32", "index_ptr": "*i64"}
            yield "mutual", atm._mutual_kernel, dtype, mutual, outputs
    for dtype in DTYPES:  # per-query template sets (retrieval): one map per program
        cfg = atm.tile_config(64, 64, 2, 8, 256, one_map=True)
        indexed = dict(TILE_H=cfg["TILE_H"], TILE_W=cfg["TILE_W"], BLOCK_C=cfg["BLOCK_C"],
                       **atm.union_shape(cfg, 64, 64, 2), FORE_R=2, BACK_R=1, REACH=2, BLOCK_B=1,
                       DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", HAS_INDEX=True)
        yield "mutual-indexed", atm._mutual_kernel, dtype, indexed, {"fore_ptr": "*fp32", "back_ptr": "*fp32",
                                                                      "index_ptr": "*i64"}
    # the extremes of the tuning space (most promising, largest tile, most warps) must compile too
    space = atm.config_space(64, 64, 6, 32, 256)
    extremes = {0: space[0], 1: max(space, key=lambda c: c["TILE_H"] * c["TILE_W"] * c["BLOCK"]),
                2: max(space, key=lambda c: (c["num_warps"], c["num_stages"], c["BLOCK_C"]))}
    for config in extremes.values():
        constexprs, options = dict(config), {}
        for name in ("num_warps", "num_stages"):
            options[name] = constexprs.pop(name)
        tuned = dict(TILE_H=config["TILE_H"], TILE_W=config["TILE_W"], BLOCK_C=config["BLOCK_C"],
                     **atm.union_shape(config, 64, 64, 6), FORE_R=6, BACK_R=6, REACH=6, BLOCK_B=config["BLOCK"],
                     DOT_PRECISION="tf32", HAS_INDEX=False)
        yield "mutual-tuned", atm._mutual_kernel, "fp16", tuned, \
            {"fore_ptr": "*fp32", "back_ptr": "*fp32", "index_ptr": "*i64"}, options
    # the largest aggregation and retrieval tiles of their spaces, with their warps
    big_tile = max(aggregate.config_space(256, 256, 64, 64), key=lambda c: (c["BLOCK_H"] * c["BLOCK_W"], c["num_warps"]))
    yield "aggregate-tuned", aggregate._aggregate_kernel, "fp32", dict(
        MAP_H=64, MAP_W=64, BLOCK_H=big_tile["BLOCK_H"], BLOCK_W=big_tile["BLOCK_W"], SCORE_MAX=True, CHUNK=16), \
        {"extent_ptr": "*i32"}, {k: big_tile[k] for k in ("num_warps", "num_stages")}
    big_block = max(retrieval.topk_space(32, 25), key=lambda c: (c["BLOCK_Q"] * c["BLOCK_R"], c["num_warps"]))
    yield "trimmed_topk-tuned", retrieval._trimmed_topk_kernel, "fp32", dict(
        USE_KL=True, COUNTS=True, BLOCK_Q=big_block["BLOCK_Q"], BLOCK_R=big_block["BLOCK_R"], BLOCK_D=8, BLOCK_BINS=16,
        CAND=16), \
        {"bank_ptr": "*u8", "key_ptr": "*i64"}, {"num_warps": big_block["num_warps"]}
    # the benchmarks' one-thread-per-output baseline, on the goal shape's window
    yield "naive-baseline", naive_atm._naive_window_max_kernel, "fp16", dict(RADIUS=6, BLOCK=256), \
        {"out_ptr": "*fp32"}
    for map_side, block in ((16, 16), (64, 32)):
        shape = dict(MAP_H=map_side, MAP_W=map_side, BLOCK_H=block, BLOCK_W=block, SCORE_MAX=True, CHUNK=16)
        yield "aggregate", aggregate._aggregate_kernel, "fp32", shape, {"extent_ptr": "*i32"}
    for dtype in ("fp16", "fp32"):
        yield "block_histogram", retrieval._block_histogram_kernel, dtype, \
            dict(BLOCK_PIX=64, BLOCK_C=32, BLOCK_BINS=16, BLOCK_K=16, WRITE_CODES=True), \
            {"hist_ptr": "*fp32", "code_ptr": "*i64"}, {"num_warps": 8}
    for use_kl in (True, False):
        for counts in (True, False):  # a compact bank of counts, or float histograms
            yield "trimmed_topk", retrieval._trimmed_topk_kernel, "fp32", \
                dict(USE_KL=use_kl, COUNTS=counts, BLOCK_Q=16, BLOCK_R=32, BLOCK_D=8, BLOCK_BINS=16, CAND=16), \
                {"bank_ptr": "*u8" if counts else "*fp32", "key_ptr": "*i64"}
    for count in (16, 200):
        yield "pts_select", pts._pts_select_kernel, "fp32", dict(BLOCK_N=triton.next_power_of_2(count)), \
            {"labels_ptr": "*i64", "picked_ptr": "*i64"}


def main(arch: int) -> int:
    target = GPUTarget("cuda", arch, 32)
    for name, kernel, dtype, constexprs, pointer_types, *options in configurations():
        source = ASTSource(kernel, _signature(kernel, dtype, constexprs, pointer_types), constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options[0] if options else None)
        uses_mma = "mma" in compiled.asm["ptx"]
        blocks = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.startswith(("TILE", "BLOCK", "MAP")))
        blocks = blocks or "-"
        launch = ",".join(f"{k}={v}" for k, v in (options[0] if options else {}).items())
        print(f"sm_{arch} {name} {dtype} {blocks}{',' + launch if launch else ''} ok tensor-cores={uses_mma}")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
