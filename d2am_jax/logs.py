"""What a run writes for people to read: metrics.jsonl and TensorBoard scalars of the same records,
results.json, and the check that stops a run on a non-finite loss or gradient or a diverged state.

Host-only (no jax): records are plain Python numbers by the time they arrive here.
"""

from __future__ import annotations

import json
import math
import os

# A state whose largest |θ| exceeds this many times the initial parameters' has diverged. Adam
# moves a parameter by about the learning rate per step, so a healthy run (β ≤ 1e-3) would need
# ~10⁶ steps to get there; a too-large rate gets there in one.
DIVERGED_FACTOR = 1e3


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient; the message names the last good checkpoint."""


class DivergedError(NonFiniteLossError):
    """An update that left finite but diverged parameters; the message names the last good
    checkpoint."""


class MetricLog:
    """metrics.jsonl (one JSON object per record) and TensorBoard scalars of the same numbers.

    Opening keeps the first `keep_lines` records (those of the restored checkpoint's past) and
    drops the rest, so a resumed run's log is the uninterrupted run's log.
    """

    def __init__(self, workdir: str, keep_lines: int, purge_step: int | None,
                 enabled: bool = True):
        # Disabled (processes other than 0 of a multi-process run): counts, writes nothing.
        self.enabled, self.lines, self.tb = enabled, keep_lines, None
        if not enabled:
            return
        self.path = os.path.join(workdir, "metrics.jsonl")
        lines = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()[:keep_lines]
        with open(self.path, "w") as f:
            f.writelines(lines)
        self.lines = len(lines)
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            self.lines += 1
            return
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
        if self.tb is not None:
            self.tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_results(workdir: str, results: list[dict]) -> None:
    """results.json, written whole and atomically."""
    path = os.path.join(workdir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def check_finite(scalars: dict[str, float], where: str, last_good: int | None,
                 ckpt_dir: str, initial_scale: float | None = None) -> None:
    """Stops a run before it saves a bad state: NonFiniteLossError when a loss, a gradient norm
    or the updated state's scale (`state/`, see state.state_scale) is NaN or ±inf; with
    `initial_scale` (the initial parameters' largest |θ|), DivergedError when the updated
    parameters' largest |θ| exceeds DIVERGED_FACTOR times it. Both name `last_good`, the newest
    checkpoint, whose state passed this check when it was made."""
    good = (f"the last good checkpoint is step {last_good} in {ckpt_dir}; rerunning with the "
            f"same workdir resumes from it" if last_good is not None
            else "no checkpoint had been saved yet")
    bad = {k: v for k, v in scalars.items()
           if k.startswith(("loss/", "grad_norm/", "state/")) and not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite training values at {where}: {bad}. Training stopped; {good}. Lower "
            f"meta.outer_lr / meta.inner_lr or check the data.")
    if initial_scale is None:
        return
    bound = DIVERGED_FACTOR * max(initial_scale, 1e-6)
    largest = scalars["state/max_abs_param"]
    if largest > bound:
        raise DivergedError(
            f"the parameters diverged at {where}: the update left max |θ| = {largest:.3g}, over "
            f"{DIVERGED_FACTOR:g}× the initial parameters' {initial_scale:.3g} (loss and "
            f"gradients were finite). Training stopped; {good}. Lower meta.outer_lr / "
            f"meta.inner_lr.")
