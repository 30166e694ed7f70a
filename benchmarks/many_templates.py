"""Cost and accuracy against the number of training images (40 to 1,000).

    python benchmarks/many_templates.py --data MANY --build --category grass planks tiles --sizes 40 160 320 1000
    python benchmarks/many_templates.py --data MANY --category grass --sizes 40 320 --systems all auto --patchcore
    python benchmarks/many_templates.py --data MANY --category planks --sizes 40 320 --systems auto --draws 6

``--build`` writes the choose set under ``--data`` with ``max(sizes) - 40`` further training crops per named
category (``eval_sets.build_set(..., more_train=)``): the first 40 training images and every test image are
the ones the accuracy protocol uses, so a row at N differs from the row at 40 only in the training images.
For each N and system: fit seconds (from the image files, decoding included, as ``hetmm fit`` reads them),
predict images/s at batch 1 and 8 (the systems at that N interleaved, median per call), image AUROC, pixel
AUROC and PRO, the bank's size on disk and, with ``--memory``, the peak resident memory of a fresh process
that fits and predicts. hetmm systems are ``HETMM`` options by name (``SYSTEMS``); ``--patchcore`` adds
anomalib's PatchCore (coreset 0.1, the same lite0 weights) at every N whose fit its measured growth says
finishes within ``--budget`` seconds, and says where it does not. ``--test-each 60`` builds 60 normal and 60
defective test images a category (one draw of 40 moves image AUROC by 0.01-0.03); ``--draws K`` adds K banks of
40 drawn at random from the first max(N) images: the spread a bank's choice of images gives by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_anomalib import AnomalibSystem, load_category, peak_rss, rates  # noqa: E402
from eval_sets import build_set  # noqa: E402

import torch  # noqa: E402

from hetmm import HETMM, aupro, image_auroc, pixel_auroc  # noqa: E402
from hetmm.backbone import LITE0  # noqa: E402
from hetmm.data import image_files, read_image  # noqa: E402

BASE = 40  # the choose set's own training images
SYSTEMS = {
    "all": dict(templates="all"),
    "auto": dict(templates="auto"),
    "pts": dict(templates="pts", tsize=60),
    "retrieval": dict(templates="all", retrieval_k=40),
}


class HetmmFiles:
    """hetmm fitted from image files, as ``hetmm fit`` does; predicts tensors."""

    def __init__(self, name: str, **options):
        self.name, self.options = name, options

    def fit(self, paths: list) -> None:
        self.detector = HETMM(LITE0, "imagenet", device="cpu", **self.options).fit(paths)

    def predict(self, images: torch.Tensor):
        self.detector.batch_size = max(self.detector.batch_size, images.shape[0])
        result = self.detector.predict(images)
        return result.pred_score, result.anomaly_map, result.pro_map

    def bank_bytes(self) -> int:
        with tempfile.TemporaryDirectory() as folder:
            return self.detector.save(Path(folder) / "bank.safetensors").stat().st_size


class PatchCoreFiles(AnomalibSystem):
    """anomalib's PatchCore, given the same files (decoded here: its API takes tensors)."""

    def fit(self, paths: list) -> None:
        super().fit(torch.stack([read_image(p, 256) for p in paths]))

    def bank_bytes(self) -> int:
        with tempfile.TemporaryDirectory() as folder:
            return self.save(Path(folder)).stat().st_size


def make(name: str):
    """A fresh, unfitted system by name: a key of ``SYSTEMS``, or ``patchcore-0.1``."""
    if name == "patchcore-0.1":
        return PatchCoreFiles(name, "patchcore", coreset=0.1)
    return HetmmFiles(name, **SYSTEMS[name])


def training_files(root: Path, category: str) -> list:
    """The category's training images, the choose set's 40 first (their names sort first)."""
    return sorted(image_files(root / category / "train" / "good"))


def scored(system, test, labels, masks, batch: int = 8) -> dict:
    parts = [system.predict(test[i:i + batch]) for i in range(0, test.shape[0], batch)]
    scores, anomaly, pro = (torch.cat([p[j].float().cpu() for p in parts]) for j in range(3))
    return dict(image_auroc=image_auroc(labels, scores), pixel_auroc=pixel_auroc(masks, anomaly), pro=aupro(masks, pro))


def run(root: Path, category: str, sizes, systems, patchcore: bool, budget: float, memory: bool,
        rounds: int = 2) -> dict:
    _, test, labels, masks = load_category(root, category)
    files = training_files(root, category)
    if len(files) < max(sizes):
        raise SystemExit(f"{category} has {len(files)} training images, fewer than {max(sizes)}: build with --build")
    rows, patchcore_fit = {}, None
    for size in sizes:
        paths = files[:size]
        present = [make(name) for name in systems]
        if patchcore:
            if patchcore_fit is not None and patchcore_fit[1] * (size / patchcore_fit[0]) ** 2 > budget:
                rows[f"patchcore-0.1@{size}"] = dict(skipped=f"its fit grows as N^2: {patchcore_fit[1]:.0f} s at "
                                                             f"N={patchcore_fit[0]} predicts "
                                                             f"{patchcore_fit[1] * (size / patchcore_fit[0]) ** 2:.0f} s "
                                                             f"> the {budget:.0f} s budget")
            else:
                present.append(make("patchcore-0.1"))
        for system in present:
            start = time.perf_counter()
            system.fit(paths)
            seconds = time.perf_counter() - start
            if system.name == "patchcore-0.1":
                patchcore_fit = (size, seconds)
            rows[f"{system.name}@{size}"] = dict(fit_seconds=seconds, bank_mb=system.bank_bytes() / 1e6,
                                                 **scored(system, test, labels, masks))
            print(f"{category} N={size} {system.name}: fit {seconds:.1f} s, {rows[f'{system.name}@{size}']}", flush=True)
        for key, value in rates(present, test, rounds=rounds).items():
            name, batch = key.split("@")
            rows[f"{name}@{size}"][f"images_per_s_b{batch}"] = value
        if memory:
            for system in present:
                rows[f"{system.name}@{size}"]["peak_rss_mib"] = peak_rss(make(system.name), paths, test, timeout=3600)
        del present
    return rows


def draws(root: Path, category: str, pool: int, count: int, size: int = BASE, seed: int = 0) -> dict:
    """The yardstick for comparing N: image / pixel AUROC and PRO of ``count`` banks of ``size`` images drawn at
    random (seeded) from the first ``pool`` training images. Which images a bank holds moves a category's
    metrics by itself; ``auto`` at N is judged against this spread, not against one bank of the first 40."""
    _, test, labels, masks = load_category(root, category)
    files = training_files(root, category)[:pool]
    detector = HETMM(LITE0, "imagenet", device="cpu")  # one network: each draw refits its bank, then is scored
    features = detector.extract(files, progress=False)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for i in range(count):
        chosen = torch.randperm(len(files), generator=generator)[:size].sort().values
        system = HetmmFiles(f"random{size}of{len(files)}#{i}")
        system.detector = detector.fit_features({layer: value[chosen] for layer, value in features.items()})
        rows[system.name] = scored(system, test, labels, masks)
        print(f"{category} {system.name}: {rows[system.name]}", flush=True)
    banks = list(rows.values())
    for metric in ("image_auroc", "pixel_auroc", "pro"):
        values = sorted(row[metric] for row in banks)
        rows[f"spread_{metric}"] = dict(min=values[0], median=values[len(values) // 2], max=values[-1])
    return rows


def format_rows(category: str, rows: dict) -> str:
    lines = [f"{category:10s} {'system@N':22s} {'fit s':>7s} {'b1/s':>7s} {'b8/s':>7s} {'img':>6s} {'pix':>6s} "
             f"{'PRO':>6s} {'bank MB':>8s} {'RSS MiB':>8s}"]
    for key, row in rows.items():
        if key.startswith("spread_"):
            lines.append(f"{'':10s} {key:22s} min {row['min']:.3f}, median {row['median']:.3f}, max {row['max']:.3f}")
            continue
        if "fit_seconds" not in row:  # a random draw's bank: accuracy only
            lines.append(f"{'':10s} {key:22s} {'':7s} {'':7s} {'':7s} {row['image_auroc']:6.3f} "
                         f"{row['pixel_auroc']:6.3f} {row['pro']:6.3f}")
            continue
        if "skipped" in row:
            lines.append(f"{'':10s} {key:22s} skipped: {row['skipped']}")
            continue
        lines.append(f"{'':10s} {key:22s} {row['fit_seconds']:7.1f} {row.get('images_per_s_b1', float('nan')):7.1f} "
                     f"{row.get('images_per_s_b8', float('nan')):7.1f} {row['image_auroc']:6.3f} "
                     f"{row['pixel_auroc']:6.3f} {row['pro']:6.3f} {row['bank_mb']:8.1f} "
                     f"{row.get('peak_rss_mib', float('nan')):8.0f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the set's root (written there with --build)")
    parser.add_argument("--build", action="store_true", help="write the choose set with more training images first")
    parser.add_argument("--category", nargs="+", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[40, 160, 320, 1000])
    parser.add_argument("--systems", nargs="+", default=["all", "auto"], choices=sorted(SYSTEMS))
    parser.add_argument("--patchcore", action="store_true", help="anomalib's PatchCore (coreset 0.1) beside")
    parser.add_argument("--budget", type=float, default=900.0, help="seconds a PatchCore fit may take (default 900)")
    parser.add_argument("--memory", action="store_true", help="peak RSS of a fresh process per system and N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--test-each", type=int, default=20,
                        help="with --build: normal and defective test images per category (default 20 each)")
    parser.add_argument("--draws", type=int, default=0,
                        help="also this many banks of 40 drawn at random from the first max(--sizes) training "
                             "images: the spread that which images a bank holds gives by itself")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if min(args.sizes) < 2:
        parser.error("--sizes: every N must be at least 2")
    if args.test_each < 1:
        parser.error(f"--test-each: expected a count >= 1, got {args.test_each}")
    if args.draws < 0 or (args.draws and max(args.sizes) <= BASE):
        parser.error(f"--draws: expected a count >= 0, and a largest --sizes above {BASE}")
    root = Path(args.data)
    if args.build:
        build_set(root, "choose", n_good=args.test_each, n_defective=args.test_each,
                  more_train=max(0, max(args.sizes) - BASE), more_categories=args.category)
    results = {}
    for category in args.category:
        results[category] = run(root, category, args.sizes, args.systems, args.patchcore, args.budget, args.memory,
                                args.rounds)
        if args.draws:
            results[category].update(draws(root, category, max(args.sizes), args.draws))
        print(format_rows(category, results[category]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
