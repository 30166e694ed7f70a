"""``hetmm serve --banks DIR``: banks served by name, the folder followed (added, replaced, removed, corrupt files),
banks dropped when idle or over the byte budget, and two replica processes sharing the folder and each other's
hot updates. Traffic goes only to loopback and every client call has a timeout."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")

import hetmm  # noqa: E402
from hetmm.demo import build_dataset  # noqa: E402
from hetmm.serve import Service  # noqa: E402
from test_serve import SIZE, Running, _free_port, call, under_load  # noqa: E402

NOTICE_S = 2.0  # a change in the folder is served within this (the bound)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_good=2, n_defective=3)


@pytest.fixture(scope="module")
def banks(demo, tmp_path_factory):
    """``{name: bank file}``: brick and grass (6 templates each) and brick with one more template (7)."""
    folder = tmp_path_factory.mktemp("banks")
    made = {}
    for name in ("brick", "grass"):
        det = hetmm.HETMM("tf_efficientnet_lite0", image_size=SIZE, out_size=SIZE)
        det.fit(sorted((demo / name / "train" / "good").glob("*.png")))
        made[name] = det.save(folder / f"{name}.safetensors")
    det.add_templates([_flipped(demo, "grass")])
    made["grass7"] = det.save(folder / "grass7.safetensors")
    return made


def _flipped(demo: Path, name: str) -> torch.Tensor:
    return hetmm.data.read_image(sorted((demo / name / "train" / "good").glob("*.png"))[0], SIZE).flip(2)


def _put(source: Path, target: Path) -> None:
    """Replace ``target`` whole, as ``hetmm fit --out`` and a careful deploy do."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def _wait_for(condition, seconds: float = NOTICE_S) -> float:
    """Seconds until ``condition()`` held; fails after ``seconds``."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def _listed(running) -> dict:
    status, _, body = running.call("GET", "/banks")
    assert status == 200
    return {b["name"]: b for b in json.loads(body)["banks"]}


def _score(running, bank: str, image: bytes) -> float:
    status, _, body = running.call("POST", f"/banks/{bank}/predict", image)
    assert status == 200, body
    return json.loads(body)["score"]


def test_banks_are_served_by_name(demo, banks, tmp_path):
    for name in ("brick", "grass"):
        shutil.copyfile(banks[name], tmp_path / f"{name}.safetensors")
    (tmp_path / "notes.txt").write_text("not a bank")
    query = sorted((demo / "grass" / "test").rglob("*.png"))[-1]
    expected = float(hetmm.HETMM.load(banks["grass"]).predict([query]).pred_score[0])
    with Running(Service(banks=tmp_path, watch_s=0.1)) as running:
        listed = _listed(running)
        assert sorted(listed) == ["brick", "grass"] and listed["grass"]["templates"] == 6
        assert listed["brick"]["image_threshold"] is not None and listed["brick"]["pixel_threshold"] is not None
        status, _, body = running.call("POST", "/banks/grass/predict", query.read_bytes())
        verdict = json.loads(body)
        assert status == 200 and verdict["bank"] == "grass"
        assert verdict["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        status, _, body = running.call("POST", "/banks/tiles/predict", query.read_bytes())
        assert status == 404 and "'tiles'" in json.loads(body)["error"] and "brick, grass" in json.loads(body)["error"]
        status, _, body = running.call("POST", "/predict", query.read_bytes())  # which bank? say so
        assert status == 400 and "brick, grass" in json.loads(body)["error"]
        status, _, body = running.call("GET", "/healthz")
        assert json.loads(body) == {"ok": True, "templates": 12, "banks": {"brick": 6, "grass": 6}}
        text = running.call("GET", "/metrics")[2].decode()
        assert 'hetmm_requests_total{bank="grass",endpoint="predict",status="200"} 1.0' in text
        assert 'hetmm_templates{bank="brick"} 6.0' in text and 'hetmm_predict_seconds_count{bank="grass"} 1.0' in text
        assert 'bank="tiles"' not in text  # a client's name never becomes a series


def test_the_folder_is_followed(demo, banks, tmp_path, caplog):
    shutil.copyfile(banks["brick"], tmp_path / "brick.safetensors")
    query = sorted((demo / "grass" / "test").rglob("*.png"))[-1].read_bytes()
    caplog.set_level(logging.INFO, logger="hetmm.serve")
    with Running(Service(banks=tmp_path, watch_s=0.1)) as running:
        assert sorted(_listed(running)) == ["brick"]
        _put(banks["grass"], tmp_path / "grass.safetensors")  # a new bank
        _wait_for(lambda: "grass" in _listed(running))
        before = _score(running, "grass", query)
        _put(banks["grass7"], tmp_path / "grass.safetensors")  # refitted elsewhere, deployed
        _wait_for(lambda: _listed(running)["grass"]["templates"] == 7)
        assert _score(running, "grass", query) != before

        caplog.clear()
        (tmp_path / "broken.safetensors").write_bytes(os.urandom(5000))  # never good: not served
        (tmp_path / "grass.safetensors").write_bytes(banks["grass"].read_bytes()[:-100])  # truncated in place
        _wait_for(lambda: sum("fails its checks" in r.getMessage() for r in caplog.records) >= 2)
        listed = _listed(running)
        assert sorted(listed) == ["brick", "grass"] and listed["grass"]["templates"] == 7  # the last good one
        assert _score(running, "grass", query) != before
        rejected = [r.getMessage() for r in caplog.records if "fails its checks" in r.getMessage()]
        assert any("broken" in m and "not served" in m for m in rejected)
        assert any(m.startswith("bank grass") and "last good bank stays served" in m for m in rejected)
        time.sleep(0.5)  # a file that failed is not read again until it changes
        assert sum("fails its checks" in r.getMessage() for r in caplog.records) == 2

        _put(banks["grass"], tmp_path / "grass.safetensors")  # mended
        _wait_for(lambda: _listed(running)["grass"]["templates"] == 6)
        assert _score(running, "grass", query) == pytest.approx(before, rel=1e-4, abs=1e-5)
        (tmp_path / "grass.safetensors").unlink()
        _wait_for(lambda: "grass" not in _listed(running))
        assert running.call("POST", "/banks/grass/predict", query)[0] == 404
        assert running.call("POST", "/predict", query)[0] == 200  # one bank again: /predict is that one


def test_requests_in_flight_never_fail_while_their_bank_is_replaced(demo, banks, tmp_path):
    path = tmp_path / "grass.safetensors"
    shutil.copyfile(banks["grass"], path)
    queries = sorted((demo / "grass" / "test").rglob("*.png"))
    expected = {name: hetmm.HETMM.load(banks[name]).predict(queries).pred_score for name in ("grass", "grass7")}
    with Running(Service(banks=tmp_path, watch_s=0.05, max_wait_ms=2)) as running:
        def replace():
            for version in ("grass7", "grass", "grass7", "grass", "grass7"):
                _put(banks[version], path)
                time.sleep(0.4)

        answers, _ = under_load(running, "/banks/grass/predict", queries, 4, replace)
    assert answers and all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:2]
    for index, _, verdict in answers:
        assert any(verdict["score"] == pytest.approx(float(scores[index]), rel=1e-4, abs=1e-5)
                   for scores in expected.values()), (index, verdict["score"])


def test_banks_are_dropped_when_idle_and_within_the_byte_budget(demo, banks, tmp_path):
    for name in ("brick", "grass"):
        shutil.copyfile(banks[name], tmp_path / f"{name}.safetensors")
    query = sorted((demo / "grass" / "test").rglob("*.png"))[0].read_bytes()
    one = Service(banks=tmp_path)
    sizes = {name: hetmm.bank_folder.resident_bytes(b.detector) for name, b in one.banks.items()}
    budget = max(sizes.values()) * 3 // 2  # room for one bank, not two
    with Running(Service(banks=tmp_path, max_bank_bytes=budget, watch_s=0.1)) as running:
        scores = {name: _score(running, name, query) for name in ("brick", "grass", "brick")}
        listed = _listed(running)
        assert listed["brick"]["loaded"] and not listed["grass"]["loaded"]
        # at start both were read (brick dropped for grass), then each request read its bank again
        assert _score(running, "grass", query) == scores["grass"]  # read again, the same bank
        text = running.call("GET", "/metrics")[2].decode()
        assert 'hetmm_bank_loads_total{bank="grass"} 3.0' in text and 'hetmm_bank_bytes{bank="brick"} 0.0' in text
    with Running(Service(banks=tmp_path, idle_s=0.3, watch_s=0.1)) as running:
        assert _listed(running)["brick"]["loaded"]
        _wait_for(lambda: not any(b["loaded"] for b in _listed(running).values()))
        assert _score(running, "brick", query) == scores["brick"]
        assert _listed(running)["brick"]["loaded"] and _listed(running)["brick"]["templates"] == 6


# ---------------------------------------------------------------------------------------------- two replicas
class Replica:
    """``hetmm serve --banks DIR`` in a process of its own on 127.0.0.1, its stderr in a file."""

    def __init__(self, folder: Path, token_file: Path, log: Path):
        self.port, self.log = _free_port(), log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hetmm", "serve", "--banks", str(folder), "--port", str(self.port),
             "--token-file", str(token_file), "--max-wait-ms", "2"],
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-2000:]
        try:
            return self.call("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        return call(self.port, method, path, body, headers)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _png(image: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_two_replicas_share_the_folder_and_each_others_updates(demo, banks, tmp_path):
    folder = tmp_path / "banks"
    folder.mkdir()
    for name in ("brick", "grass"):
        shutil.copyfile(banks[name], folder / f"{name}.safetensors")
    token = tmp_path / "token.txt"
    token.write_text("t0ken\n")
    auth = {"Authorization": "Bearer t0ken"}
    # defective images, each scored high until it is a template itself; 128 px PNGs as the service reads them
    x, y, z = (_png(hetmm.data.read_image(p, SIZE)) for p in sorted((demo / "grass" / "test").rglob("*.png"))[-3:])
    replicas = [Replica(folder, token, tmp_path / f"replica{i}.log") for i in range(2)]
    try:
        _wait_for(lambda: all(r.ready() for r in replicas), seconds=180)
        first, second = replicas
        scores = {name: [_score(r, "grass", image) for r in replicas] for name, image in (("x", x), ("y", y), ("z", z))}

        # a template posted to one replica makes that image score lower on the other within 2 s
        status, _, body = first.call("POST", "/banks/grass/templates", x, auth)
        assert status == 200 and json.loads(body) == {"bank": "grass", "templates": 7}
        took = _wait_for(lambda: _score(second, "grass", x) < 0.5 * scores["x"][1])
        print(f"\nan update on one replica served by the other after {took:.2f} s")

        # two templates posted at once, one to each replica: both stay, on both replicas
        with ThreadPoolExecutor(2) as pool:
            posted = [pool.submit(r.call, "POST", "/banks/grass/templates", image, auth)
                      for r, image in ((first, y), (second, z))]
            answers = [p.result(timeout=120) for p in posted]
        assert all(a[0] == 200 for a in answers) and sorted(json.loads(a[2])["templates"] for a in answers) == [8, 9]
        _wait_for(lambda: all(_listed(r)["grass"]["templates"] == 9 for r in replicas))
        for name, image in (("x", x), ("y", y), ("z", z)):
            for index, replica in enumerate(replicas):
                assert _score(replica, "grass", image) < 0.5 * scores[name][index], (name, index)
        assert len(hetmm.HETMM.load(folder / "grass.safetensors").bank) == 9

        # a bank copied into the folder is served by both within 2 s
        _put(banks["grass7"], folder / "tiles.safetensors")
        took = _wait_for(lambda: all("tiles" in _listed(r) for r in replicas))
        print(f"a new bank served by both replicas after {took:.2f} s")

        # a corrupt file is refused with a log line, and nothing else changes
        before = [_listed(r) for r in replicas]
        (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + os.urandom(64))
        _wait_for(lambda: all("corrupt: the file fails its checks" in r.log.read_text() for r in replicas))
        assert [_listed(r) for r in replicas] == before
        assert all(r.call("POST", "/banks/corrupt/predict", x)[0] == 404 for r in replicas)
    finally:
        for replica in replicas:
            replica.stop()
