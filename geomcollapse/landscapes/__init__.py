"""Synthetic landscapes with exact answers: quadratic (docs/theory.md §4) and logistic (§5).

* :class:`QuadraticLandscape` / :func:`make_quadratic_landscape`: ``L = ½xᵀAx + cᵀx``
  and ``u = ½xᵀFx`` with chosen AIC numbers, exact flows and GD.
* :class:`LogisticLandscape` / :func:`make_logistic_landscape` /
  :func:`make_logistic_batch`: multinomial logistic skill and fine-tuning NLLs.
* Batches: :func:`quadratic_summary`, :func:`quadratic_summary_krylov`,
  :func:`summarize_batch`, :func:`map_landscapes`.
"""

from geomcollapse.landscapes._batch import (
    KrylovSummary,
    QuadraticSummary,
    map_landscapes,
    quadratic_summary,
    quadratic_summary_krylov,
    summarize_batch,
)
from geomcollapse.landscapes._logistic import (
    LogisticLandscape,
    make_logistic_batch,
    make_logistic_landscape,
    orthogonal_correction,
    softmax_fisher,
    softmax_nll,
)
from geomcollapse.landscapes._quadratic import QuadraticLandscape, make_quadratic_landscape

__all__ = [
    "KrylovSummary",
    "LogisticLandscape",
    "QuadraticLandscape",
    "QuadraticSummary",
    "make_logistic_batch",
    "make_logistic_landscape",
    "make_quadratic_landscape",
    "map_landscapes",
    "orthogonal_correction",
    "quadratic_summary",
    "quadratic_summary_krylov",
    "softmax_fisher",
    "softmax_nll",
    "summarize_batch",
]
