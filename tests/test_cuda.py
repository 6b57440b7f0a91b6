"""The same fits on CUDA as on the CPU, to 1e-8 (skipped without a GPU).

Basis, graph (closed form and generic vector-Jacobian products), the Dask
reduction and the modules of the graph, each fitted with ``device="cuda"`` and
``device="cpu"`` from the same float64 data.
"""

import numpy as np
import pytest
import torch
from torch import nn

from sklearn_lib import InteractionBasis
from sklearn_lib.graph import InteractionGraph

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
RTOL = 1e-8


def assert_rel(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def assert_same_basis(got, want):
    for name in ("gram_", "jacobian_gram_", "mean_", "interaction_strengths_"):
        assert_rel(getattr(got, name), getattr(want, name))
    assert_rel(got.components_.T @ got.components_, want.components_.T @ want.components_)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4)).double()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(500, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_basis_on_cuda_equals_cpu(rng):
    X = rng.normal(size=(400, 12)) @ rng.normal(size=(12, 12))
    J = rng.normal(size=(400, 5, 12))
    cpu = InteractionBasis().fit(X, jacobians=J)
    cuda = InteractionBasis(device="cuda").fit(X, jacobians=J)
    assert_same_basis(cuda, cpu)
    Z = cuda.transform(torch.as_tensor(X, device="cuda"))
    assert Z.device.type == "cuda"
    assert_rel(Z.cpu().numpy() @ cuda.components_ @ cuda.components_.T,
               cpu.transform(X) @ cpu.components_ @ cpu.components_.T)


@pytest.mark.parametrize("fast_path", ["auto", False])
@pytest.mark.parametrize("variant", ["local", "global"])
def test_graph_on_cuda_equals_cpu(net, inputs, fast_path, variant):
    layers = [":input", "1", "3", "4"]
    kwargs = dict(fast_path=fast_path, variant=variant, batch_size=128)
    cpu = InteractionGraph(**kwargs).fit_model(net, layers, inputs)
    cuda = InteractionGraph(device="cuda", **kwargs).fit_model(net, layers, inputs)
    assert cuda.fast_path_ == cpu.fast_path_
    assert any(cpu.fast_path_) == (fast_path == "auto")
    for b, b_ref in zip(cuda.bases_, cpu.bases_):
        assert_same_basis(b, b_ref)
    for E, E_ref in zip(cuda.edges_, cpu.edges_):
        assert_rel(E, E_ref)


def test_dask_reduction_on_cuda_equals_cpu(rng):
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")
    X = rng.normal(size=(300, 6))
    J = rng.normal(size=(300, 2, 6))
    with dask.config.set(scheduler="synchronous"):
        cuda = InteractionBasis(device="cuda").fit(
            da.from_array(X, chunks=(50, 6)), jacobians=da.from_array(J, chunks=(50, 2, 6)))
    assert_same_basis(cuda, InteractionBasis().fit(X, jacobians=J))


def test_modules_of_a_cuda_graph_equal_cpu(net, inputs):
    pytest.importorskip("networkit")
    from sklearn_lib.cluster import ModularityClustering

    layers = [":input", "1", "3", "4"]
    labels = []
    for device in ("cpu", "cuda"):
        graph = InteractionGraph(device=device).fit_model(net, layers, inputs)
        mc = ModularityClustering(random_state=0, normalization="sqrt").fit(graph)
        labels.append(mc.labels_)
    np.testing.assert_array_equal(labels[0], labels[1])


@pytest.mark.parametrize("m", [None, 2])
def test_transformer_halves_on_cuda(m):
    # GPT-2's attention and MLP halves in closed form on the device (products for exact
    # positions, per-head factors for combined ones): exact positions against the same
    # fit on the CPU; combined ones against the device's generic products, which draw
    # the same signs from the device's generator (the CPU's draws others).
    pytest.importorskip("transformers")
    from _hf_models import gpt2

    model, _ = gpt2()
    layers = ["h.0:input", "h.0.ln_2:input", "h.0", "h.1.ln_2:input", "h.1"]
    ids = torch.randint(0, 20, (6, 5), generator=torch.Generator().manual_seed(1))
    runs = [("cuda", "auto"), ("cpu", "auto") if m is None else ("cuda", False)]
    fits = [InteractionGraph(n_components=4, batch_size=4, random_state=0,
                             stochastic_positions=m, device=device,
                             fast_path=fast_path).fit_model(model, layers, ids, sequence=True)
            for device, fast_path in runs]
    assert fits[0].fast_path_ == [True] * 4
    for got, want in zip(fits[0].bases_, fits[1].bases_):
        assert_rel(got.jacobian_gram_, want.jacobian_gram_)
        assert_rel(got.interaction_strengths_, want.interaction_strengths_)
    for got, want in zip(fits[0].edges_, fits[1].edges_):
        assert_rel(got, want)


def test_inferred_sections_on_cuda():
    # The shipped transformer's halves found by their values, checked by a random
    # vector-Jacobian product per batch on the device, against the same fit on the CPU.
    from sklearn_lib.datasets import ModularAdditionTransformer

    torch.manual_seed(0)
    model = ModularAdditionTransformer(p=7, d_model=8, n_heads=2, d_head=4, d_mlp=16)
    X = torch.tensor([[a, b] for a in range(7) for b in range(7)])
    layers = ["hook_resid_pre", "hook_resid_mid[-1]", "hook_resid_post[-1]", "unembed"]
    fits = [InteractionGraph(batch_size=16, device=device).fit_model(model, layers, X,
                                                                      sequence=True)
            for device in ("cuda", "cpu")]
    assert fits[0].fast_path_ == [True, True, True]
    for got, want in zip(fits[0].edges_, fits[1].edges_):
        assert_rel(got, want)
