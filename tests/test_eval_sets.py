"""The choose set's defect painters: every kind changes what its mask says and little else, and the two faint
kinds differ as they are meant to (a stain scales the texture, a film washes it out)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("scipy")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from eval_sets import (CHOOSE_COLOUR_DEFECTS, CHOOSE_FINE_DEFECTS, CHOOSE_PLAIN_DEFECTS,  # noqa: E402
                       paint_choose_defect)

KINDS = sorted(set(CHOOSE_FINE_DEFECTS + CHOOSE_PLAIN_DEFECTS + CHOOSE_COLOUR_DEFECTS))


def grain(seed: int, size: int = 176) -> np.ndarray:
    """A colour wood-like grain: stripes of varying width with noise, values well inside (0, 1)."""
    rng = np.random.default_rng(seed)
    x = np.arange(size)[None, :] + 6 * np.sin(np.arange(size)[:, None] / 17)
    luminance = 0.55 + 0.18 * np.sin(x / 3.1) + 0.05 * rng.standard_normal((size, size))
    return np.clip(luminance[..., None] * np.array([1.0, 0.8, 0.6]), 0.05, 0.95).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_a_defect_changes_its_mask_more_than_the_rest(kind, seed):
    image, piece = grain(seed), grain(seed + 10).mean(axis=2)  # the pasted texture is grey, as build_set draws it
    out, mask = paint_choose_defect(image, kind, np.random.default_rng(seed), piece)
    assert out.shape == image.shape and mask.shape == image.shape[:2] and mask.dtype == bool
    assert 0 <= out.min() and out.max() <= 1
    assert 0 < mask.mean() < 0.2  # a defect, not the whole image
    change = np.abs(out - image).mean(axis=2)
    assert change[mask].mean() > 0.01  # visible, if faint
    assert change[mask].mean() > 3 * change[~mask].mean()  # soft edges may spill a little beyond the mask


@pytest.mark.parametrize("seed", range(6))
def test_a_film_washes_the_texture_out_where_a_stain_keeps_its_contrast(seed):
    image = grain(seed)

    def contrast(picture, mask):  # the texture's relative contrast inside the mask: spread over mean
        luminance = picture.mean(axis=2)[mask]
        return luminance.std() / luminance.mean()

    film, film_mask = paint_choose_defect(image, "film", np.random.default_rng(seed), None)
    stain, stain_mask = paint_choose_defect(image, "stain", np.random.default_rng(seed), None)
    assert contrast(film, film_mask) < 0.8 * contrast(image, film_mask)  # at least ~a third of it gone (opacity >= 0.35)
    assert contrast(stain, stain_mask) == pytest.approx(contrast(image, stain_mask), rel=0.1)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown defect kind .rust.; expected one of .*film.*scratch"):
        paint_choose_defect(grain(0), "rust", np.random.default_rng(0), None)
