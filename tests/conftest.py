import numpy as np
import pytest
import sklearn
from hypothesis import settings

# Property-based tests explore a fixed set of examples, so CI runs are reproducible.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def routing():
    """Enable scikit-learn metadata routing for one test."""
    with sklearn.config_context(enable_metadata_routing=True):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny tensors, where threads only contend."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
