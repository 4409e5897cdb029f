"""Forecasts of the alignment loss: the Taylor series along gradient flow and under minibatch SGD.

:mod:`geomcollapse.series` is two modules behind one face:

* the flow forecast (docs/theory.md §6): :func:`flow_taylor`, :func:`delta_u_series`
  and the :class:`Series` they return, the window (:func:`polynomial_validity_time`)
  and the crossing step (:func:`crossing_step`, :func:`first_order_time`);
* the minibatch-SGD forecast (docs/theory.md §8): :func:`sgd_delta_u` and its
  :class:`SGDForecast`, built on the first.

Typical use::

    s = series.delta_u_series(skill_loss, task_loss, params, 4, subspace=(lam, basis))
    s.delta_u            # (5,) c₀ … c₄ of Δu(t); c₀ = 0
    s.projected          # (5,) the same for ½‖F^{1/2}Px(t)‖²
    s.evaluate(ts)       # both series at times ts
    s.validity_time      # where the t⁴ term reaches 10 % of the sum
"""

from geomcollapse.series._flow import (
    Series,
    SeriesValues,
    TaylorFallbackWarning,
    TaylorRoute,
    crossing_step,
    delta_u_series,
    first_order_time,
    flow_taylor,
    polynomial_validity_time,
    projected_from_coordinates,
)
from geomcollapse.series._sgd import SGDForecast, sgd_delta_u

__all__ = [
    "SGDForecast",
    "Series",
    "SeriesValues",
    "TaylorFallbackWarning",
    "TaylorRoute",
    "crossing_step",
    "delta_u_series",
    "first_order_time",
    "flow_taylor",
    "polynomial_validity_time",
    "projected_from_coordinates",
    "sgd_delta_u",
]
