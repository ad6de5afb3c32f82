"""`train_and_evaluate(config, workdir)`: D²AM's Algorithm 1 end to end — per epoch a stats pass,
pseudo-domain assignment, jitted meta-steps, evaluation on the unseen target and a checkpoint.

One loop over the global step; the epoch is derived from it. Three jitted functions each compile
once per run: the meta-step (or the ERM step), the stats pass and the prediction used by
evaluation. Randomness: one root key in the TrainState (a step's key is fold_in(root, step)); every
host draw is seeded by (seed, epoch, step), so a resumed run is the same run.

Outputs in the workdir: config.json, results.json (one record per evaluation), metrics.jsonl and
TensorBoard under tb/ (every logged scalar), checkpoints/ (last N) and best/ (best by source
validation, never by the target); with data.skip_bad, bad_records.json (the stored frames and
depth maps that failed to decode and what stood in for them), once there is one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import tqdm

from d2am_jax import (
    bn_recompute,
    checkpointing,
    config_check,
    domains,
    erm,
    evaluation,
    feed,
    logs,
    meta,
    runtime,
    stats,
)
from d2am_jax import state as state_lib
from d2am_jax.data import sampler as sampler_lib
from d2am_jax.data import sources
from d2am_jax.data.dataset import FasData, depth_size
from d2am_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RunState:
    """What a checkpoint holds besides the TrainState and the pseudo domains (its metadata, with
    the config): with the TrainState's step it fixes where the run stands."""

    k: int                    # K, resolved once: the config's, the true domains' or by silhouette
    steps_per_epoch: int
    results: list             # results.json's records so far
    best_value: float | None  # the best source-validation value (sign-adjusted: lower is better)
    log_lines: int            # metrics.jsonl records so far
    devices: int = 1          # the mesh's size (a resume must keep it: see _start_or_resume)
    # data.skip_bad: the stored frames and depth maps met so far that failed to decode, one line
    # each (what stood in); reported in metrics.jsonl and bad_records.json as they are met.
    bad_records: list = dataclasses.field(default_factory=list)


class Steps(NamedTuple):
    """The run's jitted functions: the training step (meta or ERM), stats pass, prediction, and
    with eval.bn_statistics='recomputed' the BatchNorm moments of a training batch."""

    train: Callable
    stats: Callable
    predict: Callable
    moments: Callable | None = None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs (or resumes, from the same workdir) Algorithm 1; returns a summary: the results, the
    last and best, whether the run was preempted, and the trace counts of the jitted parts."""
    config_check.check(config)
    runtime.start(config)
    placement = runtime.Placement()           # one mesh over every device of every process
    placement.check_divides(_batch_sizes(config))
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    data = sources.load(config, workdir)                             # Algorithm 1 line 1
    ckpt = checkpointing.Checkpointer(workdir, int(config.checkpoint.keep))
    imagenet = ImageNetBank(config, data.train.frames)
    run, state, pseudo, initial_scale = _start_or_resume(config, ckpt, data.train,  # line 2
                                                         imagenet, placement)
    spe, d2am = run.steps_per_epoch, config.method == "d2am"
    total = int(config.num_epochs) * spe
    steps = _steps(config, placement, total)
    sampler = sampler_lib.MetaBatchSampler(
        data.train.frames, data.train.labels, data.train.depth, num_domains=run.k,
        per_domain_batch=int(config.meta.per_domain_batch),
        depth_size=depth_size(config.data.resolution), seed=int(config.seed))
    step = int(jax.device_get(state.step))
    last_good = step or None   # the newest checkpoint's step: its state passed check_finite
    rate, batches = _Rate(), None
    main = placement.is_main_process          # logs, results and the bar come from process 0
    if main:
        logs.write_results(workdir, run.results)
    with logs.MetricLog(workdir, run.log_lines, (step + 1) if step else None,
                        enabled=main) as metric_log, \
            runtime.Preemption() as preemption, contextlib.ExitStack() as stack, \
            tqdm.tqdm(total=total, initial=min(step, total), unit="step",
                      disable=not (config.progress and main), dynamic_ncols=True) as bar:
        while step < total and not preemption.requested:            # line 3
            epoch, in_epoch = divmod(step, spe)
            if d2am and in_epoch == 0:                               # lines 4–8
                t0 = time.time()
                pseudo, diagnostics = epoch_domains(config, epoch, run.k, state, steps.stats,
                                                    data.train, pseudo, imagenet)
                runtime.release_host_memory()  # the stats pass and clustering compiled/allocated
                metric_log.write({"kind": "assignment", "epoch": epoch + 1, "step": step,
                                  "seconds": time.time() - t0, **diagnostics})
            if batches is None:  # this epoch's batches, prepared ahead on a background thread
                batches = stack.enter_context(feed.training_batches(
                    config, sampler, pseudo, epoch, in_epoch, spe, placement))
            t0, waited = time.time(), batches.wait_seconds              # lines 9–17
            batch = next(batches)
            state, metrics = steps.train(state, batch)
            if not rate.images:
                runtime.release_host_memory()   # the compiler's freed heap (~1 GB on CPU)
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
            logs.check_finite(scalars, f"epoch {epoch + 1} step {in_epoch + 1} (global step "
                              f"{step + 1})", last_good, ckpt.latest_dir, initial_scale)
            step += 1
            rate.add(batch["y"].size, time.time() - t0, batches.wait_seconds - waited)
            bar.update(1)
            if step % int(config.log_every) == 0:
                images_per_s, wait_share = rate.take()
                bar.set_postfix({"img/s": f"{images_per_s:.1f}",
                                 "loss": f"{scalars['loss/total']:.3f}"})
                metric_log.write({"kind": "train", "epoch": epoch + 1, "step": step,
                                  "images_per_s": images_per_s, "input_wait_share": wait_share,
                                  **scalars})
            epoch_end = step % spe == 0
            if epoch_end:
                batches.close()
                batches = None
            best = False
            if epoch_end and ((epoch + 1) % int(config.eval.every_epochs) == 0 or step == total):
                running = None
                if steps.moments is not None:   # evaluation, checkpoint and prediction use them
                    running, state = state, _recomputed_bn(config, steps.moments, state, sampler,
                                                           pseudo, epoch, spe, placement)
                best = _evaluate(config, run, steps.predict, state, data, epoch + 1, step,
                                 metric_log, bar, placement, running)
                del running
            if epoch_end or step % int(config.checkpoint.every_steps) == 0 \
                    or preemption.requested:
                _report_bad_records(run, data.bad, metric_log, workdir, epoch + 1, step, main)
                run.log_lines = metric_log.lines
                ckpt.save(step, state, pseudo, _metadata(config, run), best=best)
                last_good = step
                if main:
                    logs.write_results(workdir, run.results)
    ckpt.close()
    return {
        "results": run.results,
        "last": run.results[-1] if run.results else None,
        "best_value": run.best_value,
        "preempted": step < total,
        "global_step": step,
        "workdir": workdir,
        "bad_records": len(run.bad_records),
        "trace_counts": {name: fn.trace_count() for name, fn in
                         (("train_step", steps.train), ("stats_pass", steps.stats),
                          ("predict", steps.predict), ("bn_moments", steps.moments))
                         if fn is not None},
    }


def _report_bad_records(run: RunState, bad, metric_log: logs.MetricLog, workdir: str,
                        epoch: int, step: int, main: bool) -> None:
    """data.skip_bad: the bad frames and maps met since the last checkpoint (each was warned
    about when met) go into the run record, a 'bad_records' line of metrics.jsonl and the whole
    list into bad_records.json, as a build lists what it skipped in build_report.json."""
    if bad is None:
        return
    new = sorted(set(bad.messages()) - set(run.bad_records))
    if not new:
        return
    run.bad_records.extend(new)
    metric_log.write({"kind": "bad_records", "epoch": epoch, "step": step,
                      "count": len(run.bad_records), "new": len(new)})
    if main:
        path = os.path.join(workdir, "bad_records.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"count": len(run.bad_records), "items": run.bad_records}, f, indent=1)
        os.replace(path + ".tmp", path)


class _Rate:
    """Images per second over the time spent waiting for batches and stepping (not saving or
    evaluating), and the share of that time the loop waited for its input."""

    def __init__(self):
        self.images, self._window_images, self._seconds, self._waited = 0, 0, 0.0, 0.0

    def add(self, images: int, seconds: float, waited: float) -> None:
        self.images += images
        self._window_images += images
        self._seconds += seconds
        self._waited += waited

    def take(self) -> tuple[float, float]:
        seconds = max(self._seconds, 1e-9)
        out = self._window_images / seconds, min(1.0, self._waited / seconds)
        self._window_images, self._seconds, self._waited = 0, 0.0, 0.0
        return out


class ImageNetBank:
    """Epoch-1 df(x): instance statistics of the ImageNet CNN over every source training frame,
    computed once on first use (K by silhouette and the epoch-1 clustering share it)."""

    def __init__(self, config, frames):
        self._config, self._frames, self._bank = config, frames, None

    def get(self) -> np.ndarray:
        if self._bank is None:
            from d2am_jax import pretrained
            pc = self._config.pretrained
            fx = pretrained.load_feature_extractor(pc.arch, pc.checkpoint or None)
            n, bs = len(self._frames), int(pc.batch_size)
            parts = [fx.features(np.asarray(self._frames[np.arange(s, min(n, s + 16 * bs))]), bs)
                     for s in range(0, n, 16 * bs)]
            self._bank = np.concatenate(parts).astype(np.float32)
        return self._bank


def _batch_sizes(config) -> dict[str, int]:
    """The batches a mesh splits, by the config field that sizes them."""
    sizes = {"domains.stats_batch_size": int(config.domains.stats_batch_size),
             "eval.batch_size": int(config.eval.batch_size)}
    if config.method == "d2am":
        sizes["meta.per_domain_batch"] = int(config.meta.per_domain_batch)
    else:  # ERM's pooled batch: K·B examples
        sizes["meta.per_domain_batch"] = int(config.meta.per_domain_batch) * int(
            config.meta.num_domains)
    return sizes


def _steps(config, placement: runtime.Placement, total_steps: int) -> Steps:
    if config.method == "d2am":
        meta_step = meta.make_meta_step(config, placement, total_steps)
        second_order = bool(config.meta.second_order)
        train_step = lambda s, b: meta_step(s, b, second_order=second_order)  # noqa: E731
        train_step.trace_count = meta_step.trace_count
    else:
        train_step = erm.make_erm_step(config, placement, total_steps)
    stats_pass = stats.make_stats_pass(config, int(config.domains.stats_batch_size),
                                       placement=placement)
    moments = None
    if config.eval.bn_statistics == "recomputed":
        moments = bn_recompute.make_batch_moments(config, placement)
    return Steps(train_step, stats_pass, state_lib.make_predict(config), moments)


def _recomputed_bn(config, moments, state, sampler, pseudo, epoch: int, spe: int,
                   placement) -> state_lib.TrainState:
    """`state` with the BatchNorm statistics recomputed from eval.bn_batches training batches
    (bn_recompute): this epoch's pseudo domains (D²AM) or pooled batches (ERM), drawn as steps
    spe, spe + 1, … of the epoch — seeded by (seed, epoch, step) like every training batch, and
    never one of them. The training steps read no running statistic; the next epoch's stats pass
    (E in evaluation mode) reads these."""
    n = int(config.eval.bn_batches)
    with feed.training_batches(config, sampler, pseudo, epoch, spe, spe + n,
                               placement) as batches:
        new_stats = bn_recompute.recompute(moments, state.params, state.batch_stats, batches)
    return state.replace(batch_stats=new_stats)


def _metadata(config, run: RunState) -> dict:
    return {"config": config_check.as_dict(config), **dataclasses.asdict(run)}


def _check_devices(saved_meta: dict, placement: runtime.Placement, where: str) -> None:
    """A resume on another device count is refused, naming both counts.

    A different mesh splits each batch differently: BatchNorm and the losses see the same global
    batch (the config's, which a resume may not change), but XLA's reductions run in another
    order, so the resumed run would not be the one interrupted, bit for bit.
    """
    devices = int(saved_meta.get("devices", 1))  # RunState's default: saved before the field
    if devices != placement.num_devices:
        raise UserError(
            f"{where} was trained on {devices} device(s), this run has "
            f"{placement.num_devices}; resume with the same device count (the global batch "
            f"is fixed by the config), or use a new workdir")


def _start_or_resume(config, ckpt: checkpointing.Checkpointer, train: FasData,
                     imagenet: ImageNetBank, placement: runtime.Placement
                     ) -> tuple[RunState, state_lib.TrainState, np.ndarray, float]:
    """(run record, TrainState replicated on the mesh, pseudo domains, the initial parameters'
    largest |θ|): restored from the newest checkpoint, or fresh. The initial state is built
    either way: it is the fresh run's, the restore's target, and the scale against which
    divergence is judged. A resume checks the saved config and device count first, from the
    checkpoint's metadata, before anything compiles."""
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        # The config first (a changed model would not restore), then the newest checkpoint that
        # restores: a damaged newer one is moved aside, and the run record is the restored one's.
        _, saved = ckpt.read_meta("latest")
        changed = config_check.resumable_changes(saved["config"], config, ckpt.latest_dir)
        if changed:
            log.warning("resuming with changed config fields %s", changed)
        _check_devices(saved, placement, ckpt.latest_dir)
    initial = state_lib.init_state(config, jax.random.PRNGKey(int(config.seed)))
    initial_scale = max(float(np.max(np.abs(leaf)))
                        for leaf in jax.tree.leaves(jax.device_get(initial.params)))
    if resume_step is None:
        k = resolve_k(config, train, imagenet)
        batch_images = k * int(config.meta.per_domain_batch)
        spe = int(config.steps_per_epoch) or -(-len(train) // batch_images)
        run = RunState(k, spe, [], None, 0, placement.num_devices)
        state = initial
        pseudo = np.zeros(len(train), np.int32)
    else:
        restored = ckpt.restore(initial)
        resume_step, saved = restored.step, restored.meta
        # A field the record lacks (saved before it existed) takes RunState's default.
        run = RunState(**{f.name: saved[f.name] for f in dataclasses.fields(RunState)
                          if f.name in saved})
        _check_devices(saved, placement, ckpt.latest_dir)  # the restored one's record
        state, pseudo = restored.state, restored.pseudo_domain
        epoch, in_epoch = divmod(resume_step, run.steps_per_epoch)
        log.info("resumed from %s step %d (epoch %d, step %d of %d)", ckpt.latest_dir,
                 resume_step, epoch + 1, in_epoch, run.steps_per_epoch)
    state = placement.replicate(state)
    if placement.is_main_process:
        with open(os.path.join(ckpt.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    return run, state, pseudo, initial_scale


def resolve_k(config, train: FasData, imagenet: ImageNetBank) -> int:
    """K: the config's, the number of true source domains ('w/ d'), or the best silhouette of the
    ImageNet features (Algorithm 1 line 2, `domains.choose_k`)."""
    if config.method != "d2am":
        return int(config.meta.num_domains)
    if config.domain_labels == "true":
        return len(np.unique(train.domain))
    if not config.domains.choose_k:
        return int(config.meta.num_domains)
    dc = config.domains
    choice = domains.choose_k(imagenet.get(), range(dc.k_min, dc.k_max + 1), seed=config.seed,
                              n_init=dc.n_init)
    log.info("K = %d by silhouette %s", choice.k, choice.scores)
    return choice.k


def epoch_domains(config, epoch: int, k: int, state, stats_fn, train: FasData,
                  previous: np.ndarray, imagenet: ImageNetBank) -> tuple[np.ndarray, dict]:
    """(pseudo_domain, diagnostics) for one epoch (Algorithm 1 lines 4–8).

    Epoch 1: one joint clustering of ImageNet features fixes the live/spoof pairing (per-class
    clusters aligned to it only where a joint cluster lacks a class); later epochs cluster the
    stats pass's df(x) per class, aligned to the previous labels (Kuhn–Munkres). 'true' and
    'random' (the "w/ d" and "w/o d" ablations) need no features. Every record names the domains
    with fewer than domains.min_class_size live or spoof samples (0: half a domain batch).
    """
    dc, mode, is_live = config.domains, config.domain_labels, train.labels == 1
    min_class_size = int(dc.min_class_size) or int(config.meta.per_domain_batch) // 2
    if mode == "pseudo" and epoch == 0:
        result = domains.initial_assignment(
            imagenet.get(), k, seed=int(config.seed), n_init=int(dc.n_init),
            algorithm=dc.algorithm, is_live=is_live, per_class="auto", true_domain=train.domain,
            min_class_size=min_class_size)
    else:
        bank = None
        if mode == "pseudo":
            bank = stats.compute_bank(stats_fn, state.params["E"], state.batch_stats["E"],
                                      train.frames, mode=dc.select, fraction=dc.fraction)
        result = domains.domain_labels(
            mode, is_live=is_live, seed=int(config.seed), epoch=epoch, k=k, bank=bank,
            prev_labels=previous if epoch > 0 else None, true_domain=train.domain,
            n_init=int(dc.n_init), algorithm=dc.algorithm, min_class_size=min_class_size)
    keep = ("k", "cluster_sizes", "domain_sizes", "nmi_previous", "agreement_previous",
            "nmi_true_domain", "mmd2_pseudo", "mmd2_true", "mode", "alignment",
            "degenerate_domains", "min_class_size", "joint_cluster_sizes", "pairing_agreement",
            "pairing_weak", "pairing_note")
    return result.labels.astype(np.int32), {key: result.diagnostics.get(key) for key in keep}


def _evaluate(config, run: RunState, predict, state, data: sources.RunData, epoch: int,
              step: int, metric_log: logs.MetricLog, bar, placement=None,
              running_state=None) -> bool:
    """Evaluates on the target, records the result; True if source validation is the best yet.
    `running_state`: the state with the running BatchNorm averages, when `state` holds recomputed
    ones; its metrics go in the record beside, as running_bn_* (nothing else uses them)."""
    result = evaluation.evaluate(predict, state, data.target, data.val, config, placement)
    record = evaluation.record(result, epoch, step)
    if running_state is not None:
        running = evaluation.evaluate(predict, running_state, data.target, data.val, config,
                                      placement)
        record.update({f"running_bn_{key}": running[key] for key in evaluation.RUNNING_BN_KEYS})
    sign = 1.0 if config_check.BEST_METRICS[config.checkpoint.best_metric] == "min" else -1.0
    value = sign * float(result[config.checkpoint.best_metric])
    # Ties go to the later checkpoint: a small validation set often reaches EER 0 early, and the
    # earliest checkpoint to do so is the least trained of the tied ones.
    best = run.best_value is None or value <= run.best_value
    if best:
        run.best_value = value
    record["is_best"] = best
    run.results.append(record)
    metric_log.write({"kind": "eval", **record})
    if placement is None or placement.is_main_process:
        bar.write(f"epoch {epoch}: HTER {record['hter']:.4f} AUC {record['auc']:.4f} ACER "
                  f"{record['acer']:.4f} (threshold {record['threshold']:.4f}, "
                  f"{record['threshold_mode']}); source-val EER {record['val_eer']:.4f}")
    return best
