"""Cross-domain protocols as data: which built datasets/splits/domains form the pooled source
and which the unseen target (O&C&I→M, O&C&M→I, O&M&I→C, I&C&M→O, M&I→C, M&I→O, or domain lists).

The source is one mixed pool; its domain strings are kept for analysis and the 'w/ d' ablation.

Splits ('splits' argument): 'ssdg' (default) follows the code the DG FAS literature compares with
(SSDG, CVPR 2020, data_label/generate_label.py and utils/get_loader.py; RFM and D²AM build on it):
every source dataset's train AND test parts form the source, the target's train and test parts
form the target, and devel parts are left out. 'strict' uses only the source datasets' train parts
and only the target's test part, so no subject of the target's train part is ever scored.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from d2am_jax.data.dataset import FasData
from d2am_jax.errors import UserError

# The DG FAS literature's one-letter names of the built datasets.
LETTERS = {"O": "oulu_npu", "C": "casia_fasd", "I": "replay_attack", "M": "msu_mfsd"}

SPLITS = {"ssdg": (("train", "test"), ("train", "test")),
          "strict": (("train",), ("test",))}


@dataclasses.dataclass(frozen=True)
class Part:
    """Examples of one built dataset: these splits, restricted to these domains (() = all)."""

    dataset: str
    splits: tuple[str, ...]
    domains: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    source: tuple[Part, ...]
    target: tuple[Part, ...]


def cross_dataset(sources: str, target: str, splits: str = "ssdg") -> Protocol:
    """A leave-datasets-out protocol from the literature's letters, e.g. ('OCI', 'M')."""
    if splits not in SPLITS:
        raise UserError(f"splits must be one of {sorted(SPLITS)}, got {splits!r}")
    letters = list(sources) + [target]
    unknown = [c for c in letters if c not in LETTERS]
    if unknown or len(set(letters)) != len(letters) or not sources:
        raise UserError(f"protocol {sources}→{target}: expected distinct letters from "
                         f"{sorted(LETTERS)} (O OULU-NPU, C CASIA-FASD, I Replay-Attack, "
                         f"M MSU-MFSD)")
    src_splits, tgt_splits = SPLITS[splits]
    return Protocol(
        name=f"{'&'.join(sources)}→{target}" + ("" if splits == "ssdg" else f" ({splits})"),
        source=tuple(Part(LETTERS[c], src_splits) for c in sources),
        target=(Part(LETTERS[target], tgt_splits),))


# The paper's Table 1 (three sources) and Table 2 (two sources, limited source data).
PAPER_PROTOCOLS = ("OCI_M", "OCM_I", "OMI_C", "ICM_O", "MI_C", "MI_O")


def get(name: str, splits: str = "ssdg") -> Protocol:
    """A cross-dataset protocol by name: 'OCI_M', 'O&C&I→M', 'O_C_I_to_M', 'OCI->M' alike."""
    m = re.fullmatch(r"\s*([OCIM&_,\s]+?)\s*(?:→|->|_to_|_|>)\s*([OCIM])\s*", name)
    if not m:
        raise UserError(f"unknown protocol {name!r}; expected e.g. 'O&C&I→M' or one of "
                         f"{PAPER_PROTOCOLS}")
    return cross_dataset(re.sub(r"[&_,\s]", "", m.group(1)), m.group(2), splits)


def domain_protocol(dataset: str, source: list[str], target: list[str], split: str = "frames",
                    name: str | None = None) -> Protocol:
    """Source and target as lists of domain names of one built dataset (a manifest's `domain`
    column; its single split is 'frames')."""
    source, target = tuple(source), tuple(target)
    if not source or not target:
        raise UserError(f"{dataset}: both the source and the target need at least one domain "
                         f"(got source={list(source)}, target={list(target)})")
    both = sorted(set(source) & set(target))
    if both:
        raise UserError(f"{dataset}: domains {both} are in both the source and the target")
    return Protocol(name or f"{dataset}: {'&'.join(source)}→{'&'.join(target)}",
                    (Part(dataset, (split,), source),), (Part(dataset, (split,), target),))


def synthetic(source: list[int], target: list[int]) -> Protocol:
    """fas_synthetic with some latent domains as source and held-out ones as target."""
    from d2am_jax.data.builders.synthetic import domain_split
    both = sorted(set(source) & set(target))
    if both or not source or not target:
        raise UserError(f"fas_synthetic: source {list(source)} and target {list(target)} must "
                         "be non-empty and disjoint")
    return Protocol(f"fas_synthetic: {'&'.join(map(str, source))}→{'&'.join(map(str, target))}",
                    (Part("fas_synthetic", tuple(domain_split(d) for d in source)),),
                    (Part("fas_synthetic", tuple(domain_split(d) for d in target)),))


def load(protocol: Protocol, data_dir: str, configs: dict[str, dict] | None = None, *,
         depth_size: int | None = None, in_memory: bool = True) -> tuple[FasData, FasData]:
    """(pooled source, target) of a protocol from datasets built in data_dir.

    configs: per dataset name, the config overrides it was built with. depth_size, in_memory:
    as in loader.load. Fails before training if
    a requested domain is absent, or the source or the target lacks live or spoof examples.
    """
    from d2am_jax.data import loader  # reads ArrayRecord through tensorflow_datasets

    cache: dict[tuple[str, str], FasData] = {}

    def part_data(part: Part) -> FasData:
        pieces = []
        for split in part.splits:
            key = (part.dataset, split)
            if key not in cache:
                cache[key] = loader.load(part.dataset, split, data_dir,
                                         (configs or {}).get(part.dataset), depth_size=depth_size,
                                         in_memory=in_memory)
            pieces.append(cache[key])
        data = loader.concat(pieces)
        if not part.domains:
            return data
        present = set(data.domain.tolist())
        absent = [d for d in part.domains if d not in present]
        if absent:
            raise UserError(f"protocol {protocol.name}: domain(s) {absent} not in "
                             f"{part.dataset} {list(part.splits)}; it has {sorted(present)}")
        return data.take(np.isin(data.domain, np.asarray(part.domains)))

    source = loader.concat([part_data(p) for p in protocol.source])
    target = loader.concat([part_data(p) for p in protocol.target])
    source.require_both_classes(f"protocol {protocol.name}: source")
    target.require_both_classes(f"protocol {protocol.name}: target")
    return source, target

