"""The whole predict, end to end: backbone, matching, aggregation, post-processing, results on the host.

On a GPU: Wide-ResNet-101-2 at 256x256 (random weights: the same work as ImageNet ones),
half precision, channels-last, the batch's GPU work replayed from a CUDA graph (and, at batch 1,
without one, to show what the launches cost); against
PTS-60 (60 templates) and all N = 200 templates, at batch 1 and 32. On the CPU, where that
backbone alone takes seconds per batch, tf_efficientnet_lite0 stands in at batch 1 and 8.
Templates are random unit features of the backbone's shapes (what they are does not change
the work). The mode column gives images per second.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import device, record, run
from hetmm.bank import TemplateBank
from hetmm.detector import HETMM

GPU = torch.cuda.is_available()
BACKBONE = "wide_resnet101_2" if GPU else "tf_efficientnet_lite0"
BATCHES = [1, 32] if GPU else [1, 8]
TEMPLATES = {"PTS-60": 60, "all N=200": 200}


_DETECTORS: list[HETMM] = []  # one backbone for every case: building Wide-ResNet-101-2 takes seconds


def _detector(batch: int, templates: int) -> HETMM:
    if not _DETECTORS:
        _DETECTORS.append(HETMM(BACKBONE, None, image_size=256, out_size=256, device=device(), half=GPU))
    det = _DETECTORS[0]
    det.batch_size = batch  # a new batch size or bank is captured anew
    shapes = {k: v.shape[1:] for k, v in det.extract(torch.zeros(1, 3, 256, 256, device=device())).items()}
    g = torch.Generator().manual_seed(0)
    det.bank = TemplateBank({k: F.normalize(torch.randn(templates, *s, generator=g), dim=1) for k, s in shapes.items()},
                            det.config)
    return det


@pytest.mark.parametrize("graph", [True, False] if GPU else [False])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("bank", list(TEMPLATES))
def test_predict_end_to_end(benchmark, matmul_rate, bank, batch, graph):
    if GPU and not graph and (batch, bank) != (1, "PTS-60"):
        pytest.skip("eager launches are timed once, where they cost the most: batch 1")
    det = _detector(batch, TEMPLATES[bank])
    det.cuda_graph = graph
    images = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(1)).to(device())
    det.predict(images)  # capture (GPU) and warm caches outside the timing
    run(benchmark, lambda: det.predict(images), 5 if GPU else 2)
    per_second = batch / benchmark.stats.stats.median
    record(benchmark, None, matmul_rate, det.feature_dtype, op="predict", layer=f"{BACKBONE} 256px",
           windows=det.params_string.split(";")[0], batch=batch, templates=bank, backend="triton" if GPU else "torch",
           mode=f"{per_second:.1f} images/s" + (", CUDA graph" if graph else ""))
