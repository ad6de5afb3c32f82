"""Bad data a demanding user brings (issue 16): edited manifests, duplicate or contradictory rows,
16-bit depth maps, decompression bombs, Excel's BOM; and no empty folder left by a build."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from d2am_jax import predict
from d2am_jax.data import build, loader
from d2am_jax.data.faces import BadItem
from d2am_jax.errors import UserError

tfds.disable_progress_bar()

PNG = {"resolution": "16", "image_format": "png"}


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)


def write_manifest(folder, rows, header="path,label,video,domain,depth", encoding="utf-8"):
    path = os.path.join(folder, "manifest.csv")
    with open(path, "w", encoding=encoding) as f:
        f.write(header + "\n" + "".join(r + "\n" for r in rows))
    return path


def bomb_png(path, side=30000):
    """A tiny PNG whose header declares side × side pixels (PIL refuses to open it)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


@pytest.fixture
def frames(tmp_path):
    folder = tmp_path / "frames"
    for i in range(3):
        save(str(folder / "img" / f"{i}.png"), np.full((8, 8, 3), 60 * i, np.uint8))
    return folder


def test_manifest_edited_in_place_is_rebuilt_by_build_and_refused_by_load(frames, tmp_path):
    out = str(tmp_path / "out")
    manifest = write_manifest(str(frames), ["img/0.png,live,,,", "img/1.png,spoof,,,"])
    assert build.build("fas_manifest", out, str(frames), PNG)["examples"] == {"frames": 2}
    write_manifest(str(frames), ["img/0.png,live,,,", "img/1.png,spoof,,,", "img/2.png,live,,,"])
    # training reads the build: it must not train on the old rows
    with pytest.raises(UserError, match=rf"{manifest} has changed since .*--overwrite"):
        loader.load("fas_manifest", "frames", out, PNG)
    # the build command rebuilds from the edited manifest
    assert build.build("fas_manifest", out, str(frames), PNG)["examples"] == {"frames": 3}
    assert len(loader.load("fas_manifest", "frames", out, PNG)) == 3


def test_duplicate_rows_fail_naming_both_lines_or_are_skipped(frames, tmp_path):
    manifest = write_manifest(str(frames), ["img/0.png,live,,,", "img/1.png,spoof,,,",
                                            "img/./0.png,live,,,"])
    with pytest.raises(BadItem, match=r"manifest.csv:4: .*0.png is listed again \(first at "
                                      r"line 2\)"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    summary = build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG, skip_bad=True)
    assert summary["examples"] == {"frames": 2} and summary["num_skipped"] == 1
    assert [s["item"] for s in build.builders.read_report(summary["path"])["skipped"]] == [
        f"{manifest}:4"]


def test_video_with_live_and_spoof_rows_fails_naming_the_lines(frames, tmp_path):
    write_manifest(str(frames), ["img/0.png,live,v0,,", "img/1.png,spoof,v1,,",
                                 "img/2.png,spoof,v0,,"])
    with pytest.raises(BadItem, match=r"manifest.csv:4: video 'v0' has spoof rows \(line 4\) "
                                      r"and live rows \(line 2\)"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG, skip_bad=True)


def png16(array):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_depth_map_is_scaled_not_saturated(frames, tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    (frames / "depth").mkdir()
    (frames / "depth" / "0.png").write_bytes(png16(ramp))
    write_manifest(str(frames), ["img/0.png,live,,,depth/0.png", "img/1.png,spoof,,,"])
    build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    data = loader.load("fas_manifest", "frames", str(tmp_path / "out"), PNG)
    depth = data.depth[np.flatnonzero(data.labels == 1)][0]
    np.testing.assert_allclose(depth, np.tile(np.linspace(0, 1, 16), (16, 1)), atol=1 / 255)


def test_stored_16_bit_depth_bytes_decode_like_their_8_bit_version():
    ramp = np.tile(np.linspace(0, 65535, 8).round(), (8, 1))
    eight = io.BytesIO()
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(eight, format="PNG")
    blobs = {"image": np.array([b"", b""], object),
             "depth": np.array([png16(ramp), eight.getvalue()], object)}
    records = loader.Records([], np.zeros(2), np.arange(2), blobs)
    for size in (8, 4):
        deep, flat = loader.DepthStore(records, np.array([1, 1]), np.array([True, True]), size)[
            [0, 1]]
        assert deep.shape == (size, size) and 0.0 <= deep.min() and deep.max() <= 1.0
        np.testing.assert_allclose(deep, flat, atol=1 / 255)
    full = loader.DepthStore(records, np.array([1, 1]), np.array([True, True]), 8)[0][0]
    np.testing.assert_allclose(full, ramp / 65535.0, atol=1e-6)


def test_decompression_bomb_is_a_bad_item(frames, tmp_path):
    bomb_png(str(frames / "img" / "bomb.png"))
    bomb_png(str(frames / "depth_bomb.png"))
    manifest = write_manifest(str(frames), ["img/0.png,live,,,", "img/bomb.png,live,,,",
                                            "img/1.png,spoof,,,",
                                            "img/2.png,live,,,depth_bomb.png"])
    with pytest.raises(BadItem, match=r"manifest.csv:3: .*bomb.png cannot be decoded.*pixels"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    summary = build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG, skip_bad=True)
    assert summary["examples"] == {"frames": 2} and summary["num_skipped"] == 2
    assert sorted(s["item"] for s in build.builders.read_report(summary["path"])["skipped"]) == [
        f"{manifest}:3", f"{manifest}:5"]
    # predict reads frames with the builder's reader: the same bad item, skippable
    with pytest.raises(BadItem, match=r"manifest.csv:3: .*bomb.png cannot be decoded"):
        predict.frames_from_manifest(manifest, 8, "none", False)
    assert len(predict.frames_from_manifest(manifest, 8, "none", True).skipped) == 1


def test_excel_utf8_bom_is_accepted_by_build_and_predict(frames, tmp_path):
    manifest = write_manifest(str(frames), ["img/0.png,live,v0,,", "img/1.png,spoof,v1,,"],
                              encoding="utf-8-sig")
    assert open(manifest, "rb").read(3) == b"\xef\xbb\xbf"
    summary = build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)
    assert summary["examples"] == {"frames": 2}
    got = predict.frames_from_manifest(manifest, 8, "none", False)
    assert got.videos == ["v0", "v1"] and got.labels.tolist() == [1, 0]


def test_manifest_not_utf8_names_the_file(frames, tmp_path):
    write_manifest(str(frames), ["img/0.png,live,caf\xe9,,"], encoding="latin-1")
    with pytest.raises(BadItem, match=r"manifest.csv: .*UTF-8"):
        build.build("fas_manifest", str(tmp_path / "out"), str(frames), PNG)


def test_build_leaves_no_empty_folder(frames, tmp_path):
    write_manifest(str(frames), ["img/0.png,live,,,", "img/1.png,spoof,,,"])
    out = tmp_path / "out"
    build.build("fas_manifest", str(out), str(frames), PNG)
    empty = [root for root, dirs, files in os.walk(out) if not dirs and not files]
    assert empty == []


def test_failed_build_leaves_no_folder_behind(frames, tmp_path):
    write_manifest(str(frames), ["img/0.png,live,,,", "img/9.png,spoof,,,"])
    out = tmp_path / "new" / "out"
    with pytest.raises(BadItem, match="9.png does not exist"):
        build.build("fas_manifest", str(out), str(frames), PNG)
    assert not (tmp_path / "new").exists()
    (out / "mine").mkdir(parents=True)  # folders that were there before are kept
    with pytest.raises(BadItem, match="9.png does not exist"):
        build.build("fas_manifest", str(out), str(frames), PNG)
    assert os.listdir(out) == ["mine"]


def test_absolute_and_parent_paths_resolve_as_documented(frames, tmp_path):
    sub = frames / "lists"
    sub.mkdir()
    write_manifest(str(sub), ["../img/0.png,live,,,", f"{frames / 'img' / '1.png'},spoof,,,"])
    summary = build.build("fas_manifest", str(tmp_path / "out"), str(sub), PNG)
    assert summary["examples"] == {"frames": 2}
