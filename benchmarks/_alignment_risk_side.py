"""The alignment-risk side of ``benchmarks.compare_alignment_risk``: torch only, no JAX.

The MLP of the comparison rebuilt as a ``torch.nn.Sequential`` from the same
numpy weights (``w`` ``(d_in, d_out)`` → ``Linear.weight = wᵀ``), the skill
and fine-tuning losses written in torch, and one run of alignment-risk's
``AlignmentRiskPipeline`` whose numbers come back as a plain dict. Run as
``python -m benchmarks._alignment_risk_side DATA.npz D`` it times that
pipeline on the weights and data in ``DATA.npz`` and prints one JSON line
(wall time and peak memory of this process), so that it can be measured in
its own process, apart from JAX.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM`` of ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def torch_mlp(layers: list[tuple[np.ndarray, np.ndarray]], dtype):
    """``Linear → Tanh → … → Linear``, ``Linear.weight = wᵀ`` and ``bias = b`` per ``(w, b)``."""
    import torch

    modules = []
    for i, (w, b) in enumerate(layers):
        lin = torch.nn.Linear(w.shape[0], w.shape[1], dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(np.array(w.T), dtype=dtype))
            lin.bias.copy_(torch.tensor(np.array(b), dtype=dtype))
        modules.append(lin)
        if i < len(layers) - 1:
            modules.append(torch.nn.Tanh())
    return torch.nn.Sequential(*modules)


def kl_skill_loss(model, batch):
    """Mean ``KL(softmax(z*) ‖ softmax(model(x)))`` of a ``(x, z*)`` batch: exact minimum at θ*."""
    import torch

    x, ref = batch
    logq = torch.log_softmax(model(x), dim=-1)
    logp = torch.log_softmax(ref, dim=-1)
    return torch.sum(torch.exp(logp) * (logp - logq), dim=-1).mean()


def fisher_rows_loss(model, batch):
    """``√(C p_ic) log p_ic(θ)`` per ``(x_i, c, √(C p_ic))`` row.

    Over the ``N·C`` rows of :func:`fisher_rows`, the mean outer product of
    these per-row gradients is ``(1/N) Σ_i Σ_c p_ic ∇log p_ic ∇log p_icᵀ``:
    the true Fisher, exactly, from alignment-risk's empirical-Fisher code.
    """
    import torch

    x, cls, weight = batch
    logq = torch.log_softmax(model(x), dim=-1)
    return (weight * logq.gather(-1, cls[:, None])[:, 0]).mean()


def fisher_rows(x: np.ndarray, ref_logits: np.ndarray, dtype):
    """The ``N·C`` rows ``(x_i, c, √(C p_ic))`` of :func:`fisher_rows_loss`; ``p = softmax(z*)``."""
    import torch

    n, c = ref_logits.shape
    z = ref_logits - ref_logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return (
        torch.as_tensor(np.repeat(x, c, axis=0), dtype=dtype),
        torch.as_tensor(np.tile(np.arange(c), n), dtype=torch.long),
        torch.as_tensor(np.sqrt(c * p).reshape(-1), dtype=dtype),
    )


def cross_entropy(model, batch):
    """Mean cross-entropy of a ``(x, y)`` batch: the fine-tuning loss ``L``."""
    import torch

    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def orthogonalized_cross_entropy(pg: list[tuple[np.ndarray, np.ndarray]], model0):
    """``L(θ) − ⟨Pg(θ*), θ − θ*⟩`` for ``pg`` given per layer as ``(w, b)`` in the JAX layout."""
    import torch

    dtype = next(model0.parameters()).dtype
    flat_pg = torch.cat(
        [
            t
            for w, b in pg
            for t in (
                torch.as_tensor(np.ascontiguousarray(w.T), dtype=dtype).reshape(-1),
                torch.as_tensor(b, dtype=dtype),
            )
        ]
    )
    theta_star = torch.cat([p.detach().reshape(-1).clone() for p in model0.parameters()])

    def loss(model, batch):
        theta = torch.cat([p.reshape(-1) for p in model.parameters()])
        return cross_entropy(model, batch) - torch.dot(flat_pg, theta - theta_star)

    return loss


def run_pipeline(
    model,
    safety_batches: list,
    safety_loss,
    task_batch: tuple,
    task_loss,
    *,
    d: int | None,
    max_samples: int = 128,
    learning_rate: float = 1e-4,
    max_steps: int = 2000,
    max_parameters: int = 500_000,
) -> dict:
    """One ``AlignmentRiskPipeline.run`` with ``d`` eigenpairs (``None``: its defaults).

    ``d = None`` keeps every Fisher default (rank by 90 % explained variance,
    at most 32); an integer fixes ``top_rank = d`` and turns the
    explained-variance rule off, so both tools use the same ``dim M``. The
    forecast's step ``k`` is the flow time ``t = learning_rate · k``
    (alignment-risk maps ``ε̂ → lr·ε̂``, ``γ̂ → lr²·γ̂``).
    """
    import alignment_risk as ar
    import torch

    fisher = ar.FisherConfig(max_samples=max_samples, max_parameters=max_parameters, device="cpu")
    if d is not None:
        fisher = ar.FisherConfig(
            max_samples=max_samples,
            max_parameters=max_parameters,
            top_rank=d,
            target_explained_variance=None,
            device="cpu",
        )
    config = ar.PipelineConfig(
        fisher=fisher,
        curvature=ar.CurvatureConfig(device="cpu"),
        forecast=ar.ForecastConfig(max_steps=max_steps, step_size=1.0),
        learning_rate=learning_rate,
    )
    pipeline = ar.AlignmentRiskPipeline(config)
    start, cpu = time.perf_counter(), time.process_time()
    report = pipeline.run(model, safety_batches, safety_loss, [task_batch], task_loss)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    lam = report.subspace.fisher_eigenvalues.double()
    # the λ_min its forecast multiplies by: the 10 % lower quantile of the kept eigenvalues
    lambda_min = float(pipeline._stable_lambda_min(report.subspace))
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "d": int(lam.numel()),
        "eigenvalues": [float(v) for v in lam],
        "lambda_d": float(lam[-1]) if lam.numel() else float("nan"),
        "top_eigenvalues_sum": float(lam.sum()),
        "lambda_min": lambda_min,
        "epsilon_hat": report.curvature.epsilon_hat,
        "gamma_hat": report.curvature.gamma_hat,
        "orthogonality": report.initial_risk.projected_norm / learning_rate,
        "gradient_norm": report.initial_risk.update_norm / learning_rate,
        "learning_rate": learning_rate,
        "estimated_loss": [float(v) for v in report.forecast.estimated_loss],
        "collapse_step": report.forecast.collapse_step,
        "warning": report.warning,
        "torch": torch.__version__,
        "alignment_risk": ar.__version__,
    }


def layers_from_npz(data) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(w0, b0), (w1, b1), …]`` from the ``w{i}``/``b{i}`` arrays of an ``.npz``."""
    count = sum(1 for k in data.files if k.startswith("w"))
    return [(data[f"w{i}"], data[f"b{i}"]) for i in range(count)]


def large_child(path: str, d: int) -> dict:
    """alignment-risk on the weights and data of ``path``; this process's wall and peak memory."""
    import torch

    data = np.load(path)
    model = torch_mlp(layers_from_npz(data), torch.float32)
    skill = (torch.as_tensor(data["skill_x"]), torch.as_tensor(data["skill_y"]))
    task = (torch.as_tensor(data["task_x"]), torch.as_tensor(data["task_y"]))
    n = sum(p.numel() for p in model.parameters())
    rss_before = peak_rss_bytes()
    result = run_pipeline(
        model,
        [skill],
        cross_entropy,
        task,
        cross_entropy,
        d=d,
        max_parameters=max(500_000, n),
    )
    result.pop("estimated_loss")
    result.update(num_params=n, peak_rss_bytes=peak_rss_bytes(), rss_before_bytes=rss_before)
    result["torch_threads"] = torch.get_num_threads()
    return result


if __name__ == "__main__":
    print(json.dumps(large_child(sys.argv[1], int(sys.argv[2]))))
