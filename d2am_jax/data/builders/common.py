"""What every FAS builder shares: the record schema, configs named from their values, and the
skip_bad bookkeeping that ends in build_report.json next to the ArrayRecord files.

Records hold PIL-encoded image bytes (tfds' Image feature would need TensorFlow to encode).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm
from etils import epath

from d2am_jax.data import facemesh
from d2am_jax.data.faces import BadItem
from d2am_jax.errors import UserError

log = logging.getLogger(__name__)

REPORT_FILE = "build_report.json"
LIVE, SPOOF = 1, 0
DEPTH_CHOICES = ("mesh", "prior")


def default_depth() -> str:
    """'mesh' where the Face Mesh model is installed, else 'prior'."""
    return "mesh" if facemesh.model_available() else "prior"


def check_depth(owner: str, depth: str) -> None:
    """A config's `depth` must be 'mesh' (with the model installed), 'prior' or a folder."""
    if depth == "mesh" and not facemesh.model_available():
        raise UserError(f"{owner}.depth: 'mesh' needs the Face Mesh model "
                         f"({facemesh.MESH_PATH}) and OpenCV ≥ 4.8; use depth=prior or a folder")
    if depth not in DEPTH_CHOICES and not os.path.isdir(depth):
        raise UserError(f"{owner}.depth: expected 'mesh', 'prior' or a folder of depth maps, "
                         f"got {depth!r} (not a folder)")


def depth_source(config) -> str:
    """What a config's live depth maps are, for the dataset's info: mesh, prior, the absolute
    path of the user's maps, or 'builder' for a builder that makes its own (fas_synthetic)."""
    depth = getattr(config, "depth", None)
    if depth is None:
        return "builder"
    return depth if depth in DEPTH_CHOICES else os.path.abspath(depth)


def features() -> tfds.features.FeaturesDict:
    """The record schema of every FAS builder."""
    blob = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731
    return tfds.features.FeaturesDict({
        "image": blob(),      # PNG/JPEG bytes, RGB, resolution × resolution
        "label": tfds.features.Scalar(dtype=np.int32),  # 1 = live, 0 = spoof
        "depth": blob(),      # 8-bit gray PNG bytes in [0, 255] ↔ [0, 1], or b"" (use the prior)
        "video": tfds.features.Text(),   # video id, unique within the dataset
        "domain": tfds.features.Text(),  # dataset name, latent domain or manifest domain
        "frame": tfds.features.Scalar(dtype=np.int32),  # frame index within the video
        "attack": tfds.features.Text(),  # attack type ("" for live)
    })


@dataclasses.dataclass(eq=False)
class FasConfig(tfds.core.BuilderConfig):
    """Base of the builders' configs; subclasses add typed fields with defaults."""

    name: str = "default"

    def validate(self) -> None:
        """Raise ValueError naming the field for a value out of its allowed range."""

    def check_choice(self, field: str, choices: tuple) -> None:
        if getattr(self, field) not in choices:
            raise ValueError(f"{type(self).__name__}.{field}: expected one of {choices}, "
                             f"got {getattr(self, field)!r}")

    def check_positive(self, *fields: str) -> None:
        for field in fields:
            if not getattr(self, field) > 0:
                raise ValueError(f"{type(self).__name__}.{field}: expected a positive value, "
                                 f"got {getattr(self, field)!r}")


def config_fields(cls: type[FasConfig]) -> dict[str, dataclasses.Field]:
    """The user-settable fields of a config class (not tfds' own name/version/…)."""
    base = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in base}


def _name_part(key: str, value: Any) -> str:
    clean = lambda v: re.sub(r"[^A-Za-z0-9.]+", "", str(v))  # noqa: E731
    if isinstance(value, str) and (os.sep in value or key.endswith(("_dir", "manifest"))):
        # A path: the folder it names (or holds it) for people, a hash of it for uniqueness.
        path = os.path.abspath(value)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        digest = hashlib.sha1(path.encode()).hexdigest()[:8]
        return f"{key}-{clean(os.path.basename(folder))}-{digest}"
    return f"{key}-{clean(value)}"


def make_config(cls: type[FasConfig], default: FasConfig, overrides: dict[str, Any]) -> FasConfig:
    """A config with `overrides` applied, named after its non-default values ('default' if none).

    Unknown keys and values of the wrong type fail with the field name and the expected type.
    """
    fields = config_fields(cls)
    values = {}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ValueError(f"{cls.__name__}: unknown config field {key!r}; "
                             f"expected one of {sorted(fields)}")
        values[key] = _coerce(cls.__name__, key, raw, type(getattr(default, key)))
    changed = {k: v for k, v in values.items() if v != getattr(default, k)}
    if not changed:
        return default
    name = "__".join(_name_part(k, changed[k]) for k in sorted(changed))
    config = cls(name=name, description=f"{default.description or ''} with {changed}".strip(),
                 **values)
    config.validate()
    return config


def _coerce(owner: str, key: str, raw: Any, typ: type) -> Any:
    if isinstance(raw, typ) and not (typ is int and isinstance(raw, bool)):
        return raw
    if not isinstance(raw, str):
        if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        raise ValueError(f"{owner}.{key}: expected {typ.__name__}, got {raw!r}")
    try:
        if typ is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        return typ(raw)
    except ValueError:
        raise ValueError(f"{owner}.{key}: expected {typ.__name__}, got {raw!r}") from None


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """['k=v', ...] (the CLI's --config) → {'k': 'v'}; a missing '=' fails naming the item."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


class BuildReport:
    """What a build skipped (skip_bad) or noted; written as JSON next to the data."""

    def __init__(self):
        self.skipped: list[dict[str, str]] = []
        self.notes: dict[str, int] = {}
        self.listed: dict[str, list[str]] = {}
        self.examples: dict[str, int] = {}

    def skip(self, item: str, reason: str) -> None:
        self.skipped.append({"item": item, "reason": reason})
        log.warning("skipped: %s", reason)

    def note(self, what: str, count: int = 1, item: str | None = None) -> None:
        """Count `what`; with `item` (file and frame), also list it under `what`."""
        self.notes[what] = self.notes.get(what, 0) + count
        if item is not None:
            self.listed.setdefault(what, []).append(item)
            log.warning("%s: %s", what, item)

    def as_dict(self, **extra) -> dict:
        return {"num_skipped": len(self.skipped), "skipped": self.skipped, "notes": self.notes,
                "listed": self.listed, "examples": self.examples, **extra}


class FasBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """GeneratorBasedBuilder with the FAS schema, ArrayRecord output and skip_bad reporting.

    Subclasses implement `_split_generators` returning {split: iterator of (key, example)}
    and raise `BadItem` for an input that cannot be used; `_guard` turns it into a skip when the
    builder was made with skip_bad=True and re-raises it otherwise.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    DESCRIPTION = ""

    def __init__(self, *, skip_bad: bool = False, num_workers: int = 1, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        self.skip_bad = bool(skip_bad)
        self.num_workers = max(1, int(num_workers))
        self.report = BuildReport()
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10's own code_path reaches for the `importlib_resources` backport, which it
        # only installs on Python < 3.9; the class's file is all tfds needs.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.DESCRIPTION, features=features(), homepage=None,
            metadata=tfds.core.MetadataDict(depth=depth_source(self.builder_config)))

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        self.report = BuildReport()
        super()._download_and_prepare(dl_manager, download_config)
        # self.data_dir is the temporary build folder here; tfds renames it when we return.
        path = os.path.join(self.data_dir, REPORT_FILE)
        with open(path, "w") as f:
            json.dump(self.report.as_dict(builder=self.name, config=self.builder_config.name,
                                          skip_bad=self.skip_bad,
                                          depth=depth_source(self.builder_config),
                                          **self._report_extra()),
                      f, indent=1)
        if self.report.skipped:
            log.warning("%s: skipped %d bad item(s); list in %s", self.name,
                        len(self.report.skipped), REPORT_FILE)

    def _generate_examples(self, examples: Iterator):
        # _split_generators already returns {split: example iterator}; tfds calls this only if a
        # subclass hands it arguments instead.
        yield from examples

    def _report_extra(self) -> dict:
        return {}

    def _guard(self, item: str, error: BadItem) -> None:
        """Record a bad item under skip_bad, else re-raise it (the message names the file)."""
        if not self.skip_bad:
            raise error
        self.report.skip(item, str(error))

    def _map_items(self, items: list, fn, label: Callable[[Any], str], desc: str) -> Iterator:
        """Yield the examples of fn(item) → (examples, notes) over items, in order, on
        num_workers threads (OpenCV and PIL release the GIL), with a progress bar. An item whose
        fn raises BadItem goes through `_guard`."""
        bar = tqdm.tqdm(total=len(items), desc=desc, leave=False)
        chunk = 4 * self.num_workers  # bounded look-ahead keeps memory flat on big releases

        def safe(item):
            try:
                return fn(item)
            except BadItem as e:
                return e

        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            for start in range(0, len(items), chunk):
                part = items[start:start + chunk]
                for item, result in zip(part, pool.map(safe, part)):
                    bar.update(1)
                    if isinstance(result, BadItem):
                        self._guard(label(item), result)
                        continue
                    examples, notes = result
                    for note in notes:
                        # a (what, item) pair is counted and listed; a plain string counted
                        if isinstance(note, tuple):
                            self.report.note(note[0], item=note[1])
                        else:
                            self.report.note(note)
                    yield from examples
        bar.close()

    def _counted(self, split: str, examples: Iterator) -> Iterator:
        """Pass examples through, counting them; an empty split is an error, not a silent hole."""
        n = 0
        for key_example in examples:
            n += 1
            yield key_example
        self.report.examples[split] = n
        if n == 0:
            raise BadItem(f"{self.name}: split {split!r} has no examples "
                          f"({len(self.report.skipped)} item(s) skipped so far; see the log)")


def read_report(version_dir: str) -> dict | None:
    """The build_report.json of a built dataset folder, or None for a build without one."""
    path = os.path.join(version_dir, REPORT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
