"""The same D²AM meta-step in PyTorch, as a same-machine yardstick for the JAX step (not a test).

    pip install torch==2.13.0   # not a project dependency; any recent CPU build
    python experiments/bench/meta_step_torch.py --resolution 64 --per-domain-batch 32 --order second

Mirrors `d2am_jax.meta.make_objective` layer for layer (models.py's table, losses.py's terms): E and
D as modules with batch-statistics BatchNorm run once per domain batch; M as a functional forward on
a parameter dict whose inner SGD step uses `torch.autograd.grad(create_graph=True)` (second order)
or detached inner gradients (first order), the way RFM's public code does it; outer Adam(β).
Prints one JSON line with the same keys as meta_step.py.
"""

import argparse
import json
import platform
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--per-domain-batch", type=int, default=32)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--num-domains", type=int, default=3)
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda (eager, float32)")
    return p.parse_args()


def scaled(c, width):
    return max(1, int(round(c * width)))


def cbr(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout, momentum=0.1),
        nn.ReLU(inplace=False),
    )


class DRLM(nn.Module):
    def __init__(self, c, reduction=16):
        super().__init__()
        self.w1 = nn.Linear(c, max(1, c // reduction))
        self.w2 = nn.Linear(max(1, c // reduction), c)
        self.wp = nn.Linear(c, 1)

    def forward(self, f):
        a = torch.sigmoid(self.w2(F.relu(self.w1(f.mean((2, 3))))))  # Eq. 4
        f_plus = f * a[:, :, None, None]  # Eq. 5
        f_minus = f - f_plus  # Eq. 6
        return f_plus, self.wp(f_minus.mean((2, 3)))[:, 0]


class FeatureExtractor(nn.Module):
    def __init__(self, width):
        super().__init__()
        s = lambda c: scaled(c, width)
        self.stem = cbr(6, s(64))
        blocks, drlms, cin = [], [], s(64)
        for _ in range(3):
            blocks.append(
                nn.Sequential(
                    cbr(cin, s(128)),
                    cbr(s(128), s(196)),
                    cbr(s(196), s(128)),
                    nn.MaxPool2d(3, 2, 1),
                )
            )
            drlms.append(DRLM(s(128)))
            cin = s(128)
        self.blocks, self.drlms = nn.ModuleList(blocks), nn.ModuleList(drlms)

    def forward(self, x):
        x = self.stem(x)
        outs, p_logits = [], []
        for block, drlm in zip(self.blocks, self.drlms):
            x, p = drlm(block(x))
            outs.append(x)
            p_logits.append(p)
        return x, outs, p_logits


class DepthEstimator(nn.Module):
    def __init__(self, width):
        super().__init__()
        s = lambda c: scaled(c, width)
        self.body = nn.Sequential(
            cbr(3 * s(128), s(128)), cbr(s(128), s(64)), nn.Conv2d(s(64), 1, 3, padding=1)
        )

    def forward(self, outs):
        size = outs[-1].shape[2:]
        # Average pooling to the last grid, as RFM's head (and d2am_jax.models.DepthEstimator).
        x = torch.cat([o if o.shape[2:] == size else F.adaptive_avg_pool2d(o, size) for o in outs],
                      1)
        return self.body(x)[:, 0]


def meta_learner_params(width, feat_channels, adaptation_dim=512):
    """θ_M as a flat dict of leaf tensors: M runs functionally so the inner step can be
    differentiated."""
    s = lambda c: scaled(c, width)
    p, cin = {}, feat_channels
    for i, c in enumerate((s(128), s(256), s(512))):
        w = torch.empty(c, cin, 3, 3)
        nn.init.kaiming_normal_(w)
        p[f"conv{i}"], p[f"bn{i}.w"], p[f"bn{i}.b"] = w, torch.ones(c), torch.zeros(c)
        cin = c
    lin = nn.Linear(cin, adaptation_dim)
    out = nn.Linear(adaptation_dim, 1)
    p.update(
        {
            "h.w": lin.weight.data,
            "h.b": lin.bias.data,
            "out.w": out.weight.data,
            "out.b": out.bias.data,
        }
    )
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}


def meta_learner(p, x):
    for i in range(3):
        x = F.conv2d(x, p[f"conv{i}"], padding=1)
        x = F.relu(
            F.batch_norm(x, None, None, p[f"bn{i}.w"], p[f"bn{i}.b"], training=True, eps=1e-5)
        )
        if i < 2:
            x = F.max_pool2d(x, 3, 2, 1)
    h = F.linear(x.mean((2, 3)), p["h.w"], p["h.b"])
    return F.linear(h, p["out.w"], p["out.b"])[:, 0], h


def mmd_to_prior(h, prior, bandwidths=(0.5, 1.0, 2.0, 4.0)):
    d, b = h.shape[1], h.shape[0]
    both = torch.cat([h, prior])
    sq = (both * both).sum(1)[:, None] + (both * both).sum(1)[None, :] - 2 * both @ both.T
    sq = sq.clamp_min(0)
    k = sum(torch.exp(-sq / (2 * s * s * d)) for s in bandwidths)
    return k[:b, :b].mean() + k[b:, b:].mean() - 2 * k[:b, b:].mean()


def m_loss(p, feat, y, lambda_m=0.05):
    logit, h = meta_learner(p, feat)
    return F.binary_cross_entropy_with_logits(logit, y) + lambda_m * mmd_to_prior(
        h, torch.randn_like(h)
    )


def domain_entropy(p_logits):
    total = 0.0
    for logit in p_logits:
        lp, lq = F.logsigmoid(logit), F.logsigmoid(-logit)
        total = total + (lp.exp() * lp + lq.exp() * lq).mean()
    return total


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dev = torch.device(args.device)
    E, D = (
        FeatureExtractor(args.width).to(dev, memory_format=fmt),
        DepthEstimator(args.width).to(dev, memory_format=fmt),
    )
    pm = {n: w.to(dev).detach().requires_grad_() for n, w in
          meta_learner_params(args.width, scaled(128, args.width)).items()}
    params = list(E.parameters()) + list(D.parameters()) + list(pm.values())
    opt = torch.optim.Adam(params, lr=1e-4)
    k, b, r = args.num_domains, args.per_domain_batch, args.resolution
    g = r
    for _ in range(3):
        g = (g + 1) // 2
    second = args.order == "second"
    alpha, lambda_p = 1e-3, 0.1

    def batch():
        y = torch.cat([torch.ones(b // 2), torch.zeros(b - b // 2)]).repeat(k, 1).to(dev)
        x = torch.rand(k, b, 6, r, r, device=dev)
        return (
            [x[i].contiguous(memory_format=fmt) for i in range(k)],
            y,
            torch.rand(k, b, g, g, device=dev) * y[:, :, None, None],
        )

    def step(xs, y, depth):
        feats, l_dep, l_p = [], 0.0, 0.0
        for i in range(k):  # BatchNorm statistics per domain batch
            feat, outs, p_logits = E(xs[i])
            l_dep = l_dep + F.mse_loss(D(outs), depth[i])
            if i < k - 1:
                l_p = l_p + domain_entropy(p_logits)
            feats.append(feat)
        total = l_dep + lambda_p * l_p
        for i in range(k - 1):
            loss_i = m_loss(pm, feats[i], y[i])
            grads = torch.autograd.grad(
                loss_i, list(pm.values()), create_graph=second, retain_graph=True
            )
            adapted = {n: w - alpha * gw for (n, w), gw in zip(pm.items(), grads)}
            total = total + loss_i + m_loss(adapted, feats[k - 1], y[k - 1])
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return float(total.detach())

    times = []
    for i in range(args.warmup + args.steps):
        data = batch()
        t = time.perf_counter()
        loss = step(*data)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    print(
        json.dumps(
            {
                "images_per_s": round(k * b / step_s, 3),
                "step_s": round(step_s, 4),
                "step_s_all": [round(t, 4) for t in times],
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "order": args.order,
                "resolution": r,
                "per_domain_batch": b,
                "num_domains": k,
                "width": args.width,
                "channels_last": args.channels_last,
                "threads": torch.get_num_threads(),
                "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                "peak_device_memory_gib": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                if dev.type == "cuda" else None,
                "loss": loss,
                "torch": torch.__version__,
                "machine": platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
