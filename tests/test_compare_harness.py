"""The comparison harness's OpenVINO systems: anomalib's models exported as its users deploy them on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("anomalib")
pytest.importorskip("openvino")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from compare_anomalib import AnomalibSystem, OpenVINOSystem, format_rows, pairing  # noqa: E402


@pytest.mark.parametrize("kind,precision", [("patchcore", "f32"), ("padim", "f32"), ("patchcore", "default")])
def test_exported_systems_score_as_the_eager_model(kind, precision, tmp_path):
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    exported = OpenVINOSystem(f"{kind}-ov", kind, precision, coreset=0.5)
    exported.fit(images, batch=3)
    assert exported.export_gap <= OpenVINOSystem.EXPORT_TOLERANCE  # the graph itself, compiled at f32
    assert exported.precision_gap <= (1e-3 if precision == "f32" else 0.15)
    unseen = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for batch in (1, 4):  # a graph per batch size: PatchCore's trace fixes its branch on the embedding count
        scores, anomaly, _ = exported.predict(unseen[:batch])
        want_scores, want_anomaly, _ = AnomalibSystem.predict(exported, unseen[:batch])  # its own eager model
        assert scores.shape == want_scores.shape and anomaly.shape == want_anomaly.shape
        tol = 1e-3 if precision == "f32" else 0.15  # bf16 nearest-neighbour distances: up to ~10% measured
        assert (scores - want_scores).abs().max() <= tol * want_scores.abs().max()
        assert (anomaly - want_anomaly).abs().max() <= tol * want_anomaly.abs().max()
    assert exported.save(tmp_path).stat().st_size > 1e6  # the IR's weights, the backbone included


def test_ratios_are_taken_against_patchcore_openvino_of_the_same_precision():
    assert pairing("hetmm") == pairing("patchcore-0.1-ov") == "default"
    assert pairing("hetmm-fp32") == pairing("patchcore-0.1-ov-f32") == "f32"
    row = dict(image_auroc=1.0, pixel_auroc=1.0, pro=1.0, fit_seconds=1.0, size_mb=1.0)
    rows = {"hetmm": {**row, "images_per_s_b1": 30.0, "images_per_s_b8": 80.0},
            "hetmm-fp32": {**row, "images_per_s_b1": 15.0, "images_per_s_b8": 20.0},
            "patchcore-0.1-ov": {**row, "images_per_s_b1": 20.0, "images_per_s_b8": 40.0},
            "patchcore-0.1-ov-f32": {**row, "images_per_s_b1": 10.0, "images_per_s_b8": 40.0}}
    lines = format_rows("brick", rows).splitlines()
    assert lines[1].split()[-4:-2] == ["1.50", "2.00"]  # hetmm against the bf16 export
    assert lines[2].split()[-4:-2] == ["1.50", "0.50"]  # hetmm-fp32 against the f32 export
