"""Data: TFDS builders (synthetic, manifest, OULU/CASIA/Replay/MSU), the host dataset type, sources,
protocols and the meta-batch sampler.

Host-only code: numpy, PIL, OpenCV and tensorflow-datasets (no TensorFlow), never jax.
"""
