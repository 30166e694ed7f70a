"""hetmm: training-free industrial anomaly detection by template mutual matching.

>>> import hetmm
>>> det = hetmm.HETMM(backbone="tf_efficientnet_lite0").fit(normal_images)   # doctest: +SKIP
>>> result = det.predict(test_images)                                         # doctest: +SKIP
>>> result.pred_score, result.anomaly_map                                     # doctest: +SKIP
"""

from . import openmp  # noqa: F401  (first: it must run before torch loads)
from .backbone import Backbone, UnknownBackbone, WeightsUnavailable
from .bank import BankInvalid, BankMismatch, TemplateBank
from .detector import HETMM, DetectorOptions, Prediction
from .metrics import aupro, image_auroc, pixel_auroc
from .parameters import DEFAULT, MVTEC_AD, parse_params
from .scoring import atmm_score

__all__ = [
    "DEFAULT", "DetectorOptions", "HETMM", "MVTEC_AD", "Backbone", "BankInvalid", "BankMismatch", "Prediction", "TemplateBank",
    "UnknownBackbone", "WeightsUnavailable", "atmm_score", "aupro", "image_auroc", "parse_params", "pixel_auroc",
]

__version__ = "0.1.0"
