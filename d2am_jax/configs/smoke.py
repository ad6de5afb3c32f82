"""Smoke test: D²AM end to end on a tiny in-memory synthetic mixture (16×16, width 1/16), for tests.

  python -m d2am_jax.main --config d2am_jax/configs/smoke.py --workdir /tmp/d2am_smoke

Expected run time on the 2-core CPU: about 100 s from a cold start (measured with the machine
shared, load ≈ 3.8), ~60 s of it XLA compiling the second-order meta-step; about 25 s when
--config.jax_cache_dir=DIR points at a persistent compilation cache an earlier run filled.
Source: synthetic domains 0, 1, 2 (24 frames each, videos of 4 frames), target: domain 3. Two
epochs of 4 meta-steps, K = 3 pseudo domains, 4 images per domain batch; checkpoints every 2
steps (and at epoch ends).
"""

from d2am_jax.configs import default


def get_config():
    config = default.get_config()
    config.num_epochs = 2
    config.steps_per_epoch = 4
    config.log_every = 1
    config.model.width = 0.0625
    config.model.adaptation_dim = 8
    config.model.drlm_reduction = 4
    config.meta.num_domains = 3
    config.meta.per_domain_batch = 4
    config.meta.outer_lr = 1e-3
    config.data.name = "synthetic"
    config.data.resolution = 16
    config.data.source = "0,1,2"
    config.data.target = "3"
    config.data.source_val_fraction = 0.2
    config.data.synthetic.num_domains = 4
    config.data.synthetic.per_domain = 24
    config.data.synthetic.frames_per_video = 4
    config.domains.stats_batch_size = 16
    config.domains.n_init = 1
    config.pretrained.batch_size = 32
    config.eval.batch_size = 16
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 2
    return config
