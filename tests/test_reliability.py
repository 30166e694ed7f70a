"""Inputs that used to be scored silently wrong: images, masks, tensors (issue: reliability)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hetmm
from hetmm.cli import main
from hetmm.data import ImageError, MVTecCategory, read_image, read_mask
from hetmm.evaluation import evaluate_category

EXIF_ORIENTATION = 0x0112


def _ramp(height=32, width=40):  # images hetmm reads have sides of 32 px or more (hetmm.data.MIN_SIDE)
    """A horizontal ramp 0..1 (left dark, right bright), float64 ``[H, W]``."""
    return np.tile(np.linspace(0, 1, width), (height, 1))


# ---------------------------------------------------------------- images
def test_a_16_bit_png_is_read_at_its_full_range(tmp_path):
    values = (_ramp() * 65535).round().astype(np.uint16)
    path = tmp_path / "wide.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # what Pillow makes of a 16-bit grey PNG
    image = read_image(path, 32)
    assert image.shape == (3, 32, 32)
    eight_bit = tmp_path / "narrow.png"
    Image.fromarray((_ramp() * 255).round().astype(np.uint8)).save(eight_bit)
    # the same picture in 8 bits: equal to 8-bit rounding (convert("RGB") made the 16-bit one all white)
    assert torch.allclose(image, read_image(eight_bit, 32), atol=2 / 255)
    assert image.mean() < 0.6


def test_palette_images_are_read_in_their_colours(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, 16:] = (200, 30, 60)
    path = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(path)
    image = read_image(path, 32)
    assert torch.allclose(image[:, :, 24], torch.tensor([200, 30, 60]).float()[:, None] / 255, atol=1 / 255)
    assert image[:, :, :16].max() < 1 / 255


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.fromarray((_ramp(32, 32) * 255).round().astype(np.uint8)).convert("RGB")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(path, exif=exif, quality=100)
    image = read_image(path, 32)[0]
    # displayed upright the ramp runs top (dark) to bottom (bright), not left to right
    assert image[:4].mean() < 0.2 and image[-4:].mean() > 0.8
    assert abs(image[:, :4].mean() - image[:, -4:].mean()) < 0.1


def test_float_images_outside_the_unit_range_are_an_error(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray((_ramp() * 255).astype(np.float32), mode="F").save(path)
    with pytest.raises(ImageError, match=r"float.tif.*must lie in \[0, 1\]"):
        read_image(path, 16)


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("defect_value", [1, 255, 128, 7])
def test_any_non_zero_mask_pixel_is_defect(tmp_path, defect_value):
    values = np.zeros((16, 16), np.uint8)
    values[4:8, 4:12] = defect_value
    path = tmp_path / "mask.png"
    Image.fromarray(values).save(path)
    mask = read_mask(path, 16)
    assert mask.sum() == 32 and mask[4:8, 4:12].all()


def test_palette_masks_are_read_by_index(tmp_path):
    values = np.zeros((16, 16), np.uint8)
    values[2:6, 2:6] = 1
    img = Image.fromarray(values, mode="P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)  # index 0 white, index 1 black
    path = tmp_path / "mask.png"
    img.save(path)
    mask = read_mask(path, 16)
    assert mask.sum() == 16 and mask[2:6, 2:6].all()


def _layout(root, with_mask: bool):
    category = root / "part"
    rng = np.random.default_rng(0)
    for folder, count in (("train/good", 3), ("test/good", 2), ("test/hole", 2)):
        (category / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(category / folder / f"{i:03d}.png")
    (category / "ground_truth/hole").mkdir(parents=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:16, 8:16] = 255
    Image.fromarray(mask).save(category / "ground_truth/hole/000_mask.png")
    if with_mask:
        Image.fromarray(mask).save(category / "ground_truth/hole/001_mask.png")
    return MVTecCategory(root, "part")


def test_a_defect_image_without_its_mask_is_an_error_naming_it(tmp_path):
    data = _layout(tmp_path, with_mask=False)
    with pytest.raises(ImageError, match=r"1 defect image\(s\) have no mask .*001_mask.png"):
        data.load_masks(data.test, 32)
    detector = hetmm.HETMM(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32")
    with pytest.raises(ImageError, match="001_mask.png"):
        evaluate_category(detector, data)
    assert detector.bank is None  # found before the fit


def test_missing_masks_can_be_allowed_and_leave_the_pixel_metrics(tmp_path):
    data = _layout(tmp_path, with_mask=False)
    detector = hetmm.HETMM(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32")
    metrics = evaluate_category(detector, data, allow_missing_masks=True)
    assert metrics["masks_missing"] == 1 and metrics["test_images"] == 4
    assert 0 <= metrics["pixel_auroc"] <= 1


def test_the_cli_refuses_missing_masks_before_fitting(tmp_path, capsys):
    _layout(tmp_path, with_mask=False)
    status = main(["evaluate", "--data", str(tmp_path), "--category", "part", "--backbone", "resnet18",
                   "--weights", "none", "--image-size", "32"])
    assert status == 2
    assert "001_mask.png" in capsys.readouterr().err


# ---------------------------------------------------------------- tensors
@pytest.fixture(scope="module")
def fitted():
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return hetmm.HETMM(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32").fit(images)


@pytest.mark.parametrize("images,message", [
    (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), r"floats in \[0, 1\]; got torch.uint8 \(divide"),
    (torch.rand(2, 3, 32, 32) * 255, r"got values from .* to .*look like 0..255"),
    (torch.rand(2, 3, 32, 32) - 0.5, r"floats in \[0, 1\]; got values from -0\.\d+ to 0\.\d+$"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN or inf"),
    ([torch.rand(3, 32, 32), torch.rand(3, 32, 32) * 255], "look like 0..255"),
])
def test_images_outside_the_unit_range_are_an_error(fitted, images, message):
    with pytest.raises((TypeError, ValueError), match=message):
        fitted.predict(images)
    with pytest.raises((TypeError, ValueError), match=message):
        fitted.extract(images)


def test_images_in_the_unit_range_still_score(fitted):
    result = fitted.predict(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(result.pred_score).all()


# ---------------------------------------------------------------- banks
def _saved_bank(tmp_path, fitted, name="bank.safetensors"):
    return fitted.save(tmp_path / name)


def _rewrite(path, edit_tensors=None, edit_metadata=None, keep_checksum=True):
    """Rewrite a bank file with edited tensors/metadata (an attacker or a broken tool would)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {n: f.get_tensor(n) for n in f.keys()}
    if edit_tensors:
        tensors = edit_tensors(tensors)
        if not keep_checksum:
            metadata.pop("checksum")
    if edit_metadata:
        metadata = edit_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _config_edit(**changes):
    import json

    def edit(metadata):
        config = json.loads(metadata["config"])
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        metadata["config"] = json.dumps(config)
        return metadata
    return edit


@pytest.mark.parametrize("edit,message", [
    (lambda t: {k: v * 1e30 for k, v in t.items()}, "L2-normalised features; norms run"),
    (lambda t: {k: (v * 1000).to(torch.int32) for k, v in t.items()}, "must be floating"),
    (lambda t: {k: torch.zeros_like(v) for k, v in t.items()}, "L2-normalised"),
    (lambda t: {k: v.masked_fill(v > 0.2, float("nan")) if v.is_floating_point() else v for k, v in t.items()},
     "NaN or inf"),  # the features (an integer extra, such as a coreset's indices, holds no NaN)
    (lambda t: {k: v for k, v in t.items() if k != "layer2"}, r"parameters use .*layer2.* the file holds"),
])
def test_banks_with_bad_features_are_refused_on_load(tmp_path, fitted, edit, message):
    path = _rewrite(_saved_bank(tmp_path, fitted), edit, keep_checksum=False)
    with pytest.raises(hetmm.BankInvalid, match=message):
        hetmm.HETMM.load(path, weights=None)


def test_edited_tensors_fail_the_checksum(tmp_path, fitted):
    path = _rewrite(_saved_bank(tmp_path, fitted), lambda t: {k: v.flip(0) for k, v in t.items()})
    with pytest.raises(hetmm.BankInvalid, match="do not match the checksum"):
        hetmm.HETMM.load(path, weights=None)


@pytest.mark.parametrize("edit,message", [
    (lambda m: {**m, "config": "{not json"}, "not JSON"),
    (lambda m: {k: v for k, v in m.items() if k != "config"}, "missing or not JSON"),
    (_config_edit(backbone=None), "'backbone' must be a str"),
    (_config_edit(image_size=10 ** 6), "image_size must be a whole number from 16 to 4096"),
    (_config_edit(out_size=0), "out_size must be a whole number from 16 to 4096"),
    (_config_edit(params="L4:5x3_a=0.5_l=1"), "the layers are L1 to L3"),
    (_config_edit(params="L1:5x3_a=nan_l=1"), "alpha"),
    (_config_edit(layers=["layer9"]), "layers must be among"),
    (_config_edit(retrieval_k=4), "asks for retrieval"),
])
def test_banks_with_bad_configurations_are_refused_on_load(tmp_path, fitted, edit, message):
    path = _rewrite(_saved_bank(tmp_path, fitted), edit_metadata=edit)
    with pytest.raises(hetmm.BankInvalid, match=message):
        hetmm.HETMM.load(path, weights=None)


def test_the_cli_reports_a_bad_bank_in_one_line(tmp_path, fitted, capsys):
    path = _rewrite(_saved_bank(tmp_path, fitted), edit_metadata=_config_edit(image_size=10 ** 6))
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    assert main(["predict", "--bank", str(path), "--weights", "none", str(image), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "image_size must be a whole number" in err and "Traceback" not in err


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=100000), "image_size must be from 16 to 4096"),
    (dict(out_size=0), "out_size must be from 16 to 4096"),
])
def test_sizes_are_bounded(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hetmm.HETMM(backbone="resnet18", weights=None, **kwargs)


def test_loading_while_another_process_replaces_the_bank_gives_one_of_the_two(tmp_path, fitted):
    import subprocess
    import sys

    other = hetmm.HETMM(backbone="resnet18", weights=None, image_size=32, out_size=32, precision="fp32").fit(
        torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(9)))
    banks = [fitted.bank, other.bank]
    sources = [b.save(tmp_path / f"{name}.safetensors") for b, name in zip(banks, "ab")]
    live = tmp_path / "live.safetensors"
    banks[0].save(live)
    # another process swaps the two files in, atomically, as fast as it can (as TemplateBank.save does)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, shutil, sys\n"
        "a, b, live = sys.argv[1:]\n"
        "while True:\n"
        "    for src in (a, b):\n"
        "        shutil.copyfile(src, live + '.tmp')\n"
        "        os.replace(live + '.tmp', live)\n"), str(sources[0]), str(sources[1]), str(live)])
    try:
        seen = set()
        for _ in range(80):
            loaded = hetmm.TemplateBank.load(live)
            match = [i for i, b in enumerate(banks) if len(loaded) == len(b) and
                     all(torch.equal(loaded.features[k], b.features[k]) for k in b.features)]
            assert len(match) == 1
            seen.add(match[0])
    finally:
        writer.kill()
        writer.wait()


def test_a_hub_backbone_named_by_a_bank_is_not_fetched_without_download(tmp_path, fitted):
    import time

    from hetmm.backbone import WeightsUnavailable

    path = _rewrite(_saved_bank(tmp_path, fitted), edit_metadata=_config_edit(backbone="hf-hub:someone/model"))
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailable, match="fetched only with download=True"):
        hetmm.HETMM.load(path, weights=None)
    assert time.perf_counter() - start < 10  # no network retries


# ---------------------------------------------------------------- outputs
@pytest.fixture(scope="module")
def bank_file(tmp_path_factory, fitted):
    return fitted.save(tmp_path_factory.mktemp("bank") / "bank.safetensors")


def _image(folder, name="x.png"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    return path


def test_a_very_long_image_name_gets_a_short_heat_map_name(tmp_path, bank_file):
    image = _image(tmp_path / "in", "a" * 240 + ".png")
    assert main(["predict", "--bank", str(bank_file), str(image), "--out", str(tmp_path / "out")]) == 0
    heat = json.loads((tmp_path / "out" / "scores.json").read_text())[0]["heatmap"]
    assert Path(heat).is_file() and len(Path(heat).name.encode()) < 128


def test_predict_refuses_to_write_into_its_input_folder(tmp_path, bank_file, capsys):
    image = _image(tmp_path / "in")
    assert main(["predict", "--bank", str(bank_file), str(tmp_path / "in"), "--out", str(tmp_path / "in")]) == 2
    assert "holds input images" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [image.name]


def test_outputs_are_not_written_through_symlinks(tmp_path, bank_file, capsys):
    image = _image(tmp_path / "in")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.csv").symlink_to(victim)
    assert main(["predict", "--bank", str(bank_file), str(image), "--out", str(tmp_path / "out")]) == 2
    assert "symlink" in capsys.readouterr().err
    assert victim.read_text() == "keep me"


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(tmp_path, bank_file, monkeypatch):
    _image(tmp_path / "in", "=HYPERLINK(1).png")
    monkeypatch.chdir(tmp_path / "in")
    assert main(["predict", "--bank", str(bank_file), "=HYPERLINK(1).png", "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "scores.csv").open()))
    assert rows[0]["image"] == "'=HYPERLINK(1).png"  # shown as text, never run
    assert json.loads((tmp_path / "out" / "scores.json").read_text())[0]["image"] == "=HYPERLINK(1).png"


def test_fit_refuses_to_overwrite_an_input_image(tmp_path, capsys):
    image = _image(tmp_path / "good")
    assert main(["fit", "--good", str(tmp_path / "good"), "--out", str(image), "--backbone", "resnet18",
                 "--weights", "none", "--image-size", "32"]) == 2
    assert "one of the input images" in capsys.readouterr().err


def test_saved_banks_follow_the_umask_and_stale_temporaries_are_removed(tmp_path, fitted):
    import os
    import subprocess
    import sys

    # a temporary left by a writer that was killed (its pid no longer exists)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".bank.safetensors.{int(dead.stdout)}.abc.tmp"
    stale.write_bytes(b"x" * 100)
    previous = os.umask(0o027)
    try:
        path = fitted.save(tmp_path / "bank.safetensors")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o640
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.safetensors"]


def test_a_bank_whose_maps_do_not_fit_its_image_size_is_refused(tmp_path, fitted):
    path = _rewrite(_saved_bank(tmp_path, fitted), edit_metadata=_config_edit(image_size=64))
    with pytest.raises(hetmm.BankInvalid, match=r"layer1 is 8x8, but 64 px images give 16x16 at stride 4"):
        hetmm.HETMM.load(path, weights=None)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    image = _image(tmp_path / "in")
    with pytest.raises(FileNotFoundError, match="no file at"):
        main(["--debug", "predict", "--bank", str(tmp_path / "none.safetensors"), str(image), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("args,message", [
    (["--image-size", "100000"], "image_size must be from 16 to 4096"),
    (["--out-size", "0"], "out_size must be from 16 to 4096"),
    (["--params", "L4:5x3_a=0.5_l=1"], "the layers are L1 to L3"),
    (["--precision", "fp16", "--device", "cpu"], "no fast CPU kernels"),
])
def test_fit_option_errors_are_one_line_before_any_work(tmp_path, capsys, args, message):
    _image(tmp_path / "good")
    assert main(["fit", "--good", str(tmp_path / "good"), "--out", str(tmp_path / "b.safetensors"),
                 "--backbone", "resnet18", "--weights", "none", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.safetensors").exists()
