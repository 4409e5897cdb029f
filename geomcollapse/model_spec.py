"""Any model for ``geomcollapse diagnose --spec``: a function that returns the model and data.

A spec is ``FILE.py``, ``FILE.py:function``, ``package.module`` or
``package.module:function`` (the function defaults to ``spec``). The function
takes no argument and returns a :class:`ModelSpec` or a dict with its fields:

- ``skill_loss``, ``task_loss`` (required): ``u(params, *skill_args)`` and
  ``L(params, *task_args)`` -> scalar, as :func:`geomcollapse.diagnose` takes them;
- ``params`` (required): ``θ*``, a pytree of floating arrays;
- ``skill_args``, ``task_args``: tuples of the losses' extra arguments, the data
  (default ``()``; a list is taken as a tuple);
- ``skill_logits``: ``(params, *skill_args) -> (N, ..., C)`` logits, for the true
  Fisher (``fisher='true'``, the default);
- ``fisher``: ``'true'``, ``'empirical'`` or a matvec ``fisher(params, v, *skill_args)``.

:func:`load_spec` reads one (``ValueError`` naming what is missing or wrong);
:func:`diagnose_spec` is exactly ``geomcollapse.diagnose(skill_loss, task_loss,
params, skill_args=…, task_args=…, skill_logits=…, fisher=…, **options)``, so the
CLI's report equals the library call's. See docs/diagnose.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from geomcollapse.diagnosis import Diagnosis, diagnose

__all__ = ["ModelSpec", "diagnose_spec", "load_spec", "model_spec", "spec_source"]

REQUIRED = ("skill_loss", "task_loss", "params")
DEFAULT_FUNCTION = "spec"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model to diagnose: its two losses, ``θ*`` and their data (module docstring)."""

    skill_loss: Callable[..., Any]
    task_loss: Callable[..., Any]
    params: Any
    skill_args: tuple = ()
    task_args: tuple = ()
    skill_logits: Callable[..., Any] | None = None
    fisher: str | Callable[..., Any] = "true"


FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))


def model_spec(value: Any, where: str = "the spec") -> ModelSpec:
    """``value`` (a :class:`ModelSpec` or a dict of its fields) checked as a :class:`ModelSpec`.

    Raises ``ValueError`` naming ``where`` and the missing, unknown or wrong field.
    """
    if isinstance(value, ModelSpec):
        value = {f: getattr(value, f) for f in FIELDS}
    if not isinstance(value, dict):
        raise ValueError(
            f"{where} returned {type(value).__name__}; return a dict with keys "
            f"{list(REQUIRED)} (optionally {list(FIELDS[3:])}) or a geomcollapse.model_spec."
            "ModelSpec"
        )
    missing = [k for k in REQUIRED if k not in value]
    if missing:
        raise ValueError(f"{where} has no {missing}: a spec needs {list(REQUIRED)}")
    unknown = sorted(set(value) - set(FIELDS), key=str)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; a spec's keys: {list(FIELDS)}")
    for name in ("skill_loss", "task_loss"):
        if not callable(value[name]):
            raise ValueError(
                f"{where}: {name} must be a function (params, *args) -> scalar, got "
                f"{type(value[name]).__name__}"
            )
    logits = value.get("skill_logits")
    if logits is not None and not callable(logits):
        raise ValueError(
            f"{where}: skill_logits must be a function (params, *skill_args) -> logits or None, "
            f"got {type(logits).__name__}"
        )
    fields = dict(value)
    for name in ("skill_args", "task_args"):
        args = fields.get(name, ())
        if not isinstance(args, tuple | list):
            raise ValueError(
                f"{where}: {name} must be a tuple of the loss's extra arguments (the data), "
                f"got {type(args).__name__}; wrap a single array as (array,)"
            )
        fields[name] = tuple(args)
    return ModelSpec(**fields)


def _split(target: str) -> tuple[str, str]:
    """``'a/b.py:make'`` -> ``('a/b.py', 'make')``; the function defaults to ``spec``."""
    where, sep, function = target.rpartition(":")
    if not sep or not function.isidentifier() or not where:
        return target, DEFAULT_FUNCTION
    return where, function


def spec_source(target: str) -> str:
    """The file (as an absolute path) or the module that ``target`` names, as
    :func:`load_spec` reads it: a file relative to the working directory."""
    where, _ = _split(target)
    return str(Path(where).resolve()) if _names_a_file(where) else where


def _names_a_file(where: str) -> bool:
    """``where`` is a Python file (else a module name)."""
    return where.endswith(".py") or Path(where).is_file()


def _load_module(where: str, target: str):
    if _names_a_file(where):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--spec {target}: {where} is not a file")
        # a module name of its own, registered before it runs (a dataclass in it needs that)
        name = "geomcollapse_spec_" + "".join(c if c.isalnum() else "_" for c in path.stem)
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ValueError(f"--spec {target}: {where} cannot be loaded as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        return module
    if not all(part.isidentifier() for part in where.split(".")):
        raise ValueError(
            f"--spec {target}: neither a .py file nor a module name (FILE.py[:function] or "
            "package.module[:function])"
        )
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        if err.name is not None and (where == err.name or where.startswith(err.name + ".")):
            raise ValueError(f"--spec {target}: no module {where!r}") from None
        raise


def load_spec(target: str) -> ModelSpec:
    """Load ``target`` (``FILE.py[:function]`` or ``module[:function]``), call it, check it.

    The function takes no argument. Raises ``ValueError`` naming ``target`` if the
    file or module is missing, the function is missing, not callable or needs
    arguments, or what it returns is not a spec (:func:`model_spec`). An exception
    raised by the user's own code is left as it is (its traceback points into that code).
    """
    if not isinstance(target, str) or not target:
        raise ValueError(
            f"--spec must name FILE.py[:function] or module[:function], got {target!r}"
        )
    where, function = _split(target)
    module = _load_module(where, target)
    make = getattr(module, function, None)
    if not callable(make):
        defined = sorted(
            k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
        )
        raise ValueError(
            f"--spec {target}: {where} defines no function {function!r} (its functions: "
            f"{defined}); name one as {where}:function"
        )
    try:
        inspect.signature(make).bind()
    except TypeError:  # e.g. `logits(params, x)` named instead of the spec function
        raise ValueError(
            f"--spec {target}: {function}{inspect.signature(make)} takes arguments; name the "
            "function that takes none and returns the spec (default: spec)"
        ) from None
    except ValueError:  # no signature to read (a builtin): call it and see
        pass
    return model_spec(make(), f"--spec {target}")


def diagnose_spec(spec: ModelSpec, **options: Any) -> Diagnosis:
    """:func:`geomcollapse.diagnose` of ``spec``'s model, with ``options`` (``key``, ``d``, ...)."""
    return diagnose(
        spec.skill_loss,
        spec.task_loss,
        spec.params,
        skill_args=spec.skill_args,
        task_args=spec.task_args,
        skill_logits=spec.skill_logits,
        fisher=spec.fisher,
        **options,
    )
