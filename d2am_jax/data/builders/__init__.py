"""TFDS builders of the FAS datasets (synthetic, manifest, OULU-NPU, CASIA-FASD, Replay-Attack,
MSU-MFSD), writing ArrayRecord with PIL-encoded images; `builder()` makes one from k=v overrides.

No TensorFlow: building and reading go through tfds' ArrayRecord path only.
"""

from __future__ import annotations

from typing import Any

from d2am_jax.data.builders.casia_fasd import CasiaFasd
from d2am_jax.data.builders.common import (
    REPORT_FILE,
    FasBuilder,
    make_config,
    parse_overrides,
    read_report,
)
from d2am_jax.data.builders.manifest import FasManifest
from d2am_jax.data.builders.msu_mfsd import MsuMfsd
from d2am_jax.data.builders.oulu_npu import OuluNpu
from d2am_jax.data.builders.replay_attack import ReplayAttack
from d2am_jax.data.builders.synthetic import FasSynthetic
from d2am_jax.data.protocols import LETTERS

BUILDERS: dict[str, type[FasBuilder]] = {
    "fas_synthetic": FasSynthetic,
    "fas_manifest": FasManifest,
    "oulu_npu": OuluNpu,
    "casia_fasd": CasiaFasd,
    "replay_attack": ReplayAttack,
    "msu_mfsd": MsuMfsd,
}


def builder(name: str, data_dir: str, config: dict[str, Any] | None = None,
            **kwargs) -> FasBuilder:
    """The builder `name` in data_dir with config overrides (values may be strings, as from the
    CLI). kwargs go to the builder: skip_bad, num_workers."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
    cls = BUILDERS[name]
    default = cls.BUILDER_CONFIGS[0]
    return cls(data_dir=data_dir, config=make_config(type(default), default, config or {}),
               **kwargs)


__all__ = ["BUILDERS", "LETTERS", "REPORT_FILE", "builder", "parse_overrides", "read_report"]
