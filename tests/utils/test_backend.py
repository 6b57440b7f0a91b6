import pytest
import torch

from sklearn_lib.utils._backend import resolve_device


@pytest.mark.parametrize("device", ["cpu", "cpu:0", torch.device("cpu"), "auto"])
def test_resolve_device_accepts_what_we_compute_on(device):
    assert resolve_device(device).type in ("cpu", "cuda")


@pytest.mark.parametrize(
    "device, error, match",
    [
        ("tpu", ValueError, "not a device torch knows.*'cpu', 'cuda'"),
        ("meta", ValueError, "not supported.*CPU and CUDA"),
        (torch.device("meta"), ValueError, "not supported.*CPU and CUDA"),
        ("mps", ValueError, "not supported"),
        (0, TypeError, "got int 0"),
    ],
)
def test_resolve_device_refuses_what_we_cannot_compute_on(device, error, match):
    with pytest.raises(error, match=match):
        resolve_device(device)


def test_resolve_device_checks_device_objects_for_cuda():
    """A torch.device used to be returned unchecked (raw AssertionError later)."""
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=f"only {n} CUDA device"):
            resolve_device(torch.device("cuda", n))
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device(torch.device("cuda"))
