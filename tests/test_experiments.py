"""The main job and its experiments run end to end (tiny configs) and write what they claim."""

import json

import numpy as np

from experiments import reproduce, spectrum_mlp


def test_reproduce_writes_table_results_and_figure(tmp_path):
    claims = reproduce.main(outdir=tmp_path, tiny=True)
    text = (tmp_path / "paper_repro.md").read_text()
    assert text.startswith("# paper_repro.md")
    assert text.count("\n| ") == len(claims) + 1  # header + one row per claim
    for c in claims:
        assert f"`{c.command}`" in text and c.verdict in text
    result = json.loads((tmp_path / "experiments/results/spectrum_mlp.json").read_text())
    assert (tmp_path / result["figure"]).stat().st_size > 10_000
    # The identities hold even on the tiny problem.
    assert result["fisher_ggn_rel"] <= 1e-12
    assert max(result["max_relative_residual"].values()) <= spectrum_mlp.TINY.tol
    np.testing.assert_allclose(
        result["eigenvalues"]["empirical_fisher"], result["gram_eigenvalues"], rtol=1e-7, atol=1e-12
    )
    # The softmax Fisher is positive semi-definite.
    assert min(result["eigenvalues"]["fisher"]) >= 0
    passed = {c["claim"][:20]: c["passed"] for c in result["claims"]}
    assert all(passed[k] for k in passed if not k.startswith("Control"))
