"""Where the meta-step's time goes (not a test): XLA:CPU thunk time grouped by operation kind.

    python experiments/bench/profile_meta_step.py --resolution 64 --per-domain-batch 32

Traces one step after warm-up with `jax.profiler` (Perfetto JSON), then sums the duration of the
executable's thunks by the HLO op name's kind (e.g. `ynn_fusion`, `dot`, `pad_slice_fusion`) and
prints the top kinds and the largest single ops as JSON lines; asynchronous thunks (Eigen dots) are
reported by their start-to-completion spans and by the time no thunk's own span covers.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax
import numpy as np

from d2am_jax import meta
from d2am_jax import state as state_lib
from d2am_jax.configs import default
from d2am_jax.data.dataset import depth_size


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--per-domain-batch", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--top", type=int, default=25)
    return p.parse_args()


def kind(name: str) -> str:
    """`ynn_fusion.12` → `ynn_fusion`; `dot.3` → `dot`."""
    return re.sub(r"(\.\d+)+$", "", name)


def main():
    args = parse_args()
    config = default.get_config()
    config.data.resolution = args.resolution
    config.model.width = args.width
    config.meta.per_domain_batch = args.per_domain_batch
    k, b, r = config.meta.num_domains, args.per_domain_batch, args.resolution
    g = depth_size(r)
    rng = np.random.default_rng(0)
    y = np.tile(np.r_[np.ones(b // 2), np.zeros(b - b // 2)], (k, 1)).astype(np.float32)
    data = {
        "x": rng.random((k, b, r, r, 6), dtype=np.float32),
        "y": y,
        "depth": rng.random((k, b, g, g), dtype=np.float32) * y[:, :, None, None],
    }
    second = args.order == "second"
    state = state_lib.init_state(config, jax.random.PRNGKey(0))
    step = meta.make_meta_step(config)
    state, m = step(state, data, second_order=second)  # compile + warm-up
    jax.block_until_ready(m)
    out = tempfile.mkdtemp(prefix="d2am_profile_")
    with jax.profiler.trace(out, create_perfetto_trace=True):
        state, m = step(state, data, second_order=second)
        jax.block_until_ready(m)
    path = glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    by_kind, by_op = collections.Counter(), collections.Counter()
    wall = (
        max(
            (
                e["dur"]
                for e in events
                if e.get("name") == "ThunkExecutor::Execute (wait for completion)"
            ),
            default=0,
        )
        / 1e6
    )
    # Some thunks run asynchronously (the dots XLA leaves to Eigen, large elementwise loops): their
    # own span covers only the dispatch, and a separate "end: NAME" event marks completion. Their
    # start-to-end spans are summed apart ("async_span_s"; they include waiting for the thread pool
    # and overlap each other), and the time during which no thunk's own span is running
    # ("outside_spans_s") is where that asynchronous work runs alone.
    ends = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name", "").startswith("end: "):
            ends[e["name"][5:]].append(e["ts"] + e.get("dur", 0))
    starts, spans = collections.defaultdict(list), []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        # Thunks carry HLO op names; skip the Python and runtime spans around them, and control
        # flow (`while`), whose body thunks are counted themselves.
        if not re.match(r"^[a-z_][a-z0-9_\-]*(\.\d+)+$|^[a-z_]+$", name) or name.startswith(
            ("pjit", "while")
        ):
            continue
        by_kind[kind(name)] += e["dur"] / 1e6
        by_op[name] += e["dur"] / 1e6
        starts[name].append(e["ts"])
        spans.append((e["ts"], e["ts"] + e["dur"]))
    async_span = collections.Counter()
    for name, done in ends.items():
        begun = sorted(starts.get(name, []))
        if len(begun) == len(done):
            async_span[kind(name)] += sum(b - a for a, b in zip(begun, sorted(done))) / 1e6
    covered, reach = 0.0, None
    for a, b in sorted(spans):
        if reach is None or a > reach:
            covered, reach = covered + (b - a), b
        elif b > reach:
            covered, reach = covered + (b - reach), b
    first = min((a for a, _ in spans), default=0)
    outside = (max((b for _, b in spans), default=0) - first - covered) / 1e6
    total = sum(by_kind.values())
    # XLA:CPU runs independent thunks concurrently, so the op total can exceed the step's wall time.
    print(
        json.dumps(
            {
                "step_wall_s": round(wall, 3),
                "total_op_s": round(total, 3),
                "outside_spans_s": round(outside, 3),
                "trace": path,
            }
        )
    )
    print(json.dumps({"async_span_s": {k: round(v, 2) for k, v in async_span.most_common(8)}}))
    for name, s in by_kind.most_common(args.top):
        print(json.dumps({"kind": name, "s": round(s, 3), "share": round(s / total, 3)}))
    for name, s in by_op.most_common(args.top):
        print(json.dumps({"op": name, "s": round(s, 3)}))


if __name__ == "__main__":
    main()
