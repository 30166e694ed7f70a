"""Compile every Triton kernel as the JIT compiles it when the launchers run, for sm_80 and sm_90, without a GPU.

The launchers run on CPU tensors of the real shapes with Triton's launch replaced by a
recorder, so every kernel, argument, constexpr and launch option is the launcher's own
(the multiprocessor count and shared-memory budget are the target GPU's). Each recorded
launch goes through the JIT's own binder (which adds what the JIT adds at run time:
``tt.divisibility=16`` on pointers and ints that are multiples of 16, ints equal to 1 as
constants) and is compiled with Triton's bundled ptxas. From the artefacts: registers and
spills (ptxas ``-v``), shared memory, the MMA kind and the width of global loads (PTX).

    TRITON_INTERPRET=0 python tests/kernel_stats.py 90 ci     # the CI subset: one JSON line per compilation
    TRITON_INTERPRET=0 python tests/kernel_stats.py 80 full   # + every config of the matching tuning space
    TRITON_INTERPRET=0 python tests/kernel_stats.py 90 mvtec  # how many kernels a full MVTec AD run compiles

Exits 1 if a launch breaks a rule (see ``problems``); ``tests/test_triton_compile.py`` runs it.
Identical specialisations are compiled once: the count of compilations is what a run would JIT.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="hetmm-kstats-"))  # fresh: the ptxas log
os.environ["HETMM_AUTOTUNE"] = "0"  # the heuristic defaults, not a tuning cache of this machine

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from hetmm.parameters import DEFAULT, MVTEC_AD, parse_params  # noqa: E402
from hetmm_kernels.triton_ops import aggregate, atm, global_match, pts, retrieval, window_argmax  # noqa: E402

GPUS = {90: dict(name="H100/H200", sms=132, shared=232448), 80: dict(name="A100", sms=108, shared=166912)}
# The paper's features: Wide-ResNet-101-2 at 256 px, 60 templates (PTS's tiny set)
LAYERS = {"layer1": (256, 64), "layer2": (512, 32), "layer3": (1024, 16)}
TEMPLATES = 60
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MATCHING = ("_mutual_kernel", "_mutual_resident_kernel", "_window_max_kernel", "_global_max_kernel")
# the benchmarks' one-thread-per-output baseline (the published design): compiled, not held to the rules
# (sm_90: 40 registers and 16 spill bytes as published-style code gets them)
BASELINES = ("_naive_window_max_kernel",)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclass
class Launch:
    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: tuple
    cases: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def recording(arch: int):
    """Launches are recorded, not run; the launchers see ``arch``'s multiprocessors and shared memory."""
    launches = []
    saved = JITFunction.run, atm._multiprocessors, atm.device_shared_bytes

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    JITFunction.run = record
    atm._multiprocessors = lambda device: GPUS[arch]["sms"]
    atm.device_shared_bytes = lambda device: GPUS[arch]["shared"]
    try:
        yield launches
    finally:
        JITFunction.run, atm._multiprocessors, atm.device_shared_bytes = saved


def _maps(count, channels, side, dtype):
    return torch.empty(count, side, side, channels, dtype=dtype)  # pixel-major, values never read


def _windows(layer: str) -> set:
    """Every (fore, back) radius pair the paper's 15 strings and ``DEFAULT`` use at ``layer``."""
    pairs = set()
    for text in [*MVTEC_AD.values(), DEFAULT]:
        p = parse_params(text).layers.get(layer)
        if p is not None and p.fore and p.back:
            pairs.add((p.fore // 2, p.back // 2))
    return pairs


def matching_cases(batches=(1, 32)):
    """The fused matching at the paper's shapes, every window pair, dtype and batch; the drop-in ops."""
    for layer, (channels, side) in LAYERS.items():
        for dtype_name, dtype in DTYPES.items():
            templates = _maps(TEMPLATES, channels, side, dtype)
            for batch in batches:
                query = _maps(batch, channels, side, dtype)
                for fore, back in sorted(_windows(layer)):
                    yield f"mutual {layer} b{batch} {dtype_name} r{fore}/{back}", \
                        lambda q=query, t=templates, f=fore, b=back: atm.mutual_max(q, t, f, b)
            # per-query template sets (retrieval's top 10)
            query = _maps(32, channels, side, dtype)
            indices = torch.zeros(32, 10, dtype=torch.int64)
            yield f"mutual-indexed {layer} b32 {dtype_name} r2/1", \
                lambda q=query, t=templates, i=indices: atm.mutual_max(q, t, 2, 1, indices=i)
            # the published drop-in (forward_ATM, backward_ATM) at the layer's widest window
            widest = max(f for f, _ in _windows(layer))
            yield f"window_max {layer} b1 {dtype_name} r{widest}", \
                lambda t=templates, d=dtype, r=widest: atm.window_max(_maps(1, channels, side, d), t, r, d)


def other_cases():
    yield "aggregate 3 layers b32 256px blur", lambda: aggregate.aggregate_maps(
        [torch.empty(32, s, s) for s in (64, 32, 16)], [torch.empty(32, s, s) for s in (64, 32, 16)],
        (0.5, 0.5, 0.3), (1.0, 0.8, 0.5), (256, 256), (4.0, 33), "max")
    for dtype_name in ("fp16", "fp32"):
        yield f"block_histograms b32 {dtype_name}", lambda d=DTYPES[dtype_name]: retrieval.block_histograms(
            torch.empty(32, 272, 32, 32, dtype=d), torch.empty(12, 272, dtype=d), 5)
    for method in ("kl", "l2"):
        for queries in (1, 32):
            # a compact bank as the launcher streams it (bins padded to 16: one vector load a block), floats
            for bank in (torch.empty(200_000, 25, 16, dtype=torch.uint8), torch.empty(4096, 25, 13)):
                yield f"retrieve_topk q{queries} {method} {bank.dtype}", \
                    lambda q=queries, b=bank, m=method: retrieval.retrieve_topk(torch.empty(q, 25, 13), b, 49, 10,
                                                                               0.8, m)
    # a layer's coreset fallback: 10% of the templates' pixels, the paper's layer 2 and lite0's (41 -> 48 channels)
    for dtype_name, dtype in DTYPES.items():
        for batch, channels, side, rows in ((32, 512, 32, 6144), (8, 48, 32, 4096)):
            yield f"global_match b{batch} c{channels} {dtype_name}", \
                lambda b=batch, c=channels, s=side, n=rows, d=dtype: global_match.global_match(
                    torch.empty(b, c, s, s, dtype=d), torch.empty(n, c, dtype=d))
    # explanations: the forward maxima with their places, at the paper's layer 2 and lite0's (40 channels)
    for dtype_name, dtype in DTYPES.items():
        for channels, side, patch in ((512, 32, 9), (40, 32, 9)):
            yield f"forward_argmax c{channels} {dtype_name} {patch}x{patch}", \
                lambda c=channels, s=side, k=patch, d=dtype: window_argmax.forward_argmax(
                    torch.empty(1, c, s, s, dtype=d), _maps(TEMPLATES, c, s, d), k)
    yield "PTS 200 templates -> 60", lambda: pts.PTS(torch.empty(200, 64, 8, 8), torch.zeros(200, 8, 8, dtype=torch.int64),
                                                    60)


def extreme_cases():
    """The extremes of each tuning space (most promising, largest tile, most warps) and the naive baseline."""
    import naive_atm

    channels, side = LAYERS["layer1"]
    query, templates = _maps(32, channels, side, torch.float16), _maps(TEMPLATES, channels, side, torch.float16)
    space = atm.config_space(side, side, 6, 32, channels, dtype=torch.float16)
    extremes = {"first": space[0],
                "largest": max(space, key=lambda c: c["TILE_H"] * c["TILE_W"] * c["BLOCK"]),
                "most warps": max(space, key=lambda c: (c["num_warps"], c["num_stages"], c.get("BLOCK_C", 0)))}
    for which, config in extremes.items():
        yield f"mutual space {which} layer1 b32 fp16 r6/6", \
            lambda c=config: atm.mutual_max(query, templates, 6, 6, config=c)
    maps = [torch.empty(32, s, s) for s in (64, 32, 16)]
    big_tile = max(aggregate.config_space(256, 256, 64, 64), key=lambda c: (c["BLOCK_H"] * c["BLOCK_W"], c["num_warps"]))
    yield "aggregate space largest", lambda: aggregate.aggregate_maps(maps, maps, (0.5,) * 3, (1.0,) * 3, (256, 256),
                                                                    (4.0, 33), "max", config=big_tile)
    big_block = max(retrieval.topk_space(32, 25), key=lambda c: (c["BLOCK_Q"] * c["BLOCK_R"], c["num_warps"]))
    yield "retrieve_topk space largest", lambda: retrieval.retrieve_topk(
        torch.empty(32, 25, 13), torch.empty(200_000, 25, 16, dtype=torch.uint8), 49, 10, 0.8, "kl", config=big_block)
    yield "naive baseline layer1 b1 fp16 13x13", lambda: naive_atm.naive_window_max(
        torch.empty(1, channels, side, side, dtype=torch.float16),
        torch.empty(TEMPLATES, channels, side, side, dtype=torch.float16), 13)


def space_cases(arch: int):
    """Every config of the matching tuning space on ``arch``, at the goal shape (layer 1, 13x13, batch 32)."""
    channels, side = LAYERS["layer1"]
    query, templates = _maps(32, channels, side, torch.float16), _maps(TEMPLATES, channels, side, torch.float16)
    for dtype_name in ("fp16", "fp32"):
        dtype = DTYPES[dtype_name]
        q, t = query.to(dtype), templates.to(dtype)
        for config in atm.config_space(side, side, 6, 32, channels, dtype=dtype, shared=GPUS[arch]["shared"]):
            yield f"space {dtype_name} {config}", lambda q=q, t=t, c=config: atm.mutual_max(q, t, 6, 6, config=c)


# MVTec AD's test-set sizes: with batches of 32, each category ends on its own remainder
MVTEC_TEST_IMAGES = dict(bottle=83, cable=150, capsule=132, carpet=117, grid=78, hazelnut=110, leather=124,
                         metal_nut=115, pill=167, screw=160, tile=117, toothbrush=42, transistor=100, wood=79,
                         zipper=151)


def mvtec_compilations(arch: int, batch: int = 32) -> dict:
    """How many matching kernels a full MVTec AD evaluation (15 strings, fp16, PTS 60) JIT-compiles.

    ``before``: the count had window radii stayed compile-time constants (one kernel per layer,
    window pair and batch specialisation), for comparison.
    """
    backend = make_backend(GPUTarget("cuda", arch, 32))
    unique, before = set(), set()
    with recording(arch) as launches:
        for category, text in MVTEC_AD.items():
            sizes = {batch, MVTEC_TEST_IMAGES[category] % batch or batch}
            for layer, p in parse_params(text).layers.items():
                channels, side = LAYERS[layer]
                templates = _maps(TEMPLATES, channels, side, torch.float16)
                for size in sizes:
                    start = len(launches)
                    atm.mutual_max(_maps(size, channels, side, torch.float16), templates, p.fore // 2, p.back // 2)
                    for launch in launches[start:]:
                        key = _specialisation(launch, backend)
                        unique.add(key)
                        before.add((key, p.fore // 2, p.back // 2))
    return dict(arch=arch, mvtec_compilations=len(unique), with_constant_radii=len(before))


def collect(arch: int, which: str) -> list:
    """Run the cases' launchers under the recorder; identical specialisations merged."""
    cases = [*matching_cases(), *other_cases(), *extreme_cases()] + ([*space_cases(arch)] if which == "full" else [])
    backend = make_backend(GPUTarget("cuda", arch, 32))
    unique = {}
    with recording(arch) as launches:
        for case, run in cases:
            start = len(launches)
            run()
            for launch in launches[start:]:
                key = _specialisation(launch, backend)
                unique.setdefault(key, launch).cases.append(case)
    return list(unique.values())


def _bind(launch: Launch, backend):
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def _specialisation(launch: Launch, backend) -> str:
    options, signature, constexprs, attrs = _bind(launch, backend)
    return repr((launch.name, signature, sorted(constexprs.items(), key=str), sorted(attrs.items(), key=str),
                 options.num_warps, options.num_stages))


def compile_launch(launch: Launch, arch: int) -> dict:
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs = _bind(launch, backend)
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    ptx, text = compiled.asm["ptx"], log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    kwargs = launch.kwargs
    rows = kwargs.get("BLOCK_B", kwargs.get("BLOCK_A", 0)) * kwargs.get("TILE_H", 0) * kwargs.get("TILE_W", 0)
    element = next((str(a.dtype).split(".")[-1] for a in launch.args if isinstance(a, torch.Tensor)), "-")
    return dict(
        kernel=launch.name, arch=arch, dtype=element, cases=launch.cases,
        config={k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")},
        rows=rows, registers=int(registers.group(1)) if registers else None,
        spill_bytes=int(spills.group(1)) + int(spills.group(2)) if spills else None,
        shared=compiled.metadata.shared, wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        loads_16B=len(re.findall(r"cp\.async\.c[ga]\.shared\.global[^;]*,\s*(?:16|0x10)(?:,|;)", ptx))
        + len(re.findall(r"ld\.global(?:\.[a-z0-9]+)*\.v4", ptx)),
        # narrower than 16 bytes (8 are whole int64 template indices, not operands)
        loads_narrow=len(re.findall(r"cp\.async\.c[ga]\.shared\.global[^;]*,\s*(?:2|4|0x[24]%s)(?:,|;)"
                                    % ("" if kwargs.get("HAS_INDEX") else "|8|0x8"), ptx)),
        relaxed_atomics=len(re.findall(r"atom\.global(?:\.[a-z]+)*\.relaxed", ptx)),
        ordered_atomics=len(re.findall(r"atom\.(?:[a-z]+\.)*(?:acq_rel|acquire|release)", ptx)),
        compile_s=round(time.time() - start, 2),
    )


def mma_kind(row: dict) -> str:
    return "wgmma" if row["wgmma"] else "mma.sync" if row["mma_sync"] else "none (CUDA cores)"


def problems(row: dict) -> list:
    """The rules every launch of the package keeps on its target."""
    found = []
    if row["kernel"] in BASELINES:
        return found
    if row["registers"] is None or row["spill_bytes"] is None:
        found.append("no ptxas register report")
    elif row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes ({row['registers']} registers)")
    if row["shared"] > GPUS[row["arch"]]["shared"]:
        found.append(f"shared memory {row['shared']} > {GPUS[row['arch']]['shared']}")
    if row["ordered_atomics"]:
        found.append(f"{row['ordered_atomics']} atomics with ordering (a maximum needs none)")
    if row["kernel"] in MATCHING:
        sixteen = row["dtype"] in ("float16", "bfloat16")
        wanted = ("wgmma" if row["arch"] >= 90 and row["rows"] >= 64 else "mma.sync") if sixteen else "none (CUDA cores)"
        if mma_kind(row) != wanted and not (wanted == "mma.sync" and row["wgmma"]):
            found.append(f"products on {mma_kind(row)}, expected {wanted}")
        if sixteen and (not row["loads_16B"] or row["loads_narrow"]):
            found.append(f"operand loads: {row['loads_16B']} of 16 bytes, {row['loads_narrow']} narrower")
    return found


def main(argv) -> int:
    arch, which = int(argv[0]), (argv[1] if len(argv) > 1 else "ci")
    if which == "mvtec":
        print(json.dumps(mvtec_compilations(arch)))
        return 0
    failures = 0
    launches = collect(arch, which)
    for launch in launches:
        row = compile_launch(launch, arch)
        row["problems"] = problems(row)
        failures += bool(row["problems"])
        print(json.dumps(row), flush=True)
    print(json.dumps(dict(arch=arch, compilations=len(launches), failures=failures)), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
