"""Run by tests/test_sharding.py in a subprocess with 4 CPU devices: the meta-step, the stats pass
and prediction over a 4-device mesh against the same functions on one device, in float64 (or
float32 with --float32). Prints one JSON line of relative differences and trace counts.

The meta-gradient is read off the meta-step's own update: the check's Adam state starts with a
large second moment, so that one step moves θ by −β·g/√(ν̂) ≈ a fixed multiple of the
meta-gradient g rather than by ±β·sign(g), as a fresh Adam state would (one compile per program
checks both the step and its gradient).

In float32 (second order only: the first-order programs are checked exactly in float64, and the
second order is the one that amplifies rounding) it also prints the rounding floor of each
meta-step quantity: how far the one-device
step moves when the images of every domain batch are put in another order (BatchNorm moments,
the losses and MMD are means over them: the same maths, summed in another order). A mesh sums in
another order too, so its differences are to be judged against that floor.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2am_jax import evaluation, meta, runtime, stats
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import FasData, depth_size
from d2am_jax.data.sampler import InMemoryFrames


def config_():
    c = default.get_config()
    c.data.resolution, c.model.width, c.model.adaptation_dim = 16, 0.03125, 4
    c.model.drlm_reduction, c.meta.num_domains, c.meta.per_domain_batch = 4, 3, 4
    c.meta.inner_lr = 0.5   # large, so that the second-order terms matter
    # With ν = NU (linear_adam) Adam's first step is −β·g/√(b₂·NU/(1 − b₂) + g²) ≈ −β·g/3.2e5
    # for |g| ≪ 3e5 (this config's ‖g‖: 1.4e3 second order, 1.2e2 first); β so large that the
    # step (≈ 0.3·g) stands far above float32 rounding of θ.
    c.meta.outer_lr = 1e5
    return c


NU = 1e8


def linear_adam(opt_state):
    """The outer Adam state with every second moment ν set to NU: the next step is linear in g."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    assert any(map(is_adam, jax.tree.leaves(opt_state, is_leaf=is_adam))), opt_state
    return jax.tree.map(
        lambda s: s._replace(nu=jax.tree.map(lambda n: jnp.full_like(n, NU), s.nu))
        if is_adam(s) else s, opt_state, is_leaf=is_adam)


def step_of(new_params, params):
    """θ_new − θ in float64: with linear_adam, a fixed multiple of the meta-gradient."""
    return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                        jax.device_get(new_params), jax.device_get(params))


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ over the whole tree (the global norm)."""
    a, b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    num = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(a, b))
    den = sum(float(np.sum(np.asarray(y) ** 2)) for y in b)
    return (num / max(den, 1e-300)) ** 0.5


def rel_per_leaf(a, b) -> float:
    """The largest ‖a − b‖ / ‖b‖ of any one leaf (leaves whose b is 0 left out)."""
    out = 0.0
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if np.any(y != 0):
            out = max(out, float(np.linalg.norm(x - y) / np.linalg.norm(y)))
    return out


def main(dtype):
    config = config_()
    placement = runtime.Placement()
    assert placement.num_devices == 4, placement.num_devices
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    state = state.replace(params=cast(state.params), batch_stats=cast(state.batch_stats),
                          opt_state=linear_adam(cast(state.opt_state)))
    rng = np.random.default_rng(0)
    k, b, r = 3, 4, 16
    g = depth_size(r)
    y = np.tile(np.r_[np.ones(b // 2), np.zeros(b // 2)], (k, 1)).astype(dtype)
    batch = {"x": rng.integers(0, 256, (k, b, r, r, 3), dtype=np.uint8), "y": y,
             "depth": (rng.integers(0, 256, (k, b, g, g)) * y[..., None, None]).astype(np.uint8)}
    out = {}
    for order in (True, False) if dtype == np.float64 else (True,):
        single = meta.make_meta_step(config)
        sharded = meta.make_meta_step(config, placement)
        fresh = jax.tree.map(lambda a: jnp.array(a, copy=True), state)  # the steps donate it
        s1, m1 = single(fresh, batch, second_order=order)
        s2, m2 = sharded(placement.replicate(state), placement.batch(batch, axis=1),
                         second_order=order)
        name = "second" if order else "first"
        metric_rel = lambda m, ref: {key: abs(float(m[key]) - float(ref[key])) /
                                     max(abs(float(ref[key])), 1e-30) for key in ref}
        out[f"{name}_params"] = rel(s2.params, s1.params)
        out[f"{name}_batch_stats"] = rel(s2.batch_stats, s1.batch_stats)
        out[f"{name}_metric_rel"] = metric_rel(m2, m1)
        out[f"{name}_metrics"] = max(out[f"{name}_metric_rel"].values())
        out[f"{name}_replicated"] = all(a.sharding.is_fully_replicated
                                        for a in jax.tree.leaves(s2.params))
        out[f"{name}_traces"] = [single.trace_count(), sharded.trace_count()]
        g1, g2 = step_of(s1.params, state.params), step_of(s2.params, state.params)
        out[f"{name}_grads"] = rel(g2, g1)
        out[f"{name}_grads_leaf"] = rel_per_leaf(g2, g1)
        # Linear regime: every |g_i| ≤ ‖g‖ ≪ √(b₂·NU/(1 − b₂)) ≈ 3.2e5.
        out[f"{name}_grad_norm"] = float(m1["grad_norm/total"])
        if dtype == np.float32:
            floor = {"params": 0.0, "grads": 0.0, "grads_leaf": 0.0, "metrics": {}}
            for seed in range(3):   # three orders of each domain batch's images, one device
                perm = np.random.default_rng(10 + seed).permutation(b)
                shuffled = {key: value[:, perm] for key, value in batch.items()}
                fresh = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
                sp, mp = single(fresh, shuffled, second_order=order)   # compiled already
                gp = step_of(sp.params, state.params)
                floor["params"] = max(floor["params"], rel(sp.params, s1.params))
                floor["grads"] = max(floor["grads"], rel(gp, g1))
                floor["grads_leaf"] = max(floor["grads_leaf"], rel_per_leaf(gp, g1))
                for key, value in metric_rel(mp, m1).items():
                    floor["metrics"][key] = max(floor["metrics"].get(key, 0.0), value)
            out[f"{name}_floor"] = floor
            out[f"{name}_traces"] = [single.trace_count(), sharded.trace_count()]

    frames = InMemoryFrames(rng.integers(0, 256, (20, r, r, 3), dtype=np.uint8))
    one = stats.make_stats_pass(config, 8)(state.params["E"], state.batch_stats["E"], frames)
    pass_ = stats.make_stats_pass(config, 8, placement=placement)
    many = pass_(placement.replicate(state.params["E"]),
                 placement.replicate(state.batch_stats["E"]), frames)
    out["stats"] = rel(many, one)
    out["stats_traces"] = pass_.trace_count()
    data = FasData(frames, np.zeros(20, np.int32), None, np.arange(20).astype(str),
                   np.full(20, "d"), np.full(20, ""))
    predict = state_lib.make_predict(config)
    p1 = evaluation.scores(predict, state, data, 8, r)
    p2 = evaluation.scores(predict, placement.replicate(state), data, 8, r, placement)
    out["predict"] = float(np.max(np.abs(p2 - p1)) / np.max(np.abs(p1)))
    print(json.dumps(out))


if __name__ == "__main__":
    if "--float32" in sys.argv:
        main(np.float32)
    else:
        with jax.enable_x64(True):
            main(np.float64)
