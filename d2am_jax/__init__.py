"""D²AM for mixture-domain face anti-spoofing in JAX (Chen et al., AAAI 2021).

Pure-function network, losses and exact second-order meta-step; host-side pseudo-domain discovery.
Importing the package loads nothing heavy and changes no jax setting (see `runtime.start`).
"""

__version__ = "0.1.0"
