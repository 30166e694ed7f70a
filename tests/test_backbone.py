"""The backbone taps: pre-ReLU layer outputs, unit features, real offline weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetmm.backbone import LITE0, Backbone, WeightsUnavailable, create_network


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
