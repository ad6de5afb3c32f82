"""The training state and the one way the project jits a step: TrainState, its initialisation, the
outer optimizer, `jit_step` (one compile per static signature, counted) and the jitted prediction.

Both training steps (meta.py, erm.py), the stats pass and evaluation compile through `jit_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from d2am_jax import models, runtime


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # outer steps taken
    params: Any                # {'E': ..., 'D': ..., 'M': ...}
    batch_stats: Any           # running BatchNorm statistics, same keys
    opt_state: Any             # outer optax state
    rng: jax.Array             # root key; step keys are fold_in(rng, step)


class JittedStep:
    """A jitted function that counts its traces (`trace_count()`); `jitted` is the jax.jit object.

    Every trace and call runs with jax's classic (non-partitionable) threefry: the project's random
    streams are small and need no sharding, XLA:CPU compiles them ~10× faster (BENCHMARKS.md), and
    results do not depend on the flag the user's session happens to set.
    """

    def __init__(self, fn: Callable, **jit_kwargs):
        self._traces = 0

        def counted(*args, **kwargs):
            self._traces += 1      # Python side effect: runs once per trace, never per call
            return fn(*args, **kwargs)

        self.jitted = jax.jit(counted, **jit_kwargs)

    def __call__(self, *args, **kwargs):
        with runtime.project_random():
            return self.jitted(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with runtime.project_random():
            return self.jitted.lower(*args, **kwargs)

    def trace_count(self) -> int:
        return self._traces


def jit_step(fn: Callable, *, static_argnames=(), donate_state: bool = False,
             training: bool = False, placement=None, rematerialized: bool = False) -> JittedStep:
    """`fn` jitted: the state (first argument) donated if asked, training steps with the project's
    XLA options (`runtime.training_compiler_options`; `rematerialized`: the step holds
    jax.checkpoint regions, `model.remat`). Over a sharded `placement` a training step's outputs
    (the new state and the scalar metrics) are replicated like its state; the inputs carry their
    own shardings (`Placement.replicate`, `Placement.batch`)."""
    kwargs: dict[str, Any] = {"static_argnames": static_argnames}
    if training and placement is not None and placement.sharded:
        kwargs["out_shardings"] = placement.replicated
    if donate_state:
        kwargs["donate_argnums"] = (0,)
    if training:
        kwargs["compiler_options"] = runtime.training_compiler_options(rematerialized)
    return JittedStep(fn, **kwargs)


def outer_lr(meta_config, total_steps: int | None = None):
    """β (meta.outer_lr_schedule='constant'), or for 'cosine' the schedule
    step → β·½(1 + cos(π·step / total_steps)): β at the first step, 0 after the run's last.
    `total_steps` (num_epochs × steps per epoch) only the run knows: without it the schedule
    refuses to be evaluated — an optimizer built from it can be initialised, not stepped."""
    if meta_config.outer_lr_schedule == "constant":
        return meta_config.outer_lr
    if not total_steps:
        def unknown_length(count):
            raise ValueError("meta.outer_lr_schedule='cosine': the step was built without the "
                             "run's total number of outer steps (total_steps)")
        return unknown_length
    return optax.cosine_decay_schedule(meta_config.outer_lr, int(total_steps))


def scheduled_lr_metric(meta_config, total_steps: int | None = None) -> Callable:
    """step → {'lr/outer': the β this step applies} under a schedule; {} for a constant β."""
    lr = outer_lr(meta_config, total_steps)
    return (lambda step: {"lr/outer": lr(step)}) if callable(lr) else (lambda step: {})


def outer_optimizer(meta_config, total_steps: int | None = None) -> optax.GradientTransformation:
    """Adam(β) on all parameters (Eq. 11–13), β by meta.outer_lr_schedule (`outer_lr`)."""
    lr = outer_lr(meta_config, total_steps)
    if meta_config.weight_decay:
        return optax.adamw(lr, weight_decay=meta_config.weight_decay)
    return optax.adam(lr)


def init_state(config, rng: jax.Array, batch_size: int = 2) -> TrainState:
    """Fresh parameters for E, D and M at the config's resolution, and the outer optimizer state.

    Jitted: run eagerly, flax's init would dispatch (and compile) every primitive one by one.
    """
    E, D, M = models.build_modules(config.model)
    r = config.data.resolution
    tx = outer_optimizer(config.meta)

    def init(rng):
        k_e, k_d, k_m, k_root = jax.random.split(rng, 4)
        x = jnp.zeros((batch_size, r, r, models.INPUT_CHANNELS), jnp.float32)
        vars_e = E.init(k_e, x, True)
        feat, blocks, _ = E.apply(vars_e, x, True, mutable=["batch_stats"])[0]
        vars_d = D.init(k_d, blocks, True)
        vars_m = M.init(k_m, feat, True)
        params = {"E": vars_e["params"], "D": vars_d["params"], "M": vars_m["params"]}
        stats = {"E": vars_e["batch_stats"], "D": vars_d["batch_stats"],
                 "M": vars_m["batch_stats"]}
        return TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), k_root)

    return JittedStep(init)(rng)


def global_norm(tree) -> jax.Array:
    """√(Σ‖leaf‖²) over a pytree (written out: optax renamed its helper across the versions
    requirements.txt admits)."""
    return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def gradient_norms(grads) -> dict[str, jax.Array]:
    """The metrics both training steps report: the gradient norm of each module and in total."""
    out = {f"grad_norm/{name}": global_norm(grads[name]) for name in ("E", "D", "M")}
    out["grad_norm/total"] = global_norm(grads)
    return out


def state_scale(params, batch_stats) -> dict[str, jax.Array]:
    """The metrics both training steps report on the state they return (not the one they were
    given): the largest |θ| and the largest |BatchNorm statistic|, NaN if any value is. The host
    refuses to save a state whose scale is non-finite or has diverged (logs.check_finite)."""
    largest = lambda tree: jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(tree)]))
    return {"state/max_abs_param": largest(params),
            "state/max_abs_batch_stat": largest(batch_stats)}


def make_predict(config) -> JittedStep:
    """`predict(params, batch_stats, x) -> live probability [B]` with running BN statistics
    (evaluation mode); x is uint8 RGB [B, H, W, 3] or float RGB+HSV [B, H, W, 6]."""
    E, _, M = models.build_modules(config.model)

    def predict(params, batch_stats, x):
        x = models.model_input(x, models.compute_dtype(config.model, params["E"]))
        feat = E.apply({"params": params["E"], "batch_stats": batch_stats["E"]}, x, False)[0]
        logit, _ = M.apply({"params": params["M"], "batch_stats": batch_stats["M"]}, feat, False)
        return jax.nn.sigmoid(logit)

    return jit_step(predict)
