"""One BLAS thread while the compiled kernels run.

numba's kernels run on an OpenMP pool whose workers spin for a while after each parallel loop; BLAS
(OpenBLAS under NumPy) keeps its own worker threads, which spin too. On a machine with few cores the
two pools then take turns through the scheduler: a 0.08 ms kernel called after an sgemm took a median
3 ms on the 2-core development machine, and prefill ran at half its speed. Inside `serial()` the
loaded BLAS libraries use the calling thread only, so the cores belong to the kernels' pool; the
products BLAS still does there (attention scores) are small, and prefill attention spreads its
pieces over a thread per core itself. The previous thread counts come back when the last nested or
concurrent user leaves. (Concurrent users are two models run from two threads at once; OpenBLAS
0.3.31 may ignore a count that a thread other than the one that lowered it sets back.)
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

log = logging.getLogger(__name__)

_lock = threading.Lock()
_users = 0
_saved: list[tuple[object, int]] = []
_libs: list | None = None


def _blas_libs() -> list:
    """threadpoolctl's controllers of the BLAS libraries loaded now (found once; [] without it)."""
    global _libs
    if _libs is None:
        try:
            from threadpoolctl import ThreadpoolController
            _libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception as e:  # no threadpoolctl, or a library it cannot drive: BLAS keeps its threads
            log.warning("cannot limit BLAS threads (%s); the CPU kernels may run slower", e)
            _libs = []
    return _libs


@contextmanager
def serial():
    """Run the body with one BLAS thread (see the module docstring)."""
    global _users
    with _lock:
        if _users == 0:
            _saved[:] = [(lib, lib.num_threads) for lib in _blas_libs()]
            for lib, n in _saved:
                if n != 1:
                    lib.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                for lib, n in _saved:
                    if n != 1:
                        lib.set_num_threads(n)
                _saved.clear()
