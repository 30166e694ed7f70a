"""Per-GPU tuning of the Triton kernels (tile shapes, warps, stages), persisted across runs.

Each Triton launcher names its problem (op and sizes, bucketed to powers of two where nearby
sizes share a best config) and asks ``choose`` for a config: the tuned one when this GPU has
one in the cache, otherwise the launcher's heuristic. ``tune`` times a search space, keeps
the fastest config whose result matches the heuristic's, and records it.

The cache is one JSON file, keyed by device (GPU name, compute capability, Triton version),
then op, then problem: a GPU is tuned once and later processes start fast. Its path is
``$HETMM_TUNE_CACHE``, else ``$XDG_CACHE_HOME/hetmm/triton-tuning.json`` (``~/.cache`` by
default). A corrupt or foreign file, or an entry that is not a valid config for its problem,
is ignored with a warning, never an error. ``HETMM_AUTOTUNE=0`` turns lookups off.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

FORMAT = "hetmm-tuning/1"
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # launch options; every other config key is a constexpr


def cache_path() -> Path:
    if os.environ.get("HETMM_TUNE_CACHE"):
        return Path(os.environ["HETMM_TUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hetmm" / "triton-tuning.json"


def enabled() -> bool:
    return os.environ.get("HETMM_AUTOTUNE", "1") != "0"


def device_key(device: torch.device) -> str:
    """What a tuned config is only valid for: the GPU model, its compute capability, Triton's version."""
    return _device_key(torch.device(device))


@functools.lru_cache(maxsize=16)
def _device_key(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}|sm_{props.major}{props.minor}|triton-{triton.__version__}"
    return f"interpreter|{device.type}|triton-{triton.__version__}"


def bucket(n: int) -> int:
    """Next power of two: nearby sizes share an entry."""
    return 1 << max(0, int(n) - 1).bit_length()


def problem_key(**sizes) -> str:
    return ",".join(f"{name}={value}" for name, value in sizes.items())


def launch_options(config: dict) -> tuple[dict, dict]:
    """``(constexprs, launch options)`` of a config."""
    constexprs = {k: v for k, v in config.items() if k not in LAUNCH_OPTIONS}
    return constexprs, {k: v for k, v in config.items() if k in LAUNCH_OPTIONS}


class TuningCache:
    """The JSON file of tuned configs, read once, written atomically (merged with what is on disk)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict | None = None

    def _read(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
                raise ValueError(f"not a {FORMAT} file")
            return data["devices"]
        except (OSError, ValueError) as error:  # JSONDecodeError is a ValueError
            warnings.warn(f"hetmm: ignoring the tuning cache {self.path} ({error}); "
                          "the kernels use their default configs", RuntimeWarning, stacklevel=3)
            return {}

    @property
    def entries(self) -> dict:
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def get(self, device: str, op: str, problem: str) -> dict | None:
        """The entry ``{"config": ..., "ms": ...}``, or None (absent, or not shaped like one)."""
        node = self.entries
        for key in (device, op, problem):
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else None

    def put(self, device: str, op: str, problem: str, config: dict, ms: float) -> None:
        merged = self._read()  # another process may have tuned other problems meanwhile
        merged.setdefault(device, {}).setdefault(op, {})[problem] = {"config": config, "ms": ms}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "devices": merged}, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._entries = merged


_caches: dict[Path, TuningCache] = {}
_memo: dict[tuple, dict] = {}  # (path, device, op, problem) -> config, so a launch costs one dict lookup
_warned: set = set()


def cache() -> TuningCache:
    path = cache_path()
    if path not in _caches:
        _caches[path] = TuningCache(path)
    return _caches[path]


def forget() -> None:
    """Drop what this process has read (after the file or ``HETMM_TUNE_CACHE`` changed)."""
    _caches.clear()
    _memo.clear()


def choose(op: str, problem: str, device: torch.device, default: dict, valid: Callable[[dict], bool]) -> dict:
    """The tuned config of ``problem`` on this device, else ``default``.

    ``valid(config)``: whether a cached config is usable for this problem (known keys, legal
    shapes); an unusable entry is reported once and ``default`` is used.
    """
    if not enabled():
        return default
    path = cache_path()
    memo_key = (path, device_key(device), op, problem)
    if memo_key in _memo:
        return _memo[memo_key]
    entry = cache().get(memo_key[1], op, problem)
    config = default
    if entry is not None:
        candidate = entry.get("config")
        try:
            usable = isinstance(candidate, dict) and set(candidate) == set(default) and valid(candidate)
        except (TypeError, ValueError):
            usable = False
        if usable:
            config = dict(candidate)
        elif memo_key not in _warned:
            _warned.add(memo_key)
            warnings.warn(f"hetmm: ignoring the tuned config of {op} [{problem}] in {path}: {candidate!r} "
                          "is not a valid config for it", RuntimeWarning, stacklevel=3)
    _memo[memo_key] = config
    return config


@dataclass
class Trial:
    config: dict
    ms: float | None = None  # None: failed (compile error, out of resources, wrong result)
    error: str | None = None


@dataclass
class TuneResult:
    op: str
    problem: str
    default: Trial
    trials: list[Trial] = field(default_factory=list)

    @property
    def best(self) -> Trial:
        """The fastest config that ran and matched (the default on ties)."""
        return min([self.default, *(t for t in self.trials if t.ms is not None)], key=lambda t: t.ms)


def cpu_timer(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall time in ms (the interpreter has no GPU benchmarker)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gpu_timer(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25)


def tune(op: str, problem: str, device: torch.device, space: list[dict], default: dict,
         run: Callable[[dict], object], same: Callable[[object, object], bool],
         timer: Callable[[Callable], float] | None = None, save: bool = True) -> TuneResult:
    """Time ``run(config)`` for the default and every config of ``space``; record the fastest.

    A config whose output differs from the default's (``same(expected, got)`` false) or that
    fails to compile or launch is reported, never chosen.
    """
    timer = timer or (gpu_timer if device.type == "cuda" else cpu_timer)
    expected = run(default)
    result = TuneResult(op, problem, Trial(default, timer(lambda: run(default))))
    for config in space:
        trial = Trial(config)
        try:
            if not same(expected, run(config)):
                trial.error = "result differs from the default config's"
            else:
                trial.ms = timer(lambda: run(config))
        except Exception as error:  # a config the compiler or the GPU rejects is skipped
            trial.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        result.trials.append(trial)
    best = result.best
    if save:
        cache().put(device_key(device), op, problem, best.config, best.ms)
        _memo.clear()
    return result
