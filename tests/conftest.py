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
