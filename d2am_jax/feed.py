"""The device end of the input pipeline: a run's training batches, built by the host sampler on a
prefetch thread and placed on the device while the previous step runs.

What crosses to the device is uint8 RGB frames and uint8 depth targets (and float labels).
"""

from __future__ import annotations

import jax

from d2am_jax import erm
from d2am_jax.data import pipeline

BATCH_KEYS = ("x", "y", "depth")


def training_batches(config, sampler, pseudo_domain, epoch: int, start: int, stop: int,
                     placement) -> pipeline.Prefetcher:
    """Steps start..stop-1 of `epoch`: meta-batches over the pseudo domains (D²AM) or pooled
    batches (ERM), `data.prefetch` batches ahead, already on the device(s). Over a mesh each
    process loads only its columns of each global batch and they are sharded over B."""
    d2am = config.method == "d2am"
    b = int(config.meta.per_domain_batch)
    columns = placement.local_rows(b if d2am else b * sampler.num_domains)

    def produce(step: int):
        if d2am:
            batch = sampler.meta_batch(pseudo_domain, epoch, step, columns)
        else:
            batch = erm.flat_batch(sampler.pooled_batch(epoch, step, columns))
        batch = {key: batch[key] for key in BATCH_KEYS}
        if not placement.sharded:
            return jax.device_put(batch)
        return placement.batch(batch, axis=1 if d2am else 0)

    return pipeline.Prefetcher(produce, range(start, stop), depth=int(config.data.prefetch))
