"""D²AM for mixture-domain face anti-spoofing in JAX (Chen et al., AAAI 2021).

Pure-function network, losses and exact second-order meta-step; host-side pseudo-domain discovery.
"""

import jax as _jax

# With the partitionable threefry (jax's default since 0.5) XLA:CPU took ~10× longer to compile
# the parameter initialisation here (100 s vs 9 s for a tiny model, see BENCHMARKS.md). The
# project's random streams are small (initialisation, MMD prior samples) and need no sharding.
_jax.config.update("jax_threefry_partitionable", False)

__version__ = "0.1.0"
