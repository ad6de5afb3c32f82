"""What a run writes for people to read: metrics.jsonl and TensorBoard scalars of the same records,
results.json, and the check that stops a run on a non-finite loss or gradient.

Host-only (no jax): records are plain Python numbers by the time they arrive here.
"""

from __future__ import annotations

import json
import math
import os


class NonFiniteLossError(FloatingPointError):
    """A non-finite loss or gradient; the message names the last good checkpoint."""


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
                 ckpt_dir: str) -> None:
    """Raises NonFiniteLossError when a loss or gradient norm among `scalars` is NaN or ±inf."""
    bad = {k: v for k, v in scalars.items()
           if (k.startswith("loss/") or k.startswith("grad_norm/")) and not math.isfinite(v)}
    if bad:
        good = (f"the last good checkpoint is step {last_good} in {ckpt_dir}; rerunning with the "
                f"same workdir resumes from it" if last_good is not None
                else "no checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"non-finite training values at {where}: {bad}. Training stopped; {good}. Lower "
            f"meta.outer_lr / meta.inner_lr or check the data.")
