"""The traffic model's table for the matching kernels at the paper's shapes (no GPU needed).

    python benchmarks/traffic_table.py [--gpu H200] [--l2 7 10]

Per layer (Wide-ResNet-101-2 at 256 px, 60 templates, fp16 and fp32) and batch: the default
config's useful and issued GFLOP, L2-to-SM and DRAM bytes, predicted time, fraction of peak and
bound, beside the streaming kernel's heuristic (the design before the resident kernel), for each
assumed L2-to-SM bandwidth. See ``hetmm_kernels/traffic.py`` for what is counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from hetmm_kernels import traffic  # noqa: E402
from hetmm_kernels.triton_ops import atm  # noqa: E402

SHAPES = {"layer1": (256, 64), "layer2": (512, 32), "layer3": (1024, 16)}  # channels, side
WINDOWS = {"layer1": [(6, 6), (6, 3), (2, 1)], "layer2": [(4, 2)], "layer3": [(3, 1)]}  # 13x13 is the goal
# the streaming kernel's config before the resident kernel and the register-aware rules (issue 14's "before")
BEFORE = dict(TILE_H=4, TILE_W=4, BLOCK=4, BLOCK_C=64, num_warps=8, num_stages=3)


def _show(config: dict) -> str:
    kind = config.get("KERNEL", "stream")
    blocks = f"U{config['BLOCK_U']}" if kind == "resident" else f"C{config['BLOCK_C']}"
    return (f"{kind} {config['TILE_H']}x{config['TILE_W']} B{config['BLOCK']} {blocks} "
            f"w{config['num_warps']} s{config['num_stages']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default=traffic.DEFAULT_GPU, choices=sorted(traffic.GPUS))
    parser.add_argument("--l2", type=float, nargs="+", default=[7.0, 10.0], help="L2-to-SM TB/s to assume")
    args = parser.parse_args(argv)
    base = traffic.GPUS[args.gpu]
    print(f"{base.name}: {base.tensor_tflops} TFLOP/s fp16, {base.fp32_tflops} fp32, {base.dram_tbps} TB/s HBM, "
          f"L2-to-SM assumed {' / '.join(map(str, args.l2))} TB/s (not published; the first GPU run calibrates it)\n")
    print("| layer | windows | B | dtype | config | useful / issued GFLOP | L2->SM GB | DRAM GB | "
          + " | ".join(f"ms, of peak, bound @{l2:g} TB/s" for l2 in args.l2) + " |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(args.l2))
    for layer, (channels, side) in SHAPES.items():
        for fore, back in WINDOWS[layer]:
            for batch in (1, 32):
                for dtype in (torch.float16, torch.float32):
                    reach = max(fore, back)
                    default = atm.mutual_default(side, side, reach, batch, channels, dtype,
                                                 shared=atm.SHARED_BYTES[(9, 0)])
                    configs = [("default", default)]
                    if dtype == torch.float16 and batch == 32:
                        configs.append(("before", BEFORE))
                    for label, config in configs:
                        cells = []
                        for l2 in args.l2:
                            gpu = dataclasses.replace(base, l2_tbps=l2)
                            e = traffic.matching(config, batch, side, side, channels, 60, fore, back, dtype, gpu)
                            cells.append(f"{e.seconds * 1e3:.3f}, {e.fraction_of_peak:.0%}, {e.bound}")
                        print(f"| {layer} | {2 * fore + 1}x{2 * back + 1} | {batch} | {str(dtype)[6:]} | "
                              f"{label}: {_show(config)} | {e.useful_flops / 1e9:.0f} / {e.issued_flops / 1e9:.0f} | "
                              f"{e.l2_bytes / 1e9:.2f} | {e.dram_bytes / 1e9:.2f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
