"""OpenMP's idle spinning, shortened before torch loads (``hetmm/__init__`` imports this module first).

torch's CPU ops run on an OpenMP pool (libgomp on Linux) whose worker threads spin for 300,000 rounds after
every parallel region before they sleep: milliseconds here. hetmm's CPU predict alternates torch's matching
with OpenVINO's backbone, whose own threads then share the cores with spinning ones. Measured on 2 cores
(lite0, 40 templates, the demo's brick, interleaved processes, 3 pairs): predict at batch 1 ran 112-125
images/s in bfloat16 with ``GOMP_SPINCOUNT=10000`` against 91-113 at the default, and 52-59 against 43-52 in
float32 (batch 8: 163-181 against 144-173 in bfloat16); the backbone alone 1.4 ms instead of 2.9. 10,000
rounds still bridge the gaps between the matching's small parallel regions. libgomp reads the setting once,
when it loads: it is set only where torch has not been imported yet and the user has set neither it nor
``OMP_WAIT_POLICY`` (import hetmm before torch, or set it yourself, to have it).
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"


def shorten_spinning() -> bool:
    """Set ``GOMP_SPINCOUNT`` for the OpenMP runtime torch is about to load; whether it was set."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


SHORTENED = shorten_spinning()
