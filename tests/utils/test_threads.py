"""Tests for sklearn_lib.utils._threads: small LAPACK calls on one thread."""

import numpy as np
import pytest


def _blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_numpy_lapack_runs_on_one_blas_thread():
    """np.linalg calls (numpy's own BLAS) are limited too, and only small ones."""
    from sklearn_lib.utils._threads import lapack_threads

    threadpoolctl = pytest.importorskip("threadpoolctl")
    A = np.eye(5)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        if not _blas_threads() or max(_blas_threads()) < 2:
            pytest.skip("numpy's BLAS does not run on 2 threads here")
        with lapack_threads(A):
            assert set(_blas_threads()) == {1}
        assert max(_blas_threads()) == 2
        with lapack_threads(A, max_size=4):
            assert max(_blas_threads()) == 2
        with pytest.raises(RuntimeError, match="boom"):
            with lapack_threads(A):
                raise RuntimeError("boom")
        assert max(_blas_threads()) == 2
