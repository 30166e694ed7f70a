"""``hetmm serve``: an inspection service over a saved bank (Starlette on uvicorn).

``POST /predict`` takes one image file's bytes and answers the verdict as JSON (or, with ``?heatmap=png``,
the overlay); requests that arrive together are scored as one batch (up to ``max_batch``, waiting at most
``max_wait_ms`` for more). ``POST /templates`` adds a normal image to the bank while predictions go on: the
update runs on a copy of the detector, is saved atomically, then replaces it in one assignment, so every
batch is scored by the old bank or the new one, never a mix. ``GET /healthz``, ``GET /metrics`` (Prometheus
text), ``GET /`` (a live page of the latest verdicts). Bad input is a 4xx with ``{"error": ...}`` naming the
problem; nothing a client sends stops the service.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
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

from .bank import TemplateBank
from .data import ImageError, read_image
from .detector import HETMM

FORMATS = {"PNG", "JPEG", "BMP", "TIFF"}  # what `hetmm predict` reads (hetmm.data.IMAGE_SUFFIXES)
MAX_SIDE = 4096
RECENT = 12  # verdicts the live page shows
BATCH_WAIT_CAP = 4  # a batch waits at most this many --max-wait-ms after its first request


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
    """The detector behind the endpoints, the batcher, the hot update and the counters."""

    def __init__(self, bank: str | Path, token: str | None = None, max_batch: int = 8, max_wait_ms: float = 5.0,
                 max_bytes: int = 32 << 20, **load_options):
        if max_batch < 1 or max_wait_ms < 0 or max_bytes < 1:
            raise ValueError(f"max_batch must be >= 1, max_wait_ms >= 0 and max_bytes >= 1; got {max_batch}, "
                             f"{max_wait_ms}, {max_bytes}")
        self.bank_path = Path(bank)
        # Every torch computation of the service runs on this one thread (loading, scoring, overlays), updates
        # on a thread that ends with each (``_in_own_thread``), decoding in numpy (``read_image``). A thread that
        # has run one parallel torch operation keeps an OpenMP team while it lives, and with more team threads
        # than cores libgomp makes every team's threads sleep between parallel regions instead of spinning: a
        # batch-1 predict on 2 cores ran 9.0 -> 14.0 ms (3 -> 206 context switches a call) while another such
        # thread lived. Kept off the event loop and the request threads: with 1 client 46-48 -> 59-67 images/s
        # (benchmarks/serve_load.py; docs/serve.md has 8 clients).
        self.scoring = ThreadPoolExecutor(1, thread_name_prefix="hetmm-score")  # one batch at a time
        options = {"batch_size": max_batch, **load_options}
        self.detector = self.scoring.submit(self._loaded, self.bank_path, options).result()
        self.token, self.max_batch, self.max_wait = token, max_batch, max_wait_ms / 1000
        self.max_bytes = max_bytes
        self.queue: asyncio.Queue | None = None
        self.update_lock = asyncio.Lock()
        self.recent: deque = deque(maxlen=RECENT)
        self.started = time.time()
        self.scored = 0
        self._metrics()

    @staticmethod
    def _loaded(path: Path, options: dict) -> HETMM:
        detector = HETMM.load(path, **options)
        detector.thresholds()  # a bank saved before calibration is calibrated now, not on the first request
        return detector

    def _metrics(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hetmm_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("hetmm_errors", "requests answered with an error", ["endpoint"], registry=self.registry)
        self.latency = Histogram("hetmm_predict_seconds", "POST /predict, arrival to answer", registry=self.registry,
                                 buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.flagged = Counter("hetmm_images_flagged", "images whose verdict is anomalous", registry=self.registry)
        self.templates = Gauge("hetmm_templates", "templates in the bank", registry=self.registry)
        self.templates.set(len(self.detector.bank))

    # ------------------------------------------------------------------ scoring
    async def batcher(self) -> None:
        """Collect requests into batches and score each on the scoring thread."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            # wait max_wait after the latest arrival (clients answered together come back spread over their
            # decoding), but never more than BATCH_WAIT_CAP times max_wait after the first
            cap = loop.time() + BATCH_WAIT_CAP * self.max_wait
            while len(items) < self.max_batch:
                remaining = min(self.max_wait, cap - loop.time())
                try:
                    items.append(self.queue.get_nowait() if remaining <= 0 else
                                 await asyncio.wait_for(self.queue.get(), remaining))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            detector = self.detector  # the whole batch against one bank, whatever an update does meanwhile
            try:
                result = await loop.run_in_executor(self.scoring, self._score, detector,
                                                    [image for image, _ in items])
            except Exception as error:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for _, future in items:
                    if not future.done():
                        future.set_exception(error)
                continue
            for index, (_, future) in enumerate(items):
                if not future.done():
                    future.set_result((result, index))

    @staticmethod
    def _score(detector: HETMM, images: list):
        with torch.inference_mode():
            return detector.predict(torch.stack(images))

    async def predict(self, image: torch.Tensor):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((image, future))
        return await future

    @staticmethod
    def verdict(result, index: int) -> dict:
        """One image's answer from its batch's ``Prediction`` (which carries the thresholds it was decided at)."""
        label = None if result.pred_label is None else bool(result.pred_label[index])
        regions = [] if result.regions is None else [
            {"box": [int(v) for v in region["box"]], "area": int(region["area"]), "peak": float(region["peak"])}
            for region in result.regions[index]]
        return {"score": float(result.pred_score[index]),
                "norm_score": None if result.norm_score is None else float(result.norm_score[index]),
                "label": label, "regions": regions,
                "image_threshold": None if result.image_threshold is None else float(result.image_threshold)}

    # ------------------------------------------------------------------ hot update
    def _updated(self, image: torch.Tensor) -> HETMM:
        """A copy of the detector with ``image`` added and its bank saved; the serving one is untouched."""
        bank = self.detector.bank
        helper = self.detector.with_bank(TemplateBank(dict(bank.features), bank.config, dict(bank.extras)))
        helper.add_templates(image[None])
        helper.save(self.bank_path)  # atomic: a restart finds the old bank or the new one
        return helper

    async def add_template(self, image: torch.Tensor) -> int:
        async with self.update_lock:  # updates one after another, each from the last one's bank
            updated = await _in_own_thread(self._updated, image)
            self.detector = updated  # one assignment: later batches see the new bank
        self.templates.set(len(updated.bank))
        return len(updated.bank)

    def authorised(self, header: str | None) -> int:
        """200 when the bearer token matches, 403 when updates are off (no token file), else 401."""
        if self.token is None:
            return 403
        given = (header or "").removeprefix("Bearer ").strip() if (header or "").startswith("Bearer ") else ""
        return 200 if given and hmac.compare_digest(given.encode(), self.token.encode()) else 401


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
    def answer(endpoint: str, status: int, payload=None, response=None):
        service.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            service.errors.labels(endpoint).inc()
        return response if response is not None else JSONResponse(payload, status_code=status)

    async def decoded(request):
        data = await _body(request, service.max_bytes)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, decode_upload, data, service.detector.image_size)

    async def predict(request):
        start = time.perf_counter()
        try:
            image = await decoded(request)
            heatmap = request.query_params.get("heatmap")
            if heatmap not in (None, "png"):
                raise BadInput(400, f"heatmap must be 'png'; got {heatmap!r}")
            result, index = await service.predict(image)
        except BadInput as error:
            return answer("predict", error.status, {"error": str(error)})
        except Exception as error:  # noqa: BLE001 - reported, and the service goes on
            return answer("predict", 500, {"error": f"scoring failed: {error}"})
        verdict = service.verdict(result, index)
        verdict["ms"] = (time.perf_counter() - start) * 1000
        service.latency.observe(verdict["ms"] / 1000)
        service.scored += 1
        if verdict["label"]:
            service.flagged.inc()
        # the overlay is drawn when someone looks (the live page, ?heatmap=png), on the scoring thread
        draw = (image, result.anomaly_map[index], result.pixel_threshold)
        service.recent.appendleft({**verdict, "time": time.time(), "draw": draw})
        if heatmap == "png":
            png = await asyncio.get_running_loop().run_in_executor(service.scoring, overlay_png, *draw)
            return answer("predict", 200, response=Response(png, media_type="image/png"))
        return answer("predict", 200, verdict)

    async def templates(request):
        status = service.authorised(request.headers.get("authorization"))
        if status != 200:
            message = ("hot update is off: start the service with --token-file" if status == 403
                       else "a valid 'Authorization: Bearer <token>' header is required")
            return answer("templates", status, {"error": message})
        try:
            count = await service.add_template(await decoded(request))
        except BadInput as error:
            return answer("templates", error.status, {"error": str(error)})
        return answer("templates", 200, {"templates": count})

    async def healthz(request):
        return answer("healthz", 200, {"ok": True, "templates": len(service.detector.bank)})

    async def metrics(request):
        return answer("metrics", 200, response=Response(generate_latest(service.registry),
                                                        media_type=CONTENT_TYPE_LATEST))

    async def recent(request):
        entries = list(service.recent)
        loop = asyncio.get_running_loop()
        for entry in entries:
            if "overlay" not in entry:  # drawn once, the first time the page asks
                png = await loop.run_in_executor(service.scoring, overlay_png, *entry["draw"])
                entry["overlay"] = base64.b64encode(png).decode()
        thresholds = service.detector.thresholds()
        elapsed = max(time.time() - service.started, 1e-9)
        verdicts = [{k: v for k, v in entry.items() if k != "draw"} for entry in entries]
        return answer("recent", 200, {"verdicts": verdicts, "templates": len(service.detector.bank),
                                      "image_threshold": None if thresholds is None else thresholds[0],
                                      "pixel_threshold": None if thresholds is None else thresholds[1],
                                      "scored": service.scored, "images_per_s": service.scored / elapsed})

    async def page(request):
        return answer("page", 200, response=HTMLResponse(LIVE_PAGE))

    async def refuse(request, exc):
        # one label for every refused path: a client must not be able to mint metric series
        return answer("refused", exc.status_code, {"error": f"{request.method} {request.url.path}: "
                                                                   f"{exc.detail}"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.queue = asyncio.Queue()  # of the server's event loop
        batcher = asyncio.get_running_loop().create_task(service.batcher())
        try:
            yield
        finally:
            batcher.cancel()

    routes = [Route("/predict", predict, methods=["POST"]), Route("/templates", templates, methods=["POST"]),
              Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/recent", recent, methods=["GET"]), Route("/", page, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: refuse})


def serve(bank, host: str = "127.0.0.1", port: int = 8000, token_file=None, max_batch: int = 8,
          max_wait_ms: float = 5.0, max_bytes: int = 32 << 20, **load_options) -> None:
    """Run the service until interrupted (``hetmm serve``)."""
    token = None
    if token_file is not None:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"the token file {token_file} is empty")
    service = Service(bank, token, max_batch, max_wait_ms, max_bytes, **load_options)
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
</style></head>
<body><h1>hetmm serve</h1><div id="status">waiting for the first verdict</div><div class="grid" id="grid"></div>
<script>
async function refresh() {
  try {
    const state = await (await fetch('/recent')).json();
    const fmt = (v) => v === null ? 'none' : v.toFixed(4);
    document.getElementById('status').textContent =
      `${state.templates} templates; image threshold ${fmt(state.image_threshold)}, pixel threshold ` +
      `${fmt(state.pixel_threshold)}; ${state.scored} images scored, ${state.images_per_s.toFixed(1)} images/s`;
    const grid = document.getElementById('grid');
    grid.replaceChildren(...state.verdicts.map((v) => {
      const card = document.createElement('div');
      card.className = 'card' + (v.label ? ' bad' : '');
      const img = document.createElement('img');
      img.src = 'data:image/png;base64,' + v.overlay;
      img.alt = 'overlay';
      const text = document.createElement('div');
      text.textContent = `${v.label ? 'ANOMALOUS' : (v.label === null ? 'no threshold' : 'normal')}, score ` +
        `${v.score.toFixed(4)}, ${v.regions.length} region(s), ${v.ms.toFixed(1)} ms`;
      card.append(img, text);
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
