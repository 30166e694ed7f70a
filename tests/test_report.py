"""The HTML pages of ``predict --out`` and ``evaluate --report``, opened in a real browser.

Headless Chromium (Debian package ``chromium``; ``.ci/run`` installs it and sets HETMM_REQUIRE_BROWSER,
so CI fails rather than skips without it) loads each page inside a checking page that lists the images
that did not load and counts the tables; console errors of the page are read from Chromium's log. The
screenshots are kept in HETMM_ARTEFACTS (default: a temporary folder, printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from hetmm.cli import main
from hetmm.demo import build_dataset
from hetmm.report import overlay_png, write_gallery

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
ARTEFACTS = Path(os.environ.get("HETMM_ARTEFACTS") or tempfile.mkdtemp(prefix="hetmm-screenshots-"))
CHECKER = """<!DOCTYPE html><html><body><iframe id="page" src="%s" width="1400" height="1000" onload="check()"></iframe>
<pre id="result">not loaded</pre><script>
function check() {
  const page = document.getElementById("page").contentDocument;
  const images = [...page.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  document.getElementById("result").textContent = JSON.stringify(
    {images: images.length, broken: broken, tables: page.querySelectorAll("table").length,
     cards: page.querySelectorAll(".card").length});
}
</script></body></html>"""

needs_browser = pytest.mark.skipif(
    BROWSER is None and not os.environ.get("HETMM_REQUIRE_BROWSER"),
    reason="no chromium here (CI installs it and requires it)")


def open_in_browser(page: Path, name: str) -> dict:
    """What Chromium saw: images, broken images, tables, cards, console errors; and a screenshot."""
    assert BROWSER is not None, "HETMM_REQUIRE_BROWSER is set but chromium is not installed"
    checker = page.parent / f".check_{page.stem}.html"
    checker.write_text(CHECKER % page.name, encoding="utf-8")
    flags = [BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--virtual-time-budget=10000", "--enable-logging=stderr", "--v=0"]
    try:
        run = subprocess.run([*flags, "--dump-dom", checker.as_uri()], capture_output=True, text=True, timeout=120)
    finally:
        checker.unlink()
    found = re.search(r'<pre id="result">(.*?)</pre>', run.stdout, re.S)
    assert found, f"the checking page did not run: {run.stdout[-500:]} {run.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    seen["console"] = [line for line in run.stderr.splitlines() if ":CONSOLE" in line and page.name in line]
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    subprocess.run([*flags, f"--screenshot={ARTEFACTS / (name + '.png')}", "--window-size=1400,1800", page.as_uri()],
                   capture_output=True, timeout=120)
    print(f"screenshot: {ARTEFACTS / (name + '.png')}")
    return seen


@needs_browser
def test_the_browser_check_catches_a_broken_page(tmp_path):
    page = tmp_path / "index.html"
    page.write_text('<html><body><table></table><img src="missing.png"><script>console.error("boom")</script>'
                    "</body></html>", encoding="utf-8")
    seen = open_in_browser(page, "broken")
    assert seen["broken"] == ["missing.png"] and seen["tables"] == 1
    assert any("boom" in line for line in seen["console"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("demo"), n_train=6, n_good=3, n_defective=3)


@needs_browser
def test_the_evaluation_report_renders(demo, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["evaluate", "--data", str(demo), "--category", "brick", "grass", "--backbone", "tf_efficientnet_lite0",
                 "--image-size", "128", "--out-size", "128", "--report", str(report)]) == 0
    assert "report:" in capsys.readouterr().out
    seen = open_in_browser(report / "index.html", "evaluate-report")
    # per category: ROC, PRO and score plots, 3 worst false positives and 3 worst false negatives
    assert seen == dict(images=2 * (3 + 3 + 3), broken=[], tables=1, cards=2 * 6, console=[])


@needs_browser
def test_the_predict_gallery_renders(demo, tmp_path):
    bank, out = tmp_path / "bank.safetensors", tmp_path / "out"
    assert main(["fit", "--data", str(demo), "--category", "brick", "--backbone", "tf_efficientnet_lite0",
                 "--image-size", "128", "--out-size", "128", "--out", str(bank)]) == 0
    assert main(["predict", "--bank", str(bank), str(demo / "brick" / "test" / "good"),
                 str(demo / "brick" / "test" / "blob"), "--out", str(out), "--fpr", "0.2", "--explain"]) == 0
    rows = json.loads((out / "scores.json").read_text())
    explained = [region for row in rows for region in row["regions"] if "nearest" in region]
    assert explained and all(row["anomalous"] or not row["regions"] for row in rows)  # normal: no regions
    assert all(Path(region["nearest"]["source"]).parent == demo / "brick" / "train" / "good" for region in explained)
    assert sum(len(row.get("explanations", [])) for row in rows) == len(explained)
    seen = open_in_browser(out / "index.html", "predict-gallery")
    assert seen == dict(images=4 + len(explained), broken=[], tables=0, cards=4, console=[])
    header = (out / "scores.csv").read_text().splitlines()[0]
    assert header.endswith("regions,nearest_template,nearest_source,nearest_similarity")


def test_the_gallery_is_sorted_by_score_and_escapes_names(tmp_path):
    rows = [dict(image="<b>a&b.png", score=0.1, heatmap=str(tmp_path / "a.png"), anomalous=False, regions=[]),
            dict(image="c.png", score=0.9, heatmap=str(tmp_path / "c.png"), anomalous=True, normalised=0.8,
                 regions=[dict(box=(0, 0, 2, 2), area=4, peak=1.0)])]
    text = write_gallery(tmp_path, rows).read_text(encoding="utf-8")
    assert text.index("c.png") < text.index("a&amp;b.png")
    assert "<b>a" not in text and "&lt;b&gt;a&amp;b.png" in text
    assert "normalised 0.800" in text and "1 region<" in text


def test_overlay_draws_the_contour_of_the_mask(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:24, 8:24] = True
    picture = np.asarray(Image.open(io.BytesIO(overlay_png(tmp_path / "grey.png", torch.zeros(32, 32), 32, 1.0, mask))))
    cyan = (picture == (0, 255, 255)).all(axis=2)
    assert cyan[8, 8:24].all() and cyan[8:24, 8].all()  # the boundary
    assert not cyan[12:20, 12:20].any() and not cyan[:6].any()  # not inside, not outside


def test_the_evaluation_report_with_equal_scores_and_no_defects(tmp_path):
    """Degenerate categories still give a page: every score equal, no defective image (no ROC, no PRO)."""
    from hetmm.data import Sample
    from hetmm.detector import Prediction
    from hetmm.report import write_evaluation

    import numpy as np
    from PIL import Image

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(paths[-1])
    samples = [Sample(p, 0, "good", None) for p in paths]
    result = Prediction(torch.full((3,), 0.5), torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    metrics = dict(category="flat", image_auroc=None, images_per_second=1.0)
    page = write_evaluation(tmp_path / "report", [dict(metrics=metrics, samples=samples, result=result,
                                                       masks=torch.zeros(3, 16, 16, dtype=torch.bool), out_size=16)])
    text = page.read_text(encoding="utf-8")
    assert "flat_scores.png" in text and "flat_roc.png" not in text and "flat_pro.png" not in text
    assert text.count('class="card ') == 3  # three normal images, no defective ones
