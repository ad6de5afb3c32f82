"""Built-in mixture-domain FAS data: procedurally drawn faces, live and spoof, under latent domains.

Numpy + OpenCV only; deterministic from a seed, and each domain independent of how many there are.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

# Rendering works on blocks of this many images: big enough to amortise numpy's per-call cost,
# small enough that a block of 256×256 float planes stays in the tens of megabytes. Fixed, because
# each block draws its own noise from its own generator.
_BLOCK = 32

# Spatial sizes (blur sigmas, halftone/moiré periods) are stated in pixels at this resolution and
# scaled with the configured one, so a domain looks the same at 64 and at 256 pixels.
_REF_RES = 64.0

ATTACKS = ("print", "replay")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and seed of the synthetic mixture; the TFDS builder's config carries these fields."""

    resolution: int = 64
    num_domains: int = 4  # latent domains
    per_domain: int = 400  # examples per domain (half live, half spoof)
    frames_per_video: int = 4  # consecutive examples share a subject/video id
    seed: int = 0

    def __post_init__(self):
        _check_config(self)


def _check_config(config: SyntheticConfig) -> None:
    def need(ok: bool, field: str, expected: str):
        if not ok:
            value = getattr(config, field)
            raise ValueError(f"SyntheticConfig.{field}: expected {expected}, got {value!r}")

    for field in ("resolution", "num_domains", "per_domain", "frames_per_video", "seed"):
        value = getattr(config, field)
        need(isinstance(value, (int, np.integer)) and not isinstance(value, bool), field,
             "an integer")
    need(config.resolution >= 16, "resolution", "≥ 16 pixels")
    need(config.num_domains >= 1, "num_domains", "≥ 1")
    need(config.per_domain >= 2 and config.per_domain % 2 == 0, "per_domain",
         "an even number ≥ 2 (half live, half spoof)")
    need(config.frames_per_video >= 1, "frames_per_video", "≥ 1")
    need(config.seed >= 0, "seed", "≥ 0 (numpy seeds are non-negative)")


@dataclasses.dataclass(frozen=True)
class DomainStyle:
    """How one latent domain looks: its light, camera, background, people and spoof media.

    Image axes: x to the right, y down, z toward the camera; sizes in pixels at 64×64.
    """

    name: str
    # Scene light (Lambertian): unit vector toward the light, ambient and diffuse strengths, and a
    # brightness falloff across the frame along the light's direction.
    light_dir: tuple[float, float, float]
    ambient: float
    diffuse: float
    falloff: float
    # Camera: white balance (colour temperature), exposure, vignetting, defocus, sensor noise
    # (luma and chroma, in [0, 1] units) and JPEG quality.
    gains: tuple[float, float, float]
    exposure: float
    vignette: float
    blur_sigma: float
    noise_std: float
    chroma_noise: float
    jpeg_quality: int
    # Background kind ('wall', 'stripes', 'texture', 'gradient') and its two colours.
    background: str
    bg_colors: tuple[tuple[float, float, float], tuple[float, float, float]]
    # Range of skin tones in this population: 0 = lightest, 1 = darkest.
    skin_tones: tuple[float, float]
    # Spoof media. print_prob: share of print attacks (the rest are screen replays).
    print_prob: float
    halftone_period: float
    halftone_angle: float
    halftone_strength: float
    paper_rgb: tuple[float, float, float]
    paper_texture: float
    print_gamut: float  # contrast/saturation kept by the print (1 = all)
    moire_period: float
    moire_angle: float
    moire_strength: float
    glare_strength: float
    glare_size: float
    screen_rgb: tuple[float, float, float]
    screen_gamma: float
    black_level: float  # the screen's backlight lifts blacks
    spoof_blur: float  # recapture defocus, on top of the camera's
    border_prob: float  # share of spoofs whose paper/screen edge is in the frame


# Four hand-designed domains, loosely after the four FAS datasets' capture conditions: a warm,
# clean studio; a cool, blurry, heavily compressed webcam; a dim, noisy fluorescent room; a bright,
# over-exposed scene. Their spoof media differ too (screen vs dot pitch, glare, gamut).
_DESIGNED = (
    DomainStyle(
        name="warm_studio", light_dir=(-0.5, -0.4, 0.77), ambient=0.45, diffuse=0.65, falloff=0.15,
        gains=(1.12, 1.0, 0.82), exposure=1.0, vignette=0.1, blur_sigma=0.3, noise_std=0.01,
        chroma_noise=0.003, jpeg_quality=92, background="wall",
        bg_colors=((0.85, 0.78, 0.65), (0.7, 0.62, 0.5)), skin_tones=(0.0, 0.5),
        print_prob=0.7, halftone_period=3.0, halftone_angle=45.0, halftone_strength=0.5,
        paper_rgb=(1.0, 0.96, 0.88), paper_texture=0.05, print_gamut=0.75,
        moire_period=5.0, moire_angle=10.0, moire_strength=0.08, glare_strength=0.25,
        glare_size=0.3, screen_rgb=(0.92, 0.97, 1.05), screen_gamma=0.9, black_level=0.06,
        spoof_blur=0.6, border_prob=0.3),
    DomainStyle(
        name="cool_webcam", light_dir=(0.6, -0.2, 0.77), ambient=0.35, diffuse=0.7, falloff=0.3,
        gains=(0.85, 0.98, 1.18), exposure=0.95, vignette=0.35, blur_sigma=1.1, noise_std=0.03,
        chroma_noise=0.015, jpeg_quality=35, background="stripes",
        bg_colors=((0.3, 0.35, 0.5), (0.6, 0.55, 0.4)), skin_tones=(0.1, 0.6),
        print_prob=0.3, halftone_period=5.0, halftone_angle=15.0, halftone_strength=0.35,
        paper_rgb=(0.97, 0.97, 1.0), paper_texture=0.08, print_gamut=0.65,
        moire_period=7.0, moire_angle=80.0, moire_strength=0.15, glare_strength=0.5,
        glare_size=0.22, screen_rgb=(0.9, 1.0, 1.1), screen_gamma=1.1, black_level=0.1,
        spoof_blur=0.9, border_prob=0.15),
    DomainStyle(
        name="dim_fluorescent", light_dir=(0.0, -0.7, 0.71), ambient=0.3, diffuse=0.45,
        falloff=0.2, gains=(0.95, 1.08, 0.92), exposure=0.95, vignette=0.25, blur_sigma=0.7,
        noise_std=0.035, chroma_noise=0.02, jpeg_quality=70, background="texture",
        bg_colors=((0.2, 0.25, 0.2), (0.45, 0.4, 0.3)), skin_tones=(0.4, 1.0),
        print_prob=0.5, halftone_period=4.0, halftone_angle=30.0, halftone_strength=0.2,
        paper_rgb=(0.95, 0.93, 0.9), paper_texture=0.15, print_gamut=0.7,
        moire_period=3.5, moire_angle=45.0, moire_strength=0.2, glare_strength=0.3,
        glare_size=0.35, screen_rgb=(1.0, 1.0, 1.0), screen_gamma=1.0, black_level=0.12,
        spoof_blur=1.2, border_prob=0.4),
    DomainStyle(
        name="bright_outdoor", light_dir=(-0.3, -0.3, 0.9), ambient=0.6, diffuse=0.7,
        falloff=0.05, gains=(1.05, 0.95, 1.05), exposure=1.05, vignette=0.05, blur_sigma=0.0,
        noise_std=0.015, chroma_noise=0.005, jpeg_quality=55, background="gradient",
        bg_colors=((0.55, 0.75, 0.95), (0.9, 0.95, 1.0)), skin_tones=(0.2, 0.8),
        print_prob=0.6, halftone_period=3.5, halftone_angle=70.0, halftone_strength=0.4,
        paper_rgb=(1.0, 1.0, 0.95), paper_texture=0.04, print_gamut=0.55,
        moire_period=9.0, moire_angle=135.0, moire_strength=0.1, glare_strength=0.7,
        glare_size=0.4, screen_rgb=(1.05, 0.95, 1.0), screen_gamma=0.85, black_level=0.04,
        spoof_blur=0.4, border_prob=0.2),
)

NUM_DESIGNED = len(_DESIGNED)
_BACKGROUNDS = ("wall", "stripes", "texture", "gradient")


def _drawn_style(seed: int, domain: int) -> DomainStyle:
    """A domain beyond the hand-designed ones: every field drawn from ranges spanning them."""
    rng = np.random.default_rng((seed, domain, 0))
    u = rng.uniform
    azimuth = u(0, 2 * math.pi)
    elevation = u(0.2, 0.8)  # how far the light sits from the camera axis, as sin(angle)
    light = (elevation * math.cos(azimuth), elevation * math.sin(azimuth),
             math.sqrt(1 - elevation ** 2))
    warmth = u(-1, 1)
    gains = (1.0 + 0.15 * warmth + u(-0.05, 0.05), 1.0 + u(-0.06, 0.08),
             1.0 - 0.18 * warmth + u(-0.05, 0.05))
    return DomainStyle(
        name=f"drawn_{domain}", light_dir=light, ambient=u(0.25, 0.6), diffuse=u(0.4, 0.75),
        falloff=u(0.0, 0.3), gains=gains, exposure=u(0.8, 1.15), vignette=u(0.0, 0.4),
        blur_sigma=u(0.0, 1.2), noise_std=u(0.005, 0.05), chroma_noise=u(0.0, 0.02),
        jpeg_quality=int(rng.integers(30, 96)), background=_BACKGROUNDS[rng.integers(4)],
        bg_colors=(tuple(u(0.15, 0.95, 3)), tuple(u(0.15, 0.95, 3))),
        skin_tones=_tone_range(u(0.0, 0.6), u(0.4, 0.7)),
        print_prob=u(0.25, 0.75), halftone_period=u(2.5, 6.0), halftone_angle=u(0, 90),
        halftone_strength=u(0.15, 0.55), paper_rgb=(1.0, u(0.92, 1.0), u(0.85, 1.0)),
        paper_texture=u(0.02, 0.15), print_gamut=u(0.5, 0.8), moire_period=u(3.0, 10.0),
        moire_angle=u(0, 180), moire_strength=u(0.06, 0.2), glare_strength=u(0.2, 0.7),
        glare_size=u(0.2, 0.4), screen_rgb=(u(0.9, 1.05), u(0.95, 1.02), u(0.95, 1.12)),
        screen_gamma=u(0.85, 1.15), black_level=u(0.03, 0.12), spoof_blur=u(0.3, 1.2),
        border_prob=u(0.1, 0.4))


def _tone_range(lo: float, width: float) -> tuple[float, float]:
    return (float(lo), float(min(1.0, lo + width)))


def domain_style(seed: int, domain: int) -> DomainStyle:
    """The look of latent domain `domain`: hand-designed below NUM_DESIGNED, else seed-drawn."""
    if domain < 0:
        raise ValueError(f"domain_style: domain must be ≥ 0, got {domain}")
    return _DESIGNED[domain] if domain < NUM_DESIGNED else _drawn_style(seed, domain)


# ----------------------------------------------------------------------------------------------
# Per-example parameters: identities per subject, pose per frame.


def _example_plan(config: SyntheticConfig, domain: int, style: DomainStyle) -> dict:
    """Who is in each example, how posed, live or which attack, and which video it belongs to.

    Videos alternate live and spoof; spoof video v shows live video v's subject (as in the real
    datasets, where attacks replay the same people), so identity is no cue for liveness.
    """
    rng = np.random.default_rng((config.seed, domain, 1))
    half = config.per_domain // 2
    fpv = config.frames_per_video
    num_subjects = -(-half // fpv)
    frames = np.minimum(fpv, half - fpv * np.arange(num_subjects))  # last video may be short

    lo, hi = style.skin_tones
    subject = {
        "tone": rng.uniform(lo, hi, num_subjects),
        "skin_jitter": rng.normal(0.0, 0.03, (num_subjects, 3)),
        "hair_rgb": _hair_colours(rng, num_subjects),
        "shirt_rgb": rng.uniform(0.1, 0.9, (num_subjects, 3)),
        "face_w": rng.uniform(0.34, 0.44, num_subjects),
        "aspect": rng.uniform(1.18, 1.42, num_subjects),
        "eye_x": rng.uniform(0.32, 0.42, num_subjects),
        "eye_size": rng.uniform(0.8, 1.25, num_subjects),
        "mouth_w": rng.uniform(0.22, 0.36, num_subjects),
        "hairline": rng.uniform(-0.72, -0.45, num_subjects),
        "hair_len": rng.uniform(0.0, 1.0, num_subjects),
        "cx": rng.normal(0.0, 0.05, num_subjects),
        "cy": rng.normal(-0.04, 0.04, num_subjects),
        "scale": rng.uniform(0.85, 1.12, num_subjects),
        "roll": rng.normal(0.0, 0.12, num_subjects),
        "yaw": rng.normal(0.0, 0.2, num_subjects),
    }
    spoof_attack = np.where(rng.uniform(size=num_subjects) < style.print_prob, 0, 1)

    subj_idx, live = [], []
    for s in range(num_subjects):
        for is_live in (True, False):
            subj_idx.extend([s] * int(frames[s]))
            live.extend([is_live] * int(frames[s]))
    subj_idx = np.asarray(subj_idx)
    live = np.asarray(live)
    n = subj_idx.size

    plan = {k: v[subj_idx] for k, v in subject.items()}
    # Frame-to-frame motion within a video: small shifts, roll and yaw, and a blink now and then.
    plan["cx"] = plan["cx"] + rng.normal(0.0, 0.015, n)
    plan["cy"] = plan["cy"] + rng.normal(0.0, 0.015, n)
    plan["roll"] = plan["roll"] + rng.normal(0.0, 0.03, n)
    plan["yaw"] = plan["yaw"] + rng.normal(0.0, 0.05, n)
    plan["eye_open"] = np.where(rng.uniform(size=n) < 0.1, 0.25, 1.0)
    plan["live"] = live
    plan["attack"] = np.where(live, -1, spoof_attack[subj_idx])
    plan["subject"] = subj_idx
    return plan


def _hair_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    palette = np.array([[0.08, 0.06, 0.05], [0.25, 0.16, 0.09], [0.45, 0.3, 0.15],
                        [0.75, 0.6, 0.35], [0.55, 0.55, 0.55], [0.5, 0.2, 0.08]], np.float32)
    return palette[rng.integers(len(palette), size=n)] * rng.uniform(0.85, 1.15, (n, 1))


def _skin_rgb(tone: np.ndarray, jitter: np.ndarray) -> np.ndarray:
    light = np.array([0.96, 0.80, 0.69], np.float32)
    dark = np.array([0.40, 0.26, 0.18], np.float32)
    return np.clip(light + tone[:, None] * (dark - light) + jitter, 0.05, 1.0)


# ----------------------------------------------------------------------------------------------
# Rendering, channel-first so that per-pixel planes broadcast over colour without strided loops:
# scalar planes are float32 [n, 1, R, R], colours [n, 3, 1, 1], images [n, 3, R, R].


def _col(values) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1, 1, 1, 1)


def _rgb(values) -> np.ndarray:
    return np.asarray(values, np.float32).reshape(-1, 3, 1, 1)


def _grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(res, dtype=np.float32) + 0.5) / res * 2.0 - 1.0
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return xx[None, None], yy[None, None]


def _ellipse(fu, fv, cu, cv, ru, rv, a, b, px):
    """Anti-aliased coverage of an ellipse given in face units (fu, fv scaled by a, b)."""
    q = np.sqrt(((fu - cu) / ru) ** 2 + ((fv - cv) / rv) ** 2)
    radius = np.minimum(ru * a, rv * b)
    return np.clip((1.0 - q) * radius / px + 0.5, 0.0, 1.0)


def _over(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """Paints `colour` with coverage `alpha` onto `canvas`, in place."""
    canvas += alpha * (colour - canvas)


def _backgrounds(style: DomainStyle, n: int, res: int, rng: np.random.Generator) -> np.ndarray:
    """[n, 3, R, R] backgrounds of the domain's kind, each with its own jitter."""
    xx, yy = _grid(res)
    c0 = _rgb(style.bg_colors[0]) * _rgb(rng.uniform(0.9, 1.1, (n, 3)))
    c1 = _rgb(style.bg_colors[1]) * _rgb(rng.uniform(0.9, 1.1, (n, 3)))
    if style.background == "wall":
        t = np.clip(0.5 + 0.4 * yy + _col(rng.uniform(-0.2, 0.2, n)), 0, 1)
        return c0 + (c1 - c0) * t + 0.04 * _smooth_noise(rng, n, res, cells=16)
    if style.background == "stripes":
        # Shelves and books: vertical bars whose widths and phase vary per example.
        period = _col(rng.uniform(0.25, 0.5, n))
        phase = _col(rng.uniform(0, 1, n))
        t = 0.5 + 0.5 * np.sign(np.sin(2 * np.pi * (xx / period + phase)))
        return c0 + (c1 - c0) * t
    if style.background == "texture":
        t = np.clip(0.5 + 1.5 * _smooth_noise(rng, n, res, cells=6), 0, 1)
        return c0 + (c1 - c0) * t
    if style.background == "gradient":
        angle = _col(rng.uniform(-0.5, 0.5, n))
        t = np.clip(0.5 + 0.5 * (np.sin(angle) * xx - np.cos(angle) * yy), 0, 1)
        return c0 + (c1 - c0) * t
    raise ValueError(f"DomainStyle.background: unknown kind {style.background!r}, expected one of "
                     f"{_BACKGROUNDS}")


def _smooth_noise(rng: np.random.Generator, n: int, res: int, cells: int) -> np.ndarray:
    """[n, 1, R, R] low-frequency noise (≈ unit std): a cells×cells grid upsampled bicubically."""
    coarse = rng.standard_normal((n, cells, cells), dtype=np.float32)
    return np.stack([cv2.resize(c, (res, res), interpolation=cv2.INTER_CUBIC)
                     for c in coarse])[:, None]


def _render_people(p: dict, res: int, background: np.ndarray, light, ambient, diffuse,
                   falloff) -> tuple[np.ndarray, np.ndarray]:
    """Faces (hair, neck, shirt, eyes, brows, nose, mouth) over `background`, Lambertian-shaded.

    light: [n, 3] unit vectors; ambient, diffuse, falloff: [n]. Returns RGB [n, 3, R, R] in
    about [0, 1] and the live depth map [n, R, R] (ellipsoid cap + nose ridge, max 1).
    """
    xx, yy = _grid(res)
    px = 2.0 / res
    scale = _col(p["scale"])
    a = _col(p["face_w"]) * scale
    b = a * _col(p["aspect"])
    roll = _col(p["roll"])
    cos_r, sin_r = np.cos(roll), np.sin(roll)
    dx, dy = xx - _col(p["cx"]), yy - _col(p["cy"])
    fu = (cos_r * dx + sin_r * dy) / a  # face-frame coordinates, face ellipse = unit circle
    fv = (-sin_r * dx + cos_r * dy) / b
    yaw = _col(p["yaw"])
    shift = 0.35 * yaw  # features slide sideways when the head turns

    r2 = fu ** 2 + fv ** 2
    nz = np.sqrt(np.clip(1.0 - r2, 0.0, None))
    # Normals of the head ellipsoid in image axes (the face frame rotated back by the roll).
    nx = cos_r * fu - sin_r * fv + 0.3 * yaw * nz
    ny = sin_r * fu + cos_r * fv
    norm = np.sqrt(nx ** 2 + ny ** 2 + nz ** 2) + 1e-6
    lx, ly, lz = (_col(light[:, i]) for i in range(3))
    lambert = np.clip((nx * lx + ny * ly + nz * lz) / norm, 0.0, None)
    plane = 1.0 - _col(falloff) * (lx * xx + ly * yy)
    amb, dif = _col(ambient), _col(diffuse)
    face_shade = (amb + dif * lambert) * plane
    flat_shade = (amb + dif * lz) * plane  # background and shirt face the camera
    hair_shade = (amb + 0.6 * dif) * plane

    skin = _rgb(_skin_rgb(np.asarray(p["tone"]), np.asarray(p["skin_jitter"])))
    hair = _rgb(p["hair_rgb"])
    img = background * flat_shade

    # Hair behind the head: a larger ellipse, longer hair reaching further down.
    hair_len = _col(p["hair_len"])
    hair_back = _ellipse(fu, fv, 0.0, -0.12 + 0.25 * hair_len, 1.15, 1.0 + 0.3 * hair_len,
                         a, b, px)
    _over(img, hair * hair_shade, hair_back)

    # Neck and shirt (in image axes, below the face).
    neck = np.clip((0.42 * a - np.abs(dx)) / px + 0.5, 0, 1) * np.clip(dy / px, 0, 1)
    _over(img, skin * (0.8 * flat_shade), neck)
    below = dy - 1.05 * b
    shoulders = (np.clip(below / px + 0.5, 0, 1)
                 * np.clip((1.9 * a + 0.8 * below - np.abs(dx)) / px + 0.5, 0, 1))
    _over(img, _rgb(p["shirt_rgb"]) * flat_shade, shoulders)

    face = np.clip((1.0 - np.sqrt(r2)) * np.minimum(a, b) / px + 0.5, 0.0, 1.0)
    # Everything below lies inside some face: work on the block's common face window only.
    rows = np.flatnonzero(face.any(axis=(0, 1, 3)))
    cols = np.flatnonzero(face.any(axis=(0, 1, 2)))
    depth = np.zeros((len(img), res, res), np.float32)
    if rows.size == 0:  # every face is out of frame
        return img, depth
    win = (slice(None), slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    fu, fv, nz, face = fu[win], fv[win], nz[win], face[win]
    face_img = img[win]  # a view: painting it paints img
    _face_features(face_img, fu, fv, face, a, b, px, shift, p, skin, hair, face_shade[win])
    fringe = face * np.clip((_col(p["hairline"]) - fv) * b / px + 0.5, 0, 1)
    _over(face_img, hair * hair_shade[win], fringe)

    nose_ridge = 0.25 * np.exp(-(((fu - 1.2 * shift) / 0.12) ** 2 + ((fv - 0.05) / 0.3) ** 2))
    depth[win[0], win[2], win[3]] = ((nz + nose_ridge) * face)[:, 0]
    depth /= np.maximum(depth.max(axis=(1, 2), keepdims=True), 1e-6)
    return img, depth.astype(np.float32)


def _face_features(img, fu, fv, face, a, b, px, shift, p, skin, hair, shade) -> None:
    """Paints eyes, brows, nose, nostrils and lips onto the face region `img`, in place.

    The features' coverages (scalar planes) mix their colours in one batched matmul instead of
    one full-colour composite per feature; only the iris overlaps another feature (its sclera),
    so coverages are made disjoint by hand.
    """
    eye_x, eye_size = _col(p["eye_x"]), _col(p["eye_size"])
    eye_h = eye_size * _col(p["eye_open"])
    sclera = iris = brow = nostril = 0.0
    for side in (-1.0, 1.0):
        cu = side * eye_x + shift
        sclera = sclera + _ellipse(fu, fv, cu, -0.12, 0.15 * eye_size, 0.075 * eye_h, a, b, px)
        iris = iris + _ellipse(fu, fv, cu + 0.2 * shift, -0.12, 0.07 * eye_size, 0.07 * eye_h,
                               a, b, px)
        brow = brow + _ellipse(fu, fv, cu, -0.33, 0.19, 0.045, a, b, px)
        nostril = nostril + _ellipse(fu, fv, 1.3 * shift + side * 0.07, 0.27, 0.045, 0.03,
                                     a, b, px)
    iris = np.minimum(iris, sclera)
    sclera = sclera - iris
    nose = _ellipse(fu, fv, 1.2 * shift + 0.05, 0.08, 0.05, 0.2, a, b, px) * (1.0 - nostril)
    lips = _ellipse(fu, fv, shift, 0.52, _col(p["mouth_w"]), 0.075, a, b, px)
    bare = np.clip(1.0 - sclera - iris - brow - nose - nostril - lips, 0.0, 1.0)
    weights = np.concatenate([bare, sclera, iris, brow, nose, nostril, lips], axis=1)
    colours = np.concatenate([
        skin, np.broadcast_to(_rgb([0.92, 0.9, 0.88]), skin.shape),
        np.broadcast_to(_rgb([0.12, 0.08, 0.06]), skin.shape), hair, 0.78 * skin, 0.45 * skin,
        skin * _rgb([0.85, 0.5, 0.5])], axis=2)[..., 0]  # [n, 3, 7]
    n, _, h, w = img.shape
    albedo = np.matmul(colours, weights.reshape(n, 7, h * w)).reshape(img.shape)
    _over(img, albedo * shade, face)


def _blur(images: np.ndarray, sigma: float | np.ndarray) -> np.ndarray:
    """Gaussian blur per image plane ([n, C, R, R]); sigma in pixels, scalar or per image."""
    sigmas = np.broadcast_to(np.asarray(sigma, np.float32), (len(images),))
    out = images.copy()
    for i, s in enumerate(sigmas):
        if s > 0.05:  # below this the kernel is the identity at pixel precision
            for c in range(images.shape[1]):
                out[i, c] = cv2.GaussianBlur(images[i, c], (0, 0), float(s))
    return out


def _pixel_coords(res: int, angle_deg: np.ndarray):
    """Pixel coordinates rotated by per-image angles: (along, across), each [n, 1, R, R]."""
    xx, yy = _grid(res)
    pix_x, pix_y = (xx + 1) * res / 2, (yy + 1) * res / 2
    theta = np.deg2rad(angle_deg)
    cos_t, sin_t = _col(np.cos(theta)), _col(np.sin(theta))
    return cos_t * pix_x + sin_t * pix_y, -sin_t * pix_x + cos_t * pix_y


def _print_medium(content, style, res, rng):
    """A printed photo: shrunk gamut, paper tint, halftone dots and paper fibres."""
    n = len(content)
    mean = content.mean(axis=(2, 3), keepdims=True)
    grey = content.mean(axis=1, keepdims=True)
    c = grey + style.print_gamut * (content - grey)  # inks lose saturation ...
    c = mean + (0.5 + 0.5 * style.print_gamut) * (c - mean)  # ... and contrast
    c = 0.04 + 0.88 * np.clip(c, 0, 1) * _rgb(style.paper_rgb)
    period = style.halftone_period * res / _REF_RES / np.sqrt(2.0)
    u, v = _pixel_coords(res, style.halftone_angle + rng.uniform(-5, 5, n))
    screen = 0.5 + 0.25 * (np.cos(2 * np.pi * u / period) + np.cos(2 * np.pi * v / period))
    dots = 1.0 / (1.0 + np.exp(-(c - screen) / 0.06))  # ink dot where c < screen
    c = (1 - style.halftone_strength) * c + style.halftone_strength * (0.04 + 0.88 * dots)
    fibres = 1.0 + style.paper_texture * _smooth_noise(rng, n, res, cells=max(8, res // 3))
    return c * fibres


def _replay_medium(content, style, res, rng):
    """A screen replay: colour cast and gamma, lifted blacks, moiré bands and a glare spot."""
    n = len(content)
    xx, yy = _grid(res)
    c = np.clip(content, 0, 1) ** style.screen_gamma * _rgb(style.screen_rgb)
    c = style.black_level + (1 - style.black_level) * c
    period = style.moire_period * res / _REF_RES
    u, _ = _pixel_coords(res, style.moire_angle + rng.uniform(-8, 8, n))
    phase = _col(rng.uniform(0, 2 * np.pi, n))
    bands = np.sin(2 * np.pi * u / period + phase) + 0.5 * np.sin(2 * np.pi * u / (1.7 * period))
    c = c * (1.0 + style.moire_strength * bands)
    # The glare mirrors the room light on the glass: opposite the light's side, jittered.
    light = style.light_dir
    gx = _col(-0.6 * light[0] + rng.normal(0, 0.15, n))
    gy = _col(-0.6 * light[1] + rng.normal(0, 0.15, n))
    spot = np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2) / (2 * style.glare_size ** 2))
    strength = _col(style.glare_strength * rng.uniform(0.6, 1.2, n))
    return c + strength * spot * (1.0 - c)


def _camera(scene: np.ndarray, style: DomainStyle, res: int, rng: np.random.Generator):
    """The domain's camera: white balance, exposure, vignetting, blur, noise, JPEG → uint8 NHWC."""
    xx, yy = _grid(res)
    n = len(scene)
    vignette = 1.0 - style.vignette * (xx ** 2 + yy ** 2) / 2.0
    img = scene * (_rgb(style.gains) * (style.exposure * vignette))
    img = _blur(img.astype(np.float32), style.blur_sigma * res / _REF_RES)
    img += rng.standard_normal((n, 1, res, res), dtype=np.float32) * style.noise_std
    img += rng.standard_normal((n, 3, res, res), dtype=np.float32) * style.chroma_noise
    img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(style.jpeg_quality)]
    for i in range(n):
        ok, buf = cv2.imencode(".jpg", img[i, ..., ::-1], params)  # OpenCV encodes BGR
        if not ok:
            raise RuntimeError("synthetic: OpenCV failed to JPEG-encode a rendered frame")
        img[i] = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return img


def _render_block(plan: dict, style: DomainStyle, res: int, rng: np.random.Generator):
    """uint8 images [n, R, R, 3] and depth [n, R, R] for one block of planned examples."""
    n = len(plan["live"])
    live = plan["live"]
    # A spoof shows a recording made under its own (unknown, roughly frontal) light; the medium is
    # then a flat sheet lit by the room, so its shading does not follow the room light.
    src = rng.normal(0, 0.35, (n, 2)).astype(np.float32)
    src_light = np.concatenate([src, np.ones((n, 1), np.float32)], axis=1)
    src_light /= np.linalg.norm(src_light, axis=1, keepdims=True)
    light = np.where(live[:, None], np.asarray(style.light_dir, np.float32), src_light)
    ambient = np.where(live, style.ambient, rng.uniform(0.4, 0.6, n)).astype(np.float32)
    diffuse = np.where(live, style.diffuse, rng.uniform(0.4, 0.6, n)).astype(np.float32)
    falloff = np.where(live, style.falloff, 0.0).astype(np.float32)

    background = _backgrounds(style, n, res, rng)
    scene, depth = _render_people(plan, res, background, light, ambient, diffuse, falloff)
    depth[~live] = 0.0

    spoof = np.flatnonzero(~live)
    if spoof.size:
        scene[spoof] = _spoof_scene(scene[spoof], plan["attack"][spoof], style, res, rng)
    return _camera(scene, style, res, rng), depth


def _spoof_scene(content, attack, style, res, rng):
    """Re-capture the rendered content through its medium, lit flat by the room's light."""
    n = len(content)
    xx, yy = _grid(res)
    content = _blur(content, style.spoof_blur * res / _REF_RES * rng.uniform(0.7, 1.3, n))
    out = np.empty_like(content)
    printed = attack == 0
    if printed.any():
        out[printed] = _print_medium(content[printed], style, res, rng)
    if (~printed).any():
        out[~printed] = _replay_medium(content[~printed], style, res, rng)
    lx, ly, lz = style.light_dir
    room = (style.ambient + style.diffuse * lz) * (1.0 - style.falloff * (lx * xx + ly * yy))
    # Paper reflects the room light; a screen emits its own and is lit far less by the room.
    out *= np.where(_col(printed), room, 0.55 + 0.45 * room)

    # Some spoofs show the paper's or screen's edge: the room behind it, then a margin or bezel.
    framed = np.flatnonzero(rng.uniform(size=n) < style.border_prob)
    if framed.size:
        m = framed.size
        room_bg = _backgrounds(style, m, res, rng) * room
        margins = rng.uniform(0.05, 0.3, (m, 4)) * (rng.uniform(size=(m, 4)) < 0.6)
        x0, x1 = _col(-1 + margins[:, 0]), _col(1 - margins[:, 1])
        y0, y1 = _col(-1 + margins[:, 2]), _col(1 - margins[:, 3])
        edge = 0.05
        inner = (xx > x0) & (xx < x1) & (yy > y0) & (yy < y1)
        outer = (xx > x0 - edge) & (xx < x1 + edge) & (yy > y0 - edge) & (yy < y1 + edge)
        rim = np.where(_col(printed[framed]), 0.9 * _rgb(style.paper_rgb), 0.05) * room
        out[framed] = np.where(inner, out[framed], np.where(outer, rim, room_bg))
    return out


# ----------------------------------------------------------------------------------------------
# Public interface.


def generate_domain(config: SyntheticConfig, domain: int) -> dict[str, np.ndarray]:
    """All examples of latent domain `domain` (its videos alternate live and spoof).

    Depends only on (config.seed, domain, resolution, per_domain, frames_per_video), never on
    num_domains, so a builder can stream one domain at a time.
    """
    _check_config(config)
    if not 0 <= domain < config.num_domains:
        raise ValueError(f"generate_domain: domain must be in [0, {config.num_domains}) "
                         f"(SyntheticConfig.num_domains), got {domain}")
    style = domain_style(config.seed, domain)
    plan = _example_plan(config, domain, style)
    n, res = len(plan["live"]), config.resolution
    images = np.empty((n, res, res, 3), np.uint8)
    depth = np.empty((n, res, res), np.float32)
    for block, start in enumerate(range(0, n, _BLOCK)):
        sl = slice(start, min(n, start + _BLOCK))
        rng = np.random.default_rng((config.seed, domain, 2, block))
        images[sl], depth[sl] = _render_block({k: v[sl] for k, v in plan.items()}, style, res,
                                              rng)
    attack_names = np.array(("live",) + ATTACKS)
    attack = attack_names[plan["attack"] + 1]
    video = np.array([f"d{domain}/s{s:05d}/{a}" for s, a in zip(plan["subject"], attack)])
    return {
        "image": images,
        "label": plan["live"].astype(np.int32),
        "domain": np.full(n, domain, np.int32),
        "depth": depth,
        "video": video,
        "attack": attack,
    }


def generate(config: SyntheticConfig) -> dict[str, np.ndarray]:
    """The whole mixture: domains 0..num_domains-1 concatenated, per_domain examples each.

    'image' uint8 [N, R, R, 3]; 'label' int32 [N] (1 = live, 0 = spoof); 'domain' int32 [N];
    'depth' float32 [N, R, R] (face-shaped for live, zeros for spoof); 'video', 'attack' str [N].
    """
    _check_config(config)
    parts = [generate_domain(config, d) for d in range(config.num_domains)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
