"""How a run uses jax and its host: settings applied when a run starts (compilation cache), the
project's random-number setting, backend-dependent choices, compile options, preemption, memory.

Nothing here runs at import: importing the package changes no jax setting in the user's session.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

FAST_CONV_GRAD_CHOICES = ("auto", True, False)


def start(config) -> None:
    """jax settings for a run, applied where it starts (train, predict): the persistent
    compilation cache when `config.jax_cache_dir` names one."""
    if config.get("jax_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", str(config.jax_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def project_random():
    """Context in which the project traces its jitted functions: jax's classic threefry.

    With the partitionable threefry (jax's default since 0.5) XLA:CPU took ~10× longer to compile
    the parameter initialisation (100 s vs 9 s for a tiny model, BENCHMARKS.md). The project's
    random streams are small (initialisation, MMD prior samples); a context, not a global flag,
    so the user's own session keeps its setting.
    """
    return jax.threefry_partitionable(False)


def with_project_random(fn):
    """`fn` traced and run under `project_random()`: its random draws are the same whatever the
    session's global threefry flag (the meta objective and the ERM loss draw MMD prior samples)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with project_random():
            return fn(*args, **kwargs)

    return wrapped


def fast_conv_grad(value) -> bool:
    """`model.fast_conv_grad` resolved: 'auto' → the CPU-tuned ops (ops.py) on CPU only, XLA's own
    convolutions and derivatives on GPU and TPU (where cuDNN / the TPU compiler own them); True
    or False (also as the strings a command-line override gives) force either."""
    text = str(value).strip().lower()
    if text == "auto":
        return jax.default_backend() == "cpu"
    if text in ("true", "false"):
        return text == "true"
    raise ValueError(f"model.fast_conv_grad: expected 'auto', True or False, got {value!r}")


class Preemption:
    """SIGTERM sets `requested`; the run saves a checkpoint at the next step boundary and returns.
    Outside the main thread no handler is installed (the caller owns signals there)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# XLA:CPU hands convolutions and dots to YNNPACK, and by default also elementwise and reduction
# fusions, which then need every operand materialised: in the training step that costs 2 GB of
# temporaries and ~10 % of the time (BENCHMARKS.md). The training steps compile with YNNPACK for
# convolutions and dots only.
_CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": (
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    ),
}
# XLA:CPU expands the optimization barriers with which jax.checkpoint keeps its recomputation
# apart ('cse_barrier_expander', before layout assignment) and then runs CSE again, which merges
# the recomputed forward pass back into the original: rematerialisation is undone and the memory
# stays as without it (measured: the paper-scale step compiled with the same convolutions and
# the same temporaries, BENCHMARKS.md). A step that rematerialises keeps the barriers.
_CPU_REMAT_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}
_options_cache: dict[tuple[str, bool], dict] = {}


def training_compiler_options(rematerialized: bool = False) -> dict:
    """XLA options for the jitted training steps: `_CPU_OPTIONS` on the CPU backend, with
    `_CPU_REMAT_OPTIONS` for a step that rematerialises (`model.remat`); none elsewhere.

    An XLA build that does not know the options gets none (with a warning) rather than a failed
    compile.
    """
    backend = jax.default_backend()
    key = (backend, bool(rematerialized))
    if key not in _options_cache:
        options = {}
        if backend == "cpu":
            wanted = {**_CPU_OPTIONS, **(_CPU_REMAT_OPTIONS if rematerialized else {})}
            try:
                jax.jit(lambda v: v + 1, compiler_options=wanted)(jnp.zeros(()))
                options = wanted
            except Exception as err:  # noqa: BLE001 - any rejection means: compile without it
                warnings.warn(
                    f"XLA rejected {sorted(wanted)}; compiling with defaults ({err})",
                    stacklevel=2,
                )
        _options_cache[key] = options
    return _options_cache[key]


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


class Placement:
    """Where a run's arrays live: one mesh over every device of every process, axis 'data'.

    Parameters and optimizer state are replicated; batches are sharded over their batch axis (the
    per-domain batch B of a meta-batch [K, B, ...], the first axis otherwise). Plain `jit` over
    these shardings keeps one device's semantics: BatchNorm statistics, MMD and the inner step
    all see the whole global batch (XLA inserts the collectives). Each process supplies only its
    own slice of a global batch (`local_rows`, `batch`).
    """

    def __init__(self, devices=None):
        devices = jax.devices() if devices is None else list(devices)
        # Auto axes: XLA's sharding propagation places the intermediates (plain `jit` semantics);
        # explicit axes would make every reshape of the sharded batch spell out its sharding.
        self.mesh = jax.make_mesh((len(devices),), ("data",), devices=devices,
                                  axis_types=(jax.sharding.AxisType.Auto,))
        self.num_devices = len(devices)
        self.process_index, self.process_count = jax.process_index(), jax.process_count()
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

    @property
    def sharded(self) -> bool:
        return self.num_devices > 1

    @property
    def is_main_process(self) -> bool:
        """The process that writes logs, results and the progress bar."""
        return self.process_index == 0

    def batch_sharding(self, axis: int) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec(*([None] * axis), "data"))

    def local_rows(self, n: int) -> slice:
        """This process's rows of a global batch axis of length n (n divisible by the devices)."""
        per = n // self.process_count
        return slice(self.process_index * per, (self.process_index + 1) * per)

    def batch(self, local: dict, axis: int) -> dict:
        """A global batch from this process's slice of it (the same slice `local_rows` names)."""
        sharding = self.batch_sharding(axis)
        return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
                for key, value in local.items()}

    def replicate(self, tree):
        """A pytree (the same values on every process) replicated on every device."""
        if not self.sharded:
            return jax.device_put(tree)
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(np.shape(a), self.replicated,
                                                   lambda index: np.asarray(a)[index]),
            jax.device_get(tree))

    def fetch(self, tree):
        """Host numpy copies of (possibly sharded, multi-process) arrays: the global values."""
        if self.process_count > 1:
            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)

    def check_divides(self, sizes: dict[str, int]) -> None:
        """UserError naming each config field whose batch the device count does not divide."""
        bad = {field: n for field, n in sizes.items() if n % self.num_devices}
        if bad:
            from d2am_jax.errors import UserError
            raise UserError("; ".join(
                f"config.{field}={n} is not divisible by the {self.num_devices} devices of the "
                f"mesh (each device takes an equal part of every batch)"
                for field, n in bad.items()))


_CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID",
                "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def start_processes(coordinator_address: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, initialization_timeout: int = 300) -> None:
    """Joins a multi-process run (`jax.distributed`) before jax's backends start.

    With a coordinator address, the three values say it all; without one, jax detects the cluster
    itself where the environment names one (SLURM, TPU VMs, Open MPI); a single process on its own
    needs nothing. A process id outside [0, num_processes) or an incomplete triple is refused, and
    so is a --num_processes that differs from the coordinator's (every process names both
    numbers). Process 0 hosts the coordinator, which waits `initialization_timeout` seconds for
    all the processes it expects; when fewer arrive, jax ends each process from C++ (an abort
    after 'DEADLINE_EXCEEDED ... RegisterTask', nothing Python can catch), so the line logged
    before joining says which numbers to check.
    """
    from d2am_jax.errors import UserError
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise UserError("--coordinator_address, --num_processes and --process_id go together "
                        f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id={process_id} must lie in [0, --num_processes="
                            f"{num_processes})")
        log.info("joining the coordinator at %s as process %d of --num_processes=%d; it waits %d "
                 "s for all of them. An abort after 'DEADLINE_EXCEEDED ... RegisterTask' means "
                 "not all reached it: start %d processes, ids 0 to %d, each with "
                 "--num_processes=%d and the same --coordinator_address", coordinator_address,
                 process_id, num_processes, initialization_timeout, num_processes,
                 num_processes - 1, num_processes)
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=initialization_timeout)
        counts = _process_counts(process_id, num_processes, initialization_timeout)
        coordinator = counts[0]
        others = {i: n for i, n in counts.items() if n != coordinator}
        if others:
            raise UserError(
                f"the coordinator at {coordinator_address} (process 0) runs "
                f"--num_processes={coordinator}, but " + ", ".join(
                    f"process {i} was started with --num_processes={n}"
                    for i, n in sorted(others.items()))
                + f"; start every process with the same --num_processes (here {coordinator})")
    elif any(_env_says_cluster(name) for name in _CLUSTER_ENV):
        jax.distributed.initialize()


def _process_counts(process_id: int, num_processes: int, timeout_s: int) -> dict[int, int]:
    """Every process's --num_processes, by process id, through the coordinator's key-value store.

    jax takes the process count from the coordinator alone: a process started with another
    --num_processes joins without complaint and fails later, in a collective, where the others
    wait on it. Here each process publishes its own and reads all, so all see a mismatch at once
    and stop with the same error.
    """
    from jax._src import distributed  # the client jax.distributed.initialize connected
    client = distributed.global_state.client
    key = "d2am_jax/num_processes/{}".format
    client.key_value_set(key(process_id), str(num_processes))
    timeout_ms = 1000 * int(timeout_s)
    coordinator = int(client.blocking_key_value_get(key(0), timeout_ms))
    return {i: int(client.blocking_key_value_get(key(i), timeout_ms))
            for i in range(coordinator)}


def _env_says_cluster(name: str) -> bool:
    import os
    value = os.environ.get(name, "")
    if name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        return value.isdigit() and int(value) > 1
    return bool(value)
