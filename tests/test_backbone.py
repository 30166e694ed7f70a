"""The backbone taps: pre-ReLU layer outputs, unit features, real offline weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetmm.backbone import ENGINE_VARIABLE, LITE0, Backbone, WeightsUnavailable, create_network, openvino_available


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_taps_are_the_layers_before_their_final_relu(name, tmp_path):
    # timm zero-initialises each block's last BatchNorm: randomise every weight so residuals matter
    generator = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=generator) * 0.2 + (1.0 if k.endswith("running_var") else 0.0)
             if v.is_floating_point() else v for k, v in create_network(name, weights=None).state_dict().items()}
    state = {k: v.abs() if k.endswith("running_var") else v for k, v in state.items()}
    torch.save(state, tmp_path / "w.pth")
    net = Backbone(name, weights=tmp_path / "w.pth")
    reference = create_network(name, weights=tmp_path / "w.pth").eval()  # untouched activations
    images = torch.rand(2, 3, 64, 64)
    ours = net(images, normalize=False)
    with torch.no_grad():
        x = reference.maxpool(reference.act1(reference.bn1(reference.conv1((images - net._mean) / net._std))))
        for layer in ("layer1", "layer2", "layer3"):
            x = getattr(reference, layer)(x)  # timm's output is after the final ReLU
            assert (ours[layer] < 0).any(), f"{layer} should keep negative (pre-ReLU) values"
            assert torch.allclose(F.relu(ours[layer]), x, rtol=1e-4, atol=1e-4), layer


def test_features_are_unit_length_per_pixel():
    features = Backbone("resnet18", weights=None)(torch.rand(1, 3, 64, 64))
    for layer, f in features.items():
        assert torch.allclose(f.norm(dim=1), torch.ones(1, *f.shape[2:]), atol=1e-5), layer


def test_lite0_stages_and_shapes():
    features = Backbone(LITE0)(torch.rand(1, 3, 256, 256))
    assert {k: tuple(v.shape[1:]) for k, v in features.items()} == {
        "layer1": (24, 64, 64), "layer2": (40, 32, 32), "layer3": (112, 16, 16)}


@pytest.mark.parametrize("photo,classes", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_lite0_weights_are_real_imagenet_weights(photo, classes):
    """skimage's cat photograph is a cat (ImageNet 281-285), its coffee cup an espresso (967)."""
    skimage_data = pytest.importorskip("skimage.data")
    network = create_network(LITE0, "imagenet").eval()
    image = torch.tensor(getattr(skimage_data, photo)()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        top = network((image - 0.5) / 0.5).argmax(-1).item()
    assert top in classes


def test_missing_weights_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # no network request either way
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailable, match="weights=None for random initialisation"):
        Backbone("wide_resnet50_2.tv_in1k", weights="imagenet")


def test_weights_from_the_local_torch_hub_cache(monkeypatch, tmp_path):
    """A user who has the paper's weights cached gets them: found on disk, no download."""
    import os

    from timm.models import get_pretrained_cfg

    from hetmm.backbone import cached_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    source = create_network("resnet18", weights=None)
    target = tmp_path / "checkpoints" / os.path.basename(get_pretrained_cfg("resnet18").url)
    target.parent.mkdir()
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in source.state_dict().items()}, target)
    assert cached_weights("resnet18") == target
    assert torch.equal(create_network("resnet18", "imagenet").conv1.weight, source.conv1.weight + 1)


def test_checkpoint_path_loads_torchvision_style_state_dict(tmp_path):
    source = create_network("resnet18", weights=None)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    loaded = create_network("resnet18", weights=path)
    assert torch.equal(loaded.conv1.weight, state["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        create_network("resnet18", weights=tmp_path / "missing.pth")


def test_bad_images_shape():
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        Backbone("resnet18", weights=None)(torch.rand(1, 1, 32, 32))


# ---------------------------------------------------------------- the OpenVINO-compiled stages
openvino_only = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


def _random_resnet(tmp_path, name="resnet18"):
    """A resnet whose every weight matters (timm zero-initialises each block's last batch norm)."""
    generator = torch.Generator().manual_seed(3)
    state = {k: (torch.randn(v.shape, generator=generator) * 0.2).abs() + 0.5 if k.endswith("running_var") else
             torch.randn(v.shape, generator=generator) * 0.2 if v.is_floating_point() else v
             for k, v in create_network(name, weights=None).state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    return tmp_path / "w.pth"


def _cosines(actual: dict, expected: dict) -> dict:
    """Per layer, the smallest cosine between the same pixel's unit features."""
    return {k: (actual[k].float() * expected[k].float()).sum(1).min().item() for k in expected}


@openvino_only
@pytest.mark.parametrize("name,size,batch", [("resnet18", 64, 3), ("resnet18", 96, 1), (LITE0, 128, 2)])
def test_openvino_features_equal_torch_in_float32(name, size, batch, tmp_path):
    weights = _random_resnet(tmp_path) if name == "resnet18" else "imagenet"
    compiled, torch_path = Backbone(name, weights, engine="openvino"), Backbone(name, weights, engine="torch")
    assert compiled.runs_openvino() and not torch_path.runs_openvino()
    images = torch.rand(batch, 3, size, size)
    ours, reference = compiled(images, normalize=False), torch_path(images, normalize=False)
    assert compiled._openvino is not None and torch_path._openvino is None
    for layer, expected in reference.items():
        got = ours[layer]
        assert got.shape == expected.shape and got.dtype == torch.float32, layer
        assert got.is_contiguous(memory_format=torch.channels_last), layer  # the layout the matching reads
        # float32 convolutions in another order: a few float32 ulps of the layer's largest value
        tol = 1e-5 * expected.abs().max().item()
        assert (got - expected).abs().max().item() <= tol, layer


@openvino_only
@pytest.mark.parametrize("neighbourhood", [1, 3])
def test_openvino_bfloat16_features_are_as_close_to_float32_as_torch_bfloat16(neighbourhood):
    images = torch.rand(2, 3, 128, 128)
    reference = Backbone(LITE0, engine="torch", neighbourhood=neighbourhood)(images)
    results = {}
    for engine in ("openvino", "torch"):
        net = Backbone(LITE0, engine=engine, neighbourhood=neighbourhood).set_precision(torch.bfloat16)
        features = net(images)
        assert all(f.dtype == torch.bfloat16 for f in features.values())
        results[engine] = _cosines(features, reference)
    for layer, cosine in results["openvino"].items():
        # bfloat16 keeps 8 bits: every pixel's feature within a few degrees of float32's, as torch's autocast
        assert cosine >= 0.99 and cosine >= results["torch"][layer] - 0.005, (layer, results)


@openvino_only
def test_openvino_batches_of_any_size_give_each_image_its_own_features():
    net = Backbone("resnet18", weights=None, engine="openvino")
    images = torch.rand(5, 3, 64, 64)
    whole = net(images)
    parts = [net(images[:2]), net(images[2:3]), net(images[3:])]
    for layer in whole:
        assert torch.allclose(torch.cat([p[layer] for p in parts]), whole[layer], atol=1e-5), layer
    # float32 batches run as single images on OpenVINO's throughput streams: one model compiled for one image
    # (streamed), and one for a lone image (latency); other precisions compile per batch size
    assert {(key[0], key[-1]) for key in net._openvino._compiled} == {(1, True), (1, False)}
    net.set_precision(torch.bfloat16)
    halves = [net(images[:2]), net(images[2:])]
    assert {key[0] for key in net._openvino._compiled if key[-2] == "bf16"} == {2, 1}  # in parts of two at most
    for layer in whole:  # bfloat16's rounding of the same features
        cosine = (torch.cat([h[layer] for h in halves]).float() * whole[layer]).sum(1)
        assert cosine.min() > 0.98, layer


@openvino_only
def test_openvino_graph_is_converted_once_per_network_and_size(monkeypatch):
    import openvino as ov

    from hetmm.backbone import OpenVINOStages

    monkeypatch.setattr(OpenVINOStages, "_converted", {})
    calls = []
    convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: calls.append(k["input"]) or convert(*a, **k))
    images = torch.rand(1, 3, 64, 64)
    first, second = Backbone("resnet18", weights=None, engine="openvino"), Backbone("resnet18", weights=None, engine="openvino")
    first(images), second(images), second(torch.rand(2, 3, 64, 64))
    assert len(calls) == 1  # same weights, same size: one conversion for both backbones and both batch sizes
    second(torch.rand(1, 3, 96, 96))
    assert len(calls) == 2
    other = Backbone("resnet18", weights=None, engine="openvino")
    with torch.no_grad():
        other.stem[0].weight.add_(0.1)  # other weights: its own graph, never another network's
    assert not torch.allclose(other(images)["layer1"], first(images)["layer1"])
    assert len(calls) == 3


def test_engine_is_chosen_by_argument_then_environment(monkeypatch):
    monkeypatch.setenv(ENGINE_VARIABLE, "torch")
    assert Backbone("resnet18", weights=None).engine == "torch"
    assert not Backbone("resnet18", weights=None).runs_openvino()
    assert Backbone("resnet18", weights=None, engine="auto").engine == "auto"
    monkeypatch.setenv(ENGINE_VARIABLE, "onnx")
    with pytest.raises(ValueError, match=r"engine must be one of .*got 'onnx' \(from HETMM_BACKBONE_ENGINE\)"):
        Backbone("resnet18", weights=None)
    with pytest.raises(ValueError, match="engine must be one of"):
        Backbone("resnet18", weights=None, engine="tensorrt")
    monkeypatch.delenv(ENGINE_VARIABLE)
    assert Backbone("resnet18", weights=None).engine == "auto"


def test_engine_openvino_without_the_package_says_how_to_install(monkeypatch):
    import hetmm.backbone as backbone_module

    monkeypatch.setattr(backbone_module, "openvino_available", lambda: False)
    with pytest.raises(ImportError, match="pip install openvino"):
        Backbone("resnet18", weights=None, engine="openvino")
    assert not Backbone("resnet18", weights=None, engine="auto").runs_openvino()  # auto falls back to torch


@openvino_only
def test_a_compiled_backbone_copies_and_pickles_without_its_compiled_network():
    import copy
    import pickle

    net = Backbone("resnet18", weights=None, engine="openvino")
    images = torch.rand(1, 3, 64, 64)
    expected = net(images)["layer3"]
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone._openvino is None
        assert torch.allclose(clone(images)["layer3"], expected, atol=1e-6)
