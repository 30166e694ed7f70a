"""hetmm inside anomalib: ``hetmm.anomalib.Hetmm`` through anomalib's Engine and Folder datamodule, beside ``hetmm evaluate``.

    python benchmarks/anomalib_engine.py                      # the demo textures (written to a temporary folder)
    python benchmarks/anomalib_engine.py --data ROOT --category brick grass

Per category: image AUROC and pixel AUROC from anomalib's evaluator after ``Engine.fit`` + ``Engine.test``,
and the same from ``hetmm evaluate``'s code path on the same files. At ``--image-size`` equal to the files'
size neither side resizes and the numbers agree to float32 rounding; otherwise anomalib resizes in float
(antialiased) and hetmm with Pillow on 8-bit pixels, and the numbers differ by that.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an MVTec-layout root (default: the demo textures)")
    parser.add_argument("--category", nargs="+", default=["brick", "grass", "gravel"])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)

    from anomalib.engine import Engine

    from hetmm import HETMM
    from hetmm.anomalib import Hetmm, mvtec_folder
    from hetmm.data import MVTecCategory
    from hetmm.demo import build_dataset
    from hetmm.evaluation import evaluate_category

    with tempfile.TemporaryDirectory(prefix="hetmm-anomalib-") as scratch:
        root = args.data or build_dataset(Path(scratch) / "demo")
        options = dict(image_size=args.image_size, out_size=args.image_size)
        print(f"{'category':<12}{'anomalib image':>16}{'pixel':>8}{'hetmm image':>13}{'pixel':>8}{'fit+test s':>12}")
        for category in args.category:
            model = Hetmm(args.backbone, **options)
            engine = Engine(default_root_dir=Path(scratch) / "results", logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
            start = time.perf_counter()
            engine.fit(model=model, datamodule=mvtec_folder(Path(root) / category, num_workers=0))
            got = engine.test(model=model, datamodule=mvtec_folder(Path(root) / category, num_workers=0))[0]
            seconds = time.perf_counter() - start
            ref = evaluate_category(HETMM(args.backbone, **options), MVTecCategory(root, category))
            print(f"{category:<12}{got['image_AUROC']:>16.4f}{got['pixel_AUROC']:>8.4f}{ref['image_auroc']:>13.4f}"
                  f"{ref['pixel_auroc']:>8.4f}{seconds:>12.1f}")


if __name__ == "__main__":
    main()
