"""The ``hetmm`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    """Match a shifted, locally damaged copy of a template against the template set."""
    import torch
    import torch.nn.functional as F

    import hetmm_kernels as hk

    generator = torch.Generator().manual_seed(args.seed)
    channels, size, count = args.channels, args.size, args.templates
    # smooth random feature maps stand in for backbone features of normal images
    base = torch.randn(count, channels, size // 4, size // 4, generator=generator)
    temp = F.normalize(F.interpolate(base, size=(size, size), mode="bilinear", align_corners=True), dim=1)
    # a normal part, moved by (1, 2) pixels (edges replicated)
    query = F.pad(temp[:1], (0, 2, 1, 0), mode="replicate")[:, :, :size, 2:].clone()
    y0, x0, side = size // 3, size // 2, max(2, size // 6)
    query[:, :, y0:y0 + side, x0:x0 + side] = F.normalize(
        torch.randn(1, channels, side, side, generator=generator), dim=1
    )  # a defect
    bank = hk.prepare_templates(temp)

    print(f"query [1,{channels},{size},{size}] against {count} templates, windows 5 (forward) x 3 (backward)")
    results = {}
    for backend in ("reference", "torch"):
        start = time.perf_counter()
        fore, back = hk.mutual_match(query, bank, 5, 3, backend=backend)
        results[backend] = (fore, back, time.perf_counter() - start)
    fore, back, _ = results["torch"]
    ref_fore, ref_back, _ = results["reference"]
    gap = max((fore - ref_fore).abs().max().item(), (back - ref_back).abs().max().item())
    print(f"torch backend vs reference: max |difference| = {gap:.2e}")
    for backend, (_, _, seconds) in results.items():
        print(f"  {backend:9s} {seconds * 1e3:8.1f} ms")

    score = 0.5 * (1 - fore[0]) + 0.5 * (1 - back[0])
    inside = torch.zeros_like(score, dtype=torch.bool)
    inside[y0:y0 + side, x0:x0 + side] = True
    print(f"anomaly score: defect {score[inside].mean():.3f}, elsewhere {score[~inside].mean():.3f}")
    shades = " .:-=+*#%@"
    top = score.max().item() or 1.0
    for row in score[::2]:
        print("  " + "".join(shades[min(9, int(9 * v / top))] for v in row.tolist()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetmm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run the matching ops on a synthetic defect and compare backends")
    demo.add_argument("--size", type=int, default=32, help="feature map side (default 32)")
    demo.add_argument("--channels", type=int, default=64, help="feature channels (default 64)")
    demo.add_argument("--templates", type=int, default=20, help="number of templates (default 20)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
