"""Magnitude-aware layers (``_m=<k>``): the stereographic lift, the matching on it in every backend, the detector."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hetmm
import hetmm_kernels as hk
from hetmm.bank import BankInvalid, TemplateBank
from hetmm.magnitude import directions, lift, rms_length
from hetmm.parameters import parse_params
from hetmm.scoring import LayerMatches
from hetmm_kernels import reference
from helpers import BACKENDS, device_for, random_images, skip_reason, tiny_detector


def _raw(n, c, h, w, seed):
    """Unnormalised features whose lengths vary by a factor of ~10, as a backbone's do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * torch.rand(n, 1, h, w, generator=g,
                                                                                  dtype=torch.float64).add(0.1) * 3


@pytest.mark.parametrize("scale", [0.5, 3.0, 40.0])
def test_the_lift_is_a_unit_vector_that_keeps_the_direction(scale):
    raw = _raw(3, 7, 4, 5, seed=1)
    lifted = lift(raw, scale)
    assert lifted.shape == (3, 8, 4, 5) and lifted.dtype == torch.float32
    torch.testing.assert_close(lifted.norm(dim=1), torch.ones(3, 4, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(directions(lifted), F.normalize(raw, dim=1).float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.5, 3.0, 40.0])
def test_the_cosine_of_two_lifts_is_a_function_of_their_euclidean_distance(scale):
    x, y = _raw(50, 9, 1, 1, seed=2)[..., 0, 0], _raw(50, 9, 1, 1, seed=3)[..., 0, 0]
    cos = (lift(x[..., None, None], scale) * lift(y[..., None, None], scale)).sum(1)[..., 0, 0].double()
    xs, ys = x / scale, y / scale
    expected = 1 - 2 * (xs - ys).pow(2).sum(1) / ((1 + xs.pow(2).sum(1)) * (1 + ys.pow(2).sum(1)))
    torch.testing.assert_close(cos, expected, atol=2e-6, rtol=0)
    # the same direction at another length is no longer a perfect match
    same_direction = (lift(x[..., None, None], scale) * lift(2 * x[..., None, None], scale)).sum(1)
    assert (same_direction < 1 - 1e-4).all()


def test_rms_length_refuses_features_without_length():
    assert rms_length(torch.full((2, 4, 3, 3), 0.5)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="RMS length must be finite and positive"):
        rms_length(torch.zeros(1, 4, 2, 2))


# (B, T, C, H, W, fore window, back window, lift scale)
SHAPES = [(2, 3, 8, 6, 7, 5, 3, 3.0), (1, 2, 24, 9, 9, 3, 3, 30.0), (2, 2, 5, 5, 4, 13, 1, 1.0)]
# |similarity - reference| of lifted inputs rounded to the dtype: float32 accumulation, and for 16-bit inputs
# their rounding (each product's relative error twice the unit round-off, the sum bounded by Cauchy-Schwarz)
# plus the output's; lifted vectors of large scales crowd near one pole, where similarities are close to 1
TOLERANCE = {torch.float32: 2e-6, torch.float16: 3 * 2.0 ** -11, torch.bfloat16: 3 * 2.0 ** -8}


@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,t,c,h,w,kf,kb,scale", SHAPES)
def test_mutual_match_of_lifted_features_in_every_backend(backend, dtype, b, t, c, h, w, kf, kb, scale):
    reason = skip_reason(backend, dtype)
    if reason:
        pytest.skip(reason)
    query, temp = lift(_raw(b, c, h, w, seed=4), scale), lift(_raw(t, c, h, w, seed=5), scale)
    device = device_for(backend)
    fore, back = hk.mutual_match(query.to(device, dtype), temp.to(device, dtype), kf, kb, backend=backend,
                                 out_dtype=torch.float32)
    ref_fore, ref_back = reference.mutual_match(query.double(), temp.double(), kf, kb)
    torch.testing.assert_close(fore.cpu().double(), ref_fore, atol=TOLERANCE[dtype], rtol=0)
    torch.testing.assert_close(back.cpu().double(), ref_back, atol=TOLERANCE[dtype], rtol=0)


def test_a_magnitude_aware_layer_sees_a_change_of_length_that_the_cosine_does_not():
    temp = _raw(2, 6, 5, 5, seed=6).float()
    query = 1.6 * temp[:1]  # every pixel a template's own direction, 60% longer (a stain that keeps the texture)
    plain = LayerMatches({"layer2": F.normalize(query, dim=1)}, {"layer2": F.normalize(temp, dim=1)},
                         "L2:3x3_a=0.5_l=1")
    scale = 2 * rms_length(temp)
    aware = LayerMatches({"layer2": lift(query, scale)}, {"layer2": lift(temp, scale)}, "L2:3x3_a=0.5_l=1_m=2")
    torch.testing.assert_close(plain.fores[0], torch.ones(1, 5, 5), atol=1e-6, rtol=0)  # found, as if normal
    assert (aware.fores[0] < 1 - 1e-3).all()


@pytest.mark.parametrize("text,words", [
    ("L1:5x3_a=0.5_l=1_m=0", r"magnitude scale \(m=\) must be in \(0, 100\]; got 0"),
    ("L1:5x3_a=0.5_l=1_m=101", r"magnitude scale .* got 101"),
    ("L1:5x3_a=0.5_l=1_m=inf", r"magnitude scale .* got inf"),
    ("L1:5x3_a=0.5_l=1_m=2_i=1", "a layer entry is"),
    ("L1:5x3_a=0.5_l=1_m=2_m=3", "a layer entry is"),
])
def test_bad_magnitude_entries(text, words):
    with pytest.raises(ValueError, match=words):
        parse_params(text)


def test_magnitude_entries_parse():
    layers = parse_params("L1:5x3_a=0.5_l=1_i=1_c=10_m=4|L2:9x3_a=0.9_l=0.8_m=1.5|L3:3x3_a=0.5_l=1").layers
    assert (layers["layer1"].isolation, layers["layer1"].coreset, layers["layer1"].magnitude) == (1.0, 10.0, 4.0)
    assert (layers["layer2"].magnitude, layers["layer3"].magnitude) == (1.5, 0.0)


# ---------------------------------------------------------------- the detector and its bank
PARAMS = "L1:3x3_a=0.5_l=1_i=1|L2:3x3_a=0.9_l=0.8_i=1_c=25_m=4|L3:3x3_a=0.9_l=0.5_m=2;img_AUC:blur_s=2.0_k=9"


def _detector(params=PARAMS, **kw):
    return tiny_detector(params=params, **kw)


_images = random_images


@pytest.fixture(scope="module")
def fitted():
    return _detector().fit(_images(4, 0))


def test_the_first_images_set_the_scales_and_the_bank_keeps_them(tmp_path, fitted):
    raw = fitted.backbone(_images(4, 0), normalize=False)
    assert fitted.magnitude_scales == {layer: pytest.approx(rms_length(raw[layer]), rel=1e-6)
                                       for layer in ("layer2", "layer3")}
    assert fitted.backbone.lift == {"layer2": pytest.approx(4 * fitted.magnitude_scales["layer2"]),
                                    "layer3": pytest.approx(2 * fitted.magnitude_scales["layer3"])}
    features = fitted.bank.features
    channels = {layer: raw[layer].shape[1] for layer in raw}
    assert features["layer1"].shape[1] == channels["layer1"]  # cosine layers keep their channels
    assert features["layer2"].shape[1] == channels["layer2"] + 1 and features["layer3"].shape[1] == channels["layer3"] + 1
    for layer in ("layer2", "layer3"):
        torch.testing.assert_close(features[layer], lift(raw[layer], fitted.backbone.lift[layer]), atol=1e-6, rtol=0)
    loaded = hetmm.HETMM.load(fitted.save(tmp_path / "bank.safetensors"), precision="fp32")
    assert loaded.magnitude_scales == fitted.magnitude_scales
    images = _images(2, 7)
    assert torch.equal(loaded.predict(images).anomaly_map, fitted.predict(images).anomaly_map)
    # a hot update lifts the new images at the bank's scales, not at their own
    grown = fitted.with_bank(TemplateBank(dict(fitted.bank.features), fitted.bank.config)).add_templates(_images(2, 9))
    new = fitted.backbone(_images(2, 9), normalize=False)["layer2"]
    assert len(grown.bank) == 6 and rms_length(new) != pytest.approx(fitted.magnitude_scales["layer2"])
    torch.testing.assert_close(grown.bank.features["layer2"][4:], lift(new, fitted.backbone.lift["layer2"]),
                               atol=1e-6, rtol=0)


def test_magnitude_changes_the_scores():
    images, tests = _images(4, 0), _images(2, 7)
    plain = _detector(PARAMS.replace("_m=4", "").replace("_m=2", "")).fit(images)
    assert plain.magnitude_scales is None and plain.backbone.lift == {}
    assert not torch.allclose(plain.predict(tests).anomaly_map, _detector().fit(images).predict(tests).anomaly_map)


def test_fit_features_needs_this_detectors_extraction():
    other = _detector(PARAMS.replace("_m=4", "").replace("_m=2", ""))
    features = other.extract(_images(3, 0), progress=False)
    with pytest.raises(ValueError, match="magnitude-aware .* this detector's extract"):
        _detector().fit_features(features)
    det = _detector()
    det.fit_features(det.extract(_images(3, 0), progress=False))
    assert set(det.magnitude_scales) == {"layer2", "layer3"}


@pytest.mark.parametrize("scales,words", [
    ({"layer2": 1.0}, r"missing \['layer3'\]"),
    ({"layer2": 1.0, "layer3": 0.0}, "invalid"),
    ({"layer2": 1.0, "layer3": float("nan")}, "invalid"),
    ({"layer2": True, "layer3": 1.0}, "invalid"),
])
def test_bad_scales_are_refused(scales, words):
    with pytest.raises(ValueError, match=words):
        _detector().set_magnitude_scales(scales)


def test_a_bank_without_its_scales_is_refused_on_load(tmp_path, fitted):
    for scales in (None, {"layer2": 1.0}, {"layer2": 1.0, "layer3": -2.0}):
        config = dict(fitted.bank.config, magnitude_scales=scales)
        path = TemplateBank(fitted.bank.features, config).save(tmp_path / "bank.safetensors")
        with pytest.raises(BankInvalid, match="magnitude_scales must give each a finite positive length"):
            TemplateBank.load(path)


def test_a_bank_made_at_other_scales_does_not_match(tmp_path, fitted):
    path = fitted.save(tmp_path / "bank.safetensors")
    bank = TemplateBank.load(path)
    other = dict(fitted.config, magnitude_scales={"layer2": 1.0, "layer3": 1.0})
    with pytest.raises(hetmm.BankMismatch, match="magnitude_scales"):
        bank.check(other)
