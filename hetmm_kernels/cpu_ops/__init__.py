"""Compiled CPU kernels (numba), for ops whose torch path stays far from the machine's speed."""

import os
import threading

# numba's default thread pool must not be entered by two threads at once; every parallel kernel here uses all
# the cores anyway, so concurrent callers take turns.
POOL = threading.Lock()

# numba's OpenMP pool first (its threads wait as torch's do, GOMP_SPINCOUNT included: hetmm/openmp.py): with its
# default order it may load TBB beside OpenVINO's, and its plain worker queue put ~100 voluntary context switches
# into every batch-1 predict here (int8 lite0 on 2 cores: 13-18 ms against 9.5-10 with OpenMP). The user's
# NUMBA_THREADING_LAYER(_PRIORITY) wins.
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    try:
        import numba

        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    except ImportError:
        pass
