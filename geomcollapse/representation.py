"""Representation-space gradients of the transformer's dense layers.

For a dense layer ``y = hW + b`` inside the model (``W`` of shape
``(in, out)``), the gradient of a scalar ``ℓ`` of the logits with respect to
``W`` factorises over positions: ``∂ℓ/∂W = Σ_p h_pᵀ δ_p``, with ``h_p`` the
layer's input at position ``p`` and ``δ_p = ∂ℓ/∂y_p`` the output-side
gradient. So every gradient of ``W`` — and every Fisher eigenvector's
``W``-block, a combination of per-example gradients — has its output side
(the row space of the ``(in, out)`` block) inside the span of the ``δ_p``.
Issue 13, item 3: how concentrated the stacked ``δ`` are
(:func:`output_spectrum`, or :func:`gram_spectrum` from ``δᵀδ``), and how
much of an eigenvector's ``W``-block lies in their top-``r`` subspace
(:func:`output_fraction`; random baseline ``r/out``).

The factors are read from the unchanged model: each ``nnx.Linear`` of the
merged module gets a ``dot_general`` (a flax constructor argument, so no
model change) that records its input ``h`` and adds a zero probe to its
output; ``δ`` is the cotangent of that probe.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "DenseFactors",
    "OutputSpectrum",
    "dense_factors",
    "gram_spectrum",
    "output_fraction",
    "output_spectrum",
    "skill_fisher_factors",
]


class DenseFactors(NamedTuple):
    """Input activations and output-side gradients of one dense layer.

    ``∂⟨c_k, logits⟩/∂W = Σ_n Σ_t inputs[n, t]ᵀ output_grads[n, k, t]``
    (``einsum('nti,nktj->kij')``); per example ``n`` the summand over ``t`` is
    that example's share.

    Attributes:
      inputs: ``(N, T, in)`` the layer's inputs ``h``.
      output_grads: ``(N, K, T, out)`` ``δ``, one row per example, cotangent, position.
    """

    inputs: jax.Array
    output_grads: jax.Array

    def weight_gradients(self) -> jax.Array:
        """``(N, K, in, out)`` per-example, per-cotangent gradients ``Σ_t h_tᵀ δ_t``."""
        return jnp.einsum("nti,nktj->nkij", self.inputs, self.output_grads)


def _probed_forward(graphdef: nnx.GraphDef, where: str | None) -> Callable[..., Any]:
    """``forward(params, tokens, probes) -> (logits, ({layer: input}, {layer: output}))``.

    ``probes[layer]`` (shaped like the layer's output) is added to that output.
    """
    pattern = re.compile(where) if where is not None else None

    def forward(params, tokens, probes):
        model = nnx.merge(graphdef, params)
        inputs, outputs = {}, {}
        for path, module in nnx.iter_modules(model):
            name = "/".join(str(p) for p in path)
            if not isinstance(module, nnx.Linear):
                continue
            if pattern is not None and pattern.search(name) is None:
                continue

            def recording(x, kernel, dims, *a, _name=name, _inner=module.dot_general, **kw):
                inputs[_name] = x
                y = _inner(x, kernel, dims, *a, **kw)
                y = y + probes[_name] if _name in probes else y
                outputs[_name] = y
                return y

            module.dot_general = recording
        return model(tokens), (inputs, outputs)

    return forward


def dense_factors(graphdef: nnx.GraphDef, where: str | None = None) -> Callable[..., Any]:
    """``factors(params, tokens, cotangents) -> {layer: DenseFactors}`` for the transformer.

    One forward pass and one backward pass per cotangent (``vmap`` of one
    ``vjp``); the model is the one ``models.transformer_logits(graphdef)`` computes.

    Args:
      graphdef: the transformer's graph (``models.transformer_init``).
      where: regular expression searched in the module path (``'blocks/1/fc2'``,
        ``'head'``); default every ``nnx.Linear``. The layer's kernel is the
        parameter leaf ``f'{layer}/kernel'``.

    Returns:
      ``factors(params, tokens, cotangents)`` with ``tokens`` ``(N, T)`` and
      ``cotangents`` ``(K, N, T, V)`` on the logits: ``δ`` is the gradient of
      ``⟨cotangents[k], logits⟩`` (for ``ℓ(logits)``, pass ``∂ℓ/∂logits`` with ``K = 1``).
    """
    forward = _probed_forward(graphdef, where)

    def factors(params, tokens, cotangents):
        _, (_, shapes) = jax.eval_shape(lambda p: forward(p, tokens, {}), params)
        if not shapes:
            raise ValueError(f"where={where!r} matches no dense layer of the model")
        probes = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}
        logits, pullback, (inputs, _) = jax.vjp(
            lambda q: forward(params, tokens, q), probes, has_aux=True
        )
        if cotangents.ndim != logits.ndim + 1 or cotangents.shape[1:] != logits.shape:
            raise ValueError(
                f"cotangents must have shape (K, *{logits.shape}), got {cotangents.shape}"
            )
        deltas = jax.vmap(pullback)(cotangents.astype(logits.dtype))[0]  # {name: (K, N, T, out)}
        return {
            name: DenseFactors(inputs[name], jnp.moveaxis(deltas[name], 0, 1)) for name in shapes
        }

    return factors


def skill_fisher_factors(graphdef: nnx.GraphDef, where: str | None = None) -> Callable[..., Any]:
    """``factors(params, tokens, answer_start) -> {layer: DenseFactors}`` of the skill Fisher.

    Per prompt ``n`` and class ``c`` (``K = V``), the cotangent
    ``√(p_c/N)(e_c − p)`` at the first answer position: its weight gradient is
    ``G_nc = √(p_c/N) ∇_W log p_c``, and ``Σ_{n,c} vec G_nc vec G_ncᵀ`` is the
    ``W``-block of the true skill Fisher ``F = (1/N) Σ_n Jᵀ(diag p − ppᵀ)J``
    (docs/theory.md §1), since ``Σ_c p_c (e_c − p)(e_c − p)ᵀ = diag p − ppᵀ``.
    Prompts run one at a time (``vmap``), so the ``N·V`` gradients stay separate.

    Returns ``DenseFactors`` with ``inputs`` ``(N, T, in)`` and ``output_grads``
    ``(N, V, T, out)``.
    """
    factors = dense_factors(graphdef, where)
    logits_fn = _probed_forward(graphdef, None)

    def fisher(params, tokens, answer_start):
        num = tokens.shape[0]
        logits = logits_fn(params, tokens, {})[0]
        z = jnp.take_along_axis(logits, answer_start[:, None, None], axis=1)[:, 0]
        p = jax.nn.softmax(z, axis=-1)  # (N, V)
        vocab = p.shape[-1]
        rows = jnp.sqrt(p / num)[:, :, None] * (jnp.eye(vocab, dtype=p.dtype)[None] - p[:, None])
        at = jax.nn.one_hot(answer_start, tokens.shape[1], dtype=p.dtype)  # (N, T)
        cot = rows[:, :, None, :] * at[:, None, :, None]  # (N, V, T, V)

        def one(tok, c):
            out = factors(params, tok[None], c[:, None])
            return {k: DenseFactors(f.inputs[0], f.output_grads[0]) for k, f in out.items()}

        return jax.vmap(one)(tokens, cot)

    return fisher


class OutputSpectrum(NamedTuple):
    """Singular values and right singular vectors of stacked output-side gradients.

    Attributes:
      singular_values: ``(m,)`` descending, ``m = min(rows, out)``.
      vectors: ``(out, m)`` orthonormal columns, the matching right singular vectors.
    """

    singular_values: np.ndarray
    vectors: np.ndarray

    def energy_fraction(self, r: int) -> float:
        """``Σ_{i≤r} σ_i² / Σ σ_i²``: the share of ``‖δ‖²`` in the top-``r`` directions."""
        s2 = self.singular_values**2
        return float(np.sum(s2[:r]) / np.sum(s2))

    def basis(self, r: int) -> np.ndarray:
        """``(out, r)`` orthonormal basis of the top-``r`` output subspace."""
        return self.vectors[:, :r]


def output_spectrum(output_grads) -> OutputSpectrum:
    """:class:`OutputSpectrum` of the rows ``output_grads.reshape(-1, out)`` (float64 SVD)."""
    rows = np.asarray(output_grads, np.float64)
    rows = rows.reshape(-1, rows.shape[-1])
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    return OutputSpectrum(s, vt.T)


def gram_spectrum(gram) -> OutputSpectrum:
    """:class:`OutputSpectrum` of stacked rows ``δ`` from their Gram matrix ``δᵀδ`` ``(out, out)``.

    The same singular values (``√`` of the Gram's eigenvalues, clipped at 0)
    and right singular vectors as :func:`output_spectrum` of the rows, without
    holding them: the Gram of many prompts is a sum over chunks of prompts.
    Squaring costs accuracy only in the smallest singular values (below
    ``√eps·σ₁``), not in energy fractions or the leading directions.
    """
    G = np.asarray(gram, np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"gram must be a square (out, out) matrix, got shape {G.shape}")
    w, U = np.linalg.eigh(0.5 * (G + G.T))
    return OutputSpectrum(np.sqrt(np.maximum(w[::-1], 0.0)), U[:, ::-1])


def output_fraction(block, basis) -> float:
    """``‖B Π‖²_F / ‖B‖²_F``: the share of an ``(in, out)`` weight block on the output subspace.

    ``Π = Q Qᵀ`` with ``Q = basis`` ``(out, r)`` orthonormal
    (:meth:`OutputSpectrum.basis`); ``B`` is, e.g., a Fisher eigenvector's
    kernel block. A block with i.i.d. entries scores ``r/out`` on average (the
    random baseline); a gradient of the layer scores 1 once ``Q`` spans all ``δ``.
    """
    B = np.asarray(block, np.float64)
    Q = np.asarray(basis, np.float64)
    if B.ndim != 2 or Q.ndim != 2 or Q.shape[0] != B.shape[1]:
        raise ValueError(f"block (in, out) and basis (out, r) disagree: {B.shape}, {Q.shape}")
    return float(np.sum((B @ Q) ** 2) / np.sum(B**2))
