"""What every backend test shares: devices, inputs, and the comparison with its tolerance."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
# Backends under test: triton runs on CUDA tensors, or on CPU tensors in the interpreter.
BACKENDS = ["torch", "triton"] if (HAS_CUDA or INTERPRETED) else ["torch"]

# Unit round-off of each dtype: the output is rounded to it once.
ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}


def device_for(backend: str) -> torch.device:
    if backend == "triton" and not INTERPRETED:
        return torch.device("cuda")
    return torch.device("cuda") if (HAS_CUDA and backend != "torch") else torch.device("cpu")


def skip_reason(backend: str, dtype: torch.dtype) -> str | None:
    if backend == "triton" and dtype == torch.float64:
        return "the triton backend takes 16- and 32-bit floats (float64 runs on the torch path)"
    if backend == "triton" and dtype == torch.bfloat16 and INTERPRETED:
        return "the Triton interpreter multiplies bf16 bit patterns in tl.dot; bf16 is checked on a GPU"
    return None


def features(n: int, c: int, h: int, w: int, *, dtype=torch.float32, device="cpu", seed: int = 0) -> torch.Tensor:
    """L2-normalised random features, as a backbone would give (|<q, t>| <= 1)."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, c, h, w, generator=g), dim=1)
    return x.to(device=device, dtype=dtype)


def tolerance(dtype: torch.dtype, channels: int) -> float:
    """Absolute tolerance for similarities of unit-norm features.

    Both sides multiply the same rounded inputs in float32; they differ by float32
    accumulation order (grows with the reduction length C) plus one rounding of the
    output to ``dtype`` (one unit in the last place near 1).
    """
    accumulate = 4 * channels * ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    return accumulate + 2 * ROUNDOFF[dtype] + 1e-7


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, channels: int) -> None:
    """``actual`` equals the reference ``expected`` in shape, dtype and value (within tolerance)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    tol = tolerance(expected.dtype, channels)
    gap = (actual.float().cpu() - expected.float().cpu()).abs()
    assert gap.max().item() <= tol, f"max |difference| {gap.max().item():.3e} > tolerance {tol:.3e}"


def edit_saved_bank(path, name_part: str, edit) -> None:
    """Rewrite the first tensor of a saved bank whose name holds ``name_part`` as ``edit`` makes it (the
    checksum dropped, as an older writer saved it), so that only the checks of that tensor can refuse it."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    metadata.pop("checksum")
    tensors = load_file(str(path))
    name = next(n for n in tensors if name_part in n)
    tensors[name] = edit(tensors[name]).contiguous()
    save_file(tensors, str(path), metadata=metadata)


def tiny_detector(**options):
    """A fast detector for tests: resnet18 with random weights, 64 px in and out, float32 unless told."""
    import hetmm

    return hetmm.HETMM("resnet18", None, image_size=64, out_size=64, **{"precision": "fp32", **options})


def random_images(n: int, seed: int) -> torch.Tensor:
    """``[n, 3, 64, 64]`` images in [0, 1], the same for the same seed."""
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
