"""``hetmm serve`` under load: 8 clients for 20 s on 127.0.0.1 against offline predict at batch 8
(``serve_load.run``; the figures land in the benchmark's ``extra_info``: images/s, ratio, p50, p99), and 8 clients
spread over 3 banks against all on one (``serve_load.run_banks``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip("starlette")

from serve_load import run, run_banks, run_explain  # noqa: E402


def test_serve_under_load(benchmark):
    result = benchmark.pedantic(run, kwargs=dict(clients=8, seconds=20.0), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\nservice {result['images_per_s']:.1f} images/s, {result['ratio']:.2f}x offline batch 8 "
          f"({result['offline_images_per_s']:.1f}); p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
          f"{result['errors']} errors")
    assert result["errors"] == 0 and result["requests"] > 0


def test_serve_many_banks(benchmark):
    """8 clients spread over 3 banks against all 8 on one bank, one service, alternated (issue 45: >= 0.8x)."""
    result = benchmark.pedantic(run_banks, kwargs=dict(banks=3, clients=8, seconds=10.0), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "rounds"})
    print(f"\n8 clients over 3 banks {result['spread_images_per_s']:.1f} images/s, all on one "
          f"{result['one_bank_images_per_s']:.1f}: {result['ratio']:.2f}x")


def test_serve_explained_answers(benchmark):
    """One client, defective images: /predict?explain=1 against /predict, alternated (issue 44: <= 1.2x)."""
    result = benchmark.pedantic(run_explain, kwargs=dict(seconds=5.0, rounds=3), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "rounds"})
    print(f"\n/predict {result['plain_ms']:.1f} ms, ?explain=1 {result['explain_ms']:.1f} ms: {result['ratio']:.2f}x")
