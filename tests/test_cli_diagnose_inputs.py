"""``geomcollapse diagnose``: malformed arguments stop it before any compute, in one line.

Every case runs ``cli.main`` in-process on a one-block transformer checkpoint;
where the argument alone is at fault the weights must never load
(``checkpoint.load_checkpoint`` is replaced by one that fails the test).
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomcollapse import checkpoint, cli, models, token_files

CONFIG = models.TransformerConfig(vocab=5, context=4, d_model=4, heads=2, layers=1, mlp_ratio=2)


def _weights(rng, nan_fraction=0.0):
    _, abstract = models.transformer_abstract(CONFIG)  # shapes only, no eager init ops

    def draw(a):
        w = 0.5 * rng.standard_normal(a.shape)
        return jnp.asarray(np.where(rng.random(a.shape) < nan_fraction, np.nan, w), a.dtype)

    return jax.tree.map(draw, abstract)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A one-block transformer checkpoint, one whose weights hold NaN, a skill and a task file."""
    root = tmp_path_factory.mktemp("diagnose_inputs")
    rng = np.random.default_rng(0)
    checkpoint.save_checkpoint(root / "ckpt", _weights(rng), CONFIG)
    nan_weights = _weights(rng, nan_fraction=0.1)
    checkpoint.save_checkpoint(root / "ckpt_nan", nan_weights, CONFIG, allow_non_finite=True)
    np.savez(root / "skill.npz", tokens=rng.integers(0, CONFIG.vocab, (6, 4)))
    rows = [list(map(int, rng.integers(0, CONFIG.vocab, 2 + i % 3))) for i in range(6)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def no_load(monkeypatch):
    """Loading the weights fails the test: the command must stop before it."""

    def load(*args, **kwargs):
        raise AssertionError("the checkpoint's weights were loaded")

    monkeypatch.setattr(checkpoint, "load_checkpoint", load)


def _diagnose(files, tmp_path, *extra, ckpt="ckpt", out=None):
    args = ["diagnose", "--no-progress", "--checkpoint", str(files / ckpt)]
    args += ["--skill", str(files / "skill.npz"), "--task", str(files / "task.jsonl")]
    args += ["--out", str(tmp_path / "out" if out is None else out), *extra]
    return cli.main(args)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("geomcollapse diagnose: error: "), err
    return err


@pytest.mark.parametrize("seed", [str(2**64), str(2**63), "-1", str(-(2**63))])
def test_a_seed_jax_cannot_take_or_a_negative_one_is_refused_naming_seed(
    seed, files, tmp_path, capsys, no_load
):
    assert _diagnose(files, tmp_path, "--seed", seed) == 2
    err = _one_line(capsys)
    assert "--seed must be an integer in [0, 2**63)" in err and seed in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "case", ["a file", "below a file", "a dangling link", "report a directory"]
)
def test_an_out_that_cannot_take_the_reports_is_refused_before_any_compute(
    case, files, tmp_path, capsys, no_load
):
    (tmp_path / "file").write_text("x")
    if case == "a file":
        out, problem = tmp_path / "file", "exists and is not a directory"
    elif case == "below a file":
        out = tmp_path / "file" / "sub" / "out"
        problem = f"cannot be created: {tmp_path / 'file'} is not a directory"
    elif case == "a dangling link":
        out, problem = tmp_path / "link", "exists and is not a directory"
        out.symlink_to(tmp_path / "nowhere")
    else:
        out, problem = tmp_path / "out", "report.png there is a directory"
        (out / "report.png").mkdir(parents=True)
    assert _diagnose(files, tmp_path, out=out) == 2
    err = _one_line(capsys)
    assert f"--out {out}: {problem}" in err, err
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "nowhere").exists()


def test_an_out_that_can_be_created_or_exists_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir").mkdir()
    for out in (tmp_path / "dir", tmp_path / "new" / "deeper", cli.Path("."), cli.Path("rel/x")):
        assert cli._out_problem(out) is None, out
    assert not (tmp_path / "new").exists() and not (tmp_path / "rel").exists()  # nothing created


def test_a_failed_write_of_the_reports_names_out(tmp_path, capsys, monkeypatch):
    """What the file system refuses after the checks (a full disk) is one line naming --out."""

    class Refused:
        warnings = ()

        def save(self, directory, arrays=False):
            raise OSError(28, "No space left on device", str(directory / "report.png"))

    monkeypatch.setattr(token_files, "diagnose_checkpoint", lambda *a, **k: Refused())
    args = ["diagnose", "--checkpoint", "c", "--skill", "s.npy", "--task", "t.npy"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    err = _one_line(capsys)
    assert f"--out {tmp_path}: [Errno 28] No space left on device" in err, err


def test_a_checkpoint_whose_weights_hold_nan_is_named_in_the_error(files, tmp_path, capsys):
    assert _diagnose(files, tmp_path, ckpt="ckpt_nan") == 2
    err = _one_line(capsys)
    assert f"error: {files / 'ckpt_nan'}: the checkpoint's weights: " in err, err
    assert re.search(r"weights: \S+ has \d+ non-finite \(NaN or inf\) entries", err), err
    assert not (tmp_path / "out").exists()


PLANS = {
    "d past n": (["--d", "999"], "d=999 must be smaller than n="),
    "d zero": (["--d", "0"], "d must be an integer >= 1, got 0"),
    "lr nan": (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    "lr negative": (["--lr", "-1"], "lr must be a finite number > 0, got -1.0"),
    "steps zero": (["--lr", "0.1", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    "steps without lr": (["--steps", "5"], "lr is required with steps"),
    "threshold without lr": (["--threshold", "0.1"], "lr is required with threshold"),
    "threshold negative": (["--lr", "1", "--threshold", "-1"], "threshold must be a finite"),
    "order too low": (["--order", "1"], "order must lie in [2, 12]"),
    "order too high": (["--order", "13"], "order must lie in [2, 12]"),
}


@pytest.mark.parametrize("case", PLANS)
def test_a_bad_plan_argument_is_refused_before_the_weights_load(
    case, files, tmp_path, capsys, no_load
):
    flags, problem = PLANS[case]
    assert _diagnose(files, tmp_path, *flags) == 2
    err = _one_line(capsys)
    assert problem in err, err
    assert not (tmp_path / "out").exists()
