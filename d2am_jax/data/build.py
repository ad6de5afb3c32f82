"""Builds one FAS dataset to ArrayRecord in data_dir, with progress bars and a final summary:

  python -m d2am_jax.data.build NAME --manual_dir DIR --data_dir DIR [--config k=v ...] [--skip_bad]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import tensorflow_datasets as tfds

from d2am_jax.data import builders
from d2am_jax.data.faces import BadItem
from d2am_jax.errors import MissingFileError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m d2am_jax.data.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(builders.BUILDERS))
    p.add_argument("--data_dir", required=True, help="where the built dataset goes (tfds root)")
    p.add_argument("--manual_dir", default=None,
                   help="the original release (or the folder of manifest.csv); not needed for "
                        "fas_synthetic")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="builder config override, repeatable (e.g. frames_per_video=4)")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip unreadable/unlabelled/faceless items and list them in "
                        f"{builders.REPORT_FILE} instead of stopping at the first")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if already built")
    p.add_argument("--num_workers", type=int, default=1,
                   help="threads decoding videos / images")
    return p.parse_args(argv)


def build(name: str, data_dir: str, manual_dir: str | None = None, config: dict | None = None,
          skip_bad: bool = False, overwrite: bool = False, num_workers: int = 1) -> dict:
    """Build (or reuse) a dataset and return its summary: path, examples per split, skipped."""
    if manual_dir is not None and not os.path.isdir(manual_dir):
        raise MissingFileError(f"--manual_dir {manual_dir} is not a folder")
    made = _missing_folders(os.path.join(data_dir, name))
    try:
        b = builders.builder(name, data_dir, config, skip_bad=skip_bad, num_workers=num_workers)
        mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
        made += _missing_folders(os.path.dirname(b.data_dir))
        # Nothing is downloaded (every release is manual), but tfds' download manager makes
        # <data_dir>/downloads/extracted anyway: give it a folder that goes away with the build.
        with tempfile.TemporaryDirectory(prefix="d2am_build_downloads_") as downloads:
            b.download_and_prepare(download_dir=downloads,
                                   download_config=tfds.download.DownloadConfig(
                                       manual_dir=manual_dir, download_mode=mode))
    except BaseException:
        _remove_if_left_empty(made)
        raise
    report = builders.read_report(b.data_dir) or {}
    return {"dataset": name, "config": b.builder_config.name, "path": b.data_dir,
            "examples": {s: b.info.splits[s].num_examples for s in b.info.splits.keys()},
            "num_skipped": report.get("num_skipped", 0), "notes": report.get("notes", {}),
            "report": os.path.join(b.data_dir, builders.REPORT_FILE)}


def _missing_folders(path: str) -> list[str]:
    """path and those of its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_if_left_empty(made: list[str]) -> None:
    """After a failed build, remove the folders it created that hold nothing of the user's: empty
    ones, and a dataset folder holding only tfds' default-config note (.config/metadata.json)."""
    for path in sorted(set(made), key=len, reverse=True):
        if not os.path.isdir(path):
            continue
        note = os.path.join(path, ".config")
        if os.listdir(path) == [".config"] and os.listdir(note) == ["metadata.json"]:
            os.remove(os.path.join(note, "metadata.json"))
            os.rmdir(note)
        if not os.listdir(path):
            os.rmdir(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = build(args.name, args.data_dir, args.manual_dir,
                        builders.parse_overrides(args.config), args.skip_bad, args.overwrite,
                        args.num_workers)
    except (BadItem, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, BadItem) and not args.skip_bad:
            print("(pass --skip_bad to skip such items and list them in "
                  f"{builders.REPORT_FILE})", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
