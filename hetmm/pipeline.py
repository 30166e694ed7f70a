"""The whole GPU part of ``predict`` for a fixed batch shape, captured once in a CUDA graph.

Backbone (fp16 channels-last with ``half``), per-layer matching kernels, aggregation and
image scores are a few hundred kernel launches per batch; at batch 1 the launches cost more
than the work. A CUDA graph replays all of them with one launch. The input is copied into
a static buffer (a short last batch is padded with zeros and its padding dropped), the
outputs are views of static buffers that the caller copies out before the next replay.

Capture needs code that never reads a value on the host and never copies host memory to
the device: the ops' value checks are skipped inside it (``hetmm_kernels.trusted_values``;
the eager warm-up runs them once) and every constant they need is cached on the device.
"""

from __future__ import annotations

import warnings

import torch

from hetmm_kernels.validation import trusted_values


class CapturedPredict:
    """``detector._forward`` for batches of ``batch`` images, replayed from a CUDA graph.

    If capture fails (an op that is not capturable), it warns once and runs eagerly: slower,
    never wrong.
    """

    def __init__(self, detector, batch: int, warmup: int = 2):
        self.detector, self.batch = detector, int(batch)
        size = detector.image_size
        self.images = torch.zeros(self.batch, 3, size, size, device=detector.device)
        # warm-up on a side stream: compiles the kernels, fills every cache, runs the value checks
        stream = torch.cuda.Stream(detector.device)
        stream.wait_stream(torch.cuda.current_stream(detector.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                detector._forward(self.images)
        torch.cuda.current_stream(detector.device).wait_stream(stream)
        self.graph, self.outputs = torch.cuda.CUDAGraph(), None
        try:
            with trusted_values(), torch.cuda.graph(self.graph):
                self.outputs = detector._forward(self.images)
        except Exception as error:  # an uncapturable op: fall back to eager launches
            warnings.warn(f"hetmm: CUDA graph capture failed ({type(error).__name__}: {error}); "
                          "predicting without a graph", RuntimeWarning, stacklevel=2)
            self.graph = None
            torch.cuda.synchronize(detector.device)

    def __call__(self, images: torch.Tensor):
        count = images.shape[0]
        if count > self.batch:
            raise ValueError(f"a captured batch holds {self.batch} images; got {count}")
        if self.graph is None:
            return self.detector._forward(images)
        self.images[:count].copy_(images)
        if count < self.batch:
            self.images[count:].zero_()
        self.graph.replay()
        return tuple(out[:count] for out in self.outputs)
