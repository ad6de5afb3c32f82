"""fas_synthetic: the built-in mixture-domain FAS set from d2am_jax.data.synthetic, one split per
latent domain ('domain0', 'domain1', ...), PNG-encoded, with the live depth maps stored.

Deterministic from the config's seed; the generator is imported only when a build runs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from d2am_jax.data import faces
from d2am_jax.data.builders.common import LIVE, FasBuilder, FasConfig


@dataclasses.dataclass(eq=False)
class FasSyntheticConfig(FasConfig):
    """The generator's SyntheticConfig fields (see d2am_jax.data.synthetic)."""

    resolution: int = 64
    num_domains: int = 4
    per_domain: int = 400
    frames_per_video: int = 4
    seed: int = 0

    def validate(self) -> None:
        self.check_positive("resolution", "num_domains", "per_domain", "frames_per_video")


def domain_split(d: int) -> str:
    return f"domain{d}"


class FasSynthetic(FasBuilder):
    """Procedural face-like live/spoof images under several latent domains."""

    DESCRIPTION = "Synthetic mixture-domain face anti-spoofing images with known latent domains."
    BUILDER_CONFIGS = [FasSyntheticConfig(name="default")]

    def _split_generators(self, dl_manager):
        from d2am_jax.data import synthetic  # lazy: the builders import without the generator

        cfg = self.builder_config
        gen_config = synthetic.SyntheticConfig(
            resolution=cfg.resolution, num_domains=cfg.num_domains, per_domain=cfg.per_domain,
            frames_per_video=cfg.frames_per_video, seed=cfg.seed)
        return {domain_split(d): self._counted(domain_split(d),
                                               self._domain(synthetic, gen_config, d))
                for d in range(cfg.num_domains)}

    def _domain(self, synthetic, gen_config, d: int):
        data = synthetic.generate_domain(gen_config, d)
        n = len(data["label"])
        for name in ("image", "label", "depth", "video", "attack"):
            if len(data[name]) != n:
                raise ValueError(f"synthetic.generate_domain: field {name!r} has "
                                 f"{len(data[name])} entries, 'label' has {n}")
        position: dict[str, int] = {}
        for i in range(n):
            video = str(data["video"][i])
            frame = position.get(video, 0)
            position[video] = frame + 1
            live = int(data["label"][i]) == LIVE
            yield f"{d}/{i}", {
                "image": faces.encode_image(np.asarray(data["image"][i], np.uint8), "png"),
                "label": int(data["label"][i]),
                "depth": faces.encode_depth(data["depth"][i]) if live else b"",
                "video": video, "domain": domain_split(int(data["domain"][i])),
                "frame": frame, "attack": "" if live else str(data["attack"][i])}
