"""The default main job: D²AM trained and evaluated on the built-in synthetic mixture, in memory.

  python -m d2am_jax.main --config d2am_jax/configs/synthetic.py --workdir /tmp/d2am_synthetic

Source: latent domains 0, 1, 2 of the synthetic mixture (400 frames each, 4-frame videos) pooled,
their domain ids hidden from training (domain_labels='pseudo'); 10% of the source videos per class
are held out as source validation (threshold and best checkpoint). Target: the unseen domain 3.
Scale for a 2-core CPU: 32×32 input, width 1/8 of the paper's network, K = 3 pseudo domains of 8
images each (second-order meta-gradients), 8 epochs of one pass over the source each.
Expected run time on the 2-core CPU: about 4–5 minutes (≈1.5 min of it XLA compiling the
meta-step, ≈0.3 s per meta-step); results in <workdir>/results.json.
Variants: --config.method=erm (baseline), --config.domain_labels=true|random (ablations),
--config.second_order=False (first-order meta-gradient), --config.data.target=0 (another target).
"""

from d2am_jax.configs import default


def get_config():
    config = default.get_config()
    config.num_epochs = 8
    config.log_every = 10
    config.model.width = 0.125
    config.model.adaptation_dim = 64
    config.model.drlm_reduction = 4
    config.meta.num_domains = 3
    config.meta.per_domain_batch = 8
    config.meta.outer_lr = 1e-3
    config.meta.inner_lr = 1e-3
    config.data.name = "synthetic"
    config.data.resolution = 32
    config.data.source = "0,1,2"
    config.data.target = "3"
    config.data.synthetic.num_domains = 4
    config.data.synthetic.per_domain = 400
    config.data.synthetic.frames_per_video = 4
    config.domains.stats_batch_size = 64
    config.eval.batch_size = 64
    config.checkpoint.every_steps = 50
    return config
