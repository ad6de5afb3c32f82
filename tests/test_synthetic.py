"""The synthetic mixture-domain generator: determinism, per-domain independence, layout, errors."""

import dataclasses
import itertools

import numpy as np
import pytest

from d2am_jax.data.synthetic import (
    NUM_DESIGNED,
    SyntheticConfig,
    domain_style,
    generate,
    generate_domain,
)

SMALL = SyntheticConfig(resolution=32, num_domains=NUM_DESIGNED, per_domain=24,
                        frames_per_video=4, seed=3)


@pytest.fixture(scope="module")
def small():
    return generate(SMALL)


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_same_seed_same_data_and_other_seed_other_images(small):
    assert_same(small, generate(SMALL))
    other = generate(dataclasses.replace(SMALL, seed=4))
    assert not np.array_equal(small["image"], other["image"])


def test_domain_does_not_depend_on_num_domains():
    few = dataclasses.replace(SMALL, num_domains=2, per_domain=8)
    many = dataclasses.replace(few, num_domains=NUM_DESIGNED + 2)
    both = generate(many)
    for d in (1, NUM_DESIGNED + 1):  # a hand-designed domain and a drawn one
        alone = generate_domain(dataclasses.replace(many, num_domains=d + 1), d)
        part = {k: v[both["domain"] == d] for k, v in both.items()}
        assert_same(alone, part)
    assert_same(generate_domain(few, 1), {k: v[both["domain"] == 1] for k, v in both.items()})


def test_layout_dtypes_and_ranges(small):
    n, r = SMALL.num_domains * SMALL.per_domain, SMALL.resolution
    assert small["image"].shape == (n, r, r, 3) and small["image"].dtype == np.uint8
    assert small["label"].shape == (n,) and small["label"].dtype == np.int32
    assert small["domain"].dtype == np.int32 and small["depth"].dtype == np.float32
    assert small["depth"].shape == (n, r, r)
    assert small["video"].shape == small["attack"].shape == (n,)
    assert small["video"].dtype.kind == small["attack"].dtype.kind == "U"
    np.testing.assert_array_equal(np.bincount(small["domain"]), [SMALL.per_domain] * 4)
    for d in range(SMALL.num_domains):
        assert small["label"][small["domain"] == d].sum() == SMALL.per_domain // 2
    assert set(np.unique(small["label"])) == {0, 1}
    assert set(np.unique(small["attack"])) <= {"live", "print", "replay"}
    np.testing.assert_array_equal(small["attack"] == "live", small["label"] == 1)
    # Both attack kinds occur in the mixture (each domain mixes them with its own proportion).
    assert {"print", "replay"} <= set(small["attack"])


def test_live_depth_is_a_face_and_spoof_depth_is_zero(small):
    live = small["label"] == 1
    depth = small["depth"]
    assert np.all(depth[~live] == 0.0)
    assert np.all((depth >= 0.0) & (depth <= 1.0))
    np.testing.assert_allclose(depth[live].max(axis=(1, 2)), 1.0)
    # The face covers a sizeable, not total, part of the frame, and peaks near its centre.
    covered = (depth[live] > 0).mean(axis=(1, 2))
    assert np.all((covered > 0.05) & (covered < 0.6))
    peak_rows = depth[live].max(axis=2).argmax(axis=1) / SMALL.resolution
    assert np.all((peak_rows > 0.2) & (peak_rows < 0.8))


def test_videos_are_runs_of_frames_of_one_subject_and_class():
    cfg = SyntheticConfig(resolution=16, num_domains=1, per_domain=10, frames_per_video=4)
    data = generate(cfg)
    runs = [(v, sum(1 for _ in g)) for v, g in itertools.groupby(data["video"])]
    # 5 live and 5 spoof frames per domain: videos of 4 + 1 frames, alternating live and spoof.
    assert [count for _, count in runs] == [4, 4, 1, 1]
    assert len({v for v, _ in runs}) == len(runs)  # a video id is never reused
    for video, _ in runs:
        labels = data["label"][data["video"] == video]
        assert len(set(labels)) == 1
    # A spoof video replays the subject of the live video before it.
    assert runs[0][0].rsplit("/", 1)[0] == runs[1][0].rsplit("/", 1)[0]


def test_domains_look_different(small):
    # Per-domain colour statistics (mean and spread of each channel) differ clearly pairwise.
    stats = []
    for d in range(SMALL.num_domains):
        img = small["image"][small["domain"] == d].reshape(-1, 3).astype(np.float64)
        stats.append(np.concatenate([img.mean(axis=0), img.std(axis=0)]))
    for i in range(len(stats)):
        for j in range(i + 1, len(stats)):
            assert np.abs(stats[i] - stats[j]).max() > 8.0, (i, j, stats[i], stats[j])


def test_drawn_domain_styles_come_from_the_seed():
    assert domain_style(0, NUM_DESIGNED) == domain_style(0, NUM_DESIGNED)
    assert domain_style(0, NUM_DESIGNED) != domain_style(1, NUM_DESIGNED)
    assert domain_style(0, NUM_DESIGNED) != domain_style(0, NUM_DESIGNED + 1)
    # The hand-designed ones are fixed; only the examples drawn in them depend on the seed.
    assert domain_style(0, 0) == domain_style(7, 0)


@pytest.mark.parametrize("field, value", [
    ("resolution", 15), ("per_domain", 3), ("per_domain", 0), ("num_domains", 0),
    ("frames_per_video", 0), ("seed", -1), ("resolution", 32.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"SyntheticConfig.{field}"):
        SyntheticConfig(**{field: value})


def test_domain_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="num_domains"):
        generate_domain(SyntheticConfig(num_domains=2, per_domain=2, resolution=16), 2)
