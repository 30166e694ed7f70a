"""hetmm: a training-free anomaly detector over the ``hetmm_kernels`` ops.

The detector (backbone, template bank, scoring, metrics, data) is being built;
today the package carries the command-line entry point and its ops demonstration.
"""

__version__ = "0.1.0"
