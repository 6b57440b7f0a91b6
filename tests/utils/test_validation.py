import numpy as np
import pytest
import scipy.sparse
import torch

from sklearn_lib.utils._validation import (
    check_jacobians,
    check_not_jacobians,
    check_real_values,
    check_tensor,
)


@pytest.mark.parametrize(
    "value, error, match",
    [
        ([[1.0, 2.0], [3.0]], ValueError, "ragged"),
        (np.array([["a"]]), ValueError, "got strings"),
        (np.array([1j]), ValueError, "Complex data not supported"),
        (np.array([{}], dtype=object), TypeError, "not 'dict'"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), ValueError, "datetime64"),
        (scipy.sparse.eye(3, format="csr"), TypeError, "scipy sparse"),
    ],
)
def test_check_real_values_refuses_what_is_not_real_numbers(value, error, match):
    with pytest.raises(error, match=match):
        check_real_values(value, "X")


def test_check_real_values_keeps_arrays_lazy_and_converts_objects(tmp_path):
    memmap = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", shape=(3, 2))
    assert check_real_values(memmap, "X") is memmap  # nothing read or copied
    converted = check_real_values(np.array([[1, 2.5]], dtype=object), "X")
    assert converted.dtype == np.float64
    np.testing.assert_array_equal(converted, [[1.0, 2.5]])


@pytest.mark.parametrize(
    "tensor, match",
    [
        (torch.eye(2).to_sparse(), "sparse tensor"),
        (torch.eye(2, dtype=torch.complex64), "Complex data not supported"),
        (torch.eye(2, dtype=torch.int32), "floating-point tensor"),
        (torch.zeros(2), "2-D tensor"),
    ],
)
def test_check_tensor(tensor, match):
    with pytest.raises(ValueError, match=match):
        check_tensor(tensor, "X", ndim=2, shape="(n_samples, n_features)")


@pytest.mark.parametrize("y", [None, np.zeros(4), np.zeros((4, 2)), [[1], [1, 2]]])
def test_check_not_jacobians_leaves_targets_alone(y):
    check_not_jacobians(y, "fit")


@pytest.mark.parametrize("y", [np.zeros((4, 2, 3)), torch.zeros(4, 2, 3), np.zeros((4, 2, 3)).tolist()])
def test_check_not_jacobians_refuses_3d(y):
    with pytest.raises(ValueError, match=r"fit\(X, jacobians=J\)"):
        check_not_jacobians(y, "fit")


def test_check_jacobians_refuses_zero_outputs_and_other_output_counts():
    with pytest.raises(ValueError, match="0 outputs"):
        check_jacobians(np.zeros((4, 0, 3)), (4, 3))
    with pytest.raises(ValueError, match="2 outputs but the estimator was fitted with 5"):
        check_jacobians(np.zeros((4, 2, 3)), (4, 3), n_outputs=5)
