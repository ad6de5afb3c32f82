"""Protocols as data: the paper's leave-out protocols, domain-list protocols for manifests and the
synthetic set, and the checks that stop a run before training (missing domain, one-class set)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from test_builders import fake_casia, fake_msu, fake_replay  # fake releases (same folder)

from d2am_jax.data import build, protocols
from d2am_jax.data.protocols import Part

tfds.disable_progress_bar()

FAST = {"frames_per_video": "1", "resolution": "16", "face_crop": "none"}


@pytest.mark.parametrize("name, sources, target", [
    ("O&C&I→M", ["oulu_npu", "casia_fasd", "replay_attack"], "msu_mfsd"),
    ("OCM_I", ["oulu_npu", "casia_fasd", "msu_mfsd"], "replay_attack"),
    ("O_M_I_to_C", ["oulu_npu", "msu_mfsd", "replay_attack"], "casia_fasd"),
    ("ICM->O", ["replay_attack", "casia_fasd", "msu_mfsd"], "oulu_npu"),
    ("M&I→C", ["msu_mfsd", "replay_attack"], "casia_fasd"),
    ("MI_O", ["msu_mfsd", "replay_attack"], "oulu_npu"),
])
def test_paper_protocols_parse(name, sources, target):
    p = protocols.get(name)
    assert [part.dataset for part in p.source] == sources
    assert p.target == (Part(target, ("train", "test")),)
    assert all(part.splits == ("train", "test") for part in p.source)
    strict = protocols.get(name, splits="strict")
    assert all(part.splits == ("train",) for part in strict.source)
    assert strict.target[0].splits == ("test",)


def test_all_paper_protocols_are_listed():
    names = {protocols.get(n).name for n in protocols.PAPER_PROTOCOLS}
    assert names == {"O&C&I→M", "O&C&M→I", "O&M&I→C", "I&C&M→O", "M&I→C", "M&I→O"}


@pytest.mark.parametrize("name", ["OCI", "OCX_M", "OCM_M", "_M", "OCI_M_I"])
def test_bad_protocol_names(name):
    with pytest.raises(ValueError, match="protocol"):
        protocols.get(name)


def test_bad_split_convention():
    with pytest.raises(ValueError, match="splits must be one of"):
        protocols.get("OCI_M", splits="all")


def test_domain_protocol_checks_its_lists():
    with pytest.raises(ValueError, match=r"domains \['a'\] are in both"):
        protocols.domain_protocol("fas_manifest", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="at least one domain"):
        protocols.domain_protocol("fas_manifest", [], ["a"])
    p = protocols.synthetic([0, 1, 2], [3])
    assert p.source[0].splits == ("domain0", "domain1", "domain2")
    assert p.target[0].splits == ("domain3",)
    with pytest.raises(ValueError, match="disjoint"):
        protocols.synthetic([0, 1], [1])


@pytest.fixture(scope="module")
def built_mic(tmp_path_factory):
    """Tiny MSU, Replay-Attack and CASIA builds (whole frames, 16 px) for M&I→C."""
    tmp = tmp_path_factory.mktemp("mic")
    out = str(tmp / "out")
    for name, fake in (("msu_mfsd", fake_msu), ("replay_attack", fake_replay),
                       ("casia_fasd", fake_casia)):
        build.build(name, out, fake(str(tmp / name)), FAST)
    return out


def test_cross_dataset_source_is_one_pool_of_train_and_test(built_mic):
    configs = {n: FAST for n in ("msu_mfsd", "replay_attack", "casia_fasd")}
    source, target = protocols.load(protocols.get("M&I→C"), built_mic, configs, depth_size=4)
    assert set(source.origin) == {"msu_mfsd/train", "msu_mfsd/test", "replay_attack/train",
                                  "replay_attack/test"}
    # MSU: 2 subjects × 2 videos; Replay: 2 splits × 3 videos (devel left out); 1 frame each
    assert len(source) == 4 + 6
    assert sorted(set(source.domain)) == ["msu_mfsd", "replay_attack"]
    assert set(target.origin) == {"casia_fasd/train", "casia_fasd/test"} and len(target) == 8
    assert source.frames[np.arange(len(source))].shape == (10, 16, 16, 3)
    assert source.depth[np.arange(len(source))].shape == (10, 4, 4)
    assert len(set(source.video)) == len(source)  # video ids stay unique across datasets

    source, target = protocols.load(protocols.get("M&I→C", splits="strict"), built_mic, configs)
    assert set(source.origin) == {"msu_mfsd/train", "replay_attack/train"}
    assert set(target.origin) == {"casia_fasd/test"}


def test_cross_dataset_needs_every_dataset_built(built_mic):
    configs = {n: FAST for n in ("msu_mfsd", "replay_attack", "casia_fasd", "oulu_npu")}
    with pytest.raises(FileNotFoundError, match="oulu_npu .* is not built"):
        protocols.load(protocols.get("MI_O"), built_mic, configs)


@pytest.fixture(scope="module")
def built_manifest(tmp_path_factory):
    """Domains A and B with both classes, C live only, D spoof only."""
    folder = tmp_path_factory.mktemp("manifest")
    rows = []
    for i, (domain, label) in enumerate([("A", "live"), ("A", "spoof"), ("B", "live"),
                                         ("B", "spoof"), ("B", "spoof"), ("C", "live"),
                                         ("D", "spoof")]):
        os.makedirs(folder / "img", exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label},v{i},{domain}")
    (folder / "manifest.csv").write_text("path,label,video,domain\n" + "\n".join(rows) + "\n")
    out = str(folder / "out")
    build.build("fas_manifest", out, str(folder), {"resolution": "8"})
    return out


def test_manifest_domains_choose_source_and_target(built_manifest):
    configs = {"fas_manifest": {"resolution": "8"}}
    p = protocols.domain_protocol("fas_manifest", ["A", "C"], ["B"])
    source, target = protocols.load(p, built_manifest, configs)
    assert sorted(source.domain) == ["A", "A", "C"] and sorted(target.domain) == ["B"] * 3
    assert source.class_counts() == {"live": 2, "spoof": 1}
    assert target.class_counts() == {"live": 1, "spoof": 2}


@pytest.mark.parametrize("source, target, message", [
    (["C"], ["A"], r"source: no spoof examples"),
    (["A"], ["D"], r"target: no live examples"),
    (["A", "Z"], ["B"], r"domain\(s\) \['Z'\] not in fas_manifest \['frames'\]; "
                        r"it has \['A', 'B', 'C', 'D'\]"),
])
def test_unusable_sets_fail_before_training(built_manifest, source, target, message):
    p = protocols.domain_protocol("fas_manifest", source, target)
    with pytest.raises(ValueError, match=message):
        protocols.load(p, built_manifest, {"fas_manifest": {"resolution": "8"}})
