"""Colour conversion for the model's input: RGB in [0, 1] → RGB+HSV, 6 channels in [0, 1].

The paper feeds RGB and HSV stacked (256×256×6); numpy only, vectorised over any leading axes.
"""

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """HSV of float RGB in [0, 1] (last axis 3); hue scaled to [0, 1) like OpenCV's full range."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_hsv: expected a last axis of 3 (RGB), got shape {rgb.shape}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = rgb.max(axis=-1)
    minc = rgb.min(axis=-1)
    delta = maxc - minc
    v = maxc
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    safe = np.where(delta > 0, delta, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1).astype(np.float32)


def rgb_to_model_input(rgb_uint8: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] → float32 [..., H, W, 6] (RGB then HSV, all in [0, 1])."""
    rgb = np.asarray(rgb_uint8)
    if rgb.dtype != np.uint8:
        raise ValueError(f"rgb_to_model_input: expected uint8 RGB, got dtype {rgb.dtype}")
    x = rgb.astype(np.float32) / 255.0
    return np.concatenate([x, rgb_to_hsv(x)], axis=-1)
