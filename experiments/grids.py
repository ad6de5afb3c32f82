"""Experiment grids: named lists of (row name, config overrides), with the paper's numbers as data.

Host-only (no jax). `build_config(base, overrides)` makes a row's config the same way in the runner
and in each run's process.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, NamedTuple

import ml_collections

from d2am_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Row(NamedTuple):
    """One grid row: its name, the config fields it sets, and the paper's numbers for it (metric →
    value as a fraction, plus 'table': where they come from), empty when the paper has none."""

    name: str
    overrides: dict
    paper: dict


class Grid(NamedTuple):
    """A named list of rows; `pairs`: the (row, reference) pairs whose seed-by-seed differences
    the summary reports, empty for every row against the first."""

    name: str
    rows: tuple
    description: str
    pairs: tuple = ()


def _paper(table: str, hter_pct: float, auc_pct: float) -> dict:
    return {"table": table, "hter_test_eer": round(hter_pct / 100.0, 6),
            "auc": round(auc_pct / 100.0, 6)}


# D²AM's rows of the paper's tables (HTER %, AUC %), copied from ../shared/paper/d2am-aaai2021.md.
# Published tables set the threshold on the target (SSDG's code), hence hter_test_eer.
_TABLE1 = {"OCI_M": (12.70, 95.66), "OCM_I": (15.43, 91.22), "OMI_C": (20.98, 85.58),
           "ICM_O": (15.27, 90.87)}
_TABLE2 = {"MI_C": (32.65, 72.04), "MI_O": (27.70, 75.36)}
_TABLE3 = "Table 3 (O&C&M→I)"
_TABLE3_VALUES = {"d2am": (15.43, 91.22), "w_d": (18.24, 89.28), "wo_d": (27.05, 73.57),
                  "wo_select": (16.57, 89.98), "wo_lp": (15.89, 90.81), "wo_mmd": (16.11, 90.24),
                  "k2": (17.16, 90.03), "k3": (15.43, 91.22), "k4": (16.82, 90.57)}

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1)


def _protocol_rows(values: dict, table: str) -> tuple:
    return tuple(Row(name, {"data.protocol": name}, _paper(table, *values[name]))
                 for name in values)


def _table3_rows() -> tuple:
    overrides = {
        "d2am": {},
        "w_d": {"domain_labels": "true"},
        "wo_d": {"domain_labels": "random"},
        "wo_select": {"domains.select": "none"},
        "wo_lp": {"meta.lambda_p": 0.0},
        "wo_mmd": {"meta.lambda_m": 0.0},
        "k2": {"meta.num_domains": 2},
        "k3": {"meta.num_domains": 3},
        "k4": {"meta.num_domains": 4},
        "erm": {"method": "erm"},
        "first_order": {"meta.second_order": False},
        # Variants the paper leaves open (configs/default.py): the DRLM's adversarial entropy
        # head, 2×2 pooling, and BatchNorm statistics pooled over the K domain batches.
        "adversarial_head": {"model.entropy_head": "adversarial"},
        "pool2": {"model.pool_window": 2},
        "pooled_bn": {"meta.batch_norm": "pooled"},
    }
    return tuple(Row(name, o, _paper(_TABLE3, *_TABLE3_VALUES[name]) if name in _TABLE3_VALUES
                     else {}) for name, o in overrides.items())


def _order_rows() -> tuple:
    """Both orders × α, each reporting the cosine and norm ratio of the two meta-gradients at
    every step (which costs the other order's gradient too), plus one row per order at the
    config's α without that diagnostic, for honest step times and peak memory."""
    rows = []
    for order, second in (("second", True), ("first", False)):
        for alpha in ALPHAS:
            rows.append(Row(f"{order}_a{alpha:g}", {"meta.second_order": second,
                                                    "meta.inner_lr": alpha,
                                                    "meta.grad_cosine": True, "log_every": 1}, {}))
    for order, second in (("second", True), ("first", False)):
        rows.append(Row(f"{order}_timing", {"meta.second_order": second, "log_every": 1}, {}))
    return tuple(rows)


GRIDS = {
    "table1": Grid("table1", _protocol_rows(_TABLE1, "Table 1"),
                   "Table 1: three sources → one target (base: d2am_jax/configs/protocols.py)"),
    "table2": Grid("table2", _protocol_rows(_TABLE2, "Table 2"),
                   "Table 2: limited sources M&I → C, O (base: d2am_jax/configs/protocols.py)"),
    "table3": Grid("table3", _table3_rows(),
                   "Table 3 ablations + ERM and first-order D²AM (paper values: O&C&M→I only)"),
    # Each order against the other at the same α (and the two timing rows): the comparison the
    # study is for, rather than every row against the first.
    "order_study": Grid("order_study", _order_rows(),
                        "second vs first order × inner step α; gradient cosine and norm ratio",
                        tuple((f"first_a{a:g}", f"second_a{a:g}") for a in ALPHAS)
                        + (("first_timing", "second_timing"),)),
}


def get(name: str, rows: str = "") -> Grid:
    """The grid `name`, optionally limited to the comma-separated `rows`."""
    if name not in GRIDS:
        raise UserError(f"unknown grid {name!r}; expected one of {sorted(GRIDS)}")
    grid = GRIDS[name]
    wanted = [r.strip() for r in rows.split(",") if r.strip()]
    known = [r.name for r in grid.rows]
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise UserError(f"grid {name!r} has no row(s) {unknown}; its rows are {known}")
    if wanted:
        grid = grid._replace(rows=tuple(r for r in grid.rows if r.name in wanted))
    return grid


# ----------------------------------------------------------------------------- configs


def load_base(spec: str) -> ml_collections.ConfigDict:
    """A config file's get_config(), as `--config FILE[:ARG]` does (relative paths: cwd, then the
    project root)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
        path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        raise UserError(f"--base {spec!r}: no config file {path!r} (e.g. "
                        "d2am_jax/configs/synthetic.py or d2am_jax/configs/protocols.py:OCM_I)")
    module_spec = importlib.util.spec_from_file_location("_experiment_base_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ValueError as err:
        raise UserError(f"--base {spec!r}: {err}") from None


def parse_value(text: str) -> Any:
    """A command-line value: true/false, numbers, tuples as Python literals, else the string."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_overrides(args: list[str], base: ml_collections.ConfigDict | None = None) -> dict:
    """['--config.a.b=1', …] → {'a.b': 1, …}; anything else is an error naming it. A field that
    `base` holds as a string keeps the text as written (`--config.data.source=0,1,2` is the
    string '0,1,2', not the tuple (0, 1, 2))."""
    out = {}
    for arg in args:
        if not arg.startswith("--config.") or "=" not in arg:
            raise UserError(f"unexpected argument {arg!r}; config overrides read "
                            "--config.FIELD=VALUE")
        key, _, value = arg[len("--config."):].partition("=")
        out[key] = value if _field_type(base, key) is str else parse_value(value)
    return out


def _field_type(config: ml_collections.ConfigDict | None, key: str) -> type | None:
    """The type of dotted field `key` in `config` (None where it has none: `apply` then names
    an unknown field)."""
    if config is None:
        return None
    *parents, leaf = key.split(".")
    try:
        for part in parents:
            config = config[part]
        return config.get_type(leaf) if isinstance(config, ml_collections.ConfigDict) else None
    except (KeyError, AttributeError):
        return None


def apply(config: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
    """Sets dotted fields in place; an unknown field or a value of the wrong type is a UserError
    naming the field and `where` it came from."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target = config
        try:
            for part in parents:
                target = target[part]
            if leaf not in target:
                raise KeyError(leaf)
            if isinstance(target[leaf], tuple) and isinstance(value, list):
                value = tuple(value)
            if isinstance(target[leaf], float) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            target[leaf] = value
        except (KeyError, AttributeError):
            raise UserError(f"{where}: config.{key} is not a field of the config") from None
        except TypeError as err:
            raise UserError(f"{where}: config.{key}={value!r} rejected: {err}") from None


def build_config(base: str, overrides: dict, seed: int) -> ml_collections.ConfigDict:
    """The base config with `overrides` (user's, then the row's) applied and the seed set."""
    config = load_base(base)
    apply(config, overrides, "overrides")
    config.seed = int(seed)
    return config
