"""The command line, end to end, on generated MVTec-layout data."""

from __future__ import annotations

import json
import re

from PIL import Image

from hetmm.cli import main
from hetmm.demo import build_dataset

SMALL = ["--backbone", "resnet18", "--weights", "random", "--image-size", "64", "--out-size", "64"]


def test_ops_demo_finds_the_defect(capsys):
    assert main(["ops-demo", "--size", "16", "--channels", "16", "--templates", "4"]) == 0
    out = capsys.readouterr().out
    assert "torch backend vs reference" in out
    line = next(l for l in out.splitlines() if l.startswith("anomaly score"))
    defect = float(line.split("defect ")[1].split(",")[0])
    elsewhere = float(line.split("elsewhere ")[1])
    assert defect > 2 * elsewhere


def test_fit_predict_evaluate(tmp_path, capsys):
    root = build_dataset(tmp_path / "data", n_train=3, n_good=2, n_defective=2)
    bank = tmp_path / "bank.safetensors"
    assert main(["fit", "--data", str(root), "--category", "gravel", "--out", str(bank), *SMALL]) == 0
    assert bank.is_file()
    images = sorted((root / "gravel" / "test").rglob("*.png"))
    out = tmp_path / "out"
    assert main(["predict", "--bank", str(bank), *map(str, images), "--out", str(out), "--threshold", "0.5"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores) == len(images) and all("anomalous" in row for row in scores)
    assert (out / "scores.csv").read_text().count("\n") == len(images) + 1
    assert len(list(out.glob("*_heatmap.png"))) == len(images)
    capsys.readouterr()
    assert main(["evaluate", "--data", str(root), "--category", "gravel", "brick", *SMALL,
                 "--json", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    assert "image AUROC" in table and "gravel" in table and "brick" in table
    assert {row["category"] for row in json.loads((tmp_path / "m.json").read_text())} == {"gravel", "brick"}


def test_clear_errors(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    out = str(tmp_path / "out")
    assert main(["predict", "--bank", str(tmp_path / "none.safetensors"), str(image), "--out", out]) == 2
    assert "no file at" in capsys.readouterr().err
    # checked before the bank is read
    assert main(["predict", "--bank", str(tmp_path / "none.safetensors"), "y.png", "--out", out]) == 2
    assert "no such image file" in capsys.readouterr().err
    assert main(["fit", "--data", str(tmp_path), "--category", "c", "--out", str(tmp_path / "b"), *SMALL]) == 2
    assert "MVTec AD layout" in capsys.readouterr().err
    assert main(["demo", "--backbone", "wide_resnet50_2.tv_in1k"]) == 2
    assert "no ImageNet weights" in capsys.readouterr().err


def test_demo_prints_metrics(capsys):
    assert main(["demo", "--image-size", "128", "--out-size", "128"]) == 0
    out = capsys.readouterr().out
    for texture in ("brick", "grass", "gravel"):
        assert texture in out
    assert "pixel AUROC" in out


def test_evaluate_with_pts_and_with_retrieval(tmp_path, capsys):
    root = build_dataset(tmp_path / "data", n_train=5, n_good=2, n_defective=2)
    for extra in (["--templates", "pts", "--tsize", "3"], ["--retrieval-k", "2"]):
        assert main(["evaluate", "--data", str(root), "--category", "grass", *SMALL, *extra]) == 0
        out = capsys.readouterr().out
        assert "grass" in out
        templates = int(next(l for l in out.splitlines() if l.startswith("grass")).split()[1])
        assert templates == (3 if "pts" in extra else 5)


def test_fit_on_a_plain_folder_and_predict_a_folder(tmp_path, capsys):
    root = build_dataset(tmp_path / "data", n_train=3, n_good=1, n_defective=1)
    bank = tmp_path / "bank.safetensors"
    assert main(["fit", "--good", str(root / "brick" / "train" / "good"), "--out", str(bank), *SMALL]) == 0
    out = tmp_path / "out"
    assert main(["predict", "--bank", str(bank), str(root / "brick" / "test" / "good"), "--out", str(out)]) == 0
    assert len(json.loads((out / "scores.json").read_text())) == 1
    assert main(["fit", "--good", str(tmp_path / "empty"), "--out", str(bank), *SMALL]) == 2
    assert "no images in" in capsys.readouterr().err


def test_predict_names_a_folder_without_images(tmp_path, capsys):
    (tmp_path / "test" / "good").mkdir(parents=True)
    assert main(["predict", "--bank", str(tmp_path / "missing.safetensors"), str(tmp_path / "test"),
                 "--out", str(tmp_path / "out")]) == 2
    assert re.search("no images directly inside .*test .*subfolders are not searched", capsys.readouterr().err)
