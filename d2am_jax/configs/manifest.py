"""D²AM on a user's own face frames listed in manifest.csv (path,label[,video][,domain][,depth];
paths relative to the CSV). The named source domains form the pooled training source — their
names never reach training unless --config.domain_labels=true — and the target domains are held
out for evaluation:

  python -m d2am_jax.main --config d2am_jax/configs/manifest.py --workdir runs/mine \
      --config.data.manifest=/data/mine/manifest.csv --config.data.source=a,b \
      --config.data.target=c

The frames are built once into <workdir>/tfds (or --config.data.data_dir) at data.resolution
(non-square frames are resized; --config.data.face_crop=haar crops the largest face first).
Defaults are the paper's network at 256×256; on a 2-core CPU pass e.g.
--config.data.resolution=64 --config.model.width=0.25 (about 2 s per meta-step there).
Expected run time: at paper scale about 5–10 s per meta-step on a 2-core CPU, i.e. a GPU job.
"""

from d2am_jax.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "manifest"
    config.num_epochs = 30
    return config
