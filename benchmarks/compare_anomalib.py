"""hetmm against anomalib's PatchCore and PaDiM at the same backbone, on the same images.

    pip install -e ".[compare]"          # anomalib 2.7 and lightning, only for this harness
    python benchmarks/compare_anomalib.py --data ROOT --category brick grass gravel --json out.json

Every system gets the same ``tf_efficientnet_lite0`` ImageNet weights (anomalib's torch models
are built with ``pre_trained=False`` and the weights are loaded into their timm feature
extractor; the harness checks that the features equal hetmm's), the same images read once
at the same size and normalised the same way, the same training set. Reported per system and
category: fit seconds, predict images/s at batch 1 and 8 (the systems interleaved in one
process, median per call over several rounds, and the ratio to PatchCore), peak RSS (each
system fitted and run in a fresh process), bank/model size on disk, and image AUROC, pixel
AUROC and PRO computed by one metric code (``hetmm.metrics``) for all.

``--data`` defaults to a freshly built demo set (40 normal training images per texture, 20 normal
and 20 defective test images, as the speed issue measured); ``benchmarks/eval_sets.py`` builds
the two evaluation sets of the accuracy protocol.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may wait on a hub
os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset progress bar would drown the table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# hetmm before torch, as its command line and `import hetmm` load it: its OpenMP setting (hetmm/openmp.py) must
# come before torch's runtime loads; it holds for every system in this process
from hetmm import HETMM, aupro, image_auroc, pixel_auroc  # noqa: E402
import torch  # noqa: E402
from hetmm.backbone import LITE0, create_network  # noqa: E402
from hetmm.data import MVTecCategory, read_image  # noqa: E402

INSTALL_HINT = ('this comparison needs anomalib 2.7 (and lightning): pip install -e ".[compare]" '
                '(or pip install "anomalib==2.7.*")')
# The lite0 stages at strides 8 and 16 (PatchCore's layer2 / layer3), and 4, 8, 16 for PaDiM: the same
# tensors hetmm taps as layer1..layer3.
PATCHCORE_LAYERS = ["blocks.2", "blocks.4"]
PADIM_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
PADIM_FEATURES = 100  # of 24 + 40 + 112 = 176 channels, as anomalib keeps 100 of resnet18's 448
LITE0_MEAN = LITE0_STD = 0.5  # the lite weights' own input normalisation, for every system


def _require_anomalib():
    try:
        import anomalib  # noqa: F401
    except ImportError:
        raise SystemExit(INSTALL_HINT) from None


def lite0_state() -> dict:
    """The ImageNet weights hetmm's lite0 backbone uses, as a timm state dict."""
    return create_network(LITE0, "imagenet").state_dict()


def _load_lite0(feature_extractor) -> None:
    """Load the lite0 weights into anomalib's ``TimmFeatureExtractor`` (a timm ``features_only`` net)."""
    net = feature_extractor.feature_extractor
    missing, _ = net.load_state_dict(lite0_state(), strict=False)
    if missing:
        raise RuntimeError(f"anomalib's feature extractor did not take the lite0 weights: missing {missing[:5]}")


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images - LITE0_MEAN) / LITE0_STD


class HetmmSystem:
    """hetmm through its public API; ``options`` are ``HETMM`` keyword arguments."""

    def __init__(self, name="hetmm", no_bf16: bool = False, **options):
        self.name, self.options, self.no_bf16 = name, options, no_bf16

    def fit(self, images: torch.Tensor) -> None:
        # no_bf16: the detector is made as on a CPU without native bfloat16 (HETMM_NO_BF16=1 while it is built:
        # precision="auto" and int8's backbone are decided there)
        previous = os.environ.get("HETMM_NO_BF16")
        os.environ["HETMM_NO_BF16"] = "1" if self.no_bf16 else "0"
        try:
            self.detector = HETMM(LITE0, "imagenet", device="cpu", **self.options)
        finally:
            if previous is None:
                del os.environ["HETMM_NO_BF16"]
            else:
                os.environ["HETMM_NO_BF16"] = previous
        self.detector.fit(images)

    def predict(self, images: torch.Tensor):
        self.detector.batch_size = max(self.detector.batch_size, images.shape[0])
        result = self.detector.predict(images)
        return result.pred_score, result.anomaly_map, result.pro_map

    def save(self, folder: Path) -> Path:
        return self.detector.save(folder / "hetmm.safetensors")


class AnomalibSystem:
    """An anomalib torch model (PatchCore or PaDiM) fitted as its Lightning module fits it."""

    def __init__(self, name: str, kind: str, **options):
        self.name, self.kind, self.options = name, kind, options

    def build(self):
        _require_anomalib()
        if self.kind == "patchcore":
            from anomalib.models.image.patchcore.torch_model import PatchcoreModel

            model = PatchcoreModel(layers=PATCHCORE_LAYERS, backbone=LITE0, pre_trained=False, num_neighbors=9)
        else:
            from anomalib.models.image.padim.torch_model import PadimModel

            model = PadimModel(backbone=LITE0, layers=PADIM_LAYERS, pre_trained=False, n_features=PADIM_FEATURES)
        _load_lite0(model.feature_extractor)
        return model

    # fitted eager models by (kind, options, training images): the exports of one model (bf16, f32, INT8) share
    # its fit (PatchCore's coreset: ~80 s on 2 cores) instead of repeating it; its time is counted for each
    _fitted: dict = {}

    def fit(self, images: torch.Tensor, batch: int = 8) -> None:
        key = (self.kind, tuple(sorted(self.options.items())), images.data_ptr(), tuple(images.shape), batch)
        if key in self._fitted:
            model, self.reused_fit_seconds = self._fitted[key]
            self.model = copy.deepcopy(model)
            return
        start = time.perf_counter()
        self._fit(images, batch)
        self.reused_fit_seconds = 0.0
        self._fitted.clear()  # one training set at a time
        self._fitted[key] = (copy.deepcopy(self.model), time.perf_counter() - start)

    def _fit(self, images: torch.Tensor, batch: int) -> None:
        torch.manual_seed(0)  # PaDiM's random channel choice, PatchCore's coreset start
        self.model = self.build().train()
        with torch.no_grad():
            for i in range(0, images.shape[0], batch):
                self.model(_normalised(images[i:i + batch]))
        if self.kind == "patchcore" and self.options.get("coreset", 0.1) >= 1.0:
            # the whole bank: what k-center greedy returns at ratio 1, without its 40,000 serial steps
            self.model.memory_bank = torch.vstack(self.model.embedding_store)
            self.model.embedding_store.clear()
        elif self.kind == "patchcore":
            self.model.subsample_embedding(self.options.get("coreset", 0.1))
        else:
            self.model.fit()
        self.model.eval()

    def predict(self, images: torch.Tensor):
        with torch.no_grad():
            out = self.model(_normalised(images))
        anomaly = out.anomaly_map[:, 0]
        return out.pred_score.reshape(-1), anomaly, anomaly

    def save(self, folder: Path) -> Path:
        """What a user persists: the model's own buffers (memory bank / Gaussian), not the backbone."""
        state = {k: v for k, v in self.model.state_dict().items() if not k.startswith("feature_extractor.")}
        path = folder / f"{self.name}.pt"
        torch.save(state, path)
        return path


class _Scores(torch.nn.Module):
    """What anomalib's export traces: normalised images in, the eval-mode model's score and map out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):  # (eval mode: anomalib's models return their scores only there)
        out = self.model(_normalised(images))
        return out.pred_score.reshape(-1), out.anomaly_map[:, 0]


class OpenVINOSystem(AnomalibSystem):
    """An anomalib model as its users deploy it on a CPU: exported to OpenVINO and compiled there.

    anomalib's ``export(..., OPENVINO)`` traces the model to ONNX and its ``OpenVINOInferencer`` compiles it
    with OpenVINO's defaults; here ``openvino.convert_model`` traces the fitted torch model directly (the same
    graph without the ONNX file), once per batch size: PatchCore's forward branches on the number of
    embeddings, which a trace fixes, so a graph traced at one batch size is wrong at another. ``precision``:
    "default" (OpenVINO's default on this CPU: bf16 where native) or "f32". ``fit`` checks the export: the
    graph compiled at f32 must score mirrored training images at batch 1 and 8 as the eager model does, within
    1e-3 of the largest score (``export_gap``), or it fails; the gap at the system's own precision is kept as
    ``precision_gap`` (bf16 moves PatchCore's nearest-neighbour distances by up to ~10% of the largest score:
    0.106 measured on ceramic).
    """

    EXPORT_TOLERANCE = 1e-3

    def __init__(self, name: str, kind: str, precision: str = "default", int8: bool = False, **options):
        super().__init__(name, kind, **options)
        self.precision, self.int8 = precision, int8

    def fit(self, images: torch.Tensor, batch: int = 8) -> None:
        super().fit(images, batch)
        self.compiled, self.graphs, self.calibration = {}, {}, images
        if self.int8:  # quantisation is checked by the metrics, not against the float graph
            return
        self.export_gap = self.precision_gap = 0.0
        for probe in (images[:1], images[:batch]):
            probe = probe.flip(-1).roll(images.shape[-1] // 3, -2).contiguous()  # unseen images: scores far from 0
            with torch.no_grad():
                eager = _Scores(self.model).eval()(probe)[0]
            scale = eager.abs().max().clamp_min(1e-6)
            for precision in ("f32", self.precision):
                gap = ((self._infer(probe, precision)[0] - eager).abs().max() / scale).item()
                if precision == "f32":
                    self.export_gap = max(self.export_gap, gap)
                if precision == self.precision:
                    self.precision_gap = max(self.precision_gap, gap)
        if self.export_gap > self.EXPORT_TOLERANCE:
            raise RuntimeError(f"{self.name}: the exported graph (f32) scores differ from the eager model's by "
                               f"{self.export_gap:.2e} of the largest score (> {self.EXPORT_TOLERANCE})")

    def _compiled(self, images: torch.Tensor, precision: str):
        import openvino as ov

        shape = tuple(images.shape)
        if shape not in self.graphs:  # converted once per shape, as a deployment would
            with torch.no_grad():
                graph = ov.convert_model(_Scores(self.model).eval(), example_input=images,
                                         input=[ov.PartialShape(list(shape))])
            self.graphs[shape] = self._quantized(graph, shape[0]) if self.int8 else graph
        if (shape, precision) not in self.compiled:
            config = {} if precision == "default" else {"INFERENCE_PRECISION_HINT": precision}
            self.compiled[shape, precision] = ov.Core().compile_model(self.graphs[shape], "CPU", config)
        return self.compiled[shape, precision]

    def _quantized(self, graph, batch: int):
        """anomalib's ``export(..., compression_type=INT8_PTQ)``: ``nncf.quantize`` with its defaults, calibrated
        on the training images (anomalib takes its validation loader; here the fit's images, in batches of the
        graph's static size)."""
        import nncf

        images = self.calibration
        batches = [images[i:i + batch].numpy() for i in range(0, images.shape[0] - batch + 1, batch)]
        return nncf.quantize(graph, nncf.Dataset(batches), subset_size=len(batches))

    def _infer(self, images: torch.Tensor, precision: str):
        """``(scores, anomaly maps)`` of the graph for ``images``' shape compiled at ``precision``."""
        images = images.contiguous()
        results = self._compiled(images, precision)(images.numpy())
        return torch.from_numpy(results[0].copy()), torch.from_numpy(results[1].copy())

    def predict(self, images: torch.Tensor):
        scores, anomaly = self._infer(images, self.precision)
        return scores, anomaly, anomaly

    def save(self, folder: Path) -> Path:
        """The exported IR (``.xml`` graph + ``.bin`` weights, the backbone included), as deployed."""
        import openvino as ov

        path = folder / f"{self.name}.xml"
        ov.save_model(next(iter(self.graphs.values())), path, compress_to_fp16=False)
        return path.with_suffix(".bin")

    def __getstate__(self):  # compiled networks stay in their process; a spawned worker fits its own
        return {k: v for k, v in self.__dict__.items() if k not in ("graphs", "compiled")}


# Each system's pairing: the precision it runs in; ratios are taken against the faster of PatchCore-OpenVINO and
# PatchCore-OpenVINO INT8 (NNCF) in the same one (those run), batch size by batch size.
PAIRED_BASELINES = {"default": ("patchcore-0.1-ov", "patchcore-0.1-ov-int8"),
                    "f32": ("patchcore-0.1-ov-f32", "patchcore-0.1-ov-int8-f32")}


def default_systems(hetmm_options: dict | None = None) -> list:
    hetmm_options = hetmm_options or {}
    systems = [HetmmSystem("hetmm", **hetmm_options),
               HetmmSystem("hetmm-no-bf16", no_bf16=True, **hetmm_options),
               HetmmSystem("hetmm-fp32", **{**hetmm_options, "precision": "fp32"}),
               AnomalibSystem("patchcore-0.1", "patchcore", coreset=0.1),
               OpenVINOSystem("patchcore-0.1-ov", "patchcore", coreset=0.1),
               OpenVINOSystem("patchcore-0.1-ov-f32", "patchcore", "f32", coreset=0.1),
               OpenVINOSystem("patchcore-0.1-ov-int8", "patchcore", int8=True, coreset=0.1),
               OpenVINOSystem("patchcore-0.1-ov-int8-f32", "patchcore", "f32", int8=True, coreset=0.1),
               AnomalibSystem("patchcore-1.0", "patchcore", coreset=1.0),
               AnomalibSystem("padim", "padim"),
               OpenVINOSystem("padim-ov", "padim"),
               OpenVINOSystem("padim-ov-f32", "padim", "f32")]
    return systems


def pairing(name: str) -> str:
    """"f32" for the systems that run as on a CPU without bfloat16 (hetmm-fp32, hetmm-no-bf16, *-f32), else
    "default"."""
    return "f32" if name.endswith(("-f32", "-fp32", "-no-bf16")) else "default"


def baseline_rate(rows: dict, name: str, batch: int) -> float | None:
    """The images/s at ``batch`` of the faster PatchCore export in ``name``'s pairing (None: none ran)."""
    rates = [rows[b][f"images_per_s_b{batch}"] for b in PAIRED_BASELINES[pairing(name)] if b in rows]
    return max(rates) if rates else None


def check_features(image: torch.Tensor) -> float:
    """Largest difference between anomalib's and hetmm's raw lite0 features on ``image`` (0: identical)."""
    from hetmm.backbone import Backbone

    hetmm_net = Backbone(LITE0, "imagenet")
    ours = hetmm_net(image, normalize=False)
    theirs = AnomalibSystem("padim", "padim").build().feature_extractor(_normalised(image))
    worst = 0.0
    for layer, name in zip(("layer1", "layer2", "layer3"), PADIM_LAYERS):
        if theirs[name].shape != ours[layer].shape:
            raise RuntimeError(f"anomalib's {name} is {tuple(theirs[name].shape)}, hetmm's {layer} "
                               f"{tuple(ours[layer].shape)}")
        worst = max(worst, (theirs[name] - ours[layer]).abs().max().item())
    return worst


def load_category(root, category: str, size: int = 256):
    data = MVTecCategory(root, category)
    samples = data.test
    train = torch.stack([read_image(p, size) for p in data.train])
    test = torch.stack([read_image(s.path, size) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    masks = data.load_masks(samples, size)
    return train, test, labels, masks


def accuracy(system, train, test, labels, masks, batch: int = 8) -> dict:
    start = time.perf_counter()
    system.fit(train)
    fit_seconds = time.perf_counter() - start + getattr(system, "reused_fit_seconds", 0.0)
    parts = [system.predict(test[i:i + batch]) for i in range(0, test.shape[0], batch)]
    scores, anomaly, pro = (torch.cat([p[j].float().cpu() for p in parts]) for j in range(3))
    return dict(fit_seconds=fit_seconds, image_auroc=image_auroc(labels, scores),
                pixel_auroc=pixel_auroc(masks, anomaly), pro=aupro(masks, pro))


def rates(systems, test, batches=(1, 8), rounds: int = 3, calls: int = 4) -> dict:
    """Images/s per system and batch: median seconds per call, the systems interleaved in every round."""
    times = {(s.name, b): [] for s in systems for b in batches}
    for s in systems:  # warm-up: first-call allocations, layouts, thread pools
        for b in batches:
            s.predict(test[:b])
    for _ in range(rounds):
        for b in batches:
            for s in systems:
                for c in range(calls):
                    chunk = test[(c * b) % max(1, test.shape[0] - b + 1):][:b]
                    start = time.perf_counter()
                    s.predict(chunk)
                    times[(s.name, b)].append(time.perf_counter() - start)
    return {f"{name}@{b}": b / statistics.median(t) for (name, b), t in times.items()}


def _peak_rss_worker(system, train, test, queue) -> None:
    torch.set_num_threads(int(os.environ.get("HETMM_COMPARE_THREADS", torch.get_num_threads())))
    system.fit(train)
    for i in range(0, test.shape[0], 8):
        system.predict(test[i:i + 8])
    queue.put(_peak_rss_mib())


def _peak_rss_mib() -> float:
    """This process's peak resident memory, MiB. Linux: VmHWM, which belongs to the address space and
    starts afresh at exec; ``ru_maxrss`` keeps the parent's peak across fork + exec (every spawned
    worker would report at least the harness's own RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def peak_rss(system, train, test, timeout: float = 600) -> float:
    """Peak resident memory (MiB) of a fresh process that fits ``system`` on ``train`` (whatever its ``fit``
    takes) and predicts ``test``."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_rss_worker, args=(system, train, test, queue))
    process.start()
    value = queue.get(timeout=timeout)
    process.join()
    return value


def compare(root, categories, systems=None, rounds: int = 3, measure_memory: bool = True) -> dict:
    from cpu_rates import header, matmul_rates

    systems = systems or default_systems()
    products = matmul_rates()
    report = {"threads": torch.get_num_threads(), "cpu": header(products), "matmul_rates": products, "categories": {}}
    print(report["cpu"], flush=True)
    for category in categories:
        train, test, labels, masks = load_category(root, category)
        if "feature_check_max_abs_diff" not in report:
            report["feature_check_max_abs_diff"] = check_features(train[:2])
        rows = {}
        for s in systems:
            rows[s.name] = accuracy(s, train, test, labels, masks)
            if hasattr(s, "export_gap"):
                rows[s.name].update(export_gap=s.export_gap, precision_gap=s.precision_gap)
            with tempfile.TemporaryDirectory() as folder:
                rows[s.name]["size_mb"] = s.save(Path(folder)).stat().st_size / 2**20
        speed = rates(systems, test, rounds=rounds)
        for s in systems:
            for b in (1, 8):
                rows[s.name][f"images_per_s_b{b}"] = speed[f"{s.name}@{b}"]
            if measure_memory:
                rows[s.name]["peak_rss_mb"] = peak_rss(s, train, test)
        report["categories"][category] = rows
        print(format_rows(category, rows), flush=True)
    return report


def format_rows(category: str, rows: dict) -> str:
    """One line per system; "x PC-OV": its images/s over the faster of PatchCore-OpenVINO and its INT8 export at
    the same pairing (default precision, or float32 for the *-f32 / *-fp32 / *-no-bf16 systems)."""
    head = (f"{category:<10}{'system':<27}{'img AUROC':>10}{'pix AUROC':>10}{'PRO':>7}{'fit s':>7}"
            f"{'img/s b1':>10}{'img/s b8':>10}{'x PC-OV b1':>11}{'x PC-OV b8':>11}{'RSS MB':>8}{'disk MB':>9}")
    lines = [head]
    for name, r in rows.items():
        bases = [baseline_rate(rows, name, b) for b in (1, 8)]
        ratio = [f"{r[f'images_per_s_b{b}'] / base:>11.2f}" if base else f"{'-':>11}" for b, base in zip((1, 8), bases)]
        lines.append(f"{'':<10}{name:<27}{r['image_auroc']:>10.3f}{r['pixel_auroc']:>10.3f}{r['pro']:>7.3f}"
                     f"{r['fit_seconds']:>7.1f}{r['images_per_s_b1']:>10.1f}{r['images_per_s_b8']:>10.1f}"
                     f"{ratio[0]}{ratio[1]}{r.get('peak_rss_mb', float('nan')):>8.0f}{r['size_mb']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="an MVTec-layout root (default: build the 40-image demo set)")
    parser.add_argument("--category", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-system peak-RSS processes")
    parser.add_argument("--systems", nargs="+", default=None,
                        help="a subset of: " + " ".join(s.name for s in default_systems()))
    parser.add_argument("--hetmm", default="{}", help="HETMM keyword arguments as JSON, e.g. '{\"precision\": \"fp32\"}'")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    _require_anomalib()
    root = args.data
    if root is None:
        from hetmm.demo import TEXTURES, build_dataset

        root = build_dataset(Path(tempfile.mkdtemp(prefix="hetmm-compare-")), n_train=40, n_good=20, n_defective=20)
        args.category = args.category or list(TEXTURES)
    if not args.category:
        parser.error("--category is required with --data")
    systems = [s for s in default_systems(json.loads(args.hetmm)) if args.systems is None or s.name in args.systems]
    report = compare(root, args.category, systems, rounds=args.rounds, measure_memory=not args.no_memory)
    print(f"features: anomalib vs hetmm, max |difference| {report['feature_check_max_abs_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
