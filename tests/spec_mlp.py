"""A model that is not one of ours, for ``geomcollapse diagnose --spec tests/spec_mlp.py``.

A plain-JAX two-layer MLP classifier (4 → 6 → 3, 51 parameters) at fixed random
weights ``θ*``. The skill to keep is its own output distribution on 16 inputs
(``u = mean KL(p_{θ*} ‖ p_θ)``, whose Fisher is the true one of the logits);
the fine-tuning task is cross-entropy on 24 other labelled inputs. ``spec()``
returns the dict of docs/diagnose.md; ``spec_dataclass()`` the same model as a
``ModelSpec``; ``not_a_spec()`` and ``missing_params()`` are wrong on purpose.
"""

import jax
import jax.numpy as jnp
import numpy as np

from geomcollapse.model_spec import ModelSpec


def logits(params, x):
    hidden = jnp.tanh(x @ params["w1"] + params["b1"])
    return hidden @ params["w2"] + params["b2"]


def skill_loss(params, x, reference):
    log_p = jax.nn.log_softmax(logits(params, x))
    log_ref = jax.nn.log_softmax(reference)
    return jnp.mean(jnp.sum(jnp.exp(log_ref) * (log_ref - log_p), axis=-1))


def skill_logits(params, x, reference):
    return logits(params, x)


def task_loss(params, x, labels):
    log_p = jax.nn.log_softmax(logits(params, x))
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def _fields() -> dict:
    rng = np.random.default_rng(7)
    params = {
        "w1": jnp.asarray(rng.standard_normal((4, 6))),
        "b1": jnp.asarray(0.1 * rng.standard_normal(6)),
        "w2": jnp.asarray(rng.standard_normal((6, 3))),
        "b2": jnp.asarray(0.1 * rng.standard_normal(3)),
    }
    x_skill = jnp.asarray(rng.standard_normal((16, 4)))
    x_task = jnp.asarray(rng.standard_normal((24, 4)))
    labels = jnp.asarray(rng.integers(0, 3, 24))
    return {
        "skill_loss": skill_loss,
        "task_loss": task_loss,
        "params": params,
        "skill_args": (x_skill, logits(params, x_skill)),
        "task_args": (x_task, labels),
        "skill_logits": skill_logits,
    }


def spec() -> dict:
    """The model, its θ* and data, as a dict."""
    return _fields()


def spec_dataclass() -> ModelSpec:
    """The same, as a ModelSpec."""
    return ModelSpec(**_fields())


def not_a_spec():
    return 3


def missing_params() -> dict:
    fields = _fields()
    del fields["params"]
    return fields
