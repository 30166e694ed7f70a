"""``hetmm serve``: an inspection service over saved banks (Starlette on uvicorn).

One bank file, or a folder whose every ``*.safetensors`` is served under its stem. ``POST
/banks/{name}/predict`` (``/predict`` when one bank is served) takes one image file's bytes and answers the
verdict as JSON (or, with ``?heatmap=png``, the overlay); requests for one bank that arrive together are scored
as one batch (up to ``max_batch``, waiting at most ``max_wait_ms`` for more). ``POST /banks/{name}/templates``
(``/templates``) adds a normal image to the bank while predictions go on: the update runs on a copy of the
detector under the file's update lock, extends whatever another replica wrote meanwhile, is saved atomically,
then replaces the serving detector in one assignment, so every batch is scored by the old bank or the new one,
never a mix. The files are watched, so every replica sharing the folder serves each other's updates and new or
refitted banks without a restart. ``GET /banks``, ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /``
(a live page of the latest verdicts). Bad input is a 4xx with ``{"error": ...}`` naming the problem; nothing a
client sends stops the service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import uvicorn
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from .bank_folder import ServedBank, file_identity, read_detector, resident_bytes, scan, update_lock
from .data import MIN_SIDE, ImageError, read_image
from .detector import HETMM

FORMATS = {"PNG", "JPEG", "BMP", "TIFF"}  # what `hetmm predict` reads (hetmm.data.IMAGE_SUFFIXES)
MAX_SIDE = 4096
RECENT = 12  # verdicts the live page shows
BATCH_WAIT_CAP = 4  # a batch waits at most this many --max-wait-ms after its first request
WATCH_S = 0.5  # the bank files are looked at this often (a change is served within about twice this)

log = logging.getLogger("hetmm.serve")


class BadInput(Exception):
    """A request the service refuses: ``status`` and a message naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(data: bytes, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [0, 1] from one image file's bytes, read exactly as ``hetmm predict`` reads the
    file; ``BadInput`` 400 (not an image, unsupported, undecodable) or 413 (too large, a decompression bomb)."""
    if not data:
        raise BadInput(400, "the body is empty: send one image file's bytes")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError as error:
        raise BadInput(413, f"the image declares too many pixels: {error}") from None
    except Exception:
        raise BadInput(400, "the body is not an image file (PNG, JPEG, BMP or TIFF)") from None
    if kind not in FORMATS:
        raise BadInput(400, f"unsupported image format {kind}; expected PNG, JPEG, BMP or TIFF")
    if max(width, height) > MAX_SIDE:
        raise BadInput(413, f"the image is {width} x {height} pixels; sides up to {MAX_SIDE} are accepted")
    if min(width, height) < MIN_SIDE:
        raise BadInput(400, f"the image is {width} x {height} pixels; the shorter side must be at least {MIN_SIDE}")
    try:
        return read_image(io.BytesIO(data), size)
    except (ImageError, Image.DecompressionBombError) as error:
        raise BadInput(400, f"the image cannot be decoded: {str(error).replace('<_io.BytesIO object', 'upload')}") from None


def overlay_png(image: torch.Tensor, anomaly: torch.Tensor, threshold: float | None) -> bytes:
    """The image with its anomaly map as a red overlay, PNG bytes: full red at twice the pixel ``threshold`` (or at
    the map's own maximum, if that is higher), the pixels at the threshold outlined in cyan."""
    scale = max(float(anomaly.max()), 2 * threshold if threshold is not None else 0.0)
    size = image.shape[-1]
    heat = torch.nn.functional.interpolate(anomaly[None, None].float(), size=(size, size), mode="bilinear")[0, 0]
    alpha = (heat / max(scale, 1e-12)).clamp(0, 1)[None] * 0.6
    red = torch.tensor([1.0, 0.1, 0.1])[:, None, None]
    mixed = image * (1 - alpha) + red * alpha
    if threshold is not None:
        mask = (heat >= threshold).float()[None, None]
        inner = 1 - torch.nn.functional.max_pool2d(1 - mask, 3, 1, 1)  # the mask less its border pixels
        edge = (mask - inner)[0, 0].bool()
        mixed[:, edge] = torch.tensor([0.0, 1.0, 1.0])[:, None]
    pixels = (mixed.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, format="PNG")
    return out.getvalue()


async def _in_own_thread(function, *args):
    """``function(*args)`` on a thread of its own that ends when it returns: its OpenMP team (torch's threads
    for that thread) ends with it instead of slowing the scoring thread's for as long as the process lives."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(outcome, error) -> None:
        if future.done():  # the awaiting request went away
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(outcome)

    def run() -> None:
        try:
            outcome = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, outcome, None)

    threading.Thread(target=run, name="hetmm-update", daemon=True).start()
    return await future


class Service:
    """The banks behind the endpoints, the batcher, the hot update, the folder watcher and the counters.

    ``bank``: one bank file, served under its stem and kept loaded; or ``banks``: a folder whose every
    ``*.safetensors`` is served under its stem. Either way the files are watched every ``watch_s`` seconds: a bank
    added, replaced or removed there (by ``hetmm fit``, a deploy, another replica's hot update) is served, swapped
    or dropped without a restart, and a file that fails its checks is logged and skipped while the last good bank
    stays served. A folder's banks are dropped from memory after ``idle_s`` seconds without requests, and the least
    recently used go first when those loaded would pass ``max_bank_bytes``; a dropped bank is read again on its
    next request.
    """

    def __init__(self, bank: str | Path | None = None, token: str | None = None, max_batch: int = 8,
                 max_wait_ms: float = 5.0, max_bytes: int = 32 << 20, *, banks: str | Path | None = None,
                 idle_s: float | None = None, max_bank_bytes: int | None = None, watch_s: float = WATCH_S,
                 **load_options):
        if max_batch < 1 or max_wait_ms < 0 or max_bytes < 1:
            raise ValueError(f"max_batch must be >= 1, max_wait_ms >= 0 and max_bytes >= 1; got {max_batch}, "
                             f"{max_wait_ms}, {max_bytes}")
        if (bank is None) == (banks is None):
            raise ValueError("give bank (one bank file) or banks (a folder of them), not both or neither")
        if (idle_s is not None and idle_s <= 0) or (max_bank_bytes is not None and max_bank_bytes < 1) or watch_s <= 0:
            raise ValueError(f"idle_s, max_bank_bytes and watch_s must be positive; got {idle_s}, {max_bank_bytes}, "
                             f"{watch_s}")
        self.only = None if bank is None else Path(bank)
        self.folder = None if banks is None else Path(banks)
        if self.only is not None and not self.only.is_file():
            raise FileNotFoundError(f"bank: no file at {self.only}")
        if self.folder is not None and not self.folder.is_dir():
            raise FileNotFoundError(f"banks: no folder at {self.folder}")
        # Every torch computation of the service runs on this one thread (loading at start, scoring, overlays),
        # later loads and updates on a thread that ends with each (``_in_own_thread``), decoding in numpy
        # (``read_image``). A thread that has run one parallel torch operation keeps an OpenMP team while it
        # lives, and with more team threads than cores libgomp makes every team's threads sleep between parallel
        # regions instead of spinning: a batch-1 predict on 2 cores ran 9.0 -> 14.0 ms (3 -> 206 context
        # switches a call) while another such thread lived. Kept off the event loop and the request threads: with
        # 1 client 46-48 -> 59-67 images/s (benchmarks/serve_load.py; docs/serve.md has 8 clients).
        self.scoring = ThreadPoolExecutor(1, thread_name_prefix="hetmm-score")  # one batch at a time
        self.options = {"batch_size": max_batch, **load_options}
        self.token, self.max_batch, self.max_wait = token, max_batch, max_wait_ms / 1000
        self.max_bytes, self.idle_s, self.max_bank_bytes, self.watch_s = max_bytes, idle_s, max_bank_bytes, watch_s
        self.banks: dict[str, ServedBank] = {}
        self.rejected: dict[str, tuple] = {}  # files never served that failed their checks: name -> identity
        self.queue: asyncio.Queue | None = None
        self.recent: deque = deque(maxlen=RECENT)
        self.started = time.time()
        self.scored = 0
        self._metrics()
        for name, path in scan(self.folder, self.only).items():
            try:
                detector, identity = self.scoring.submit(read_detector, path, self.options).result()
            except Exception as error:
                if self.only is not None:
                    raise
                self._reject(name, file_identity(path), error)
                continue
            self._took(ServedBank(name, path, lock=asyncio.Lock()), detector, identity)

    @property
    def detector(self) -> HETMM:
        """The detector of the one bank served (``BadInput`` 400 when there are several)."""
        return self._only_bank().detector

    def _metrics(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hetmm_requests", "HTTP requests", ["endpoint", "bank", "status"],
                                registry=self.registry)
        self.errors = Counter("hetmm_errors", "requests answered with an error", ["endpoint"], registry=self.registry)
        self.latency = Histogram("hetmm_predict_seconds", "predict requests, arrival to answer", ["bank"],
                                 registry=self.registry, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.flagged = Counter("hetmm_images_flagged", "images whose verdict is anomalous", ["bank"],
                               registry=self.registry)
        self.templates = Gauge("hetmm_templates", "templates in the bank", ["bank"], registry=self.registry)
        self.loaded_bytes = Gauge("hetmm_bank_bytes", "bytes of the bank's tensors in memory (0: not loaded)",
                                  ["bank"], registry=self.registry)
        self.bank_loads = Counter("hetmm_bank_loads", "bank files read (at start, first use, a change)", ["bank"],
                                  registry=self.registry)
        self.rejections = Counter("hetmm_bank_rejections", "bank files refused by their checks", ["bank"],
                                  registry=self.registry)

    # ------------------------------------------------------------------ the banks
    def _only_bank(self) -> ServedBank:
        if len(self.banks) != 1:
            raise BadInput(400, f"{len(self.banks)} banks are served ({self._names()}): post to "
                                "/banks/{name}/predict or /banks/{name}/templates")
        return next(iter(self.banks.values()))

    def _names(self) -> str:
        return ", ".join(sorted(self.banks)) or "none"

    def _took(self, served: ServedBank, detector: HETMM, identity: tuple, read: bool = True) -> None:
        served.took(detector, identity)
        served.last_used = time.monotonic()
        self.banks[served.name] = served
        self.rejected.pop(served.name, None)
        self.templates.labels(served.name).set(served.templates)
        self.loaded_bytes.labels(served.name).set(resident_bytes(detector))
        if read:
            self.bank_loads.labels(served.name).inc()
        self._fit_budget(keep=served)

    def _reject(self, name: str, identity: tuple | None, error: Exception) -> None:
        served = self.banks.get(name)
        if served is not None:
            served.rejected = identity
        else:
            self.rejected[name] = identity
        self.rejections.labels(name).inc()
        log.warning("bank %s: the file fails its checks, %s: %s", name,
                    "the last good bank stays served" if served is not None else "not served", error)

    def _drop(self, served: ServedBank) -> None:
        """Free a loaded bank's memory; it is read again on its next request."""
        served.detector = None
        self.loaded_bytes.labels(served.name).set(0)

    def _fit_budget(self, keep: ServedBank) -> None:
        """Drop the least recently used idle banks until those loaded fit ``max_bank_bytes`` (``keep`` stays)."""
        if self.max_bank_bytes is None:
            return
        loaded = [b for b in self.banks.values() if b.detector is not None]
        total = sum(resident_bytes(b.detector) for b in loaded)
        for served in sorted(loaded, key=lambda b: b.last_used):
            if total <= self.max_bank_bytes:
                return
            if served is not keep and not served.active:
                total -= resident_bytes(served.detector)
                self._drop(served)
        if total > self.max_bank_bytes:
            log.warning("banks in use hold %d bytes, more than --max-bank-bytes %d", total, self.max_bank_bytes)

    async def bank(self, name: str | None) -> ServedBank:
        """The bank served as ``name`` (``None``: the only one), read from its file if it is not in memory."""
        served = self._only_bank() if name is None else self.banks.get(name)
        if served is None:
            raise BadInput(404, f"no bank is served as {name!r}; served: {self._names()}")
        if served.detector is None:
            async with served.lock:
                if served.detector is None:
                    await self._read_locked(served)
        served.last_used = time.monotonic()
        return served

    async def _read_locked(self, served: ServedBank) -> None:
        """Read a dropped bank again (``served.lock`` held)."""
        try:
            detector, identity = await _in_own_thread(read_detector, served.path, self.options)
        except Exception as error:  # noqa: BLE001 - the file changed under us; the watcher logs it
            raise BadInput(503, f"bank {served.name} cannot be read now: {error}") from None
        self._took(served, detector, identity)

    async def watch(self) -> None:
        """Follow the files: new banks served, changed ones swapped, removed ones dropped, idle ones freed."""
        while True:
            await asyncio.sleep(self.watch_s)
            try:
                await self.rescan()
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("watching the bank files failed")

    async def rescan(self) -> None:
        found = scan(self.folder, self.only)
        for name in [n for n in self.banks if n not in found]:
            if self.only is None:  # a single --bank whose file went away stays served as it was
                log.warning("bank %s: its file is gone; no longer served", name)
                del self.banks[name]
                for gauge in (self.templates, self.loaded_bytes):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
        for name in [n for n in self.rejected if n not in found]:
            del self.rejected[name]
        for name, path in found.items():
            identity = file_identity(path)
            served = self.banks.get(name)
            known = (served.identity, served.rejected) if served is not None else (self.rejected.get(name),)
            if identity is not None and identity not in known:
                await self._reread(name, path, served)
        if self.idle_s is not None and self.only is None:
            now = time.monotonic()
            for served in self.banks.values():
                if served.detector is not None and not served.active and now - served.last_used > self.idle_s:
                    self._drop(served)

    async def _reread(self, name: str, path: Path, served: ServedBank | None) -> None:
        served = served or ServedBank(name, path, lock=asyncio.Lock())
        async with served.lock:  # after an update of this process, which records the file it wrote
            identity = file_identity(path)
            if identity is None or identity in (served.identity, served.rejected):
                return
            was_loaded = served.detector is not None or name not in self.banks
            try:
                detector, identity = await _in_own_thread(read_detector, path, self.options, served.detector)
            except Exception as error:  # noqa: BLE001 - logged, and the last good bank stays
                self._reject(name, identity, error)
                return
            self._took(served, detector, identity)
            if not was_loaded:  # a dropped bank is only checked, and stays dropped until it is asked for
                self._drop(served)
            log.info("bank %s: serving %d templates from %s", name, served.templates, path)

    # ------------------------------------------------------------------ scoring
    async def batcher(self) -> None:
        """Collect requests into batches of one bank each and score each on the scoring thread."""
        loop = asyncio.get_running_loop()
        waiting: dict[ServedBank, deque] = {}  # requests not yet scored, per bank, in arrival order

        def stash(item) -> None:
            waiting.setdefault(item[0], deque()).append((*item, loop.time()))

        while True:
            if not waiting:
                stash(await self.queue.get())
            while not self.queue.empty():
                stash(self.queue.get_nowait())
            served = min(waiting, key=lambda b: waiting[b][0][-1])  # the bank of the oldest request
            batch = waiting[served]
            # wait max_wait after the bank's latest arrival (clients answered together come back spread over
            # their decoding), but never more than BATCH_WAIT_CAP times max_wait after its first, and not at all
            # while another bank's requests wait: the scoring thread would idle while they could be scored
            cap = batch[0][-1] + BATCH_WAIT_CAP * self.max_wait
            while len(batch) < self.max_batch and len(waiting) == 1:
                remaining = min(batch[-1][-1] + self.max_wait, cap) - loop.time()
                if remaining <= 0:
                    break
                try:
                    stash(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            items = [batch.popleft() for _ in range(min(len(batch), self.max_batch))]
            if not batch:
                del waiting[served]
            detector = served.detector  # the whole batch against one bank, whatever an update does meanwhile
            explain = any(explained for _, _, _, explained, _ in items)  # flagged images only: a small cost
            try:
                result = await loop.run_in_executor(self.scoring, self._score, detector,
                                                    [image for _, image, _, _, _ in items], explain)
            except Exception as error:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for _, _, future, _, _ in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            for index, (_, _, future, _, _) in enumerate(items):
                if not future.done():
                    future.set_result((result, index))

    @staticmethod
    def _score(detector: HETMM, images: list, explain: bool = False):
        with torch.inference_mode():
            return detector.predict(torch.stack(images), explain=explain)

    async def predict(self, served: ServedBank, image: torch.Tensor, explain: bool = False):
        future = asyncio.get_running_loop().create_future()
        served.active += 1  # not dropped while the request waits
        try:
            await self.queue.put((served, image, future, explain))
            return await future
        finally:
            served.active -= 1
            served.last_used = time.monotonic()

    @staticmethod
    def verdict(result, index: int) -> dict:
        """One image's answer from its batch's ``Prediction`` (which carries the thresholds it was decided at)."""
        label = None if result.pred_label is None else bool(result.pred_label[index])
        regions = [] if result.regions is None else [
            {"box": [int(v) for v in region["box"]], "area": int(region["area"]), "peak": float(region["peak"]),
             **({"nearest": region["nearest"]} if "nearest" in region else {})}
            for region in result.regions[index]]
        return {"score": float(result.pred_score[index]),
                "norm_score": None if result.norm_score is None else float(result.norm_score[index]),
                "label": label, "regions": regions,
                "image_threshold": None if result.image_threshold is None else float(result.image_threshold)}

    # ------------------------------------------------------------------ hot update
    def _updated(self, served: ServedBank, image: torch.Tensor) -> tuple[HETMM, tuple]:
        """A copy of the bank's detector with ``image`` added, its bank saved, and the saved file's identity; the
        serving detector is untouched. Under the file's update lock: when another process wrote the file since
        this one read it, the image is added to what that process wrote, so concurrent updates all stay."""
        with update_lock(served.path):
            detector = served.detector
            current = file_identity(served.path)
            if current is not None and current != served.identity:
                detector, _ = read_detector(served.path, self.options, detector)
            helper = detector.with_bank(detector.bank.copy())
            helper.add_templates(image[None])
            helper.save(served.path)  # atomic: a restart, or another replica, finds the old bank or the new one
            return helper, file_identity(served.path)

    async def add_template(self, name: str | None, image: torch.Tensor) -> int:
        served = await self.bank(name)
        served.active += 1
        try:
            async with served.lock:  # updates one after another, each from the last one's bank
                if served.detector is None:  # dropped while waiting for the lock
                    await self._read_locked(served)
                detector, identity = await _in_own_thread(self._updated, served, image)
                self._took(served, detector, identity, read=False)  # one assignment: later batches see it
        finally:
            served.active -= 1
        return served.templates

    def authorised(self, header: str | None) -> int:
        """200 when the bearer token matches, 403 when updates are off (no token file), else 401."""
        if self.token is None:
            return 403
        given = (header or "").removeprefix("Bearer ").strip() if (header or "").startswith("Bearer ") else ""
        return 200 if given and hmac.compare_digest(given.encode(), self.token.encode()) else 401

    def describe(self) -> list[dict]:
        """What ``GET /banks`` answers: every bank served, in name order."""
        return [{"name": b.name, "templates": b.templates, "loaded": b.detector is not None,
                 "image_threshold": None if b.thresholds is None else b.thresholds[0],
                 "pixel_threshold": None if b.thresholds is None else b.thresholds[1]}
                for b in sorted(self.banks.values(), key=lambda b: b.name)]


async def _body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadInput(413, f"the body is {int(declared)} bytes; at most {limit} are accepted")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise BadInput(413, f"the body is more than {limit} bytes; at most {limit} are accepted")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service):
    """The Starlette application serving ``service``."""
    def answer(endpoint: str, status: int, payload=None, response=None, bank: str = ""):
        # ``bank`` only ever names a bank served (never a client's string): a client cannot mint metric series
        service.requests.labels(endpoint, bank, str(status)).inc()
        if status >= 400:
            service.errors.labels(endpoint).inc()
        return response if response is not None else JSONResponse(payload, status_code=status)

    async def decoded(request, served: ServedBank):
        data = await _body(request, service.max_bytes)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, decode_upload, data, served.detector.image_size)

    async def predict(request):
        start = time.perf_counter()
        name = request.path_params.get("name")
        bank = ""
        try:
            heatmap = request.query_params.get("heatmap")
            if heatmap not in (None, "png"):
                raise BadInput(400, f"heatmap must be 'png'; got {heatmap!r}")
            explain = request.query_params.get("explain", "0")
            if explain not in ("0", "1"):
                raise BadInput(400, f"explain must be 0 or 1; got {explain!r}")
            served = await service.bank(name)
            bank = served.name
            image = await decoded(request, served)
            result, index = await service.predict(served, image, explain == "1")
        except BadInput as error:
            return answer("predict", error.status, {"error": str(error)}, bank=bank)
        except Exception as error:  # noqa: BLE001 - reported, and the service goes on
            return answer("predict", 500, {"error": f"scoring failed: {error}"}, bank=bank)
        verdict = {"bank": bank, **service.verdict(result, index)}
        verdict["ms"] = (time.perf_counter() - start) * 1000
        service.latency.labels(bank).observe(verdict["ms"] / 1000)
        service.scored += 1
        if verdict["label"]:
            service.flagged.labels(bank).inc()
        # the overlay is drawn when someone looks (the live page, ?heatmap=png), on the scoring thread
        draw = (image, result.anomaly_map[index], result.pixel_threshold)
        service.recent.appendleft({**verdict, "time": time.time(), "draw": draw})
        if heatmap == "png":
            png = await asyncio.get_running_loop().run_in_executor(service.scoring, overlay_png, *draw)
            return answer("predict", 200, response=Response(png, media_type="image/png"), bank=bank)
        return answer("predict", 200, verdict, bank=bank)

    async def templates(request):
        status = service.authorised(request.headers.get("authorization"))
        if status != 200:
            message = ("hot update is off: start the service with --token-file" if status == 403
                       else "a valid 'Authorization: Bearer <token>' header is required")
            return answer("templates", status, {"error": message})
        bank = ""
        try:
            served = await service.bank(request.path_params.get("name"))
            bank = served.name
            count = await service.add_template(bank, await decoded(request, served))
        except BadInput as error:
            return answer("templates", error.status, {"error": str(error)}, bank=bank)
        except Exception as error:  # noqa: BLE001 - reported (the bank file could not be read or written)
            return answer("templates", 500, {"error": f"the update failed: {error}"}, bank=bank)
        return answer("templates", 200, {"bank": bank, "templates": count}, bank=bank)

    async def banks(request):
        return answer("banks", 200, {"banks": service.describe()})

    async def healthz(request):
        counts = {b["name"]: b["templates"] for b in service.describe()}
        return answer("healthz", 200, {"ok": True, "templates": sum(counts.values()), "banks": counts})

    async def metrics(request):
        for served in list(service.banks.values()):
            service.loaded_bytes.labels(served.name).set(
                0 if served.detector is None else resident_bytes(served.detector))
        return answer("metrics", 200, response=Response(generate_latest(service.registry),
                                                        media_type=CONTENT_TYPE_LATEST))

    async def recent(request):
        entries = list(service.recent)
        loop = asyncio.get_running_loop()
        for entry in entries:
            if "overlay" not in entry:  # drawn once, the first time the page asks
                png = await loop.run_in_executor(service.scoring, overlay_png, *entry["draw"])
                entry["overlay"] = base64.b64encode(png).decode()
        elapsed = max(time.time() - service.started, 1e-9)
        verdicts = [{k: v for k, v in entry.items() if k != "draw"} for entry in entries]
        return answer("recent", 200, {"verdicts": verdicts, "banks": service.describe(), "scored": service.scored,
                                      "images_per_s": service.scored / elapsed})

    async def page(request):
        return answer("page", 200, response=HTMLResponse(LIVE_PAGE))

    async def refuse(request, exc):
        # one label for every refused path: a client must not be able to mint metric series
        return answer("refused", exc.status_code, {"error": f"{request.method} {request.url.path}: "
                                                                   f"{exc.detail}"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.queue = asyncio.Queue()  # of the server's event loop
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(service.batcher()), loop.create_task(service.watch())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    routes = [Route("/predict", predict, methods=["POST"]), Route("/templates", templates, methods=["POST"]),
              Route("/banks/{name}/predict", predict, methods=["POST"]),
              Route("/banks/{name}/templates", templates, methods=["POST"]),
              Route("/banks", banks, methods=["GET"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/recent", recent, methods=["GET"]), Route("/", page, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: refuse})


def serve(bank=None, host: str = "127.0.0.1", port: int = 8000, token_file=None, max_batch: int = 8,
          max_wait_ms: float = 5.0, max_bytes: int = 32 << 20, *, banks=None, idle_s: float | None = None,
          max_bank_bytes: int | None = None, **load_options) -> None:
    """Run the service until interrupted (``hetmm serve``): one bank file (``bank``) or a folder (``banks``)."""
    token = None
    if token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
    if not log.handlers:  # the banks' comings and goings, and refused files, on stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s hetmm serve: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    service = Service(bank, token, max_batch, max_wait_ms, max_bytes, banks=banks, idle_s=idle_s,
                      max_bank_bytes=max_bank_bytes, **load_options)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")


LIVE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>hetmm serve</title>
<style>
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; }
#status { margin-bottom: 1em; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: white; border: 3px solid #9c9; padding: 6px; width: 260px; }
.card.bad { border-color: #d33; }
.card img { width: 256px; height: 256px; display: block; }
.why { font-size: 12px; color: #444; margin-top: 4px; }
</style></head>
<body><h1>hetmm serve</h1><div id="status">waiting for the first verdict</div><div class="grid" id="grid"></div>
<script>
async function refresh() {
  try {
    const state = await (await fetch('/recent')).json();
    const fmt = (v) => v === null ? 'none' : v.toFixed(4);
    const banks = state.banks.map((b) => `${b.name}: ${b.templates} templates, image threshold ` +
      `${fmt(b.image_threshold)}, pixel threshold ${fmt(b.pixel_threshold)}`);
    document.getElementById('status').textContent =
      `${banks.join('; ')}; ${state.scored} images scored, ${state.images_per_s.toFixed(1)} images/s`;
    const grid = document.getElementById('grid');
    grid.replaceChildren(...state.verdicts.map((v) => {
      const card = document.createElement('div');
      card.className = 'card' + (v.label ? ' bad' : '');
      const img = document.createElement('img');
      img.src = 'data:image/png;base64,' + v.overlay;
      img.alt = 'overlay';
      const text = document.createElement('div');
      text.textContent = `${v.bank}: ${v.label ? 'ANOMALOUS' : (v.label === null ? 'no threshold' : 'normal')}, score ` +
        `${v.score.toFixed(4)}, ${v.regions.length} region(s), ${v.ms.toFixed(1)} ms`;
      card.append(img, text);
      for (const region of v.regions.filter((r) => r.nearest)) {
        const why = document.createElement('div');
        why.className = 'why';
        const source = region.nearest.source ? region.nearest.source.split('/').pop() : 'no file recorded';
        why.textContent = `region at ${region.box.join(', ')}: nearest normal template ${region.nearest.template} ` +
          `(${source}) at ${region.nearest.box.join(', ')}, similarity ${region.nearest.similarity.toFixed(3)}`;
        card.append(why);
      }
      return card;
    }));
  } catch (error) {
    document.getElementById('status').textContent = 'service unreachable';
  }
}
refresh();
setInterval(refresh, 1000);
</script></body></html>
"""
