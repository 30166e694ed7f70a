"""``hetmm tune``: tune the Triton kernels for one detector configuration on this GPU.

The problems are the ones ``predict`` launches: per active layer, the fused matching kernel
on the backbone's feature shape for each batch size, against the template count (or, with
retrieval, each query against its K templates); then the aggregation to the output size and,
with retrieval, the top-K search; for a layer with a coreset, ``global_match`` against it. Results go
to the tuning cache (``hetmm_kernels.autotune``) and are used by every later process on this GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Problem:
    op: str
    layer: str
    batch: int
    shape: tuple  # [B, H, W, C] of the query side, pixel-major
    templates: int
    fore: int  # window radii
    back: int
    coreset: float = 0.0  # the layer's coreset percent (global_match is tuned for it too)


def problems(backbone: str, image_size: int, params, templates: int, batches: list[int]) -> list[Problem]:
    """The matching problems of a detector configuration (feature shapes from the backbone itself)."""
    from .backbone import Backbone
    from .parameters import parse_params

    params = parse_params(params)
    with torch.no_grad():
        features = Backbone(backbone, None)(torch.zeros(1, 3, image_size, image_size))
    found = []
    for layer, p in params.active_layers.items():
        _, channels, height, width = features[layer].shape
        channels += 1 if p.magnitude else 0  # a magnitude-aware layer's lift has one more (hetmm.magnitude)
        for batch in batches:
            found.append(Problem("mutual", layer, batch, (batch, height, width, channels), templates,
                                 p.fore // 2, p.back // 2, p.coreset))
    return found


def _check_device(device: torch.device) -> None:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("hetmm tune: tuning times the Triton kernels on a CUDA GPU (or, to exercise it, "
                         "under TRITON_INTERPRET=1 on the CPU); none is available here. --dry-run shows the space.")


def run(args) -> int:
    from hetmm_kernels import autotune, traffic
    from hetmm_kernels.triton_ops import atm

    from .parameters import params_for

    params = args.params or params_for(args.category)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if args.half else torch.float32
    found = problems(args.backbone, args.image_size, params, args.templates, args.batch_sizes)
    print(f"{args.backbone} at {args.image_size}px, {args.templates} templates, params {params}, "
          f"{str(dtype).split('.')[-1]}; cache {autotune.cache_path()}")
    if not args.dry_run:
        _check_device(device)
        print(f"device: {autotune.device_key(device)}")
    generator = torch.Generator().manual_seed(0)
    fores: dict[int, list] = {}  # batch -> the layers' map sizes, for the aggregation
    indexed = args.retrieval_k is not None  # each query against its K retrieved templates
    shared, gpu = atm.device_shared_bytes(device), traffic.gpu_for(device)
    for problem in found:
        batch, height, width, channels = problem.shape
        reach = max(problem.fore, problem.back)
        space = atm.config_space(height, width, reach, batch, channels, indexed, dtype, shared)[:args.max_configs]
        default = atm.mutual_default(height, width, reach, batch, channels, dtype, indexed, shared)
        per_query = args.retrieval_k if indexed else problem.templates

        def model(config):
            return traffic.matching(config, batch, height, width, channels, problem.templates, problem.fore,
                                    problem.back, dtype, gpu, per_query=args.retrieval_k if indexed else None)

        key = atm.mutual_problem(problem.shape, per_query, problem.fore, problem.back, dtype, indexed)
        fores.setdefault(batch, []).append((height, width))
        title = (f"{problem.op} {problem.layer} batch {batch}: [{height}x{width}x{channels}], windows "
                 f"{2 * problem.fore + 1}x{2 * problem.back + 1}")
        if args.dry_run:
            print(f"{title}\n  key {key}\n  default {_show(default)}\n    model: {model(default).line()}\n"
                  f"  {len(space)} configs to try (fastest predicted first):")
            for config in space:
                estimate = model(config)
                print(f"    {_show(config)}  -> {estimate.seconds * 1e3:.3f} ms predicted, "
                      f"{estimate.fraction_of_peak:.0%} of peak, {estimate.bound}-bound")
            continue
        q = F.normalize(torch.randn(problem.shape, generator=generator), dim=-1).to(device, dtype)
        t = F.normalize(torch.randn((problem.templates, height, width, channels), generator=generator), dim=-1)
        indices = (torch.randint(0, problem.templates, (batch, per_query), generator=generator).to(device)
                   if indexed else None)
        result = atm.tune_mutual(q, t.to(device, dtype), problem.fore, problem.back, indices=indices, space=space)
        best, failed = result.best, sum(trial.ms is None for trial in result.trials)
        flops = 2 * batch * per_query * height * width * (2 * reach + 1) ** 2 * channels
        print(f"{title}: {len(result.trials) + 1} configs ({failed} rejected)\n"
              f"  default {_show(default)}: {result.default.ms:.3f} ms "
              f"(model {model(default).seconds * 1e3:.3f} ms)\n"
              f"  best    {_show(best.config)}: {best.ms:.3f} ms (model {model(best.config).seconds * 1e3:.3f} ms) "
              f"({result.default.ms / best.ms:.2f}x the default, {flops / best.ms / 1e6:.1f} GFLOP/s useful)")
    if args.dry_run:
        from hetmm_kernels.triton_ops import aggregate

        for batch, maps in fores.items():
            side = max(16, 1 << (max(max(m) for m in maps) - 1).bit_length())
            space = aggregate.config_space(args.out_size, args.out_size, side, side)[:args.max_configs]
            print(f"aggregate batch {batch}: {len(maps)} layers -> {args.out_size}x{args.out_size}: "
                  f"{len(space)} configs to try")
        return 0
    _tune_aggregation(fores, args.out_size, device, generator, args.max_configs)
    _tune_coresets([p for p in found if p.coreset], dtype, device, generator, args.max_configs)
    if indexed:
        _tune_retrieval(args.batch_sizes, args.templates, args.retrieval_k, device, generator, args.max_configs)
    return 0


def _tune_retrieval(batches: list, templates: int, k: int, device: torch.device, generator, limit: int) -> None:
    from hetmm_kernels.triton_ops import retrieval

    area = 49  # 7x7-pixel blocks: a 32x32 layer-2 map in 5x5 blocks
    counts = torch.randint(0, 8, (templates, 25, 13), generator=generator, dtype=torch.uint8)
    for batch in batches:
        hist = torch.rand((batch, 25, 13), generator=generator).softmax(-1)
        result = retrieval.tune_topk(hist.to(device), counts.to(device), area, min(k, templates), limit=limit)
        best = result.best
        print(f"retrieve_topk batch {batch}: top {k} of {templates}: default {_show(result.default.config)}: "
              f"{result.default.ms:.3f} ms; best {_show(best.config)}: {best.ms:.3f} ms")


def _tune_coresets(found: list, dtype: torch.dtype, device: torch.device, generator, limit: int) -> None:
    from hetmm_kernels.triton_ops import global_match

    from .scoring import coreset_size

    for problem in found:
        batch, height, width, channels = problem.shape
        count = coreset_size(problem.templates * height * width, problem.coreset)
        query = F.normalize(torch.randn((batch, channels, height, width), generator=generator), dim=1)
        rows = F.normalize(torch.randn((count, channels), generator=generator), dim=1)
        result = global_match.tune(query.to(device, dtype), rows.to(device, dtype), global_match.SPACE[:limit])
        best = result.best
        print(f"global_match {problem.layer} batch {batch}: {count} coreset pixels ({problem.coreset:g}%): "
              f"default {_show(result.default.config)}: {result.default.ms:.3f} ms; "
              f"best {_show(best.config)}: {best.ms:.3f} ms")


def _tune_aggregation(sizes: dict, out_size: int, device: torch.device, generator, limit: int) -> None:
    from hetmm_kernels.triton_ops import aggregate

    for batch, maps in sizes.items():
        fores = [torch.rand((batch, h, w), generator=generator).to(device) for h, w in maps]
        backs = [torch.rand((batch, h, w), generator=generator).to(device) for h, w in maps]
        weights = [0.5] * len(maps)
        result = aggregate.tune(fores, backs, weights, weights, (out_size, out_size), blur=(4.0, 33), limit=limit)
        best = result.best
        print(f"aggregate batch {batch}: {len(maps)} layers -> {out_size}x{out_size}: "
              f"default {_show(result.default.config)}: {result.default.ms:.3f} ms; "
              f"best {_show(best.config)}: {best.ms:.3f} ms")


def _show(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())
