"""Decoding ahead of the model: bounded, ordered, the same results with or without worker threads."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hetmm
from hetmm.data import ImageError, prefetched


def test_prefetched_keeps_order_and_bounds_the_lookahead():
    started, lock = [], threading.Lock()

    def load(chunk):
        with lock:
            started.append(chunk)
        time.sleep(0.002 * (chunk % 3))  # out-of-order completion
        return chunk * 10

    consumed = []
    for value in prefetched(range(20), load, workers=3, prefetch=2):
        with lock:
            # never more than the consumed chunks + the one being handed over + prefetch ahead
            assert len(started) <= len(consumed) + 1 + 2 + 1
        consumed.append(value)
    assert consumed == [c * 10 for c in range(20)]


def test_prefetched_without_workers_runs_in_the_caller():
    threads = set()
    list(prefetched(range(3), lambda c: threads.add(threading.current_thread().name), workers=0))
    assert threads == {threading.current_thread().name}


def test_a_failed_load_is_raised_in_its_turn():
    def load(chunk):
        if chunk == 2:
            raise ImageError("cannot read image bad.png: broken")
        return chunk

    got = []
    with pytest.raises(ImageError, match="bad.png"):
        for value in prefetched(range(6), load, workers=2, prefetch=2):
            got.append(value)
    assert got == [0, 1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(7):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return sorted(root.glob("*.png"))


def test_predict_from_files_is_the_same_with_decoding_threads(folder):
    options = dict(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32", batch_size=3)
    serial = hetmm.HETMM(**options, workers=0).fit(folder[:4])
    threaded = hetmm.HETMM(**options, workers=2, prefetch=1).fit(folder[:4])
    assert all(torch.equal(serial.bank.features[k], threaded.bank.features[k]) for k in serial.bank.features)
    a, b = serial.predict(folder), threaded.predict(folder)
    assert torch.equal(a.pred_score, b.pred_score) and torch.equal(a.anomaly_map, b.anomaly_map)


def test_measured_decoding_threads_are_chosen_once_per_kind_of_file(folder, monkeypatch):
    import hetmm.detector as detector_module

    options = dict(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32", batch_size=3)
    serial = hetmm.HETMM(**options, workers=0).fit(folder[:4])
    measured = hetmm.HETMM(**options, device="cpu").fit(folder[:4])
    assert measured.workers is None  # the CPU default: measured
    expected = serial.predict(folder)
    calls = []
    original = detector_module.measured_prefetched
    monkeypatch.setattr(detector_module, "measured_prefetched", lambda *a, **k: calls.append(1) or original(*a, **k))
    for _ in range(2):
        got = measured.predict(folder)
        assert torch.equal(got.pred_score, expected.pred_score) and torch.equal(got.anomaly_map, expected.anomaly_map)
    assert len(calls) == 1  # measured once, remembered after
    assert sorted(kind[0] for kind in measured._decode_choices) == ["features", "predict"]  # fit had its own
    assert set(measured.decoding) == {"decode_ms", "compute_ms", "workers"} and measured.decoding["decode_ms"] > 0
    measured.batch_size = 2  # another batch size: measured again
    measured.predict(folder)
    assert len(calls) == 2


@pytest.mark.parametrize("kwargs", [dict(workers=-1), dict(prefetch=0)])
def test_bad_pipeline_options(kwargs):
    with pytest.raises(ValueError, match="workers must be >= 0 and prefetch >= 1"):
        hetmm.HETMM(backbone="resnet18", weights=None, **kwargs)


@pytest.mark.parametrize("cores,device,expected", [(2, "cpu", None), (8, "cpu", None), (16, "cuda", 8),
                                                   (2, "cuda", 1), (1, "cuda", 1)])
def test_default_decoding_threads(monkeypatch, cores, device, expected):
    import os

    from hetmm.detector import default_workers

    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert default_workers(torch.device(device)) == expected


@pytest.mark.parametrize("decode_ms,compute_ms,cores,expected", [
    (1.0, 8.0, 2, 0),    # 256 px PNGs: serial decoding reaches 94% of the bound
    (25.0, 8.0, 2, 2),   # 1024 px PNGs: 62%; two threads to decode at the bound's rate (20.5 ms an image)
    (6.0, 8.0, 2, 1),    # 14 vs 11 ms: 79%, one thread decodes an image in 6 of the bound's 11 ms
    (40.0, 2.0, 64, 16),  # many cores: the bound is 2.6 ms an image, 40 ms decodes need 16 threads, not 64
    (0.0, 8.0, 2, 0), (5.0, 0.0, 2, 2), (5.0, 0.0, 1, 0),
])
def test_decoding_threads_follow_the_measured_costs(decode_ms, compute_ms, cores, expected):
    from hetmm.data import choose_workers

    assert choose_workers(decode_ms / 1e3, compute_ms / 1e3, cores) == expected


def test_measured_prefetch_times_the_first_chunks_then_decodes_ahead(tmp_path):
    import time

    from hetmm.data import PROBE_CHUNKS, measured_prefetched

    chunks = [[i] * 4 for i in range(6)]
    loads, choices = [], []

    def load(chunk):
        loads.append(chunk[0])
        time.sleep(0.02)  # 5 ms an item: slow decoding
        return chunk[0]

    seen = []
    for value in measured_prefetched(chunks, load, prefetch=2, cores=2, report=lambda *a: choices.append(a)):
        seen.append(value)
        time.sleep(0.004)  # 1 ms an item of "model"
    assert seen == list(range(6))  # every chunk, in order
    (decode, compute, workers), = choices
    assert decode >= 0.005 and 0.001 <= compute < 0.005 and workers == 2
    assert loads[:PROBE_CHUNKS] == list(range(PROBE_CHUNKS))
    assert list(measured_prefetched([], load)) == [] and list(measured_prefetched(chunks[:1], load)) == [0]


def test_large_jpegs_are_decoded_at_a_reduced_scale_close_to_the_full_decode(tmp_path, monkeypatch):
    import hetmm.data as data
    from hetmm.data import read_image

    rng = np.random.default_rng(3)
    smooth = np.kron(rng.random((16, 16, 3)), np.ones((32, 32, 1)))  # 512 px, structure at 32 px
    path = tmp_path / "big.jpg"
    Image.fromarray((smooth * 255).astype(np.uint8)).save(path, quality=95)
    from PIL import JpegImagePlugin

    opened = []
    original = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, *a: opened.append(a) or original(self, *a))
    drafted = read_image(path, 128)
    assert opened and drafted.shape == (3, 128, 128)
    monkeypatch.setattr(data, "JPEG_DRAFT", False)
    full = read_image(path, 128)
    assert (drafted - full).abs().mean() < 0.02
    opened.clear()
    monkeypatch.setattr(data, "JPEG_DRAFT", True)
    read_image(path, 300)  # less than twice the target: decoded in full
    assert not opened


def test_a_stopped_predict_resumes_to_the_same_results(tmp_path, folder, monkeypatch):
    from hetmm.cli import main

    bank = hetmm.HETMM(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32",
                       workers=0).fit(folder[:3]).save(tmp_path / "bank.safetensors")
    common = ["--bank", str(bank), *map(str, folder), "--batch-size", "1", "--precision", "fp32", "--threshold", "1.5"]
    assert main(["predict", *common, "--out", str(tmp_path / "whole")]) == 0

    calls = []
    original = hetmm.HETMM.predict

    def stopped_after_two_chunks(self, images, **options):
        calls.append(len(images))
        if len(calls) > 1:
            raise KeyboardInterrupt  # the run is killed while its second chunk is scored
        return original(self, images, **options)

    monkeypatch.setattr(hetmm.HETMM, "predict", stopped_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        main(["predict", *common, "--out", str(tmp_path / "part")])
    kept = (tmp_path / "part" / "scores.jsonl").read_text().splitlines()
    assert len(kept) == 4  # the first chunk (4 batches of 1) is on disk
    monkeypatch.setattr(hetmm.HETMM, "predict", lambda self, images, **options: calls.append(images)
                        or original(self, images, **options))
    calls.clear()
    assert main(["predict", *common, "--out", str(tmp_path / "part"), "--resume"]) == 0
    assert [len(c) for c in calls] == [3]  # only the images the stopped run had not finished
    whole = json.loads((tmp_path / "whole" / "scores.json").read_text())
    resumed = json.loads((tmp_path / "part" / "scores.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "heatmap"} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(whole)
    for a, b in zip(whole, resumed):
        assert Path(a["heatmap"]).read_bytes() == Path(b["heatmap"]).read_bytes()


# A helper thread that runs one parallel torch operation keeps an OpenMP team (its worker threads) for as long
# as it lives, and with more team threads than cores libgomp makes every team sleep between parallel regions
# (hetmm.serve). The service's request threads, which decode the uploads, must therefore start none.
def _team_threads_left_by(work) -> int:
    """Threads that running ``work`` in a helper thread adds to the process while the helper lives (counted
    from inside it, once the count has settled: a team of an earlier helper ends a little after it)."""
    count = lambda: len(os.listdir("/proc/self/task"))  # noqa: E731
    added = []

    def run():
        settled = [count()]
        while len(settled) < 3 or len(set(settled[-3:])) > 1:
            time.sleep(0.02)
            settled.append(count())
        work()
        added.append(count() - settled[-1])

    helper = threading.Thread(target=run)
    helper.start()
    helper.join()
    return added[0]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2
                    or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="counts OpenMP threads through Linux's /proc with several torch threads")
@pytest.mark.parametrize("side", [256, 1024])
def test_decoding_an_upload_starts_no_openmp_team(tmp_path, side):
    from hetmm.serve import decode_upload

    assert _team_threads_left_by(lambda: torch.ones(1 << 22).mul_(2)) >= 1  # what the check detects
    rng = np.random.default_rng(side)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    grey = tmp_path / "grey16.png"
    Image.fromarray(rng.integers(0, 65536, (side, side), dtype=np.uint16)).save(grey)
    for path in (*paths, grey):
        assert _team_threads_left_by(lambda: decode_upload(path.read_bytes(), 256)) == 0
