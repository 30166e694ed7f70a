"""``hetmm serve`` over real HTTP on 127.0.0.1: the endpoints, the token rules, bad input, hot update under load
and after a restart. Traffic goes only to loopback and every client call has a timeout."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
import uvicorn  # noqa: E402

import hetmm  # noqa: E402
from hetmm.demo import build_dataset  # noqa: E402
from hetmm.serve import Service, create_app  # noqa: E402

SIZE = 128  # the bank's image size: small, so the suite stays quick


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = build_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_good=2, n_defective=3)
    return root / "brick"


@pytest.fixture(scope="module")
def bank_file(data, tmp_path_factory):
    det = hetmm.HETMM("tf_efficientnet_lite0", image_size=SIZE, out_size=SIZE)
    det.fit(sorted((data / "train" / "good").glob("*.png")))
    return det.save(tmp_path_factory.mktemp("bank") / "brick.safetensors")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Running:
    """A service on 127.0.0.1 in a background thread, stopped on exit."""

    def __init__(self, service: Service):
        self.service, self.port = service, _free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the service did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        return call(self.port, method, path, body, headers)


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """``(status, headers, body bytes)`` of one request to 127.0.0.1:``port``; never raises for an HTTP error
    status."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def under_load(running: Running, path: str, queries: list, clients: int, during):
    """``(answers, during())``: ``during`` runs while ``clients`` threads post ``queries`` in turn to ``path`` (each
    at least 4 times); ``answers`` holds ``(query index, status, JSON answer)`` of every request."""
    answers, stop = [], threading.Event()

    def client(offset):
        count = 0
        while not stop.is_set() or count < 4:
            index = (offset + count) % len(queries)
            status, _, body = running.call("POST", path, queries[index].read_bytes())
            answers.append((index, status, json.loads(body)))
            count += 1

    with ThreadPoolExecutor(clients) as pool:
        posting = [pool.submit(client, i) for i in range(clients)]
        try:
            outcome = during()
        finally:
            stop.set()
        for done in posting:
            done.result(timeout=120)
    return answers, outcome


def _copy(bank_file: Path, folder: Path) -> Path:
    target = folder / bank_file.name
    target.write_bytes(bank_file.read_bytes())
    return target


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_predict_answers_what_hetmm_predict_gives(data, bank_file, tmp_path):
    files = sorted((data / "test").rglob("*.png"))
    offline = hetmm.HETMM.load(bank_file).predict(files)
    with Running(Service(bank_file)) as running:
        for index, path in enumerate(files):
            status, headers, body = running.call("POST", "/predict", path.read_bytes(),
                                                 {"Content-Type": "application/octet-stream"})
            assert status == 200, body
            verdict = json.loads(body)
            assert set(verdict) == {"bank", "score", "norm_score", "label", "regions", "image_threshold", "ms"}
            assert verdict["score"] == pytest.approx(float(offline.pred_score[index]), rel=1e-4, abs=1e-5)
            assert verdict["label"] == bool(offline.pred_label[index])
            assert verdict["image_threshold"] == pytest.approx(offline.image_threshold)
            assert [r["area"] for r in verdict["regions"]] == [r["area"] for r in offline.regions[index]]
        status, headers, body = running.call("POST", "/predict?heatmap=png", files[-1].read_bytes())
        assert status == 200 and headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(body)).size == (SIZE, SIZE)
        status, _, body = running.call("GET", "/healthz")
        assert status == 200 and json.loads(body) == {"ok": True, "templates": 6, "banks": {"brick": 6}}
        status, _, body = running.call("GET", "/metrics")
        text = body.decode()
        assert status == 200 and 'hetmm_requests_total{bank="brick",endpoint="predict",status="200"}' in text
        assert 'hetmm_predict_seconds_bucket{bank="brick"' in text and "hetmm_images_flagged_total" in text
        assert 'hetmm_templates{bank="brick"} 6.0' in text and 'hetmm_bank_loads_total{bank="brick"} 1.0' in text
        status, _, body = running.call("GET", "/recent")
        assert status == 200 and len(json.loads(body)["verdicts"]) == len(files) + 1


def _bad_inputs(good: bytes) -> dict:
    """name -> (body, expected status)"""
    width_height_at = 16  # the IHDR chunk's width and height in a PNG
    bomb = bytearray(good)
    bomb[width_height_at:width_height_at + 8] = struct.pack(">II", 30_000, 30_000)
    bomb[29:33] = struct.pack(">I", zlib.crc32(bytes(bomb[12:29])))  # a valid IHDR checksum
    wide = bytearray(good)
    wide[width_height_at:width_height_at + 8] = struct.pack(">II", 5_000, 16)
    wide[29:33] = struct.pack(">I", zlib.crc32(bytes(wide[12:29])))
    dot, sliver = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(dot, format="PNG")
    Image.new("RGB", (200, 31)).save(sliver, format="PNG")
    gif, webp, ico = io.BytesIO(), io.BytesIO(), io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    Image.new("RGB", (32, 32)).save(ico, format="ICO")
    try:
        Image.new("RGB", (32, 32)).save(webp, format="WEBP")
    except (OSError, KeyError):
        webp.write(b"RIFF\x00\x00\x00\x00WEBPVP8 ")
    return {
        "empty": (b"", 400), "text": (b"hello, this is not an image", 400), "json": (b'{"image": 1}', 400),
        "html": (b"<html><body>no</body></html>", 400), "zeros": (bytes(1024), 400),
        "random bytes": (np.random.default_rng(0).bytes(4096), 400), "truncated PNG": (good[:len(good) // 2], 400),
        "PNG header only": (good[:8], 400), "PNG without IDAT": (good[:33], 400),
        "corrupt PNG data": (good[:60] + bytes(len(good) - 60), 400),
        "PNG declaring 30,000 x 30,000": (bytes(bomb), 413), "PNG 5,000 px wide": (bytes(wide), 413),
        "GIF": (gif.getvalue(), 400), "ICO": (ico.getvalue(), 400), "WEBP": (webp.getvalue(), 400),
        "truncated JPEG": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(40), 400), "BMP header only": (b"BM" + bytes(12), 400),
        "TIFF header only": (b"II*\x00\x08\x00\x00\x00", 400), "gzip": (zlib.compress(good), 400),
        "too many bytes": (bytes(5000), 413), "1 x 1 PNG": (dot.getvalue(), 400),
        "200 x 31 PNG": (sliver.getvalue(), 400),
    }


def test_bad_input_is_refused_by_name_and_the_service_goes_on(bank_file):
    good = _png(np.full((48, 48, 3), 128, np.uint8))
    with Running(Service(bank_file, max_bytes=4096)) as running:
        for name, (body, expected) in _bad_inputs(good).items():
            if len(body) > 4096 and expected != 413:
                continue  # (the size rule would answer first)
            status, headers, answer = running.call("POST", "/predict", body)
            assert status == expected, (name, status, answer)
            assert headers["content-type"] == "application/json" and json.loads(answer)["error"], name
        for method, path in (("GET", "/predict"), ("PUT", "/predict"), ("DELETE", "/templates"), ("POST", "/healthz")):
            status, _, answer = running.call(method, path)
            assert status == 405 and "error" in json.loads(answer), (method, path)
        status, _, answer = running.call("GET", "/nothing-here")
        assert status == 404 and "error" in json.loads(answer)
        status, _, _ = running.call("POST", "/predict", good)
        assert status == 200  # still serving


def test_a_16_bit_tiff_is_read_as_predict_reads_it(bank_file, tmp_path):
    values = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = tmp_path / "wide.tif"
    Image.fromarray(values).save(path)
    offline = hetmm.HETMM.load(bank_file).predict([path]).pred_score[0]
    with Running(Service(bank_file)) as running:
        status, _, body = running.call("POST", "/predict", path.read_bytes())
    assert status == 200 and json.loads(body)["score"] == pytest.approx(float(offline), rel=1e-4, abs=1e-5)


def test_the_token_rules(bank_file, tmp_path, data):
    image = sorted((data / "train" / "good").glob("*.png"))[0].read_bytes()
    with Running(Service(_copy(bank_file, tmp_path))) as running:
        status, _, body = running.call("POST", "/templates", image, {"Authorization": "Bearer anything"})
        assert status == 403 and "--token-file" in json.loads(body)["error"]
    with Running(Service(_copy(bank_file, tmp_path), token="s3cret")) as running:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Bearer "}):
            status, _, body = running.call("POST", "/templates", image, headers)
            assert status == 401 and json.loads(body)["error"], headers
        status, _, body = running.call("POST", "/templates", b"not an image", {"Authorization": "Bearer s3cret"})
        assert status == 400
        dot = io.BytesIO()
        Image.new("RGB", (1, 1)).save(dot, format="PNG")
        status, _, body = running.call("POST", "/templates", dot.getvalue(), {"Authorization": "Bearer s3cret"})
        assert status == 400 and "1 x 1 pixels" in json.loads(body)["error"]
        status, _, body = running.call("GET", "/healthz")
        assert json.loads(body)["templates"] == 6  # nothing was added


def test_hot_update_under_load_is_old_or_new_never_a_mix_and_survives_a_restart(bank_file, data, tmp_path):
    path = _copy(bank_file, tmp_path)
    queries = sorted((data / "test").rglob("*.png"))
    new_template = sorted((data / "train" / "good").glob("*.png"))[0]
    old = hetmm.HETMM.load(path).predict(queries).pred_score
    updated = hetmm.HETMM.load(path)
    updated.add_templates([torch.flip(hetmm.data.read_image(new_template, SIZE), dims=[2])])
    new = updated.predict(queries).pred_score
    flipped = io.BytesIO()
    Image.fromarray((hetmm.data.read_image(new_template, SIZE).flip(2).permute(1, 2, 0).numpy() * 255).round()
                    .astype(np.uint8)).save(flipped, format="PNG")
    with Running(Service(path, token="t0ken", max_wait_ms=2)) as running:
        def update():
            time.sleep(1.0)
            answer = running.call("POST", "/templates", flipped.getvalue(), {"Authorization": "Bearer t0ken"})
            time.sleep(1.0)
            return answer

        answers, (status, _, body) = under_load(running, "/predict", queries, 8, update)
        assert status == 200 and json.loads(body) == {"bank": "brick", "templates": 7}
    assert answers and all(status == 200 for _, status, _ in answers)
    seen = set()
    for index, _, verdict in answers:
        match_old = verdict["score"] == pytest.approx(float(old[index]), rel=1e-4, abs=1e-5)
        match_new = verdict["score"] == pytest.approx(float(new[index]), rel=1e-4, abs=1e-5)
        assert match_old or match_new, (index, verdict["score"], float(old[index]), float(new[index]))
        seen.add("new" if match_new and not match_old else "old" if match_old and not match_new else "either")
    assert "new" in seen, "no answer came from the updated bank"
    restarted = Service(path)  # the update was saved: a restart keeps it
    assert len(restarted.detector.bank) == 7


def test_the_live_page_shows_the_latest_verdicts(bank_file, data):
    import re
    import subprocess

    from test_report import BROWSER, needs_browser  # the report pages' browser rules: CI requires chromium

    if needs_browser.args[0]:
        pytest.skip(needs_browser.kwargs["reason"])
    assert BROWSER is not None, "HETMM_REQUIRE_BROWSER is set but chromium is not installed"
    files = sorted((data / "test").rglob("*.png"))[:3]
    with Running(Service(bank_file)) as running:
        explained = 0
        for path in files:
            status, _, body = running.call("POST", "/predict?explain=1", path.read_bytes())
            assert status == 200
            explained += sum("nearest" in region for region in json.loads(body)["regions"])
        run = subprocess.run([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                              "--enable-logging=stderr", "--v=0", "--dump-dom", f"http://127.0.0.1:{running.port}/"],
                             capture_output=True, text=True, timeout=120)
    cards = re.findall(r'<div class="card( bad)?">', run.stdout)
    overlays = re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', run.stdout)
    assert len(cards) == 3 and len(overlays) == 3, run.stdout[-1500:]
    assert "6 templates" in run.stdout and "3 images scored" in run.stdout
    assert explained and len(re.findall(r"<div class=\"why\">region at [^<]*nearest normal template", run.stdout)) == explained
    assert not [line for line in run.stderr.splitlines() if ":CONSOLE" in line], run.stderr[-1500:]


def test_predict_explains_a_flagged_image_on_request(bank_file, data):
    defect = sorted((data / "test").rglob("*.png"))[0].read_bytes()
    expected = hetmm.HETMM.load(bank_file).predict([sorted((data / "test").rglob("*.png"))[0]], explain=True)
    with Running(Service(bank_file)) as running:
        status, _, body = running.call("POST", "/predict?explain=1", defect)
        verdict = json.loads(body)
        assert status == 200 and verdict["label"] and verdict["regions"]
        for region, truth in zip(verdict["regions"], expected.regions[0]):
            near = region["nearest"]
            assert near["template"] == truth["nearest"]["template"] and near["box"] == truth["nearest"]["box"]
            assert Path(near["source"]).parent == data / "train" / "good"
        plain = json.loads(running.call("POST", "/predict", defect)[2])
        assert plain["score"] == verdict["score"] and all("nearest" not in r for r in plain["regions"])
        status, _, body = running.call("POST", "/predict?explain=yes", defect)
        assert status == 400 and "explain must be 0 or 1" in json.loads(body)["error"]


def test_the_command_line_refuses_bad_settings_by_name(bank_file, tmp_path, capsys):
    from hetmm.cli import main

    empty = tmp_path / "token.txt"
    empty.write_text("\n")
    assert main(["serve", "--bank", str(bank_file), "--token-file", str(empty)]) == 2
    assert "--token-file" in capsys.readouterr().err
    assert main(["serve", "--bank", str(bank_file), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert main(["serve", "--bank", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_a_hot_update_runs_on_a_thread_that_ends_with_it():
    """Its result or its error reaches the awaiting request, and no update thread outlives the update (its
    OpenMP team would slow the scoring thread's for as long as it lived: docs/serve.md)."""
    import asyncio

    from hetmm.serve import _in_own_thread

    seen = {}

    def work(value):
        seen["thread"] = threading.current_thread()
        if value < 0:
            raise ValueError("negative")
        return value * 2

    async def main():
        assert await _in_own_thread(work, 21) == 42
        with pytest.raises(ValueError, match="negative"):
            await _in_own_thread(work, -1)

    asyncio.run(main())
    seen["thread"].join(timeout=5)
    assert seen["thread"] is not threading.main_thread() and not seen["thread"].is_alive()
    assert not [t for t in threading.enumerate() if t.name == "hetmm-update"]
