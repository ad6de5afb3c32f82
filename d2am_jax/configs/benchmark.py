"""The synthetic benchmark for comparing methods over seeds (experiments/run.py): the main job's
network on a wider mixture — six source domains, two pooled target domains — and more epochs.

  python -m d2am_jax.main --config d2am_jax/configs/benchmark.py --workdir /tmp/d2am_benchmark
  python experiments/run.py table3 --base d2am_jax/configs/benchmark.py --seeds 5 \
      --workdir runs/table3_benchmark

Why this shape (issue 13, RESULTS.md): with the main job's three designed source domains and one
target (0, 1, 2 → 3, even at 800 frames each), target AUC over 5 seeds had a standard deviation of
24 (D²AM) and 32 (ERM) points, and a run's AUC swung by 30–60 points from epoch to epoch: which
cue a network picks up from three sources decides the target, and the seed decides the cue.
Six sources (designed 0, 1, 2 and drawn 4, 5, 6) of 400 frames (100 four-frame videos) each, and
two unseen targets (designed 3 and drawn 7, pooled: 800 frames, 200 videos) measured 8.5 (D²AM)
and 4.3 (ERM) over the same seeds at the same cost. 20 % of each class's source videos (60 per
class) are held out as source validation. 12 epochs of 80 meta-steps; a checkpoint at each epoch
end, all 12 kept for figures.py's Fig. 6 and 7a. Expected run time on the 2-core CPU: 4–10 minutes
per run depending on the machine's load (RESULTS.md gives each grid's wall time).
"""

from d2am_jax.configs import synthetic


def get_config():
    config = synthetic.get_config()
    config.num_epochs = 12
    config.data.source = "0,1,2,4,5,6"
    config.data.target = "3,7"
    config.data.synthetic.num_domains = 8
    config.data.synthetic.per_domain = 400
    config.data.source_val_fraction = 0.2
    config.checkpoint.every_steps = 80  # = one epoch: a killed run loses at most ~25 s
    config.checkpoint.keep = 12
    return config
