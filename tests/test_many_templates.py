"""benchmarks/many_templates.py: the random-bank yardstick (``--draws``) and its refusal of too few images."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import many_templates  # noqa: E402

from hetmm.demo import build_dataset  # noqa: E402

CATEGORY = "brick"
METRICS = ("image_auroc", "pixel_auroc", "pro")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("many"), n_train=10, n_good=4, n_defective=4)


def _recording_fits(monkeypatch) -> list:
    """Each bank ``draws`` fits, as the sum of its layer-3 features per template (which images it holds)."""
    banks, fit_features = [], many_templates.HETMM.fit_features

    def recording(self, features):
        banks.append(features["layer3"].float().sum(dim=(1, 2, 3)))
        return fit_features(self, features)

    monkeypatch.setattr(many_templates.HETMM, "fit_features", recording)
    return banks


def test_draws_are_seeded_random_banks_with_their_spread(root, monkeypatch):
    banks = _recording_fits(monkeypatch)
    rows = many_templates.draws(root, CATEGORY, pool=10, count=3, size=6, seed=0)
    names = [f"random6of10#{i}" for i in range(3)]
    assert [key for key in rows if not key.startswith("spread_")] == names
    assert len(banks) == 3 and all(len(bank) == 6 for bank in banks)
    assert len({tuple(bank.tolist()) for bank in banks}) == 3  # three different choices of 6 of the 10
    for metric in METRICS:
        values = sorted(rows[name][metric] for name in names)
        assert all(0 <= value <= 1 for value in values)
        assert rows[f"spread_{metric}"] == dict(min=values[0], median=values[1], max=values[2])
    again = many_templates.draws(root, CATEGORY, pool=10, count=3, size=6, seed=0)
    assert again == rows and all(torch.equal(a, b) for a, b in zip(banks[:3], banks[3:]))  # seeded
    many_templates.draws(root, CATEGORY, pool=10, count=3, size=6, seed=1)
    assert [tuple(b.tolist()) for b in banks[6:]] != [tuple(b.tolist()) for b in banks[:3]]
    table = many_templates.format_rows(CATEGORY, rows)
    assert all(name in table for name in names) and "spread_image_auroc" in table


def test_run_refuses_fewer_training_images_than_its_largest_size(root):
    with pytest.raises(SystemExit, match="brick has 10 training images, fewer than 40: build with --build"):
        many_templates.run(root, CATEGORY, sizes=[10, 40], systems=["auto"], patchcore=False, budget=1.0,
                           memory=False)
