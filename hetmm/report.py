"""Pictures of the results: heat-map overlays and static HTML pages (no server; they open from disk).

``write_gallery``: ``predict --out DIR`` writes ``DIR/index.html``, every image with its overlay, the
contours of its predicted regions, verdict and scores, highest score first; with ``--explain``, each region of a
flagged image beside the place of its nearest template (``explanation_png``). ``write_evaluation``:
``evaluate --report DIR`` writes ``DIR/index.html`` with the per-category table, ROC and PRO curves,
the normal and anomalous image-score histograms with the thresholds marked, and the worst false
positives and false negatives with their overlays.
"""

from __future__ import annotations

import html
import io
import os
from pathlib import Path

import numpy as np
import torch

from .data import read_image

WORST = 4  # false positives / negatives shown per category
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 12px 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 260px; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
.card img { width: 256px; height: 256px; object-fit: contain; display: block; }
.anomalous { border-color: #d22; } .normal { border-color: #2a2; }
.verdict { font-weight: bold; } .anomalous .verdict { color: #d22; } .normal .verdict { color: #2a2; }
.name { overflow-wrap: anywhere; font-size: 12px; color: #555; }
.plots img { width: 360px; margin-right: 8px; }
.card .why { font-size: 12px; margin-top: 6px; } .card .why img { width: auto; height: 64px; }
"""


class OutputError(ValueError):
    """An output file that cannot be written (or would be written through a symlink)."""


def write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` without following a symlink there (an output never lands elsewhere)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error.strerror}"
                          + (" (a symlink: outputs are not written through links)" if path.is_symlink() else ""))
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def overlay_png(image_path, anomaly: torch.Tensor, size: int, top: float, mask: torch.Tensor | None = None) -> bytes:
    """The image as it was scored, yellow to red where the score is high (``top``: the colour scale's
    maximum), the contour of ``mask`` (predicted regions) in cyan; PNG bytes."""
    from PIL import Image
    from scipy import ndimage

    base = read_image(image_path, size).permute(1, 2, 0).numpy()  # as scored: EXIF, 16-bit, palette
    if anomaly.shape != base.shape[:2]:
        anomaly = torch.nn.functional.interpolate(anomaly[None, None].float(), size=base.shape[:2], mode="bilinear",
                                                  align_corners=False)[0, 0]
    heat = np.clip(anomaly.numpy() / max(top, 1e-12), 0, 1)[..., None]
    colour = np.concatenate([np.ones_like(heat), 1 - heat, np.zeros_like(heat)], axis=2)
    alpha = 0.75 * heat**2
    blend = (1 - alpha) * base + alpha * colour
    if mask is not None and mask.any():
        region = mask.numpy() if mask.shape == base.shape[:2] else np.asarray(
            Image.fromarray(mask.numpy()).resize(base.shape[1::-1], Image.NEAREST))
        edge = region & ~ndimage.binary_erosion(region, iterations=2)
        blend[edge] = (0.0, 1.0, 1.0)
    encoded = io.BytesIO()
    Image.fromarray((blend * 255).round().astype(np.uint8)).save(encoded, format="PNG")
    return encoded.getvalue()


def _crop(image, box, side: int, height: int = 128):
    """The part of the PIL ``image`` that ``box`` (in a ``side x side`` map of it) covers, at ``height`` px high."""
    x0, y0, x1, y1 = box
    scale_x, scale_y = image.width / side, image.height / side
    part = image.crop((int(x0 * scale_x), int(y0 * scale_y), max(int(x0 * scale_x) + 1, round(x1 * scale_x)),
                       max(int(y0 * scale_y) + 1, round(y1 * scale_y))))
    return part.resize((max(1, round(part.width * height / part.height)), height))


def explanation_png(image_path, region: dict, side: int, thumbnail: torch.Tensor | None) -> bytes:
    """The region cropped from the image at full resolution (left) beside the place of its nearest template
    (right): from the template's file while it is at its recorded path, else from the bank's thumbnail (grey
    when there is neither); PNG bytes."""
    from PIL import Image, ImageOps

    def crop_file(path, box):
        with Image.open(path) as img:
            return _crop(ImageOps.exif_transpose(img).convert("RGB"), box, side)

    near = region["nearest"]
    query = crop_file(image_path, region["box"])
    source = near.get("source")
    if source and Path(source).is_file():
        template = crop_file(source, near["box"])
    elif thumbnail is not None:
        template = _crop(Image.fromarray(thumbnail.permute(1, 2, 0).numpy()), near["box"], side)
    else:
        template = Image.new("RGB", query.size, (128, 128, 128))
    pair = Image.new("RGB", (query.width + 8 + template.width, query.height), (255, 255, 255))
    pair.paste(query, (0, 0))
    pair.paste(template, (query.width + 8, 0))
    encoded = io.BytesIO()
    pair.save(encoded, format="PNG")
    return encoded.getvalue()


def _page(title: str, body: str) -> bytes:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n").encode()


def _card(image: str, picture: str, score: float, verdict: str | None, extra: str = "", why: str = "") -> str:
    state = {None: "", True: "anomalous", False: "normal"}[verdict if verdict is None else bool(verdict)]
    label = "" if verdict is None else f"<div class=\"verdict\">{state}</div>"
    return (f"<div class=\"card {state}\"><img src=\"{html.escape(picture)}\" alt=\"{html.escape(image)}\">"
            f"{label}<div>score {score:.4f}{extra}</div><div class=\"name\">{html.escape(image)}</div>{why}</div>")


def _why(row: dict) -> str:
    """Each explained region: its picture (the region beside its nearest template's place) and caption."""
    parts = []
    for region, picture in zip(row.get("regions", []), row.get("explanations", [])):
        near = region["nearest"]
        name = Path(near["source"]).name if near.get("source") else "no file recorded"
        parts.append(f"<div class=\"why\"><img src=\"{html.escape(picture)}\" alt=\"region and its nearest template\">"
                     f"nearest normal: template {near['template']} ({html.escape(name)}), similarity "
                     f"{near['similarity']:.3f}</div>")
    return "".join(parts)


def write_gallery(out: Path, rows: list[dict], thresholds: dict | None = None) -> Path:
    """``out/index.html``: the rows of ``predict`` (image, score, heatmap file in ``out``; normalised,
    anomalous, regions when the detector decided), highest score first."""
    cards = []
    for row in sorted(rows, key=lambda r: -r["score"]):
        extra = ""
        if "normalised" in row:
            extra += f" &middot; normalised {row['normalised']:.3f}"
        if "regions" in row:
            extra += f" &middot; {len(row['regions'])} region{'s' if len(row['regions']) != 1 else ''}"
        cards.append(_card(row["image"], Path(row["heatmap"]).name, row["score"], row.get("anomalous"), extra,
                           _why(row)))
    flagged = sum(bool(r.get("anomalous")) for r in rows)
    summary = f"<p>{len(rows)} images" + (f", {flagged} anomalous" if any("anomalous" in r for r in rows) else "")
    if thresholds:
        summary += " &middot; " + ", ".join(f"{html.escape(k)} {v:.4g}" for k, v in thresholds.items())
    note = (" Beneath a flagged image: each region (left) beside the place of the normal template that matched it"
            " best (right).") if any(r.get("explanations") for r in rows) else ""
    body = (summary + f". Contours: predicted defect regions.{note}</p>\n<div class=\"cards\">\n" + "\n".join(cards)
            + "\n</div>")
    path = out / "index.html"
    write_new(path, _page("hetmm predict", body))
    return path


def _figure_png(draw) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 3.4), dpi=100)
    draw(axes)
    figure.tight_layout()
    encoded = io.BytesIO()
    figure.savefig(encoded, format="png")
    plt.close(figure)
    return encoded.getvalue()


def _plots(out: Path, name: str, labels: np.ndarray, scores: np.ndarray, masks: torch.Tensor | None,
           maps: torch.Tensor, thresholds: dict) -> list[str]:
    from sklearn.metrics import roc_curve

    from .metrics import pro_curve

    files = []

    def roc(axes):
        fpr, tpr, _ = roc_curve(labels, scores)
        axes.plot(fpr, tpr)
        axes.plot([0, 1], [0, 1], ":", color="grey")
        axes.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{name}: image ROC")

    def pro(axes):
        fpr, overlap = pro_curve(masks, maps)
        keep = fpr <= 0.3
        axes.plot(fpr[keep], overlap[keep])
        axes.set(xlabel="pixel false positive rate", ylabel="per-region overlap", title=f"{name}: PRO to FPR 0.3")

    def histogram(axes):
        bins = np.linspace(scores.min(), scores.max(), 25) if scores.max() > scores.min() else 1
        axes.hist(scores[labels == 0], bins=bins, alpha=0.6, label="normal")
        axes.hist(scores[labels == 1], bins=bins, alpha=0.6, label="anomalous")
        for (label, value), style in zip(thresholds.items(), ("-", "--")):
            axes.axvline(value, color="black", linestyle=style, label=label)
        axes.set(xlabel="image score", ylabel="images", title=f"{name}: image scores")
        axes.legend(fontsize=8)

    draws = [("roc", roc)] if 0 < labels.sum() < len(labels) else []
    draws += [("pro", pro)] if masks is not None and masks.any() else []
    draws += [("scores", histogram)]
    for kind, draw in draws:
        file = f"{name}_{kind}.png"
        write_new(out / file, _figure_png(draw))
        files.append(file)
    return files


def _metrics_table(rows: list[dict]) -> str:
    columns = [("category", "category", "{}"), ("image AUROC", "image_auroc", "{:.3f}"),
               ("pixel AUROC", "pixel_auroc", "{:.3f}"), ("PRO", "pro", "{:.3f}"),
               ("image threshold", "image_threshold", "{:.4g}"), ("normal flagged", "normal_flagged", "{:.1%}"),
               ("defects found", "defects_found", "{:.1%}"), ("F1 threshold", "image_f1_threshold", "{:.4g}"),
               ("best F1", "image_f1", "{:.3f}"), ("images/s", "images_per_second", "{:.1f}")]
    head = "".join(f"<th>{title}</th>" for title, _, _ in columns)
    lines = []
    for row in rows:
        cells = "".join(f"<td>{html.escape(fmt.format(row[key])) if row.get(key) is not None else '-'}</td>"
                        for _, key, fmt in columns)
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(lines) + "</table>"


def write_evaluation(out: Path, categories: list[dict]) -> Path:
    """``out/index.html`` for ``evaluate --report``. Each category: ``metrics`` (evaluate_category's row),
    ``samples``, ``result`` (its Prediction), ``masks`` and ``out_size``."""
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for item in categories:
        metrics, samples, result, masks = item["metrics"], item["samples"], item["result"], item["masks"]
        name = metrics["category"]
        labels = np.array([s.label for s in samples])
        scores = result.pred_score.float().numpy()
        thresholds = {k: metrics[key] for k, key in (("calibrated threshold", "image_threshold"),
                                                     ("F1-optimal threshold", "image_f1_threshold"))
                      if metrics.get(key) is not None}
        plots = _plots(out, name, labels, scores, masks, result.pro_map, thresholds)
        top = float(result.anomaly_map.max())
        worst = []
        for kind, title, pool, reverse in (("fp", "worst false positives (normal images, highest scores)", 0, True),
                                           ("fn", "worst false negatives (defective images, lowest scores)", 1, False)):
            chosen = sorted((i for i in range(len(samples)) if labels[i] == pool), key=lambda i: scores[i],
                            reverse=reverse)[:WORST]
            cards = []
            for i in chosen:
                file = f"{name}_{kind}_{len(cards)}.png"
                mask = None if result.pred_mask is None else result.pred_mask[i]
                write_new(out / file, overlay_png(samples[i].path, result.anomaly_map[i], item["out_size"], top, mask))
                verdict = None if result.pred_label is None else bool(result.pred_label[i])
                cards.append(_card(f"{samples[i].defect}/{Path(samples[i].path).name}", file, float(scores[i]), verdict))
            if cards:
                worst.append(f"<h3>{html.escape(title)}</h3><div class=\"cards\">{''.join(cards)}</div>")
        images = "".join(f"<img src=\"{html.escape(p)}\" alt=\"{html.escape(p)}\">" for p in plots)
        sections.append(f"<h2>{html.escape(name)}</h2><div class=\"plots\">{images}</div>{''.join(worst)}")
    body = _metrics_table([c["metrics"] for c in categories]) + "\n" + "\n".join(sections)
    path = out / "index.html"
    write_new(path, _page("hetmm evaluate", body))
    return path
