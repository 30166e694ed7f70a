"""Load check of ``hetmm serve``: concurrent clients on 127.0.0.1 against offline ``HETMM.predict`` at batch 8.

    python benchmarks/serve_load.py                       # the demo's brick, lite0, 8 clients for 20 s
    python benchmarks/serve_load.py --bank BANK --images DIR --clients 8 --seconds 20
    python benchmarks/serve_load.py --banks 3             # one service, 8 clients spread over the demo's 3 banks
                                                          # against all 8 on one of them, alternated
    python benchmarks/serve_load.py --explain             # one client, defective images, ?explain=1 against none

The service runs as ``hetmm serve`` in its own process (as on a line); each client thread keeps one HTTP
connection and posts the image files in turn, for a bounded time and only to loopback. Reported: the service's
images/s and its ratio to offline predict at batch 8 on the same images (decoding included in both), and the
p50 / p99 latency each client saw.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hetmm import HETMM  # noqa: E402
from hetmm.data import image_files  # noqa: E402
from hetmm.demo import TEXTURES, build_dataset  # noqa: E402


def demo_bank(folder: Path, texture: str = "brick") -> tuple[Path, list]:
    root = folder / "demo"
    if not root.is_dir():
        build_dataset(root)
    det = HETMM("tf_efficientnet_lite0").fit(image_files(root / texture / "train" / "good"))
    return det.save(folder / "banks" / f"{texture}.safetensors"), sorted((root / texture / "test").rglob("*.png"))


def offline_rate(bank: Path, files: list, seconds: float = 10.0) -> float:
    det = HETMM.load(bank, batch_size=8)
    det.predict(files[:8])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(files) - 7, 8):
            det.predict(files[i:i + 8])
            done += 8
    return done / (time.perf_counter() - start)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load(port: int, targets: list, seconds: float) -> dict:
    """Every ``(path, bodies)`` of ``targets`` is one client posting its bodies in turn to its path."""
    latencies, errors, stop = [], [], time.monotonic() + seconds

    def client(offset: int, path: str, bodies: list) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        count = 0
        while time.monotonic() < stop:
            body = bodies[(offset + count) % len(bodies)]
            start = time.perf_counter()
            connection.request("POST", path, body, {"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            (latencies if response.status == 200 else errors).append(time.perf_counter() - start)
            count += 1
        connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i * 3, path, bodies)) for i, (path, bodies) in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return dict(images_per_s=len(latencies) / elapsed, errors=len(errors), requests=len(latencies),
                p50_ms=1000 * statistics.median(ordered), p99_ms=1000 * ordered[int(0.99 * (len(ordered) - 1))])


@contextlib.contextmanager
def serving(source: list, max_batch: int = 8, max_wait_ms: float = 5.0):
    """The port of ``hetmm serve`` started with ``source`` (``["--bank", FILE]`` or ``["--banks", DIR]``)."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "hetmm", "serve", *source, "--port", str(port),
                               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)])
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the service did not start") from None
                time.sleep(0.2)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(bank=None, images=None, clients: int = 8, seconds: float = 20.0, max_batch: int = 8,
        max_wait_ms: float = 5.0) -> dict:
    """The load check's figures (see the module's text); ``bank``/``images`` default to the demo's brick."""
    with tempfile.TemporaryDirectory() as folder:
        bank, files = (Path(bank), image_files(images)) if bank else demo_bank(Path(folder))
        offline = offline_rate(bank, files)
        targets = [("/predict", [Path(f).read_bytes() for f in files])] * clients
        with serving(["--bank", str(bank)], max_batch, max_wait_ms) as port:
            load(port, targets, 2.0)  # warm-up: every batch size the service will see
            result = load(port, targets, seconds)
    result.update(offline_images_per_s=offline, ratio=result["images_per_s"] / offline, clients=clients,
                  seconds=seconds)
    return result


def run_banks(banks: int = 3, clients: int = 8, seconds: float = 10.0, rounds: int = 2, max_batch: int = 8,
              max_wait_ms: float = 5.0) -> dict:
    """One ``hetmm serve --banks`` over the demo's textures: ``clients`` spread over ``banks`` of them (client i
    on bank i mod banks) against all on the first, alternated for ``rounds``; each bank is posted its own test
    images. The ratio is the spread rate over the one-bank rate, medians over the rounds."""
    names = TEXTURES[:banks]
    with tempfile.TemporaryDirectory() as folder:
        bodies = {}
        for name in names:
            _, files = demo_bank(Path(folder), name)
            bodies[name] = [f.read_bytes() for f in files]
        one = [(f"/banks/{names[0]}/predict", bodies[names[0]])] * clients
        spread = [(f"/banks/{names[i % banks]}/predict", bodies[names[i % banks]]) for i in range(clients)]
        rates = {"one": [], "spread": []}
        with serving(["--banks", str(Path(folder) / "banks")], max_batch, max_wait_ms) as port:
            load(port, spread, 2.0)  # warm-up: every bank read, every batch size seen
            for _ in range(rounds):
                for kind, targets in (("one", one), ("spread", spread)):
                    result = load(port, targets, seconds)
                    if result["errors"]:
                        raise RuntimeError(f"{result['errors']} requests failed")
                    rates[kind].append(result["images_per_s"])
    one_rate, spread_rate = statistics.median(rates["one"]), statistics.median(rates["spread"])
    return dict(banks=banks, clients=clients, one_bank_images_per_s=one_rate, spread_images_per_s=spread_rate,
                ratio=spread_rate / one_rate, rounds=rates)


def run_explain(seconds: float = 5.0, rounds: int = 3) -> dict:
    """One client posting the demo brick's defective images to ``/predict`` and to ``/predict?explain=1`` in
    turn (``seconds`` each, ``rounds`` times, one service): the mean answer time of each and their ratio."""
    with tempfile.TemporaryDirectory() as folder:
        bank, files = demo_bank(Path(folder))
        defective = [f.read_bytes() for f in files if f.parent.name != "good"]
        times = {"plain": [], "explain": []}
        with serving(["--bank", str(bank)]) as port:
            load(port, [("/predict?explain=1", defective)], 2.0)  # warm-up
            for _ in range(rounds):
                for kind, path in (("plain", "/predict"), ("explain", "/predict?explain=1")):
                    result = load(port, [(path, defective)], seconds)
                    if result["errors"]:
                        raise RuntimeError(f"{result['errors']} requests failed")
                    times[kind].append(1000 / result["images_per_s"])
    plain, explained = statistics.median(times["plain"]), statistics.median(times["explain"])
    return dict(plain_ms=plain, explain_ms=explained, ratio=explained / plain, rounds=times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", default=None, help="a saved bank (default: fit one on the demo's brick)")
    parser.add_argument("--images", default=None, help="a folder of images to post (default: the demo's brick tests)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--banks", type=int, default=None,
                        help="serve this many of the demo's banks: clients spread over them against all on one")
    parser.add_argument("--explain", action="store_true",
                        help="one client: defective images with and without ?explain=1, alternated")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.explain:
        result = run_explain()
        print(f"/predict {result['plain_ms']:.1f} ms, /predict?explain=1 {result['explain_ms']:.1f} ms: "
              f"{result['ratio']:.2f}x ({result['rounds']})")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    if args.banks is not None:
        result = run_banks(args.banks, args.clients, args.seconds, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms)
        print(f"{args.clients} clients over {args.banks} banks {result['spread_images_per_s']:.1f} images/s, all on "
              f"one {result['one_bank_images_per_s']:.1f}: {result['ratio']:.2f}x ({result['rounds']})")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    result = run(args.bank, args.images, args.clients, args.seconds, args.max_batch, args.max_wait_ms)
    offline = result["offline_images_per_s"]
    print(f"service {result['images_per_s']:.1f} images/s with {args.clients} clients ({result['ratio']:.2f}x offline "
          f"predict at batch 8: {offline:.1f}), p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
          f"{result['errors']} errors of {result['requests'] + result['errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
