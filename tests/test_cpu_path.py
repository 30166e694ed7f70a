"""The CPU fast path: template-tile matching, precision choice, channels-last/bf16 backbone, neighbourhood."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hetmm
import hetmm_kernels as hk
from hetmm import detector as detector_module
from hetmm.backbone import Backbone
from hetmm.bank import TemplateBank
from hetmm_kernels import reference
from hetmm_kernels.torch_ops import atm


def _unit(*shape, seed=0, dtype=torch.float32):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1).to(dtype)


@pytest.mark.parametrize("tile", [(1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (8, 8), (3, 5)])
@pytest.mark.parametrize("shape,fore,back", [
    ((3, 8, 9, 7), 5, 3),    # map not a multiple of the tile
    ((2, 5, 3, 3), 13, 3),   # window larger than the map
    ((1, 16, 6, 10), 4, 7),  # even window (acts as 5), backward wider than forward
    ((4, 24, 12, 12), 1, 1),  # windows of one pixel
])
def test_tiled_templates_equal_the_reference(tile, shape, fore, back):
    batch, channels, height, width = shape
    query, temp = _unit(batch, channels, height, width, seed=1), _unit(5, channels, height, width, seed=2)
    bank = atm.TiledTemplates(temp, tile)
    got_fore, got_back = atm.mutual_max_tiled(query, bank, fore // 2, back // 2)
    ref_fore, ref_back = reference.mutual_match(query, temp, fore, back)
    # float32 products over C channels: rounding grows with C
    assert torch.allclose(got_fore, ref_fore, atol=1e-6 * channels)
    assert torch.allclose(got_back, ref_back, atol=1e-6 * channels)


def test_tiled_matching_ignores_the_padding_when_every_real_match_is_negative():
    # the padded template and query pixels are zero vectors (product 0): where every real product
    # is -1, a window reaching over the border must still give -1
    vector = _unit(1, 8, 1, 1, seed=3)
    query = vector.expand(2, 8, 5, 7).contiguous()
    temp = -vector.expand(3, 8, 5, 7).contiguous()
    for tile in [(2, 2), (4, 4), (3, 5)]:
        fore, back = atm.mutual_max_tiled(query, atm.TiledTemplates(temp, tile), 1, 2)
        assert torch.allclose(fore, torch.full_like(fore, -1.0), atol=1e-6)
        assert torch.allclose(back, torch.full_like(back, -1.0), atol=1e-6)


@pytest.mark.parametrize("path", ["tiled", "dense"])
@pytest.mark.parametrize("sign", ["positive", "negative", "mixed"])
def test_bfloat16_window_maxima_with_masked_padding(path, sign):
    # the bfloat16 maxima skip their negative-value pass when the template maxima are all non-negative (the
    # masks' all -inf padding rows are then right as int16 maxima); with any negative they must not skip it
    query, temp = _unit(2, 8, 9, 11, seed=5), _unit(3, 8, 9, 11, seed=6)
    if sign != "mixed":
        query = query.abs() if sign == "positive" else -query.abs()
        temp = temp.abs()
    query, temp = query.to(torch.bfloat16), temp.to(torch.bfloat16)
    if path == "tiled":
        fore, back = atm.mutual_max_tiled(query, atm.TiledTemplates(temp, (2, 2)), 2, 1)
    else:
        fore, back = atm.mutual_max_dense(query, atm.DenseTemplates(temp), 2, 1)
    # bfloat16 products of bfloat16 inputs, each rounded once: the float32 reference's maxima, rounded
    ref_fore = reference.forward_ATM(query.float(), temp.float(), 5).amax(1).to(torch.bfloat16).float()
    ref_back = reference.backward_ATM(query.float(), temp.float(), 3).amax(1).to(torch.bfloat16).float()
    assert (fore < 0).any() == (back < 0).any() == (sign == "negative")
    torch.testing.assert_close(fore, ref_fore.clamp_min(-1), atol=2 ** -7, rtol=0)
    torch.testing.assert_close(back, ref_back.clamp_min(-1), atol=2 ** -7, rtol=0)


@pytest.mark.parametrize("block", [1, 700, 1 << 22])
def test_tiled_block_size_does_not_change_the_result(monkeypatch, block):
    query, temp = _unit(2, 8, 10, 10, seed=3), _unit(3, 8, 10, 10, seed=4)
    bank = atm.TiledTemplates(temp, (2, 2))
    expected = atm.mutual_max_tiled(query, bank, 2, 1)
    monkeypatch.setattr(atm, "TILE_BLOCK", block)  # 1: one tile per product
    got = atm.mutual_max_tiled(query, bank, 2, 1)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("channels", [8, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,reach", [(1, 2), (1, 3), (1, 4), (2, 2), (3, 3), (4, 2), (16, 6)])
def test_the_tile_shape_is_chosen_and_used(batch, reach, dtype, channels):
    th, tw = atm.pick_tile_shape(64, 64, reach, batch, 40, channels, dtype)
    assert (th, tw) in atm.TILES
    assert atm.pick_tile_shape(3, 1, reach, batch, 40, channels, dtype) <= (3, 1)  # never larger than the map
    temp = _unit(3, channels, 9, 9, seed=5)
    bank = hk.prepare_templates(temp.to(dtype))
    query = _unit(batch, channels, 9, 9, seed=6)
    fore, back = hk.mutual_match(query.to(dtype), bank, 2 * reach + 1, 3, backend="torch")
    ref_fore, ref_back = reference.mutual_match(query, temp, 2 * reach + 1, 3)
    # bfloat16: inputs rounded to 8 bits of mantissa, then each product's maximum rounded once more
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(fore.float(), ref_fore, atol=atol) and torch.allclose(back.float(), ref_back, atol=atol)


def test_float32_tiles_minimise_the_padded_union_per_template_pixel():
    # at batch 1 a 5x5 window on lite0's layer 1: a 1x2 tile's union is 5x6 = 30 of 32 padded columns; 2x2 pads 36
    # to 64 for the same rows' worth of work; bfloat16 keeps tall 4x4 blocks there
    assert atm.pick_tile_shape(64, 64, 2, 1, 40, 25, torch.float32) == (1, 2)
    assert atm.pick_tile_shape(64, 64, 2, 1, 40, 25, torch.bfloat16) == (4, 4)
    assert atm.pick_tile_shape(32, 32, 3, 8, 60, 512, torch.bfloat16) == (2, 2)


@pytest.mark.parametrize("height,width,fore,dense", [(9, 7, 5, True), (16, 16, 15, True), (16, 16, 3, False),
                                                     (24, 20, 5, False)])
def test_retrieved_subsets_on_the_tiled_and_dense_layouts(height, width, fore, dense):
    from hetmm_kernels.torch_ops import atm as torch_atm

    assert torch_atm.prefers_dense(height, width, fore // 2, 1) == dense
    query, temp = _unit(3, 8, height, width, seed=7), _unit(5, 8, height, width, seed=8)
    indices = torch.tensor([[0, 2], [4, 1], [3, 3]])
    fore_map, back_map = hk.mutual_match(query, temp, fore, 3, indices=indices, backend="torch")
    ref_fore, ref_back = reference.mutual_match_subset(query, temp, fore, 3, indices)
    assert torch.allclose(fore_map, ref_fore, atol=1e-5) and torch.allclose(back_map, ref_back, atol=1e-5)


def test_bf16_matching_on_the_cpu_is_the_rounded_reference():
    # bfloat16 products accumulate in float32; each similarity is rounded to bfloat16 once (8 bits)
    query, temp = _unit(3, 40, 12, 12, seed=7, dtype=torch.bfloat16), _unit(6, 40, 12, 12, seed=8, dtype=torch.bfloat16)
    fore, back = hk.mutual_match(query, temp, 5, 3, backend="torch")
    assert fore.dtype == back.dtype == torch.bfloat16
    ref_fore, ref_back = reference.mutual_match(query.float(), temp.float(), 5, 3)
    assert torch.allclose(fore.float(), ref_fore, atol=2 ** -8)
    assert torch.allclose(back.float(), ref_back, atol=2 ** -8)


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize("vnni,bf16,expected,backbone", [
    (True, True, "int8", torch.bfloat16), (True, False, "int8", torch.float32),
    (False, True, "bf16", torch.bfloat16), (False, False, "fp32", torch.float32)])
def test_auto_precision_follows_the_cpu(monkeypatch, vnni, bf16, expected, backbone):
    """int8 matching wherever it is compiled (AVX512-VNNI), its backbone in bfloat16 only where that is native;
    without VNNI bfloat16 where native, else float32 (never emulated bfloat16)."""
    monkeypatch.setattr(detector_module, "int8_cpu", lambda: vnni)
    monkeypatch.setattr(detector_module, "native_bf16_cpu", lambda: bf16)
    assert detector_module.resolve_precision("auto", device="cpu") == expected
    assert detector_module.backbone_dtype(expected) == backbone
    assert detector_module.resolve_precision("auto", device="cuda") == "fp32"
    assert detector_module.resolve_precision("auto", half=True, device="cuda") == "fp16"
    assert detector_module.resolve_precision("bf16", device="cpu") == "bf16"


def test_no_bf16_variable_makes_the_cpu_one_without_it(monkeypatch):
    monkeypatch.setenv("HETMM_NO_BF16", "1")
    assert not detector_module.native_bf16_cpu()
    assert detector_module.backbone_dtype("int8") == torch.float32
    monkeypatch.setenv("HETMM_NO_BF16", "0")
    assert detector_module.backbone_dtype("int8") == (torch.bfloat16 if detector_module.native_bf16_cpu()
                                                      else torch.float32)


@pytest.mark.parametrize("kwargs,message", [
    (dict(precision="fp16"), "no fast CPU kernels"),
    (dict(half=True), "no fast CPU kernels"),
    (dict(precision="int4"), "precision must be"),
    (dict(half="bf16", precision="fp32"), "disagree"),
    (dict(half="yes"), "half must be"),
])
def test_bad_precision_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        detector_module.resolve_precision(device="cpu", **kwargs)


def test_precision_sets_backbone_and_matching_dtypes():
    det = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision="bf16-backbone")
    assert det.backbone.autocast_dtype == torch.bfloat16 and det.feature_dtype == torch.float32
    features = det.extract(torch.rand(1, 3, 64, 64))
    assert all(f.dtype == torch.float32 for f in features.values())
    det = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, precision="bf16")
    assert all(f.dtype == torch.bfloat16 for f in det.extract(torch.rand(1, 3, 64, 64)).values())


def test_bf16_backbone_is_close_to_float32():
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    exact = Backbone("resnet18", weights=None)(images)
    fast = Backbone("resnet18", weights=None).set_precision(torch.bfloat16)(images)
    for layer, f in exact.items():
        # unit features: the cosine between the two computations, per pixel
        cosine = (fast[layer].float() * f).sum(1)
        assert cosine.min() > 0.98, layer


def test_channels_last_backbone_equals_a_contiguous_run():
    net = Backbone("resnet18", weights=None)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(10))
    got = net(images, normalize=False)
    contiguous = net.to(memory_format=torch.contiguous_format)
    with torch.no_grad():
        x = contiguous.stem((images - net._mean) / net._std)
        for layer, stage in zip(got, contiguous.stages):
            x = stage(F.relu(x))
            assert torch.allclose(got[layer], x, rtol=1e-4, atol=1e-4), layer


# ---------------------------------------------------------------- neighbourhood
def test_neighbourhood_averages_before_normalising():
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    raw = Backbone("resnet18", weights=None)(images, normalize=False)
    smooth = Backbone("resnet18", weights=None, neighbourhood=3)(images)
    for layer, f in raw.items():
        expected = F.normalize(F.avg_pool2d(f, 3, 1, 1, count_include_pad=False), dim=1)
        assert torch.allclose(smooth[layer], expected, atol=1e-5), layer


@pytest.mark.parametrize("bad", [0, 2, -3, 1.5, "3"])
def test_bad_neighbourhood_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="neighbourhood"):
        Backbone("resnet18", weights=None, neighbourhood=bad)


def test_bank_remembers_its_neighbourhood(tmp_path):
    det = hetmm.HETMM("resnet18", None, image_size=64, out_size=64, neighbourhood=3).fit(torch.rand(2, 3, 64, 64))
    path = det.save(tmp_path / "bank.safetensors")
    assert hetmm.HETMM.load(path).backbone.neighbourhood == 3
    with pytest.raises(hetmm.BankMismatch, match="neighbourhood"):
        TemplateBank.load(path).check(dict(det.config, neighbourhood=1))
    older = dict(det.config)
    del older["neighbourhood"]  # a bank saved before the option existed meant 1
    TemplateBank(det.bank.features, older).check(dict(det.config, neighbourhood=1))


@pytest.mark.parametrize("shape,dim", [((7, 40, 33), 1), ((5, 6, 8, 9), (0, 1)), ((64, 100), 0), ((3, 4, 5, 6), 3),
                                       ((2, 3, 4, 5, 6, 7), (4, 5))])
@pytest.mark.parametrize("mix", ["signed", "negative", "masked"])
def test_bfloat16_amax_on_bit_patterns_equals_torch(shape, dim, mix):
    """The int16 maximum of bfloat16 bit patterns, with its negative-case fallback, is torch's maximum exactly:
    mixed signs, slices with no positive value, -inf masks (all-masked slices too), and -0.0 beside -tiny."""
    x = torch.randn(shape)
    if mix == "negative":
        x = -x.abs() - torch.rand(shape) * (torch.rand(shape) < 0.5)
        x.view(-1)[::7] = -0.0
        x.view(-1)[1::7] = -1e-30  # the largest negative bfloat16 values sit next to -0.0's bit pattern
    elif mix == "masked":
        x = x.masked_fill(torch.rand(shape) < 0.6, float("-inf"))
        x.view(-1)[: shape[-1]] = float("-inf")
    x = x.to(torch.bfloat16)
    got, expected = atm.amax(x, dim), x.amax(dim)
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))  # the same bits (-0.0 stays -0.0)
    strided = x.transpose(0, -1)  # any strides: the int16 view reinterprets in place
    assert torch.equal(atm.amax(strided, 0), strided.amax(0))
