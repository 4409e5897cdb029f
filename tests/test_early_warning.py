"""The early-warning study (#27): its recorded column and its analysis on synthetic rows."""

from types import SimpleNamespace

import numpy as np

from experiments import prediction
from tests.conftest import tol_for


def test_projected_loss_matches_dense_fisher():
    """``update_fisher_half_d{d}`` equals ½ vᵀ P_d F P_d v with ``F`` and ``P_d`` built densely."""
    rng = np.random.default_rng(0)
    n, k = 12, 5
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    spectrum = np.sort(rng.uniform(0.1, 3.0, n))[::-1]
    fisher = q @ np.diag(spectrum) @ q.T
    s = SimpleNamespace(basis=q[:, :k].T, values=spectrum[:k])
    v = rng.normal(size=n)
    out = prediction.projected_loss(s, (2, 5), v)
    for d in (2, 5):
        proj = q[:, :d] @ q[:, :d].T
        dense = 0.5 * v @ proj @ fisher @ proj @ v
        assert abs(out[f"update_fisher_half_d{d}"] - dense) <= tol_for(np.float64) * dense
    assert out["update_fisher_half_d5"] > out["update_fisher_half_d2"]
