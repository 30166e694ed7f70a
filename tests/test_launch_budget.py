"""The launch and host-read budget of one predict batch, on the Triton backend.

Counted in the batch's device part (``HETMM._run``): Triton kernel launches (under the interpreter here,
compiled on a GPU) and reads of tensor values back to the host (``item``, ``tolist``, ``bool``, ``int``,
``float``, ``index``, ``numpy``, ``cpu``), each of which waits for the GPU. The budget:

- per active layer one matching launch (``_mutual_kernel``), per distinct post-processing one
  aggregation launch (``_aggregate_kernel``: the image score, the pixel map, the PRO map when it is
  post-processed differently), with retrieval one histogram and one top-K launch;
- no host read in the device part, and exactly one in the copy-out (``HETMM._copy_out``) on a GPU
  (none on a CPU, where the results already are on the host).
"""

from __future__ import annotations

import collections

import pytest
import torch

import hetmm
import hetmm_kernels as hk
from helpers import HAS_CUDA, INTERPRETED

pytestmark = pytest.mark.skipif(not (INTERPRETED or HAS_CUDA), reason="needs the Triton interpreter or a GPU")

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu")


class Budget:
    """Counts Triton launches by kernel name and host reads by method, while ``active``."""

    def __init__(self, monkeypatch):
        self.launches, self.reads, self.active = collections.Counter(), collections.Counter(), False
        self.host_too = True  # count reads of host tensors as well (under the interpreter every tensor is one)
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        if INTERPRETED:
            from triton.runtime.interpreter import InterpretedFunction as launcher
        else:
            from triton.runtime.jit import JITFunction as launcher
        original = launcher.run

        def run(kernel, *args, **kwargs):
            if self.active:
                self.launches[kernel.fn.__name__] += 1
            return original(kernel, *args, **kwargs)

        monkeypatch.setattr(launcher, "run", run)

    def _counted(self, name, method):
        def counted(tensor, *args, **kwargs):
            if self.active and (self.host_too or tensor.device.type != "cpu"):
                self.reads[name] += 1
            return method(tensor, *args, **kwargs)

        return counted

    def measure(self, work, host_too: bool = True):
        self.launches.clear()
        self.reads.clear()
        self.active, self.host_too = True, host_too
        try:
            return work()
        finally:
            self.active = False


def _detector(**options):
    device = "cuda" if HAS_CUDA else "cpu"
    det = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision="fp32", device=device, **options)
    # the backbone as it runs beside the Triton kernels on a GPU: torch (the CPU's OpenVINO engine hands
    # its input to OpenVINO as a NumPy array, a host read by this test's count though the tensor is on the host)
    det.backbone.engine = "torch"
    return det.fit(torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0)).to(device))


PRO_BLURRED = "L1:5x3_a=0.5_l=1|L2:9x3_a=0.5_l=0.8|L3:7x3_a=0.3_l=0.5;img_AUC:blur_s=8.0_k=33|" \
              "pix_AUC:blur_s=4.0_k=33|PRO:clean"


@pytest.mark.parametrize("options, expected", [
    # DEFAULT: PRO uses the pixel map; layer 2's coreset is one more launch
    (dict(), {"_mutual_kernel": 3, "_global_max_kernel": 1, "_aggregate_kernel": 2}),
    (dict(params=PRO_BLURRED), {"_mutual_kernel": 3, "_aggregate_kernel": 3}),
    (dict(params="L1:0x0_a=0.5_l=1|L2:9x3_a=0.5_l=1|L3:7x3_a=0.3_l=0.8;img_AUC:clean|pix_AUC:clean|PRO:clean"),
     {"_mutual_kernel": 2, "_aggregate_kernel": 2}),  # one layer off; image score from the clean map
    # with retrieval the coreset is matched per query by masked torch products (no Triton launch, no read-back)
    (dict(retrieval_k=2), {"_block_histogram_kernel": 1, "_trimmed_topk_kernel": 1, "_mutual_kernel": 3,
                           "_aggregate_kernel": 2}),
], ids=["default", "pro-post-processed", "two-layers", "retrieval"])
def test_one_batch_launches_and_reads(monkeypatch, options, expected):
    det = _detector(**options)
    batch = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(det.device)
    budget = Budget(monkeypatch)
    with hk.use_backend("triton"):
        det._run(batch)  # warm: the bank's layouts are prepared once
        outputs = budget.measure(lambda: det._run(batch))
        assert dict(budget.launches) == expected
        assert not budget.reads, f"the device part read values back to the host: {dict(budget.reads)}"
        budget.measure(lambda: det._copy_out(*outputs), host_too=False)  # its checks read the host copy
    assert dict(budget.reads) == ({"cpu": 1} if det.device.type == "cuda" else {})


def test_non_finite_results_are_an_error_not_scores():
    scores, maps = torch.tensor([0.1, float("nan")]), torch.zeros(2, 4, 4)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        hetmm.HETMM._copy_out(scores, maps, maps)
