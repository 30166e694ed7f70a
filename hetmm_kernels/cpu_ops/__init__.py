"""Compiled CPU kernels (numba), for ops whose torch path stays far from the machine's speed."""

import threading

# numba's default thread pool (workqueue) must not be entered by two threads at once; every parallel
# kernel here uses all the cores anyway, so concurrent callers take turns.
POOL = threading.Lock()
