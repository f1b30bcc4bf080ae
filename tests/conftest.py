import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real-data folder from FQBENCH_DATA: skipped when unset, a failure when missing."""
    value = os.environ.get("FQBENCH_DATA")
    if not value:
        pytest.skip("FQBENCH_DATA is not set; point it at the shared data folder to run real-data tests")
    root = Path(value)
    if not root.is_dir():
        pytest.fail(f"FQBENCH_DATA={value} is not a directory")
    return root


def synthetic_layer(out_features=96, in_features=128, samples=2048, *, correlated=True, heavy_tailed=False,
                    outlier_channels=0, seed=0):
    """A weight, its calibration Hessian and held-out inputs with controllable pathologies.

    Returns ``(W, H, X_test)``. Correlated inputs make GPTQ's error feedback matter;
    heavy-tailed weights (Student t, 3 d.o.f.) and a few outlier input channels are
    the regime where incoherence processing and frames pay off at 2 bits.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g)
    if heavy_tailed:
        chi2 = torch.randn(3, out_features, in_features, generator=g).square().sum(dim=0)
        W = W / (chi2 / 3).sqrt()  # Student t with 3 degrees of freedom
    W = W * 0.02
    mixing = torch.eye(in_features)
    if correlated:
        mixing = mixing + 2.0 * torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scales = torch.ones(in_features)
    if outlier_channels:
        idx = torch.randperm(in_features, generator=g)[:outlier_channels]
        scales[idx] = 20.0
    X = (torch.randn(2 * samples, in_features, generator=g) @ mixing.T) * scales
    X_cal, X_test = X[:samples].double(), X[samples:]
    H = 2.0 / samples * X_cal.T @ X_cal
    return W, H, X_test


@pytest.fixture(scope="module")
def one_thread():
    """Tiny layers and models: one thread avoids OpenMP spinning on a shared CPU (restored afterwards).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def layer_factory():
    return synthetic_layer
