"""Depth targets: the face-shaped prior used where no PRNet depth map exists (Eq. 10's I).

A heuristic stand-in, documented as such: a smooth ellipsoidal face bump for live, zeros for spoof.
"""

import numpy as np


def face_depth_prior(size: int, *, center=(0.5, 0.47), axes=(0.36, 0.46)) -> np.ndarray:
    """A [size, size] float32 map in [0, 1]: an ellipsoid cap over a centred face crop, 0 outside.

    center and axes are fractions of the crop (x, y); the defaults fit a face detector's square
    crop, where the face is slightly above centre and taller than wide.
    """
    if size < 1:
        raise ValueError(f"face_depth_prior: size must be ≥ 1, got {size}")
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    r2 = ((xx - center[0]) / axes[0]) ** 2 + ((yy - center[1]) / axes[1]) ** 2
    depth = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    # A nose ridge makes the prior face-like rather than a plain dome; it carries no identity.
    nose = 0.25 * np.exp(-(((xx - center[0]) / 0.06) ** 2 + ((yy - center[1] - 0.03) / 0.16) ** 2))
    depth = np.where(r2 < 1.0, depth + nose, 0.0)
    return (depth / depth.max()).astype(np.float32)


def depth_target(label_live: bool, size: int, depth: np.ndarray | None = None) -> np.ndarray:
    """The depth target for one example: the given map (live) or the prior (live), zeros (spoof)."""
    if not label_live:
        return np.zeros((size, size), np.float32)
    if depth is None:
        return face_depth_prior(size)
    depth = np.asarray(depth, np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth_target: expected a 2-D depth map, got shape {depth.shape}")
    return depth
