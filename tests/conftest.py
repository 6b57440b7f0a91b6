import numpy as np
import pytest
import sklearn


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def routing():
    """Enable scikit-learn metadata routing for one test."""
    with sklearn.config_context(enable_metadata_routing=True):
        yield
