"""Typed errors: callers classify a failure by its class, never by its message text.

Each subclasses ``ValueError``, so ``except ValueError`` keeps catching it.
"""

from __future__ import annotations

__all__ = ["NotSymmetricError"]


class NotSymmetricError(ValueError):
    """A matvec that should be symmetric is not: ``⟨q_i, A q_j⟩ ≠ ⟨A q_i, q_j⟩`` beyond rounding.

    Raised by :func:`geomcollapse.linalg.top_eigenpairs`; :func:`geomcollapse.diagnose`
    reads it as a skill Fisher that is rounding noise or not a Fisher.
    """
