"""Diagnose a model before fine-tuning: :func:`diagnose` and its :class:`Diagnosis`.

A composition of the library's measurements at ``θ*`` (docs/theory.md §2-§6), one
module each: :mod:`~geomcollapse.diagnosis.plan` (the arguments, checked once),
:mod:`~geomcollapse.diagnosis.fisher` (the skill Fisher's matvec and its refusals),
:mod:`~geomcollapse.diagnosis.spectrum` (top eigenpairs, ``tr F``, ``d``),
:mod:`~geomcollapse.diagnosis.forecast` (the series and the AIC at ``d``),
:mod:`~geomcollapse.diagnosis.run` (:func:`diagnose`),
:mod:`~geomcollapse.diagnosis.report` (:class:`Diagnosis`: JSON, Markdown, files) and
:mod:`~geomcollapse.diagnosis.plot` (its figure; imported on demand, it needs matplotlib).
"""

from geomcollapse.diagnosis.plan import (
    DEFAULT_MAX_D,
    DEFAULT_ORDER,
    DEFAULT_SHARE,
    DENSE_MAX_N,
    MAX_ORDER,
    check_plan,
)
from geomcollapse.diagnosis.report import ARRAYS_FILE, REPORT_FILES, Diagnosis
from geomcollapse.diagnosis.run import diagnose

__all__ = [
    "ARRAYS_FILE",
    "DEFAULT_MAX_D",
    "DEFAULT_ORDER",
    "DEFAULT_SHARE",
    "DENSE_MAX_N",
    "MAX_ORDER",
    "REPORT_FILES",
    "Diagnosis",
    "check_plan",
    "diagnose",
]
