"""Small dense LAPACK calls pinned to one thread, so their time does not depend on the load."""

from contextlib import contextmanager

import numpy as np
import torch
from threadpoolctl import threadpool_limits

# Matrices up to this size are eigendecomposed on one CPU thread (see lapack_threads).
_SINGLE_THREAD_MAX_SIZE = 1024


@contextmanager
def lapack_threads(A, max_size=_SINGLE_THREAD_MAX_SIZE):
    """Run the block on one thread when ``A`` is a CPU matrix of at most ``max_size`` columns.

    A dense eigendecomposition of a few hundred rows gains little from a second
    thread, but its many OpenMP barriers collapse when the cores are shared: on
    a 2-core machine with the other core busy, ``torch.linalg.eigh`` of a
    257 x 257 matrix took 9 ms on one thread and 0.1-34 s on two. One thread
    makes its time independent of the load. For a torch tensor the torch
    thread count is set; ``torch.set_num_threads`` is process-global, which is
    acceptable here because the block is a single LAPACK call of
    milliseconds, the previous count is restored even on an error, and a torch
    computation running meanwhile in another Python thread is only slower for
    those milliseconds, never different. For a numpy array (``np.linalg``
    calls run in numpy's own BLAS, not torch's) the BLAS libraries are limited
    with ``threadpoolctl``, a scikit-learn dependency. GPU matrices are left
    alone.

    Examples
    --------
    >>> import torch
    >>> from sklearn_lib.utils._threads import lapack_threads
    >>> before = torch.get_num_threads()
    >>> with lapack_threads(torch.eye(3)):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    if isinstance(A, np.ndarray):
        if A.ndim and A.shape[-1] <= max_size:
            with threadpool_limits(1, user_api="blas"):
                yield
        else:
            yield
        return
    previous = torch.get_num_threads()
    single = A.device.type == "cpu" and A.shape[-1] <= max_size and previous > 1
    if single:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if single:
            torch.set_num_threads(previous)
