"""The device end of the input pipeline: a run's training batches, built by the host sampler on a
prefetch thread and placed on the device while the previous step runs.

What crosses to the device is uint8 RGB frames and uint8 depth targets (and float labels).
"""

from __future__ import annotations

import jax

from d2am_jax import erm
from d2am_jax.data import pipeline

BATCH_KEYS = ("x", "y", "depth")


def training_batches(config, sampler, pseudo_domain, epoch: int, start: int,
                     stop: int) -> pipeline.Prefetcher:
    """Steps start..stop-1 of `epoch`: meta-batches over the pseudo domains (D²AM) or pooled
    batches (ERM), `data.prefetch` batches ahead, already on the device."""
    d2am = config.method == "d2am"

    def produce(step: int):
        if d2am:
            batch = sampler.meta_batch(pseudo_domain, epoch, step)
        else:
            batch = erm.flat_batch(sampler.pooled_batch(epoch, step))
        return jax.device_put({key: batch[key] for key in BATCH_KEYS})

    return pipeline.Prefetcher(produce, range(start, stop), depth=int(config.data.prefetch))
