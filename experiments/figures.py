"""The paper's figures from finished training workdirs: each a PNG, its data beside it (CSV/NPZ).

  python experiments/figures.py --workdir RUN [RUN ...] --out DIR [--max-points 1000]

fig3_roc: target ROC of every run on one plot. fig4ab_h_tsne: t-SNE of the adaptation-layer
features h (source and target), coloured by true domain, live ● / spoof ▲, one panel per run
(pass a D²AM and an ERM run for Fig. 4a, b). fig4cd_<run>: t-SNE of df(x) (instance mean and std)
built from F⁺ against F⁻ of the third DRLM. fig5_<run>: class-activation maps of the highest- and
lowest-attention channels of the third DRLM on sample frames. fig6_<run>: per epoch, t-SNE of the
clustering features df(x) coloured by the pseudo domains they were clustered into. fig7_<run>:
per epoch the MMD between pseudo domains and between true domains, measured in h — a space the
clustering did not partition (in the clustered df(x) split, pseudo > true holds by construction)
— and NMI with the previous assignment and with the true domains (metrics.jsonl).
Figures 4–5 use the best checkpoint (or the newest); Fig. 6 and 7a use every epoch-end checkpoint
still kept (to keep all: train with checkpoint.every_steps = the steps per epoch and
checkpoint.keep ≥ num_epochs, as configs/benchmark.py does).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE)]  # this checkout's d2am_jax

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from d2am_jax import checkpointing, config_check, domains, metrics  # noqa: E402
from d2am_jax.errors import UserError  # noqa: E402

MARKERS = {1: "o", 0: "^"}  # live ●, spoof ▲


# ----------------------------------------------------------------------------- a run


class RunView:
    """A finished workdir: its config, data, checkpoints and the jitted feature function."""

    def __init__(self, workdir: str):
        from d2am_jax.data import sources
        self.workdir = os.path.abspath(workdir)
        self.ckpt = checkpointing.Checkpointer(self.workdir, 1000)
        which = "best" if self.ckpt.best_step() is not None else "latest"
        if self.ckpt.latest_step() is None:
            raise UserError(f"{workdir}: no checkpoint under {self.ckpt.latest_dir}; train first")
        _, saved = self.ckpt.read_meta(which)
        self.meta = saved
        self.config = ml_collections.ConfigDict(config_check.with_defaults(saved["config"]))
        from d2am_jax import runtime
        runtime.start(self.config)  # the run's compilation cache, if it had one
        self.label = f"{os.path.basename(os.path.dirname(self.workdir))}/" \
            f"{os.path.basename(self.workdir)} ({self.config.method})"
        self.which = which
        self.data = sources.load(self.config, self.workdir)

    def state(self, which: str = None, step: int | None = None):
        restored = self.ckpt.restore(None, which=which or self.which, step=step)
        s = restored.state
        return types.SimpleNamespace(params=s["params"], batch_stats=s["batch_stats"]), restored

    def epoch_steps(self) -> list[int]:
        spe = int(self.meta["steps_per_epoch"])
        return [s for s in checkpointing.finalized_steps(self.ckpt.latest_dir) if s % spe == 0]

    def features(self, state, frames, keep_maps: bool = False) -> dict:
        """h, the third DRLM's attention and instance statistics of F⁺ and F⁻ (and its F maps)."""
        from d2am_jax import stats
        features = _jitted("features", self.config)
        parts = []
        for x, m in stats.padded_batches(frames, int(self.config.eval.batch_size),
                                         int(self.config.data.resolution)):
            out = features(state.params, state.batch_stats, x)
            parts.append({k: np.asarray(v)[:m] for k, v in out.items()
                          if keep_maps or k != "maps"})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


_JITTED = {}


def _jitted(kind: str, config):
    """One jitted function per kind and network (runs of a grid share it: one compile)."""
    from d2am_jax import state as state_lib
    from d2am_jax import stats
    key = (kind, config.model.to_json(sort_keys=True), int(config.data.resolution),
           int(config.domains.stats_batch_size))
    if key not in _JITTED:
        make = {"features": _feature_fn, "predict": state_lib.make_predict,
                "stats": lambda c: stats.make_stats_pass(c, int(c.domains.stats_batch_size))}
        _JITTED[key] = make[kind](config)
    return _JITTED[key]


def _feature_fn(config):
    import jax
    import jax.numpy as jnp

    from d2am_jax import models
    E, _, M = models.build_modules(config.model)

    @jax.jit
    def features(params, batch_stats, x):
        x = models.model_input(x)
        feat, blocks, drlm = E.apply({"params": params["E"], "batch_stats": batch_stats["E"]},
                                     x, False)
        _, h = M.apply({"params": params["M"], "batch_stats": batch_stats["M"]}, feat, False)
        a, f_plus = drlm[2]["attention"], blocks[2]
        maps = f_plus / jnp.maximum(a[:, None, None, :], 1e-12)  # F of the third DRLM
        mu_plus, sigma_plus = models.instance_stats(f_plus)
        return {"h": h, "attention": a, "plus": jnp.concatenate([mu_plus, sigma_plus], -1),
                "minus": jnp.concatenate([drlm[2]["mean"], drlm[2]["std"]], -1), "maps": maps}

    return features


# ----------------------------------------------------------------------------- helpers


def _subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


def tsne(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of standardised features (perplexity kept below the number of points)."""
    x = domains.standardized(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3.0)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


# Beyond this many target domains they share one colour: 26 pooled targets (configs/benchmark.py)
# would otherwise fill the plot with a 52-entry legend and repeat the 10 colours.
MAX_TARGET_COLOURS = 4


def plotted_domains(domain: np.ndarray) -> np.ndarray:
    """The names points are coloured by: the true domains, with the target's pooled into one
    ('target (N domains)') when it has more than MAX_TARGET_COLOURS."""
    names = np.asarray(domain).astype(str)
    is_target = np.char.startswith(names, "target ")
    count = len(set(names[is_target].tolist()))
    if count <= MAX_TARGET_COLOURS:
        return names
    return np.where(is_target, f"target ({count} domains)", names)


def _scatter(ax, xy, colour_by, is_live, title):
    colour_by = plotted_domains(colour_by)
    names = sorted(set(colour_by.tolist()))
    for i, name in enumerate(names):
        for label, marker in MARKERS.items():
            sel = (colour_by == name) & (is_live == label)
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=10, marker=marker, color=f"C{i % 10}",
                           label=f"{name} {'live' if label else 'spoof'}", alpha=0.7)
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=5, markerscale=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, f"{name}.png")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _write_csv(path: str, header: list[str], rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _slug(view: RunView) -> str:
    return "".join(c if c.isalnum() else "_" for c in view.label.split(" ")[0]).strip("_")


def _target_scores(view: RunView, state) -> tuple[np.ndarray, np.ndarray]:
    """Target labels and live scores, per video when the run evaluates per video."""
    from d2am_jax import evaluation
    predict = _jitted("predict", view.config)
    t = view.data.target
    s = evaluation.scores(predict, state, t, int(view.config.eval.batch_size),
                          int(view.config.data.resolution))
    if view.config.eval.per_video:
        grouped = metrics.video_scores(t.video, t.labels, s)
        return grouped.labels, grouped.scores
    return t.labels, s


# ----------------------------------------------------------------------------- figures


def fig3_roc(views, out: str) -> list[str]:
    fig, ax = plt.subplots(figsize=(4.5, 4))
    rows = []
    for view in views:
        labels, scores = _target_scores(view, view.state()[0])
        fpr, tpr, thr = skm.roc_curve(labels, scores, pos_label=1)
        auc = skm.roc_auc_score(labels, scores)
        ax.plot(fpr, tpr, label=f"{view.label} AUC {100 * auc:.1f}")
        rows += [(view.label, f, t, h) for f, t, h in zip(fpr, tpr, thr)]
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (spoof accepted)")
    ax.set_ylabel("true positive rate (live accepted)")
    ax.set_title("Fig. 3: target ROC", fontsize=9)
    ax.legend(fontsize=6)
    _write_csv(os.path.join(out, "fig3_roc.csv"), ["run", "fpr", "tpr", "threshold"], rows)
    return [_save(fig, out, "fig3_roc")]


def _source_and_target(view: RunView, max_points: int):
    """Frames, true domain names (the target marked) and labels, subsampled."""
    train, target = view.data.train, view.data.target
    frames = np.concatenate([np.asarray(train.frames[np.arange(len(train))]),
                             np.asarray(target.frames[np.arange(len(target))])])
    domain = np.concatenate([train.domain.astype(str),
                             np.char.add("target ", target.domain.astype(str))])
    live = np.concatenate([train.labels, target.labels])
    keep = _subsample(len(frames), max_points)
    return frames[keep], domain[keep], live[keep]


def fig4(views, out: str, max_points: int) -> list[str]:
    paths = []
    fig, axes = plt.subplots(1, len(views), figsize=(4 * len(views), 4), squeeze=False)
    arrays = {}
    for i, view in enumerate(views):
        frames, domain, live = _source_and_target(view, max_points)
        feats = view.features(view.state()[0], frames)
        xy = tsne(feats["h"])
        _scatter(axes[0, i], xy, domain, live, f"Fig. 4a/b: h, {view.label}")
        arrays.update({f"run{i}_xy": xy, f"run{i}_domain": domain, f"run{i}_live": live})
        paths += _fig4cd(view, feats, domain, live, out)
    np.savez(os.path.join(out, "fig4ab_h_tsne.npz"), runs=[v.label for v in views], **arrays)
    paths.append(_save(fig, out, "fig4ab_h_tsne"))
    return paths


def _fig4cd(view, feats, domain, live, out) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    xy_plus, xy_minus = tsne(feats["plus"]), tsne(feats["minus"])
    _scatter(axes[0], xy_plus, domain, live, f"Fig. 4c: df(x) from F⁺, {view.label}")
    _scatter(axes[1], xy_minus, domain, live, f"Fig. 4d: df(x) from F⁻, {view.label}")
    name = f"fig4cd_{_slug(view)}"
    np.savez(os.path.join(out, f"{name}.npz"), xy_plus=xy_plus, xy_minus=xy_minus,
             domain=domain, live=live)
    return [_save(fig, out, name)]


def fig5_cam(view: RunView, out: str, samples: int = 4) -> list[str]:
    """F maps of each frame's highest- and lowest-attention channels of the third DRLM
    (normalised, upsampled onto the frame), as GAP-weighted maps are in the paper."""
    t = view.data.target
    idx = np.linspace(0, len(t) - 1, samples).astype(int)
    frames = np.asarray(t.frames[idx])
    feats = view.features(view.state()[0], frames, keep_maps=True)
    a, maps = feats["attention"], feats["maps"]
    hi, lo = a.argmax(-1), a.argmin(-1)
    r = frames.shape[1]
    fig, axes = plt.subplots(samples, 3, figsize=(6, 2 * samples), squeeze=False)
    cams = {"high": [], "low": []}
    for row in range(samples):
        axes[row, 0].imshow(frames[row])
        axes[row, 0].set_title(f"label {'live' if t.labels[idx[row]] else 'spoof'}", fontsize=7)
        for col, (kind, ch) in enumerate((("high", hi[row]), ("low", lo[row])), start=1):
            cam = _upsampled(maps[row, :, :, ch], r)
            cams[kind].append(cam)
            axes[row, col].imshow(frames[row])
            axes[row, col].imshow(cam, cmap="jet", alpha=0.5)
            axes[row, col].set_title(f"{kind} attention: ch {ch}, a={a[row, ch]:.2f}",
                                     fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    name = f"fig5_{_slug(view)}"
    np.savez(os.path.join(out, f"{name}.npz"), frames=frames, high=np.array(cams["high"]),
             low=np.array(cams["low"]), channel_high=hi, channel_low=lo, attention=a)
    return [_save(fig, out, name)]


def _upsampled(m: np.ndarray, r: int) -> np.ndarray:
    """A channel map scaled to [0, 1] and resized (bilinear) onto the r × r frame."""
    import cv2
    m = (m - m.min()) / (np.ptp(m) + 1e-12)
    return cv2.resize(m.astype(np.float32), (r, r), interpolation=cv2.INTER_LINEAR)


def _epoch_assignments(view: RunView):
    """For every kept epoch-end checkpoint: (epoch, its state, the clustering features df(x) the
    next epoch's assignment is computed from, and that assignment) — recomputed exactly as
    training does (train.epoch_domains, same seeds)."""
    from d2am_jax import stats, train
    spe, k = int(view.meta["steps_per_epoch"]), int(view.meta["k"])
    stats_fn = _jitted("stats", view.config)
    dc, data = view.config.domains, view.data.train
    for step in view.epoch_steps():
        state, restored = view.state("latest", step)
        epoch = step // spe
        bank = stats.compute_bank(stats_fn, state.params["E"], state.batch_stats["E"],
                                  data.frames, mode=dc.select, fraction=dc.fraction)
        labels, diagnostics = train.epoch_domains(view.config, epoch, k, state, stats_fn, data,
                                                  restored.pseudo_domain, imagenet=None)
        yield epoch, state, bank, labels, diagnostics


def fig6_fig7(view: RunView, out: str, max_points: int) -> list[str]:
    if view.config.method != "d2am" or view.config.domain_labels != "pseudo":
        return []
    data = view.data.train
    keep = _subsample(len(data), max_points)
    frames = np.asarray(data.frames[keep])
    epochs, rows, arrays = [], [], {}
    for epoch, state, bank, labels, diag in _epoch_assignments(view):
        xy = tsne(bank[keep])
        h = view.features(state, frames)["h"]
        gamma = domains.median_heuristic_gamma(h, seed=0)
        mmd_pseudo, _ = domains.domain_mmd2(h, labels[keep], gamma=gamma)
        mmd_true, _ = domains.domain_mmd2(h, data.domain[keep], gamma=gamma)
        epochs.append(epoch)
        arrays.update({f"epoch{epoch}_xy": xy, f"epoch{epoch}_pseudo": labels[keep]})
        rows.append((epoch + 1, mmd_pseudo, mmd_true, diag))
    paths = []
    name = _slug(view)
    if epochs:
        fig, axes = plt.subplots(1, len(epochs), figsize=(3.2 * len(epochs), 3.2), squeeze=False)
        for ax, epoch in zip(axes[0], epochs):
            _scatter(ax, arrays[f"epoch{epoch}_xy"], arrays[f"epoch{epoch}_pseudo"].astype(str),
                     data.labels[keep], f"Fig. 6: assignment of epoch {epoch + 1}")
        np.savez(os.path.join(out, f"fig6_{name}.npz"), live=data.labels[keep], **arrays)
        paths.append(_save(fig, out, f"fig6_{name}"))
    paths.append(_fig7(view, rows, out, name))
    return paths


def _fig7(view: RunView, mmd_rows, out: str, name: str) -> str:
    records = []
    path = os.path.join(view.workdir, "metrics.jsonl")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    # Assignments that ran (metrics.jsonl), and the one after the last checkpoint (recomputed).
    assign = {r["epoch"]: r for r in records if r.get("kind") == "assignment"}
    mmd = {e: (p, t) for e, p, t, _ in mmd_rows}
    for e, _, _, diag in mmd_rows:
        assign.setdefault(e, diag)
    rows = [(e, *mmd.get(e, (None, None)), r.get("nmi_previous"), r.get("nmi_true_domain"),
             r.get("mmd2_pseudo"), r.get("mmd2_true")) for e, r in sorted(assign.items())]
    _write_csv(os.path.join(out, f"fig7_{name}.csv"),
               ["epoch", "mmd2_h_pseudo", "mmd2_h_true", "nmi_previous", "nmi_true_domain",
                "mmd2_dfx_pseudo_by_construction", "mmd2_dfx_true"], rows)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    xs = [r[0] for r in rows]
    for i, what in ((1, "pseudo domains"), (2, "true domains")):
        axes[0].plot(xs, [np.nan if r[i] is None else r[i] for r in rows], "o-", label=what)
    axes[0].set_title("Fig. 7a: MMD² between domains, in h (not the clustered space)",
                      fontsize=8)
    for i, what in ((3, "NMI vs previous assignment"), (4, "NMI vs true domains")):
        axes[1].plot(xs, [np.nan if r[i] is None else r[i] for r in rows], "o-", label=what)
    axes[1].set_title("Fig. 7b: NMI of the pseudo domains", fontsize=8)
    for ax in axes:
        ax.set_xlabel("epoch (assignment)")
        ax.legend(fontsize=7)
    return _save(fig, out, f"fig7_{name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", nargs="+", required=True, help="finished training workdirs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-points", type=int, default=1000, help="t-SNE points per plot")
    args = parser.parse_args(argv)
    try:
        views = [RunView(w) for w in args.workdir]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    paths = fig3_roc(views, args.out) + fig4(views, args.out, args.max_points)
    for view in views:
        paths += fig5_cam(view, args.out) + fig6_fig7(view, args.out, args.max_points)
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
