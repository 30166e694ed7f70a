"""Several processes (``torchrun``): data-parallel prediction and a sharded retrieval bank.

``torch.distributed`` does the work: NCCL between GPUs, gloo between CPUs. Two layouts:

* data-parallel: every rank holds the whole template bank and scores a contiguous share of
  the images, in whole batches (so each batch is the one a single process would form); the
  results are gathered on rank 0, in input order.
* sharded bank: every rank holds a contiguous share of the templates (and their retrieval
  histograms) and sees every query; the top-K retrieval is merged with ``all_gather`` and
  the per-layer match maps with an ``all_reduce(MAX)`` (a maximum is exact in any order).

A rank that raises makes every rank raise ``RankFailed`` naming it: no partial result is
written. A rank that dies outright is reported by ``torchrun`` itself.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetmm_kernels.reference import MATCH_FLOOR  # the value every match map starts from


class RankFailed(RuntimeError):
    """One or more ranks of a distributed run raised; the message names them."""


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a ``torchrun`` job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device=None) -> Group | None:
    """Join the ``torchrun`` process group (NCCL for CUDA, gloo otherwise); ``None`` when not launched.

    ``device`` ``None`` or ``"cuda"`` gives each rank the GPU of its local rank when CUDA is there.
    """
    if not launched():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device in (None, "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    device = torch.device(device or "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Group(dist.get_rank(), dist.get_world_size(), device)


def teardown(synchronise: bool = True) -> None:
    """Leave the process group. ``synchronise``: wait for every rank first (they must all be here).

    A rank that destroys the group while a peer still talks to it can abort at exit (gloo's
    threads), turning a finished run into a failed one; a rank that fails alone must not wait.
    """
    if dist.is_initialized():
        if synchronise:
            dist.barrier()
        dist.destroy_process_group()


def shard_range(count: int, rank: int, world: int, unit: int = 1) -> range:
    """Rank ``rank``'s contiguous share of ``count`` items, in whole units of ``unit`` items."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world) and world >= 1; got rank {rank}, world {world}")
    units = -(-count // unit)
    first, last = rank * units // world, (rank + 1) * units // world
    return range(min(first * unit, count), min(last * unit, count))


def run_everywhere(group: Group, work):
    """Run ``work()`` on every rank; if any rank raised, raise ``RankFailed`` on all of them."""
    try:
        result, failure = work(), None
    except Exception as error:  # reported to every rank below, then re-raised as RankFailed
        result, failure = None, f"{type(error).__name__}: {error}"
        detail = traceback.format_exc()
    failures = [None] * group.world
    dist.all_gather_object(failures, failure)
    failed = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if failed:
        if failure is not None:
            print(f"[rank {group.rank}] {detail}", end="", flush=True)
        named = "; ".join(f"rank {rank} of {group.world}: {message}" for rank, message in failed)
        raise RankFailed(f"the distributed run failed on {named}")
    return result


def gather_to_main(group: Group, obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order), ``None`` on the others."""
    gathered = [None] * group.world if group.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def predict_data_parallel(detector, items: list, group: Group):
    """Data-parallel ``detector.predict(items)``: the merged ``Prediction`` on rank 0, ``None`` elsewhere."""
    if not len(items):
        raise ValueError("images is empty")  # on every rank alike: they all hold the same list
    share = shard_range(len(items), group.rank, group.world, detector.batch_size)
    part = run_everywhere(group, lambda: detector.predict(items[share.start:share.stop]) if len(share) else None)
    parts = gather_to_main(group, part)
    if parts is None:
        return None
    parts = [p for p in parts if p is not None]
    merged = {}
    for name, first in vars(parts[0]).items():  # tensors and per-image lists joined; thresholds are everyone's
        values = [getattr(p, name) for p in parts]
        merged[name] = torch.cat(values) if isinstance(first, torch.Tensor) else \
            [x for v in values for x in v] if isinstance(first, Sequence) else first
    return type(parts[0])(**merged)  # a Prediction, built without importing the detector (no import circle)


def merge_topk(distances: torch.Tensor, indices: torch.Tensor, k: int):
    """The ``k`` smallest of ``distances [Q, M]`` with ties to the lower ``indices [Q, M]``."""
    from hetmm_kernels.torch_ops.retrieval import smallest_k

    return smallest_k(distances, indices, k)


def sharded_topk(query_hist: torch.Tensor, local_bank, k: int, offset: int, total: int, group: Group | None = None,
                 **options):
    """Global top-K over a histogram bank split across ranks; identical on every rank.

    ``local_bank`` holds global entries ``offset .. offset + len(local_bank)`` of a bank of
    ``total``. Each rank ranks its own entries, the candidates are all-gathered and merged
    by (distance, global index): the ranking equals the unsharded one. ``options`` go to
    ``hetmm_kernels.retrieve_topk`` (``l_ratio``, ``method``, ``backend``).
    """
    import hetmm_kernels as hk

    if not 1 <= k <= total:
        raise ValueError(f"k must be between 1 and the bank size {total}; got {k}")
    local_k = min(k, len(local_bank))
    distances, indices = hk.retrieve_topk(query_hist, local_bank, local_k, **options)
    indices = indices + offset
    if group is None or group.world == 1:
        return distances, indices
    if local_k < k:  # pad to a common width: +inf at index ``total`` sorts after every real entry
        pad = (0, k - local_k)
        distances = torch.nn.functional.pad(distances, pad, value=float("inf"))
        indices = torch.nn.functional.pad(indices, pad, value=total)
    all_distances = [torch.empty_like(distances) for _ in range(group.world)]
    all_indices = [torch.empty_like(indices) for _ in range(group.world)]
    dist.all_gather(all_distances, distances.contiguous())
    dist.all_gather(all_indices, indices.contiguous())
    return merge_topk(torch.cat(all_distances, dim=1), torch.cat(all_indices, dim=1), k)


def local_subsets(global_indices: torch.Tensor, offset: int, count: int):
    """Per query, its retrieved templates that live in this shard, as ``mutual_match`` indices.

    Returns ``(indices [B, K'], absent [B])``: local template numbers, each query's list padded
    by repeating its first entry (a repeated template does not change a maximum), and which
    queries have none here (their maps must stay at the floor).
    """
    local = global_indices - offset
    here = (local >= 0) & (local < count)
    width = max(1, int(here.sum(dim=1).max()))
    # stable sort puts each query's local entries first, in retrieval order
    order = (~here).to(torch.int8).argsort(dim=1, stable=True)[:, :width]
    picked, picked_here = local.gather(1, order), here.gather(1, order)
    first = torch.where(picked_here[:, :1], picked[:, :1], torch.zeros_like(picked[:, :1]))
    indices = torch.where(picked_here, picked, first)
    return indices.contiguous(), ~here.any(dim=1)


def merge_matches(matches, absent: torch.Tensor | None, group: Group) -> None:
    """Turn a shard's per-layer match maps into the whole bank's, in place, on every rank.

    ``absent [B]``: queries none of whose retrieved templates live in this shard.
    """
    for maps in (*matches.fores, *matches.backs):
        if absent is not None:
            maps[absent] = MATCH_FLOOR
        dist.all_reduce(maps, op=dist.ReduceOp.MAX)
