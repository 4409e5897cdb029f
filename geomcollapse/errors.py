"""Typed errors: callers classify a failure by its class, never by its message text.

Each subclasses ``ValueError``, so ``except ValueError`` keeps catching it.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["BroadcastDataWarning", "FlatLossWarning", "NotSymmetricError"]


class NotSymmetricError(ValueError):
    """A matvec that should be symmetric is not: ``⟨q_i, A q_j⟩ ≠ ⟨A q_i, q_j⟩`` beyond rounding.

    Raised by :func:`geomcollapse.linalg.top_eigenpairs`; :func:`geomcollapse.diagnose`
    reads it as a skill Fisher that is rounding noise or not a Fisher.
    """


class FlatLossWarning(UserWarning):
    """A loss whose gradient (hence ``Hg``) is exactly zero at ``θ*``: ``γ = 0`` and a zero
    forecast then say the loss is flat (e.g. built on ``argmax``), not that fine-tuning is safe.

    Warned by :func:`geomcollapse.aic.measure_aic`, :func:`geomcollapse.series.delta_u_series`
    and :func:`geomcollapse.series.sgd_delta_u`; :func:`geomcollapse.diagnose` lists it in
    the report's warnings instead.
    """


class BroadcastDataWarning(UserWarning):
    """A loss's data where one array's leading (example) axis is 1 while another's is longer:
    JAX broadcasts it over the examples without a word. Said once per message by the
    boundary check of every entry point; filter it (``warnings.filterwarnings("ignore",
    category=BroadcastDataWarning)``) where such an argument is meant (not per-example data).
    """


# the packages a call from the user passes through on its way to a warning: ours, and
# the JAX libraries it calls through (tracing, equinox's jit, optax's chains)
_THROUGH = frozenset(
    {"geomcollapse", "jax", "jaxlib", "optax", "flax", "equinox", "lineax", "diffrax"}
)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the user's line: the first frame outside ``_THROUGH``.

    A fixed ``stacklevel`` points into the library whenever the public function that
    warns is reached by another path (``from_diagnosis`` → ``monitor``, ``diagnose`` →
    ``measure_aic``, a traced loss); the frames are counted instead.
    """
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] in _THROUGH:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
