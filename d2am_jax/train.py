"""`train_and_evaluate(config, workdir)`: D²AM's Algorithm 1 end to end — per epoch a stats pass,
pseudo-domain assignment, jitted meta-steps, evaluation on the unseen target and a checkpoint.

Host code (data, clustering, metrics, logs) feeds fixed-shape batches to three jitted functions
that each compile once per run: the meta-step (or the ERM step), the stats pass and the
prediction used for evaluation. Randomness: one root key in the TrainState (a step's key is
fold_in(root, step)); every host draw is seeded by (seed, epoch, step), so there is no host RNG
state to save and a resumed run is the same run.

Outputs in the workdir: config.json (resolved), results.json (one record per evaluation),
metrics.jsonl (every logged scalar), TensorBoard event files under tb/, checkpoints/ (last N) and
best/ (best by source validation, never by the target).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm

from d2am_jax import checkpointing, domains, erm, meta, metrics, runtime, stats
from d2am_jax.data import sampler as sampler_lib

log = logging.getLogger(__name__)

METHODS = ("d2am", "erm")
DATA_NAMES = ("synthetic", "manifest", "protocol")
BEST_METRICS = {"val_eer": "min", "val_auc": "max"}
RESULT_KEYS = ("epoch", "step", "hter", "auc", "eer", "tpr_at_fpr_1pct", "acer", "threshold",
               "threshold_mode")
# Config fields a resumed run may change: how long it runs and how it logs, and the learning
# rates (the way out after a non-finite loss: resume the last good checkpoint with smaller ones).
RESUMABLE_CHANGES = ("num_epochs", "log_every", "progress", "jax_cache_dir", "checkpoint.",
                     "meta.outer_lr", "meta.inner_lr")


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient; the message names the last good checkpoint."""


# ----------------------------------------------------------------------------- config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Choices and ranges, each error naming the field and what it expects."""
    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            value = config
            for part in field.split("."):
                value = value[part]
            raise ValueError(f"config.{field}: expected {expected}, got {value!r}")

    need(config.method in METHODS, "method", f"one of {METHODS}")
    need(config.domain_labels in domains.LABEL_MODES, "domain_labels",
         f"one of {domains.LABEL_MODES}")
    need(config.data.name in DATA_NAMES, "data.name", f"one of {DATA_NAMES}")
    need(config.num_epochs >= 1, "num_epochs", "≥ 1")
    need(config.steps_per_epoch >= 0, "steps_per_epoch", "≥ 0 (0 = one pass over the source)")
    need(config.log_every >= 1, "log_every", "≥ 1")
    need(config.seed >= 0, "seed", "≥ 0")
    need(0.0 < config.data.source_val_fraction < 1.0, "data.source_val_fraction",
         "a fraction in (0, 1): source validation sets the threshold and picks the best checkpoint")
    need(config.data.resolution >= 8, "data.resolution", "≥ 8 pixels")
    need(config.domains.select in domains.SELECT_MODES, "domains.select",
         f"one of {domains.SELECT_MODES}")
    need(2 <= config.domains.k_min <= config.domains.k_max, "domains.k_min",
         "2 ≤ k_min ≤ k_max")
    need(config.eval.threshold_mode in metrics.THRESHOLD_MODES, "eval.threshold_mode",
         f"one of {metrics.THRESHOLD_MODES}")
    need(config.eval.batch_size >= 1, "eval.batch_size", "≥ 1")
    need(config.eval.every_epochs >= 1, "eval.every_epochs", "≥ 1")
    need(config.checkpoint.every_steps >= 1, "checkpoint.every_steps", "≥ 1")
    need(config.checkpoint.keep >= 1, "checkpoint.keep", "≥ 1")
    need(config.checkpoint.best_metric in BEST_METRICS, "checkpoint.best_metric",
         f"one of {sorted(BEST_METRICS)}")
    need(config.meta.num_domains >= 2, "meta.num_domains", "K ≥ 2")
    need(config.meta.per_domain_batch >= 2 and config.meta.per_domain_batch % 2 == 0,
         "meta.per_domain_batch", "an even number ≥ 2 (half live, half spoof)")
    if config.method == "erm" and config.domain_labels != "pseudo":
        raise ValueError(f"config.domain_labels={config.domain_labels!r} has no effect with "
                         f"method='erm' (no domains); leave it at 'pseudo'")


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def _config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass
class HostSet:
    """Examples on the host: a frame store (uint8 RGB at data.resolution), labels (1 live),
    an optional depth store, video ids and domain names (analysis and 'w/ d' only)."""

    frames: Any
    labels: np.ndarray
    depth: Any
    video: np.ndarray
    domain: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


class _Subset:
    """Rows `idx` of a frame or depth store, as a store."""

    def __init__(self, store, idx: np.ndarray):
        self.store, self.idx = store, np.asarray(idx, np.int64)

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, idx) -> np.ndarray:
        return self.store[self.idx[np.asarray(idx)]]


def take(data: HostSet, idx) -> HostSet:
    idx = np.asarray(idx, np.int64)
    return HostSet(_Subset(data.frames, idx), data.labels[idx],
                   None if data.depth is None else _Subset(data.depth, idx),
                   data.video[idx], data.domain[idx])


def _names(text: str, field: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"config.{field}: expected comma-separated domain names, got {text!r}")
    return names


def _synthetic_data(config) -> tuple[HostSet, HostSet, str]:
    from d2am_jax.data import synthetic
    sc = config.data.synthetic
    syn = synthetic.SyntheticConfig(
        resolution=int(config.data.resolution), num_domains=int(sc.num_domains),
        per_domain=int(sc.per_domain), frames_per_video=int(sc.frames_per_video),
        seed=int(sc.seed))
    all_domains = [str(d) for d in range(syn.num_domains)]
    target = _names(config.data.target or all_domains[-1], "data.target")
    source = _names(config.data.source, "data.source") if config.data.source else \
        [d for d in all_domains if d not in target]
    for field, names in (("data.source", source), ("data.target", target)):
        bad = [d for d in names if d not in all_domains]
        if bad:
            raise ValueError(f"config.{field}: synthetic domain(s) {bad} do not exist; expected "
                             f"names from {all_domains} (data.synthetic.num_domains)")
    if set(source) & set(target):
        raise ValueError(f"config.data.source {source} and data.target {target} overlap")
    raw = synthetic.generate(syn)
    domain = raw["domain"].astype(str)
    full = HostSet(sampler_lib.InMemoryFrames(raw["image"]), raw["label"].astype(np.int32),
                   raw["depth"], raw["video"].astype(str), domain)
    src = np.flatnonzero(np.isin(domain, source))
    tgt = np.flatnonzero(np.isin(domain, target))
    return _materialized(full, src), _materialized(full, tgt), \
        f"fas_synthetic (in memory): {'&'.join(source)}→{'&'.join(target)}"


def _materialized(data: HostSet, idx) -> HostSet:
    """In-memory rows idx (arrays, not views through a store)."""
    return HostSet(sampler_lib.InMemoryFrames(np.asarray(data.frames[idx])), data.labels[idx],
                   data.depth[idx], data.video[idx], data.domain[idx])


def _fas_host_set(fas, config, what: str) -> HostSet:
    r = int(config.data.resolution)
    if tuple(fas.frames.shape) != (r, r):
        raise ValueError(
            f"{what}: frames were built at {tuple(fas.frames.shape)}, but "
            f"config.data.resolution={r}; rebuild at that resolution (--config resolution={r}) "
            f"or set --config.data.resolution={fas.frames.shape[0]}")
    frames = sampler_lib.CachedFrames(len(fas), fas.frames.decode_one,
                                      int(config.data.cache_bytes))
    return HostSet(frames, fas.labels.astype(np.int32), fas.depth, fas.video.astype(str),
                   fas.domain.astype(str))


def _built_data(config, workdir: str) -> tuple[HostSet, HostSet, str]:
    from d2am_jax.data import protocols
    data_dir = config.data.data_dir or os.path.join(workdir, "tfds")
    r = int(config.data.resolution)
    depth_size = meta.depth_size(r)
    if config.data.name == "manifest":
        if not config.data.manifest:
            raise ValueError("config.data.manifest: expected the path of manifest.csv "
                             "(path,label[,video][,domain][,depth]) for data.name='manifest'")
        from d2am_jax.data import build
        overrides = {"manifest": os.path.abspath(config.data.manifest), "resolution": r,
                     "face_crop": config.data.face_crop}
        summary = build.build("fas_manifest", data_dir, config=overrides)
        log.info("manifest data: %s", summary)
        protocol = protocols.domain_protocol(
            "fas_manifest", _names(config.data.source, "data.source"),
            _names(config.data.target, "data.target"))
        configs = {"fas_manifest": overrides}
    else:
        protocol = protocols.get(config.data.protocol, config.data.splits)
        names = {p.dataset for p in protocol.source + protocol.target}
        configs = {name: {"resolution": r} for name in names}
    source, target = protocols.load(protocol, data_dir, configs, depth_size=depth_size)
    return (_fas_host_set(source, config, f"{protocol.name} source"),
            _fas_host_set(target, config, f"{protocol.name} target"), protocol.name)


def load_data(config, workdir: str) -> tuple[HostSet, HostSet, str]:
    """(pooled source, target, description) for the config's data.name."""
    if config.data.name == "synthetic":
        return _synthetic_data(config)
    return _built_data(config, workdir)


def source_val_split(data: HostSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of the source: whole videos, `fraction` of each class's
    videos (at least one each) held out, seeded by (seed, 7)."""
    rng = np.random.default_rng((seed, 7))
    val = np.zeros(len(data), bool)
    for label in (0, 1):
        videos = np.unique(data.video[data.labels == label])
        if len(videos) < 2:
            raise ValueError(
                f"source validation needs ≥ 2 {'live' if label else 'spoof'} videos in the source "
                f"(one to hold out, one to train on), found {len(videos)}")
        count = min(len(videos) - 1, max(1, int(round(fraction * len(videos)))))
        held = rng.choice(videos, count, replace=False)
        val |= np.isin(data.video, held) & (data.labels == label)
    return np.flatnonzero(~val), np.flatnonzero(val)


# ----------------------------------------------------------------------------- logging


class MetricLog:
    """metrics.jsonl (one JSON object per record) and TensorBoard scalars of the same numbers."""

    def __init__(self, workdir: str, keep_lines: int, purge_step: int | None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()[:keep_lines]  # records after the restored checkpoint go
        with open(self.path, "w") as f:
            f.writelines(lines)
        self.lines = len(lines)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.lines += 1
        step = int(record.get("step", 0))
        prefix = record.get("kind", "train")
        for key, value in record.items():
            if key in ("step", "epoch", "kind"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


def write_results(workdir: str, results: list[dict]) -> None:
    """results.json, written whole and atomically."""
    path = os.path.join(workdir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- pieces


def _imagenet_bank(config, frames) -> np.ndarray:
    """Epoch-1 df(x): instance statistics of the ImageNet CNN over every source frame."""
    from d2am_jax import pretrained
    fx = pretrained.load_feature_extractor(config.pretrained.arch,
                                           config.pretrained.checkpoint or None)
    bs = int(config.pretrained.batch_size)
    parts = []
    chunk = 16 * bs
    for start in range(0, len(frames), chunk):
        idx = np.arange(start, min(len(frames), start + chunk))
        parts.append(fx.features(np.asarray(frames[idx]), bs))
    return np.concatenate(parts)


def _evaluation_scores(predict: Callable, state, data: HostSet, config) -> np.ndarray:
    """Live probabilities of every frame of `data`, in fixed-size padded batches."""
    out = []
    for x, m in stats.padded_batches(data.frames, int(config.eval.batch_size),
                                     int(config.data.resolution)):
        out.append(np.asarray(predict(state.params, state.batch_stats, x))[:m])
    return np.concatenate(out).astype(np.float64)


def evaluate(predict, state, target: HostSet, val: HostSet, config) -> dict:
    """Target metrics (threshold by eval.threshold_mode) and the source-validation EER/AUC."""
    val_scores = _evaluation_scores(predict, state, val, config)
    scores = _evaluation_scores(predict, state, target, config)
    per_video = bool(config.eval.per_video)
    kwargs = {}
    mode = config.eval.threshold_mode
    if mode == "source_val":
        kwargs = dict(val_labels=val.labels, val_scores=val_scores,
                      val_video_ids=val.video if per_video else None)
    elif mode == "fixed":
        kwargs = dict(threshold=float(config.eval.threshold))
    result = metrics.evaluate(target.labels, scores, threshold_mode=mode,
                              video_ids=target.video if per_video else None, **kwargs)
    val_result = metrics.evaluate(val.labels, val_scores, threshold_mode="test_eer",
                                  video_ids=val.video if per_video else None)
    result["val_eer"] = val_result["eer"]
    result["val_auc"] = val_result["auc"]
    return result


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and returns."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler (the caller owns signals)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _scalars(tree) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(tree).items()}


def _check_finite(scalars: dict, where: str, last_good: int | None, ckpt_dir: str) -> None:
    bad = {k: v for k, v in scalars.items()
           if (k.startswith("loss/") or k.startswith("grad_norm/")) and not math.isfinite(v)}
    if bad:
        good = (f"the last good checkpoint is step {last_good} in {ckpt_dir}; rerunning with the "
                f"same workdir resumes from it" if last_good is not None
                else "no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"non-finite training values at {where}: {bad}. Training stopped; {good}. Lower "
            f"meta.outer_lr / meta.inner_lr or check the data.")


def _setup_jax_cache(config) -> None:
    if config.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(config.jax_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# ----------------------------------------------------------------------------- the run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes, from the same workdir) Algorithm 1; returns a summary: the last result
    record, the best, whether the run was preempted, and the trace counts of the jitted parts."""
    check_config(config)
    _setup_jax_cache(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    config = config.copy_and_resolve_references()  # our copy; K may be resolved below
    config.lock()

    source, target, description = load_data(config, workdir)
    train_rows, val_rows = source_val_split(source, config.data.source_val_fraction, config.seed)
    train_set, val_set = take(source, train_rows), take(source, val_rows)
    log.info("%s: %d source frames (%d train, %d source validation), %d target frames",
             description, len(source), len(train_set), len(val_set), len(target))

    ckpt = checkpointing.Checkpointer(workdir, int(config.checkpoint.keep))
    resume_step = ckpt.latest_step()
    resumed = None
    if resume_step is not None:
        _, saved_meta = ckpt.read_meta("latest")
        saved_config = saved_meta["config"]
        differences = [f for f in config_differences(saved_config, _config_dict(config))
                       if f != "meta.num_domains"]  # K may have been resolved from the data
        allowed = [f for f in differences
                   if any(f == p or f.startswith(p) for p in RESUMABLE_CHANGES)]
        changed = [f for f in differences if f not in allowed]
        if changed:
            raise ValueError(
                f"{ckpt.latest_dir} holds a run with a different config (fields {changed}); use "
                f"a new workdir, or the same values to resume")
        if allowed:
            log.warning("resuming with changed config fields %s", allowed)
        config.meta.num_domains = int(saved_config["meta"]["num_domains"])

    imagenet_bank = None
    is_live = train_set.labels == 1
    if resume_step is None and config.method == "d2am":
        config.meta.num_domains, imagenet_bank = _resolved_k(config, train_set)
    k = int(config.meta.num_domains)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=1))

    batch_images = k * int(config.meta.per_domain_batch)
    steps_per_epoch = int(config.steps_per_epoch) or math.ceil(len(train_set) / batch_images)
    sampler = sampler_lib.MetaBatchSampler(
        train_set.frames, train_set.labels, train_set.depth, num_domains=k,
        per_domain_batch=int(config.meta.per_domain_batch),
        depth_size=meta.depth_size(int(config.data.resolution)), seed=int(config.seed))

    state = meta.init_state(config, jax.random.PRNGKey(int(config.seed)))
    if config.method == "d2am":
        step_fn = meta.make_meta_step(config)
        second_order = bool(config.meta.second_order)
        train_step = lambda s, b: step_fn(s, b, second_order=second_order)  # noqa: E731
    else:
        step_fn = erm.make_erm_step(config)
        train_step = step_fn
    stats_fn = stats.make_stats_pass(config, int(config.domains.stats_batch_size))
    predict = meta.make_predict(config)

    epoch, step_in_epoch, results, log_lines, best_value = 0, 0, [], 0, None
    pseudo_domain = np.zeros(len(train_set), np.int32)
    bank = np.zeros((0, 0), np.float32)
    if resume_step is not None:
        resumed = ckpt.restore(state, step=resume_step)
        state, pseudo_domain, bank = resumed.state, resumed.pseudo_domain, resumed.bank
        m = resumed.meta
        epoch, step_in_epoch = int(m["epoch"]), int(m["step_in_epoch"])
        results, log_lines, best_value = list(m["results"]), int(m["log_lines"]), m["best_value"]
        log.info("resumed from %s step %d (epoch %d, step %d of %d)", ckpt.latest_dir,
                 resume_step, epoch + 1, step_in_epoch, steps_per_epoch)
    write_results(workdir, results)
    logger = MetricLog(workdir, log_lines, None if resume_step is None else resume_step + 1)
    global_step = int(jax.device_get(state.step))
    last_good = resume_step
    sign = 1.0 if BEST_METRICS[config.checkpoint.best_metric] == "min" else -1.0

    def checkpoint_meta() -> dict:
        return {"epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "results": results, "log_lines": logger.lines, "best_value": best_value,
                "steps_per_epoch": steps_per_epoch, "config": _config_dict(config),
                "host_rng": "none: host draws are seeded by (seed, epoch, step)",
                "description": description}

    def save(best: bool = False) -> None:
        nonlocal last_good
        ckpt.save(global_step, state, pseudo_domain, bank, checkpoint_meta(), best=best)
        last_good = global_step

    total_steps = int(config.num_epochs) * steps_per_epoch
    bar = tqdm.tqdm(total=total_steps, initial=min(global_step, total_steps), unit="step",
                    disable=not config.progress, dynamic_ncols=True)
    preempted, compiled = False, False
    try:
        with _Preemption() as preemption:
            while epoch < int(config.num_epochs) and not preempted:
                if step_in_epoch == 0 and config.method == "d2am":
                    t0 = time.time()
                    pseudo_domain, bank, diagnostics = _epoch_domains(
                        config, epoch, state, stats_fn, train_set, is_live, pseudo_domain,
                        imagenet_bank)
                    imagenet_bank = None
                    runtime.release_host_memory()   # the stats pass and clustering compiled/allocated
                    logger.write({"kind": "assignment", "epoch": epoch + 1, "step": global_step,
                                  "seconds": time.time() - t0, **diagnostics})
                busy, images = 0.0, 0  # seconds in sampling and steps (not saves/evals)
                while step_in_epoch < steps_per_epoch:
                    t_step = time.time()
                    if config.method == "d2am":
                        batch = sampler.meta_batch(pseudo_domain, epoch, step_in_epoch)
                        batch = {key: batch[key] for key in ("x", "y", "depth")}
                    else:
                        batch = sampler.pooled_batch(epoch, step_in_epoch)
                    state, step_metrics = train_step(state, batch)
                    if not compiled:
                        runtime.release_host_memory()   # the compiler's freed heap (~1 GB on CPU)
                        compiled = True
                    scalars = _scalars(step_metrics)  # a few scalars: the only device→host copy
                    _check_finite(scalars, f"epoch {epoch + 1} step {step_in_epoch + 1} "
                                  f"(global step {global_step + 1})", last_good, ckpt.latest_dir)
                    step_in_epoch += 1
                    global_step += 1
                    images += batch_images
                    busy += time.time() - t_step
                    bar.update(1)
                    if global_step % int(config.log_every) == 0:
                        rate = images / max(busy, 1e-9)
                        busy, images = 0.0, 0
                        bar.set_postfix({"img/s": f"{rate:.1f}",
                                         "loss": f"{scalars['loss/total']:.3f}"})
                        logger.write({"kind": "train", "epoch": epoch + 1, "step": global_step,
                                      "images_per_s": rate, **scalars})
                    last_in_epoch = step_in_epoch == steps_per_epoch
                    if preemption.requested and not last_in_epoch:
                        save()
                        preempted = True
                        break
                    if global_step % int(config.checkpoint.every_steps) == 0 and not last_in_epoch:
                        save()
                if preempted:
                    break
                # End of the epoch: evaluate, then checkpoint with the next epoch's position.
                epoch += 1
                step_in_epoch = 0
                is_best = False
                if epoch % int(config.eval.every_epochs) == 0 or epoch == int(config.num_epochs):
                    result = evaluate(predict, state, target, val_set, config)
                    record = result_record(result, epoch, global_step)
                    results.append(record)
                    logger.write({"kind": "eval", **record})
                    value = sign * float(result[config.checkpoint.best_metric])
                    is_best = best_value is None or value < best_value
                    if is_best:
                        best_value = value
                    bar.write(f"epoch {epoch}: HTER {record['hter']:.4f} AUC {record['auc']:.4f} "
                              f"(threshold {record['threshold']:.4f}, {record['threshold_mode']}); "
                              f"source-val EER {record['val_eer']:.4f}")
                save(best=is_best)
                write_results(workdir, results)
                if preemption.requested:
                    preempted = epoch < int(config.num_epochs)
                    break
    finally:
        bar.close()
        logger.close()
        ckpt.close()

    return {
        "results": results,
        "last": results[-1] if results else None,
        "best_value": best_value,
        "preempted": preempted,
        "global_step": global_step,
        "workdir": workdir,
        "trace_counts": {
            "train_step": step_fn.trace_count(),
            "stats_pass": stats_fn.trace_count(),
            "predict": predict._cache_size(),
        },
    }


def result_record(result: dict, epoch: int, step: int) -> dict:
    """One results.json record from `evaluate`'s output (RESULT_KEYS first)."""
    extra = ("val_eer", "val_auc", "unit", "num_live", "num_spoof", "apcer", "bpcer")
    return {"epoch": epoch, "step": step, **{key: result[key] for key in RESULT_KEYS[2:] + extra}}


def _resolved_k(config, train_set: HostSet) -> tuple[int, np.ndarray | None]:
    """(K, ImageNet bank if it was computed): K fixed by the config, the number of true source
    domains ('w/ d'), or by silhouette on ImageNet features (Algorithm 1 line 2)."""
    if config.domain_labels == "true":
        return len(np.unique(train_set.domain)), None
    if not config.domains.choose_k:
        return int(config.meta.num_domains), None
    bank = _imagenet_bank(config, train_set.frames)
    choice = domains.choose_k(bank, range(config.domains.k_min, config.domains.k_max + 1),
                              seed=config.seed, n_init=config.domains.n_init)
    log.info("K = %d by silhouette %s", choice.k, choice.scores)
    return choice.k, bank


def _epoch_domains(config, epoch: int, state, stats_fn, train_set: HostSet, is_live,
                   previous: np.ndarray, imagenet_bank) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pseudo_domain, bank, diagnostics) for one epoch (Algorithm 1 lines 3–8).

    Epoch 1: one joint clustering of ImageNet features fixes the live/spoof pairing; later epochs
    cluster the stats pass's df(x) per class, aligned to the previous labels (Kuhn–Munkres).
    """
    k = int(config.meta.num_domains)
    dc = config.domains
    mode = config.domain_labels
    true_domain = train_set.domain
    if mode == "pseudo" and epoch == 0:
        if imagenet_bank is None:
            imagenet_bank = _imagenet_bank(config, train_set.frames)
        result = domains.initial_assignment(
            imagenet_bank, k, seed=int(config.seed), n_init=int(dc.n_init),
            algorithm=dc.algorithm, is_live=is_live, per_class=True, true_domain=true_domain)
        bank = np.asarray(imagenet_bank, np.float32)
    else:
        bank = None
        if mode == "pseudo":
            bank = stats.compute_bank(stats_fn, state.params["E"], state.batch_stats["E"],
                                      train_set.frames, mode=dc.select, fraction=dc.fraction)
        result = domains.domain_labels(
            mode, is_live=is_live, seed=int(config.seed), epoch=epoch, k=k, bank=bank,
            prev_labels=previous if epoch > 0 else None, true_domain=true_domain,
            n_init=int(dc.n_init), algorithm=dc.algorithm)
        bank = np.zeros((0, 0), np.float32) if bank is None else np.asarray(bank, np.float32)
    keep = ("k", "cluster_sizes", "domain_sizes", "nmi_previous", "agreement_previous",
            "nmi_true_domain", "mmd2_pseudo", "mmd2_true", "mode", "alignment")
    diagnostics = {key: result.diagnostics.get(key) for key in keep}
    return result.labels.astype(np.int32), bank, diagnostics
