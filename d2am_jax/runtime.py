"""How the training processes use XLA and host memory: compile options and returning freed memory.

The compile options apply to the CPU backend only; the memory release is for any Linux host
(BENCHMARKS.md, "Meta-step").
"""

import ctypes
import ctypes.util
import warnings

import jax
import jax.numpy as jnp

# XLA:CPU hands convolutions and dots to YNNPACK, and by default also elementwise and reduction
# fusions, which then need every operand materialised: in the training step that costs 2 GB of
# temporaries and ~10 % of the time (BENCHMARKS.md). The training steps compile with YNNPACK for
# convolutions and dots only.
_CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
}
_options_cache: dict[str, dict] = {}


def training_compiler_options() -> dict:
    """XLA options for the jitted training steps: `_CPU_OPTIONS` on the CPU backend, none elsewhere.

    An XLA build that does not know the option gets none (with a warning) rather than a failed compile.
    """
    backend = jax.default_backend()
    if backend not in _options_cache:
        options = {}
        if backend == "cpu":
            try:
                jax.jit(lambda v: v + 1, compiler_options=_CPU_OPTIONS)(jnp.zeros(()))
                options = dict(_CPU_OPTIONS)
            except Exception as err:  # noqa: BLE001 - any rejection means: compile without it
                warnings.warn(f"XLA rejected {sorted(_CPU_OPTIONS)}; compiling with defaults ({err})")
        _options_cache[backend] = options
    return _options_cache[backend]


_libc = None


def release_host_memory() -> bool:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim); True if it ran.

    XLA's compiler leaves ~1 GB of freed heap behind after compiling the meta-step; without this
    the process keeps it resident for the whole run. Called after each compile-heavy phase.
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
            _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if not _libc:
        return False
    _libc.malloc_trim(0)
    return True
