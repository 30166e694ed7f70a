"""Scoring parameters: the paper's per-category strings, as data, and their parser.

A string has two parts separated by ``;``:

* per layer, ``L<i>:<fore>x<back>_a=<alpha>_l=<lambda>[_i=<isolation>]`` joined by ``|``: the
  forward and backward window, the weight ``alpha`` of the forward map, the layer weight ``lambda``
  and, optionally, the isolation weight (0 when absent; the paper's strings have none): every
  template pixel's similarities get ``isolation`` times its own leave-one-out dissimilarity added
  (``hetmm.scoring.template_isolation``), so a query pixel is scored by how much farther it is from
  the templates than the templates are from each other there. Optionally ``_c=<percent>`` (after
  ``_i``): the forward direction also matches every query pixel against a coreset of that percentage
  of all template pixels wherever they lie (greedy k-centre selection on their features, as
  PatchCore's memory bank; ``hetmm.scoring.template_coreset``), and takes the better of that and its
  window's match: structure a template shows elsewhere is found even when the window misses it.
  Optionally ``_m=<k>`` (last): the layer is magnitude-aware, its similarity a function of the Euclidean
  distance of the unnormalised features in units of ``k`` times their RMS length rather than the cosine of
  their directions (``hetmm.magnitude``); ``k`` in (0, 100], near 1 weighing length less, from about 4 close
  to PatchCore's distance. A window of 0 skips that layer.
* per metric, ``img_AUC:...|pix_AUC:...|PRO:...``, each ``clean``, ``blur_s=<sigma>_k=<size>``
  (Gaussian blur) or ``mp_k=<size>`` (mean of a ``k x k`` max-pool, for the image score).
  The image score is the maximum of the (post-processed) map unless ``mp`` is given, or, with
  ``_top=<percent>`` after a ``clean`` or ``blur`` image entry, the mean of that percentage of the
  map's highest pixels (at least one). Any entry may end with ``_L=<digits>``: that metric's map sums
  only those layers (``_L=23``: layers 2 and 3, with their own alpha and lambda); without it, every
  active layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

# The published MVTec AD configuration (Wide-ResNet-101-2, 256x256 output), one string per category.
MVTEC_AD = {
    "bottle": "L1:5x3_a=0.3_l=1|L2:5x3_a=0.3_l=1|L3:7x3_a=0.3_l=0.8;img_AUC:clean|pix_AUC:blur_s=4.1_k=39|PRO:clean",
    "cable": "L1:13x7_a=0.7_l=1|L2:5x5_a=0.7_l=0.8|L3:7x1_a=0.3_l=0.8;"
             "img_AUC:blur_s=5.5_k=39|pix_AUC:blur_s=8.6_k=61|PRO:clean",
    "capsule": "L1:13x7_a=0.5_l=1|L2:9x5_a=0.5_l=0.5|L3:7x3_a=0.3_l=0.3;"
               "img_AUC:clean|pix_AUC:blur_s=7.8_k=61|PRO:blur_s=3.6_k=11",
    "carpet": "L1:7x3_a=0.7_l=1|L2:9x1_a=0.3_l=0.8|L3:3x1_a=0.3_l=0.5;"
              "img_AUC:blur_s=5.5_k=35|pix_AUC:clean|PRO:blur_s=3.0_k=11",
    "grid": "L1:13x3_a=0.7_l=1|L2:9x1_a=0.7_l=0.5|L3:7x1_a=0.3_l=0.3;img_AUC:clean|pix_AUC:clean|PRO:clean",
    "hazelnut": "L1:13x3_a=0.7_l=1|L2:9x5_a=0.7_l=0.5|L3:7x3_a=0.3_l=0.8;img_AUC:clean|pix_AUC:clean|PRO:clean",
    "leather": "L1:11x3_a=0.5_l=1|L2:9x3_a=0.3_l=1|L3:7x3_a=0.3_l=0.3;img_AUC:clean|pix_AUC:clean|PRO:clean",
    "metal_nut": "L1:13x5_a=0.5_l=1|L2:9x5_a=0.3_l=0.5|L3:7x3_a=0.3_l=0.8;"
                 "img_AUC:clean|pix_AUC:blur_s=15.0_k=61|PRO:clean",
    "pill": "L1:11x5_a=0.5_l=1|L2:9x1_a=0.7_l=0.5|L3:7x1_a=0.3_l=0.5;img_AUC:mp_k=25|pix_AUC:blur_s=15.0_k=61|PRO:clean",
    "screw": "L1:5x3_a=0.5_l=1|L2:5x3_a=0.7_l=0.8|L3:7x3_a=0.3_l=0.3;"
             "img_AUC:clean|pix_AUC:blur_s=3.3_k=45|PRO:blur_s=3.1_k=17",
    "tile": "L1:13x7_a=0.3_l=1|L2:7x5_a=0.3_l=0.5|L3:5x3_a=0.3_l=0.5;img_AUC:clean|pix_AUC:clean|PRO:clean",
    "toothbrush": "L1:13x3_a=0.3_l=1|L2:9x5_a=0.3_l=0.8|L3:7x3_a=0.3_l=0.5;"
                  "img_AUC:clean|pix_AUC:blur_s=3.0_k=11|PRO:clean",
    "transistor": "L1:13x5_a=0.3_l=1|L2:5x3_a=0.5_l=0.5|L3:5x1_a=0.3_l=0.8;"
                  "img_AUC:blur_s=5.1_k=31|pix_AUC:blur_s=15.0_k=61|PRO:blur_s=6.6_k=39",
    "wood": "L1:7x3_a=0.7_l=1|L2:5x3_a=0.7_l=0.8|L3:7x1_a=0.7_l=0.3;img_AUC:clean|pix_AUC:clean|PRO:clean",
    "zipper": "L1:13x5_a=0.3_l=1|L2:7x5_a=0.7_l=1|L3:7x1_a=0.7_l=0.3;"
              "img_AUC:mp_k=11|pix_AUC:blur_s=10.4_k=61|PRO:blur_s=6.0_k=31",
}

# For categories outside the table, chosen on the accuracy protocol's "choose" set only
# (benchmarks/accuracy_protocol.py; lite0 features with the 3x3 neighbourhood, DEFAULT_NEIGHBOURHOOD):
# a 5x5 forward window at layer 1 (13x13 scored no better there and costs 4x), the image score the
# maximum of the map blurred with sigma 8 (one noisy pixel no longer decides), PRO on the pixel map,
# isolation 1 on every layer (rare but normal structure is no longer an anomaly; the fifth round), and
# layers 2 and 3 weighted mostly by their forward maps, alpha 0.9 (a query pixel with no match in any
# template is the defect; the ninth round), and the image score from layers 2 and 3 only (layer 1's
# fine texture localises defects but its normal variation decides too many image scores; the eleventh),
# and layer 3's forward window 23x23, most of its 16x16 map at 256 px (a query pixel's structure may lie
# anywhere in a template of a texture taken at a random offset; the backward window stays 3x3, which
# localises; the thirteenth round), and layer 2's forward direction also matched against a coreset of 10% of
# the template pixels wherever they lie (structure a template shows outside the 9x9 window is found too, at
# about a tenth of the cost of a window over the whole map; the fifteenth round).
DEFAULT = ("L1:5x3_a=0.5_l=1_i=1|L2:9x3_a=0.9_l=0.8_i=1_c=10|L3:23x3_a=0.9_l=0.5_i=1;"
           "img_AUC:blur_s=8.0_k=33_L=23|pix_AUC:blur_s=4.0_k=33|PRO:blur_s=4.0_k=33")
# Locally aware features (PatchCore's 3x3 average before normalising) for DEFAULT; the paper's strings keep 1.
DEFAULT_NEIGHBOURHOOD = 3


@dataclass(frozen=True)
class LayerParams:
    fore: int
    back: int
    alpha: float
    lda: float
    isolation: float = 0.0
    coreset: float = 0.0  # percent of the template pixels the forward direction also matches globally; 0: none
    magnitude: float = 0.0  # the lift's scale factor k (hetmm.magnitude); 0: cosine of the unit directions


@dataclass(frozen=True)
class PostProcess:
    """``clean`` (nothing), ``blur`` (Gaussian, ``sigma``, size ``k``) or ``mp`` (mean of a k x k max-pool),
    of the map summed over ``layers`` (names such as ``"layer2"``; empty: every active layer). ``top``
    (image score only, percent; 0: the maximum) scores the mean of the map's highest ``top`` percent."""

    kind: str = "clean"
    sigma: float = 0.0
    k: int = 0
    layers: tuple = ()
    top: float = 0.0


@dataclass(frozen=True)
class ScoringParams:
    layers: dict = field(default_factory=dict)  # "layer1" -> LayerParams
    image: PostProcess = PostProcess()
    pixel: PostProcess = PostProcess()
    pro: PostProcess = PostProcess()

    @property
    def active_layers(self) -> dict:
        """Layers whose windows are both non-zero (a window of 0 skips the layer)."""
        return {name: p for name, p in self.layers.items() if p.fore > 0 and p.back > 0}


# Layers the backbones expose (hetmm.backbone.LAYERS), and bounds that keep every score finite in float16.
LAYER_COUNT = 3
MAX_LAMBDA = 1e3
MAX_ISOLATION_WEIGHT = 10.0
MAX_BLUR_SIGMA = 256.0
MAX_MAGNITUDE_SCALE = 100.0  # k (hetmm.magnitude); beyond it every lifted feature sits at one pole
MAX_KERNEL = 1025


class ParamsError(ValueError):
    """A parameter string that cannot be read or holds values outside their range."""


def _bad(text: str, why: str) -> ValueError:
    return ParamsError(f"params: cannot read {text!r}: {why}; expected e.g. {DEFAULT!r}")


def _parse_layer_choice(text: str, digits: str) -> tuple:
    if not digits.isdigit() or any(not 1 <= int(d) <= LAYER_COUNT for d in digits) or len(set(digits)) < len(digits):
        raise _bad(text, f"L= names layers by their digits once each, 1 to {LAYER_COUNT} (e.g. L=23); got {digits!r}")
    return tuple(f"layer{d}" for d in sorted(digits))


def _parse_top(text: str, value: str) -> float:
    try:
        top = float(value)
    except ValueError:
        raise _bad(text, f"{value!r} is not a number") from None
    if not (math.isfinite(top) and 0 < top <= 100):
        raise _bad(text, f"top= is the percentage of the highest pixels the image score averages, in (0, 100]; "
                         f"got {value_text(top)}")
    return top


def _parse_post(text: str, metric: str) -> PostProcess:
    items = text.split("_")
    layers, top = (), 0.0
    if len(items) > 1 and items[-1].startswith("L="):
        layers = _parse_layer_choice(text, items.pop()[2:])
    if len(items) > 1 and items[-1].startswith("top="):
        top = _parse_top(text, items.pop()[4:])
        if metric != "img_AUC" or items[0] == "mp":
            raise _bad(text, "top= belongs to an img_AUC entry that is clean or blur_s=<sigma>_k=<size>")
    return replace(_parse_post_process(text, items), layers=layers, top=top)


def _parse_post_process(text: str, items: list) -> PostProcess:
    if items == ["clean"]:
        return PostProcess()
    values = {}
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if not sep:
            raise _bad(text, f"{item!r} is not key=value")
        try:
            values[key] = float(value)
        except ValueError:
            raise _bad(text, f"{value!r} is not a number") from None
    if not (items[0] == "blur" and set(values) == {"s", "k"}) and not (items[0] == "mp" and set(values) == {"k"}):
        raise _bad(text, "a post-process is clean, blur_s=<sigma>_k=<size> or mp_k=<size>, then optionally "
                        "_top=<percent> (img_AUC) and _L=<layers>")
    k = values["k"]
    if not (math.isfinite(k) and k == int(k) and 1 <= k <= MAX_KERNEL):
        raise _bad(text, f"the size k must be a whole number from 1 to {MAX_KERNEL}; got {value_text(k)}")
    if items[0] == "mp":
        return PostProcess("mp", 0.0, int(k))
    sigma = values["s"]
    if not (math.isfinite(sigma) and 0 < sigma <= MAX_BLUR_SIGMA):
        raise _bad(text, f"the blur sigma s must be in (0, {MAX_BLUR_SIGMA:g}]; got {value_text(sigma)}")
    return PostProcess("blur", sigma, int(k))


def value_text(value: float) -> str:
    return str(int(value)) if abs(value) < 1e15 and value == int(value) else f"{value:g}"


def parse_params(text: str) -> ScoringParams:
    """Parse a parameter string (the per-metric part after ``;`` is optional)."""
    if isinstance(text, ScoringParams):
        return text
    if not isinstance(text, str) or not text.strip():
        raise TypeError(f"params must be a parameter string such as {DEFAULT!r}; got {text!r}")
    layer_part, _, metric_part = text.strip().partition(";")
    layers = {}
    for chunk in layer_part.split("|"):
        name, sep, spec = chunk.partition(":")
        form = ("a layer entry is L<i>:<fore>x<back>_a=<alpha>_l=<lambda>[_i=<isolation>][_c=<coreset percent>]"
                "[_m=<magnitude scale>]")
        if not sep or not name.startswith("L") or not name[1:].isdigit():
            raise _bad(chunk, form)
        try:
            windows, *weights = spec.split("_")
            fore, back = (int(w) for w in windows.split("x"))
            pairs = [w.split("=") for w in weights]
            keys = [p[0] for p in pairs]
            optional = [k for k in keys[2:] if k in ("i", "c", "m")]
            assert keys[:2] == ["a", "l"] and keys[2:] == optional and optional == sorted(set(optional), key="icm".index)
            assert fore >= 0 and back >= 0 and all(len(p) == 2 for p in pairs)
            weights = dict(pairs)
            alpha, lda, isolation = float(weights["a"]), float(weights["l"]), float(weights.get("i", 0))
            coreset, magnitude = float(weights.get("c", 0)), float(weights.get("m", 0))
        except (ValueError, AssertionError):
            raise _bad(chunk, form) from None
        if not 1 <= int(name[1:]) <= LAYER_COUNT:
            raise _bad(chunk, f"the layers are L1 to L{LAYER_COUNT}")
        if not (math.isfinite(alpha) and 0 <= alpha <= 1):
            raise _bad(chunk, f"alpha (a=) weighs the two directions and must be in [0, 1]; got {value_text(alpha)}")
        if not (math.isfinite(lda) and 0 < lda <= MAX_LAMBDA):
            raise _bad(chunk, f"lambda (l=) weighs the layer and must be in (0, {MAX_LAMBDA:g}]; got {value_text(lda)}")
        if not (math.isfinite(isolation) and 0 <= isolation <= MAX_ISOLATION_WEIGHT):
            raise _bad(chunk, f"the isolation weight (i=) must be in [0, {MAX_ISOLATION_WEIGHT:g}]; got {value_text(isolation)}")
        if "c" in weights and not (math.isfinite(coreset) and 0 < coreset <= 100):
            raise _bad(chunk, f"the coreset (c=) is a percentage of the template pixels in (0, 100]; got {value_text(coreset)}")
        if "m" in weights and not (math.isfinite(magnitude) and 0 < magnitude <= MAX_MAGNITUDE_SCALE):
            raise _bad(chunk, f"the magnitude scale (m=) must be in (0, {MAX_MAGNITUDE_SCALE:g}]; got {value_text(magnitude)}")
        if f"layer{int(name[1:])}" in layers:
            raise _bad(chunk, f"{name} is given twice")
        layers[f"layer{int(name[1:])}"] = LayerParams(fore, back, alpha, lda, isolation, coreset, magnitude)
    post = {}
    if metric_part:
        for chunk in metric_part.split("|"):
            metric, sep, spec = chunk.partition(":")
            if metric not in ("img_AUC", "pix_AUC", "PRO") or not sep:
                raise _bad(chunk, "metric entries are img_AUC:..., pix_AUC:..., PRO:...")
            post[metric] = _parse_post(spec, metric)
    params = ScoringParams(layers, post.get("img_AUC", PostProcess()), post.get("pix_AUC", PostProcess()),
                           post.get("PRO", PostProcess()))
    if not params.active_layers:
        raise _bad(text, "every layer is skipped (a window of 0)")
    for metric, chosen in post.items():
        skipped = [name for name in chosen.layers if name not in params.active_layers]
        if skipped:
            raise _bad(text, f"{metric} sums {', '.join('L' + n[5:] for n in skipped)}, which the string skips or lacks")
    return params


def params_for(category: str | None) -> str:
    """The paper's string for an MVTec AD category, else the default."""
    return MVTEC_AD.get((category or "").lower(), DEFAULT)


def neighbourhood_for(category: str | None, params: str | None) -> int:
    """1 (each pixel's own feature) for the paper's published string of an MVTec AD category, as published;
    DEFAULT_NEIGHBOURHOOD for every other configuration."""
    published = MVTEC_AD.get((category or "").lower())
    return 1 if published is not None and (params is None or params == published) else DEFAULT_NEIGHBOURHOOD
