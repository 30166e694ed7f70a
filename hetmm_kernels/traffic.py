"""A traffic model of the matching kernels: what a launch computes and moves, and how long that takes.

For one problem and config it counts useful and issued FLOPs, the bytes every program reads
through L2 (all global loads do) and the bytes that come from DRAM, and predicts the time as
the largest of: issued products at the tensor cores' (or, for IEEE float32, the CUDA cores')
peak; L2-to-SM bytes at the L2 rate; DRAM bytes at the HBM rate; the running maximum (one
CUDA-core operation per product column) at the CUDA cores' rate. Fraction of peak is useful
FLOPs over that time, against the dtype's peak. The rates are a named GPU's datasheet figures,
except those listed in its ``assumed`` field (the L2-to-SM bandwidth is nowhere published: the
first GPU run calibrates it; ``benchmarks/gpu_check.sh`` prints the prediction beside each time).

Nothing here launches a kernel: ``hetmm tune --dry-run`` prints it, and the tuning space is
ordered by it (fastest predicted first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GPU:
    name: str
    sms: int
    tensor_tflops: float  # dense fp16/bf16 tensor-core peak
    fp32_tflops: float  # CUDA-core fp32 (FMA = 2 FLOPs)
    dram_tbps: float
    l2_tbps: float  # L2 -> SM, aggregate
    l2_mb: float
    assumed: tuple = ()  # fields not from the datasheet


GPUS = {
    "H200": GPU("NVIDIA H200 SXM", 132, 989.4, 66.9, 4.8, 8.0, 50, assumed=("l2_tbps",)),
    "H100": GPU("NVIDIA H100 SXM", 132, 989.4, 66.9, 3.35, 8.0, 50, assumed=("l2_tbps",)),
    "A100": GPU("NVIDIA A100 SXM 80GB", 108, 312.0, 19.5, 2.04, 5.0, 40, assumed=("l2_tbps",)),
}
DEFAULT_GPU = "H200"


def gpu_for(device: torch.device | None = None) -> GPU:
    """The model of ``device`` (by its name), else of the default GPU (the one the checks run on)."""
    if device is not None and torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, gpu in GPUS.items():
            if key in name:
                return gpu
    return GPUS[DEFAULT_GPU]


@dataclass
class Estimate:
    useful_flops: float
    issued_flops: float
    l2_bytes: float
    dram_bytes: float
    seconds: float
    bound: str  # what sets the time
    fraction_of_peak: float
    gpu: GPU

    def line(self) -> str:
        assumed = f" (assumed: {', '.join(self.gpu.assumed)})" if self.gpu.assumed else ""
        return (f"{self.seconds * 1e3:.3f} ms on {self.gpu.name}{assumed}: {self.fraction_of_peak:.0%} of peak, "
                f"{self.bound}-bound; {self.useful_flops / 1e9:.0f} useful / {self.issued_flops / 1e9:.0f} issued "
                f"GFLOP, {self.l2_bytes / 1e9:.2f} GB L2->SM, {self.dram_bytes / 1e9:.2f} GB DRAM")


def union_shape(config: dict, height: int, width: int, reach: int) -> dict:
    """The union of a matching tile's windows, clamped to the map; its block (a power of two) or its parts.

    Shared by the kernels' launcher (``triton_ops.atm``) and the model below, so both see one footprint.
    """
    union_h = min(config["TILE_H"] + 2 * reach, height)
    union_w = min(config["TILE_W"] + 2 * reach, width)
    if config.get("KERNEL") == "resident":
        return dict(union_h=union_h, union_w=union_w, BLOCK_U=config["BLOCK_U"],
                    n_parts=-(-union_h * union_w // config["BLOCK_U"]))
    return dict(union_h=union_h, union_w=union_w, BLOCK_U=max(16, 1 << (union_h * union_w - 1).bit_length()))


def matching(config: dict, batch: int, height: int, width: int, channels: int, templates: int, fore_r: int,
             back_r: int, dtype=torch.float16, gpu: GPU | None = None, per_query: int | None = None) -> Estimate:
    """``mutual_max`` with ``config`` (streaming or resident); ``per_query``: each query's K templates."""
    gpu = gpu or GPUS[DEFAULT_GPU]
    element = dtype.itemsize
    reach = max(fore_r, back_r)
    count_t = per_query if per_query is not None else templates
    window = min(2 * reach + 1, height) * min(2 * reach + 1, width)
    useful = 2.0 * batch * count_t * height * width * window * channels

    union = union_shape(config, height, width, reach)
    pixels = config["TILE_H"] * config["TILE_W"]
    rows = config["BLOCK"] * pixels
    n_tiles = -(-height // config["TILE_H"]) * -(-width // config["TILE_W"])
    n_blocks = -(-batch // config["BLOCK"])
    resident = config.get("KERNEL") == "resident"
    if resident:
        parts, depth = union["n_parts"], max(16, 1 << (channels - 1).bit_length())
        programs = n_tiles * n_blocks * parts
        issued = 2.0 * programs * count_t * rows * union["BLOCK_U"] * depth
        l2 = programs * (rows + count_t * union["BLOCK_U"]) * depth * element
    else:
        parts, depth = 1, -(-channels // config["BLOCK_C"]) * config["BLOCK_C"]
        programs = n_tiles * n_blocks
        issued = 2.0 * programs * count_t * rows * union["BLOCK_U"] * depth
        l2 = programs * count_t * (rows + union["BLOCK_U"]) * depth * element
    outputs = 2 * batch * height * width * 4
    l2 += programs * (rows + config["BLOCK"] * union["BLOCK_U"] * parts) * 4  # the atomic merges

    # DRAM: the queries once; the templates once per pass of the grid over them. Programs that share
    # a tile's templates run side by side (the resident grid puts query block and part innermost), so
    # a pass re-reads a template only where the programs of one wave cannot all keep it in L2.
    map_bytes = height * width * channels * element
    template_bytes = (templates if per_query is None else min(templates, batch * per_query)) * map_bytes
    passes = 1 if resident or template_bytes <= gpu.l2_mb * 1e6 / 2 else n_blocks
    dram = batch * map_bytes + passes * template_bytes + outputs

    sixteen = element <= 2
    peak = (gpu.tensor_tflops if sixteen else gpu.fp32_tflops) * 1e12
    times = {
        "tensor-core" if sixteen else "CUDA-core": issued / peak,
        "L2": l2 / (gpu.l2_tbps * 1e12),
        "DRAM": dram / (gpu.dram_tbps * 1e12),
        "running-max": issued / (2 * depth) / (gpu.fp32_tflops * 1e12 / 2),
    }
    bound = max(times, key=times.get)
    seconds = times[bound]
    return Estimate(useful, issued, l2, dram, seconds, bound, useful / seconds / peak, gpu)
