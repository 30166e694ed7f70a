"""Data-parallel and sharded-bank throughput under torchrun (images per second, all ranks together).

    torchrun --nproc-per-node 1 benchmarks/distributed_scaling.py
    torchrun --nproc-per-node 2 benchmarks/distributed_scaling.py [--images 64] [--templates 200]

Times ``predict`` only (the model is loaded and warmed up first) on random images against a
bank of random unit features of the backbone's shapes, once data-parallel (every rank holds
the bank, each scores its share of the images) and once with the bank sharded (every rank
scores every image against its share of the bank, with retrieval when ``--retrieval-k``).
Rank 0 prints one line per layout.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hetmm import distributed  # noqa: E402
from hetmm.bank import TemplateBank  # noqa: E402
from hetmm.detector import HETMM  # noqa: E402


def random_bank(det: HETMM, count: int) -> TemplateBank:
    """A bank of ``count`` random unit-feature templates shaped like ``det``'s backbone output."""
    shapes = {k: v.shape[1:] for k, v in det.extract(torch.zeros(1, 3, det.image_size, det.image_size)).items()}
    generator = torch.Generator().manual_seed(0)
    features = {k: F.normalize(torch.randn(count, *s, generator=generator), dim=1) for k, s in shapes.items()}
    return TemplateBank(features, det.config)


def timed(group, work) -> float:
    work()  # warm-up: kernels, caches
    if group:
        torch.distributed.barrier()
    start = time.perf_counter()
    work()
    if group:
        torch.distributed.barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--templates", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    group = distributed.setup(args.device)
    world = group.world if group else 1
    device = group.device if group else args.device
    det = HETMM(args.backbone, None, image_size=args.image_size, out_size=args.image_size, device=device,
                batch_size=args.batch_size)
    det.bank = random_bank(det, args.templates)
    images = torch.rand(args.images, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))

    if group:
        seconds = timed(group, lambda: distributed.predict_data_parallel(det, list(images), group))
    else:
        seconds = timed(group, lambda: det.predict(images))
    report = [("data-parallel", seconds)]
    if group:
        det.shard(group)
        report.append(("sharded bank", timed(group, lambda: det.predict(images))))
    if group is None or group.is_main:
        for layout, secs in report:
            print(f"{layout:14s} ranks {world}  threads/rank {torch.get_num_threads()}  {args.images} images "
                  f"x {args.templates} templates ({args.backbone}, {args.image_size}px, {det.device}): "
                  f"{args.images / secs:7.1f} images/s")
    distributed.teardown()


if __name__ == "__main__":
    main()
