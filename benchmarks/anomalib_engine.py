"""hetmm inside anomalib: ``hetmm.anomalib.Hetmm`` through anomalib's Engine and Folder datamodule, beside ``hetmm evaluate``.

    python benchmarks/anomalib_engine.py                      # the demo textures (written to a temporary folder)
    python benchmarks/anomalib_engine.py --data ROOT --category brick grass

Per category: image AUROC and pixel AUROC from anomalib's evaluator after ``Engine.fit`` + ``Engine.test``,
and the same from ``hetmm evaluate``'s code path on the same files. At ``--image-size`` equal to the files'
size neither side resizes and the numbers agree to float32 rounding; otherwise anomalib resizes in float
(antialiased) and hetmm with Pillow on 8-bit pixels, and the numbers differ by that.

``--patchcore``: anomalib's own PatchCore (coreset 0.1) through the same Engine and datamodule, with the
same lite0 ImageNet weights and input normalisation (as ``compare_anomalib.py`` builds it), beside
``Hetmm``: what an anomalib user comparing the two would run. Test images/s is ``Engine.test``'s wall
time over the test images (decoding, model, anomalib's post-processing and metrics).
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
    parser.add_argument("--patchcore", action="store_true", help="also anomalib's PatchCore through the same Engine")
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
        print(f"{'category':<12}{'model':<11}{'Engine image':>13}{'pixel':>8}{'hetmm image':>13}{'pixel':>8}"
              f"{'fit s':>7}{'test img/s':>12}")
        for category in args.category:
            models = {"Hetmm": Hetmm(args.backbone, **options)}
            if args.patchcore:
                models["PatchCore"] = patchcore(args.image_size)
            for name, model in models.items():
                engine = Engine(default_root_dir=Path(scratch) / "results", logger=False, enable_progress_bar=False,
                                enable_model_summary=False)
                start = time.perf_counter()
                engine.fit(model=model, datamodule=mvtec_folder(Path(root) / category, num_workers=0))
                fitted = time.perf_counter()
                data = mvtec_folder(Path(root) / category, num_workers=0)
                got = engine.test(model=model, datamodule=data)[0]
                rate = len(data.test_data) / (time.perf_counter() - fitted)
                line = f"{category:<12}{name:<11}{got['image_AUROC']:>13.4f}{got['pixel_AUROC']:>8.4f}"
                if name == "Hetmm":
                    ref = evaluate_category(HETMM(args.backbone, **options), MVTecCategory(root, category))
                    line += f"{ref['image_auroc']:>13.4f}{ref['pixel_auroc']:>8.4f}"
                else:
                    line += " " * 21
                print(line + f"{fitted - start:>7.1f}{rate:>12.1f}", flush=True)


def patchcore(size: int):
    """anomalib's PatchCore on lite0 with hetmm's weights and lite0's own input normalisation."""
    import sys

    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    sys.path.insert(0, str(Path(__file__).parent))
    from compare_anomalib import LITE0_MEAN, LITE0_STD, PATCHCORE_LAYERS, _load_lite0

    transform = Compose([Resize((size, size), antialias=True), Normalize([LITE0_MEAN] * 3, [LITE0_STD] * 3)])
    model = Patchcore(backbone="tf_efficientnet_lite0", layers=PATCHCORE_LAYERS, pre_trained=False,
                      coreset_sampling_ratio=0.1, pre_processor=PreProcessor(transform=transform))
    _load_lite0(model.model.feature_extractor)
    return model


if __name__ == "__main__":
    main()
