"""Load check of ``hetmm serve``: concurrent clients on 127.0.0.1 against offline ``HETMM.predict`` at batch 8.

    python benchmarks/serve_load.py                       # the demo's brick, lite0, 8 clients for 20 s
    python benchmarks/serve_load.py --bank BANK --images DIR --clients 8 --seconds 20

The service runs as ``hetmm serve`` in its own process (as on a line); each client thread keeps one HTTP
connection and posts the image files in turn, for a bounded time and only to loopback. Reported: the service's
images/s and its ratio to offline predict at batch 8 on the same images (decoding included in both), and the
p50 / p99 latency each client saw.
"""

from __future__ import annotations

import argparse
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
from hetmm.demo import build_dataset  # noqa: E402


def demo_bank(folder: Path) -> tuple[Path, list]:
    root = build_dataset(folder / "demo")
    det = HETMM("tf_efficientnet_lite0").fit(image_files(root / "brick" / "train" / "good"))
    return det.save(folder / "brick.safetensors"), sorted((root / "brick" / "test").rglob("*.png"))


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


def load(port: int, bodies: list, clients: int, seconds: float) -> dict:
    latencies, errors, stop = [], [], time.monotonic() + seconds

    def client(offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        count = 0
        while time.monotonic() < stop:
            body = bodies[(offset + count) % len(bodies)]
            start = time.perf_counter()
            connection.request("POST", "/predict", body, {"Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            response.read()
            (latencies if response.status == 200 else errors).append(time.perf_counter() - start)
            count += 1
        connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i * 3,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ordered = sorted(latencies)
    return dict(images_per_s=len(latencies) / elapsed, errors=len(errors), requests=len(latencies),
                p50_ms=1000 * statistics.median(ordered), p99_ms=1000 * ordered[int(0.99 * (len(ordered) - 1))])


def run(bank=None, images=None, clients: int = 8, seconds: float = 20.0, max_batch: int = 8,
        max_wait_ms: float = 5.0) -> dict:
    """The load check's figures (see the module's text); ``bank``/``images`` default to the demo's brick."""
    with tempfile.TemporaryDirectory() as folder:
        bank, files = (Path(bank), image_files(images)) if bank else demo_bank(Path(folder))
        offline = offline_rate(bank, files)
        port = _free_port()
        server = subprocess.Popen([sys.executable, "-m", "hetmm", "serve", "--bank", str(bank), "--port", str(port),
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
            bodies = [Path(f).read_bytes() for f in files]
            load(port, bodies, clients, 2.0)  # warm-up: every batch size the service will see
            result = load(port, bodies, clients, seconds)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result.update(offline_images_per_s=offline, ratio=result["images_per_s"] / offline, clients=clients,
                  seconds=seconds)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", default=None, help="a saved bank (default: fit one on the demo's brick)")
    parser.add_argument("--images", default=None, help="a folder of images to post (default: the demo's brick tests)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
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
