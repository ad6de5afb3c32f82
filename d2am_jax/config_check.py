"""The one place a run's config is checked (choices, ranges, combinations), before anything loads
or compiles, and the rule for which fields a resumed run may change.

Host-only (no jax); every error names the field and what it expects.
"""

from __future__ import annotations

import json
import math

from d2am_jax import domains, metrics
from d2am_jax.data.sources import DATA_NAMES
from d2am_jax.errors import UserError

METHODS = ("d2am", "erm")
ENTROPY_HEADS = ("paper", "adversarial")   # model.entropy_head (models.DRLM)
BATCH_NORMS = ("per_domain", "pooled")     # meta.batch_norm (meta.make_objective)
POOL_WINDOWS = (3, 2)                      # model.pool_window (models.max_pool)
BEST_METRICS = {"val_eer": "min", "val_auc": "max"}
# Config fields a resumed run may change: how long it runs and how it logs, how its input is
# read (speed and memory only, never a number), how E is rematerialised (memory: the same maths;
# XLA may fuse the recomputation differently, so the last bits may move — measured: meta-steps
# bit-identical on CPU, an ERM step within 2e-7 in float32; the way to resume on a device with
# less memory), the learning rates (the way out after a non-finite loss: resume the last good
# checkpoint with smaller ones) and data.skip_bad (the way on after a bad frame stopped the run:
# no batch before the stop held one, so the resumed run is the one skip_bad would have run from
# the start).
RESUMABLE_CHANGES = ("num_epochs", "log_every", "progress", "jax_cache_dir", "checkpoint.",
                     "data.workers", "data.prefetch", "data.cache_bytes", "data.encoded_in_memory",
                     "data.skip_bad", "model.remat", "model.remat_policy", "meta.outer_lr",
                     "meta.inner_lr")
# Of those, the fields that change nothing a finished run produced: where its compile cache
# lives, how it logs, how its input is read. A grid asked for again with other values of these
# (a moved workdir, more input workers) still counts the run as finished.
NOT_A_RESULT = ("log_every", "progress", "jax_cache_dir", "data.workers", "data.prefetch",
                "data.cache_bytes", "data.encoded_in_memory")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# jax.checkpoint_policies' policies that take no argument (checked by name: no jax import here).
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable",
                  "checkpoint_dots", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots_with_no_batch_dims")


REMAT_WHERE = ("none", "encoder", "blocks", "layers")  # model.remat (models.remat_setting)
OUTER_LR_SCHEDULES = ("constant", "cosine")             # meta.outer_lr_schedule (state.outer_lr)

# eval.bn_statistics: evaluation's BatchNorm statistics, the running averages the training steps
# keep or the ones recomputed from fresh training batches before each evaluation (bn_recompute).
BN_STATISTICS = ("running", "recomputed")


def _is_policy(name) -> bool:
    return name in REMAT_POLICIES


def _finite(value) -> bool:
    return _number(value) and math.isfinite(value)


def check(config) -> None:
    """Raises UserError naming the first field whose value is not what it should be."""
    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            value = config
            for part in field.split("."):
                value = value[part]
            raise UserError(f"config.{field}: expected {expected}, got {value!r}")

    c, m, d, dc = config, config.meta, config.data, config.domains
    need(c.method in METHODS, "method", f"one of {METHODS}")
    need(c.domain_labels in domains.LABEL_MODES, "domain_labels",
         f"one of {domains.LABEL_MODES}")
    need(d.name in DATA_NAMES, "data.name", f"one of {DATA_NAMES}")
    need(c.num_epochs >= 1, "num_epochs", "≥ 1")
    need(c.steps_per_epoch >= 0, "steps_per_epoch", "≥ 0 (0 = one pass over the source)")
    need(c.log_every >= 1, "log_every", "≥ 1")
    need(c.seed >= 0, "seed", "≥ 0")
    need(0.0 < d.source_val_fraction < 1.0, "data.source_val_fraction",
         "a fraction in (0, 1): source validation sets the threshold and picks the best checkpoint")
    need(d.source_val_min_videos >= 1, "data.source_val_min_videos", "≥ 1 video per class")
    need(d.source_val_min_frames >= 1, "data.source_val_min_frames", "≥ 1 frame per class")
    need(isinstance(d.source_val_seed, int) and d.source_val_seed >= -1, "data.source_val_seed",
         "-1 (the run's seed) or a fixed seed ≥ 0")
    need(d.resolution >= 8, "data.resolution", "≥ 8 pixels")
    need(d.cache_bytes >= 0, "data.cache_bytes", "≥ 0 bytes")
    need(d.workers >= 0, "data.workers", "≥ 0 decoding threads (0 = one per core)")
    need(d.prefetch >= 1, "data.prefetch", "≥ 1 batch prepared ahead")
    need(isinstance(d.skip_bad, bool), "data.skip_bad", "True or False")
    need(str(c.model.fast_conv_grad).lower() in ("auto", "true", "false"),
         "model.fast_conv_grad", "'auto', True or False")
    need(round(64 * c.model.width) >= 1 if _finite(c.model.width) else False, "model.width",
         "a multiplier that leaves E's 64-channel layer at least one channel (≥ 0.0079)")
    need(c.model.drlm_reduction >= 1, "model.drlm_reduction", "τ ≥ 1")
    need(c.model.adaptation_dim >= 1, "model.adaptation_dim", "≥ 1")
    need(c.model.entropy_head in ENTROPY_HEADS, "model.entropy_head",
         f"one of {ENTROPY_HEADS}")
    need(c.model.pool_window in POOL_WINDOWS, "model.pool_window",
         f"one of {POOL_WINDOWS} (3: SSDG's 3×3/2 pad 1, 2: RFM's 2×2/2)")
    if c.model.pool_window == 2:
        need(d.resolution % 8 == 0, "data.resolution",
             "a multiple of 8 with model.pool_window=2 (three 2×2 pools must divide it)")
    need(c.model.dtype in ("float32", "bfloat16"), "model.dtype", "'float32' or 'bfloat16'")
    need(not (c.model.dtype == "bfloat16" and str(c.model.fast_conv_grad).lower() == "true"),
         "model.fast_conv_grad", "'auto' or False with model.dtype='bfloat16' (the CPU-tuned "
         "ops are float32 only)")
    need(c.model.remat in REMAT_WHERE, "model.remat", f"one of {REMAT_WHERE}")
    need(c.model.remat_policy == "" or _is_policy(c.model.remat_policy), "model.remat_policy",
         "'' or the name of a jax.checkpoint_policies policy, e.g. 'nothing_saveable'")
    need(not (c.model.remat in ("blocks", "layers") and c.model.remat_policy == ""),
         "model.remat_policy", f"a jax.checkpoint_policies name with model.remat="
         f"{c.model.remat!r}, e.g. 'nothing_saveable' (one of {REMAT_POLICIES}; '' would "
         "rematerialise nothing)")
    need(0.0 <= c.model.bn_momentum < 1.0, "model.bn_momentum", "a number in [0, 1)")
    need(_finite(c.model.bn_epsilon) and c.model.bn_epsilon > 0, "model.bn_epsilon",
         "a finite number > 0")
    need(m.num_domains >= 2, "meta.num_domains", "K ≥ 2 (K-1 meta-train + 1 meta-test)")
    need(m.batch_norm in BATCH_NORMS, "meta.batch_norm", f"one of {BATCH_NORMS}")
    need(m.per_domain_batch >= 2 and m.per_domain_batch % 2 == 0, "meta.per_domain_batch",
         "an even number ≥ 2 (half live, half spoof)")
    need(_finite(m.outer_lr) and m.outer_lr > 0, "meta.outer_lr", "a finite β > 0")
    need(m.outer_lr_schedule in OUTER_LR_SCHEDULES, "meta.outer_lr_schedule",
         f"one of {OUTER_LR_SCHEDULES}")
    need(_finite(m.inner_lr) and m.inner_lr >= 0, "meta.inner_lr", "a finite α ≥ 0")
    for field in ("lambda_p", "lambda_m", "weight_decay"):
        need(_finite(m[field]) and m[field] >= 0, f"meta.{field}", "a finite number ≥ 0")
    need(len(m.mmd_bandwidths) >= 1 and all(_finite(s) and s > 0 for s in m.mmd_bandwidths),
         "meta.mmd_bandwidths", "one or more positive kernel widths")
    need(dc.select in domains.SELECT_MODES, "domains.select", f"one of {domains.SELECT_MODES}")
    need(_finite(dc.fraction) and 0.0 < dc.fraction <= 1.0, "domains.fraction",
         "a share of channels in (0, 1]")
    need(dc.algorithm in domains.ALGORITHMS, "domains.algorithm",
         f"one of {domains.ALGORITHMS}")
    need(2 <= dc.k_min <= dc.k_max, "domains.k_min", "2 ≤ k_min ≤ k_max")
    need(dc.n_init >= 1, "domains.n_init", "≥ 1")
    need(dc.stats_batch_size >= 1, "domains.stats_batch_size", "≥ 1")
    need(dc.min_class_size >= 0, "domains.min_class_size",
         "≥ 0 samples (0 = meta.per_domain_batch // 2)")
    need(c.pretrained.batch_size >= 1, "pretrained.batch_size", "≥ 1")
    need(c.eval.threshold_mode in metrics.THRESHOLD_MODES, "eval.threshold_mode",
         f"one of {metrics.THRESHOLD_MODES}")
    need(_finite(c.eval.threshold) and 0.0 <= c.eval.threshold <= 1.0, "eval.threshold",
         "a live probability in [0, 1] (used with threshold_mode='fixed')")
    need(c.eval.batch_size >= 1, "eval.batch_size", "≥ 1")
    need(c.eval.every_epochs >= 1, "eval.every_epochs", "≥ 1")
    need(c.eval.bn_statistics in BN_STATISTICS, "eval.bn_statistics", f"one of {BN_STATISTICS}")
    need(isinstance(c.eval.bn_batches, int) and c.eval.bn_batches >= 1, "eval.bn_batches",
         "≥ 1 training batches (used with bn_statistics='recomputed')")
    need(c.checkpoint.every_steps >= 1, "checkpoint.every_steps", "≥ 1")
    need(c.checkpoint.keep >= 1, "checkpoint.keep", "≥ 1")
    need(c.checkpoint.best_metric in BEST_METRICS, "checkpoint.best_metric",
         f"one of {sorted(BEST_METRICS)}")
    if c.method == "erm" and c.domain_labels != "pseudo":
        raise UserError(f"config.domain_labels={c.domain_labels!r} has no effect with "
                        f"method='erm' (no domains); leave it at 'pseudo'")


def as_dict(config) -> dict:
    """The config as plain JSON data (what checkpoints and config.json hold)."""
    return json.loads(config.to_json_best_effort())


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def same_results(saved: dict, config) -> bool:
    """Whether a saved config (fields it predates at their defaults) and `config` differ only
    in NOT_A_RESULT fields."""
    return all(any(f == p or f.startswith(p + ".") for p in NOT_A_RESULT)
               for f in differences(with_defaults(saved), as_dict(config)))


def with_defaults(saved: dict) -> dict:
    """A saved config with the fields it predates filled in from configs/default.py: a field is
    only ever added with the default that reproduces the behaviour from before it existed."""
    from d2am_jax.configs import default

    def merge(base: dict, over: dict) -> dict:
        return {k: merge(base[k], over.get(k, {})) if isinstance(base.get(k), dict)
                else over.get(k, base.get(k)) for k in {**base, **over}}
    return merge(as_dict(default.get_config()), saved)


def resumable_changes(saved: dict, config, where: str) -> list[str]:
    """The fields a resume changes (allowed: RESUMABLE_CHANGES); UserError for any other. A
    field the saved run predates counts as its default (`with_defaults`). Under a scheduled β
    the number of epochs fixes the schedule's length, so it may not change either."""
    changed = differences(with_defaults(saved), as_dict(config))
    allowed = [f for f in changed if any(f == p or f.startswith(p) for p in RESUMABLE_CHANGES)]
    if config.meta.outer_lr_schedule != "constant" and "num_epochs" in allowed:
        allowed.remove("num_epochs")
    refused = [f for f in changed if f not in allowed]
    if refused:
        why = (" — meta.outer_lr_schedule spans num_epochs" if "num_epochs" in refused and
               config.meta.outer_lr_schedule != "constant" else "")
        raise UserError(f"{where} holds a run with a different config (fields {refused}{why}); "
                        f"use a new workdir, or the same values to resume")
    return allowed
