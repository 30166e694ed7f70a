"""One rank of the distributed tests, launched by ``torchrun`` from tests/test_distributed.py.

``python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py OUT DATA``:
each rank runs the sharded retrieval and the sharded-bank detector, and ``evaluate_category``
data-parallel on the demo data in DATA; rank 0 saves what it got to OUT for the test to
compare with a single-process run.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import hetmm_kernels as hk  # noqa: E402
from hetmm import distributed  # noqa: E402
from hetmm.data import MVTecCategory  # noqa: E402
from hetmm.detector import HETMM  # noqa: E402
from hetmm.evaluation import evaluate_category  # noqa: E402


# 37: more than either shard holds (the interpreter's sort is slow: fewer Triton cases)
TOPK_CASES = [(1, "torch"), (4, "torch"), (12, "torch"), (37, "torch"), (4, "triton"), (37, "triton")]


def ranking_cases():
    """Query and bank histograms with exact ties across the shard boundary (duplicated entries)."""
    generator = torch.Generator().manual_seed(0)
    bank = torch.rand(37, 25, 13, generator=generator)
    bank[20], bank[3], bank[30] = bank[5], bank[5], bank[18]  # equal distances on both shards
    bank = bank / bank.sum(-1, keepdim=True)
    query = torch.cat([bank[[5, 18]], torch.rand(3, 25, 13, generator=generator).softmax(-1)])
    return query, bank


def main(out, data_root):
    group = distributed.setup("cpu")
    saved = {}
    query, bank = ranking_cases()
    rows = distributed.shard_range(len(bank), group.rank, group.world)
    for k, backend in TOPK_CASES:
        d, i = distributed.sharded_topk(query, bank[rows.start:rows.stop], k, rows.start, len(bank), group,
                                        backend=backend)
        saved[f"topk_{k}_{backend}_distances"], saved[f"topk_{k}_{backend}_indices"] = d, i

    # the detector with a bank sharded over the ranks, with and without retrieval
    generator = torch.Generator().manual_seed(1)
    normal, test = torch.rand(9, 3, 32, 32, generator=generator), torch.rand(3, 3, 32, 32, generator=generator)
    for retrieval_k in (None, 3):
        det = HETMM("resnet18", None, image_size=32, out_size=32, device="cpu", retrieval_k=retrieval_k).fit(normal)
        result = det.shard(group).predict(test)
        saved[f"shard_{retrieval_k}_score"], saved[f"shard_{retrieval_k}_map"] = result.pred_score, result.anomaly_map

    # data-parallel evaluation on the demo data: metrics on rank 0 over every rank's images
    det = HETMM("tf_efficientnet_lite0", "imagenet", image_size=64, out_size=64, device="cpu", batch_size=2)
    metrics = evaluate_category(det, MVTecCategory(data_root, "gravel"), group=group)
    if group.is_main:
        saved.update({f"metric_{k}": torch.tensor(v, dtype=torch.float64) for k, v in metrics.items() if k.endswith(("auroc", "pro"))})
        torch.save(saved, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
