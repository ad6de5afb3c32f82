"""Stored frames and depth maps decode to PIL's pixels exactly (OpenCV reads the builders' 8-bit
PNG, PIL the rest), and a frame or map that does not decode is an error naming its record, or,
under data.skip_bad, is replaced the same way every time and reported."""

import io
import logging
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from d2am_jax import config_check
from d2am_jax.configs import default
from d2am_jax.data import faces, loader
from d2am_jax.data.pipeline import Prefetcher
from d2am_jax.data.sampler import CachedFrames, MetaBatchSampler
from d2am_jax.errors import UserError


def _pil(blob):
    with Image.open(io.BytesIO(blob)) as img:
        img.load()
        return np.asarray(img)


def _png(array, **save):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _with_chunk(blob: bytes, kind: bytes, data: bytes) -> bytes:
    """`blob` with an ancillary chunk inserted right after IHDR (8 + 25 bytes)."""
    return blob[:33] + _chunk(kind, data) + blob[33:]


def _interlaced_rgb(rgb: np.ndarray) -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (PIL cannot write one), filter 'none' on every row."""
    h, w, _ = rgb.shape
    raw = b""
    for y0, x0, dy, dx in ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4),
                           (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1)):
        sub = rgb[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _images():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    smooth = np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)
    return {"noise": noise, "smooth": smooth}


def _counting_opencv(monkeypatch):
    calls = []
    real = loader._cv_decode
    monkeypatch.setattr(loader, "_cv_decode", lambda b, f: calls.append(f) or real(b, f))
    return calls


@pytest.mark.parametrize("save", [{"compress_level": 0}, {"compress_level": 1},
                                  {"compress_level": 6}, {"compress_level": 9},
                                  {"optimize": True}])
def test_rgb_png_decodes_to_pils_pixels_through_opencv(save, monkeypatch):
    calls = _counting_opencv(monkeypatch)
    for name, rgb in _images().items():
        blob = _png(rgb, **save)
        got = loader.decode_rgb(blob, rgb.shape[:2], name)
        assert got.dtype == np.uint8 and got.shape == rgb.shape
        np.testing.assert_array_equal(got, _pil(blob))
        np.testing.assert_array_equal(got, rgb)
    assert len(calls) == 2                                    # neither fell back to PIL


def test_opencv_without_rgb_decoding_gives_the_same_pixels(monkeypatch):
    monkeypatch.setattr(loader, "_CV_RGB", None)                # an OpenCV without IMREAD_COLOR_RGB
    calls = _counting_opencv(monkeypatch)
    for name, rgb in _images().items():
        blob = _png(rgb)
        np.testing.assert_array_equal(loader.decode_rgb(blob, rgb.shape[:2], name), _pil(blob))
    assert len(calls) == 2


def test_what_the_builders_write_decodes_to_pils_pixels(monkeypatch):
    calls = _counting_opencv(monkeypatch)
    rgb = _images()["noise"]
    blob = faces.encode_image(rgb, "png")
    np.testing.assert_array_equal(loader.decode_rgb(blob, rgb.shape[:2], "x"), _pil(blob))
    depth = np.random.default_rng(1).random((40, 40))
    gray_blob = faces.encode_depth(depth)
    gray = loader.decode_gray(gray_blob, "x")
    assert gray.dtype == np.uint8 and gray.shape == (40, 40)
    np.testing.assert_array_equal(gray, _pil(gray_blob))
    assert len(calls) == 2


def test_ancillary_chunks_and_interlacing_change_no_pixel(monkeypatch):
    calls = _counting_opencv(monkeypatch)
    rgb = _images()["noise"]
    blob = _png(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6                                          # "rotate 90°": PIL ignores it
    variants = {
        "tRNS colour key": _with_chunk(blob, b"tRNS",
                                       struct.pack(">HHH", *map(int, rgb[0, 0]))),
        "gAMA": _with_chunk(blob, b"gAMA", struct.pack(">I", 100000)),
        "sRGB": _with_chunk(blob, b"sRGB", b"\0"),
        "EXIF orientation": _png(rgb, exif=exif.tobytes()),
        "interlaced": _interlaced_rgb(rgb),
    }
    for name, variant in variants.items():
        expected = _pil(variant)
        assert expected.shape == rgb.shape, name
        np.testing.assert_array_equal(loader.decode_rgb(variant, rgb.shape[:2], name), expected,
                                      err_msg=name)
    assert len(calls) == len(variants)


def test_jpeg_and_other_pngs_go_through_pil_as_before(monkeypatch):
    calls = _counting_opencv(monkeypatch)
    rgb = _images()["smooth"]
    jpeg = faces.encode_image(rgb, "jpeg")
    np.testing.assert_array_equal(loader.decode_rgb(jpeg, rgb.shape[:2], "j"), _pil(jpeg))
    sixteen = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    deep = _png(sixteen)
    np.testing.assert_array_equal(loader.decode_gray(deep, "d"), _pil(deep))
    assert not calls
    # Frames that are not 3-channel 8-bit fail as they did, naming the item and the shape.
    for mode, array in (("L", rgb[..., 0]), ("RGBA", np.dstack([rgb, rgb[..., :1]]))):
        with pytest.raises(UserError, match=rf"item {mode}: stored frame has shape"):
            loader.decode_rgb(_png(array), rgb.shape[:2], f"item {mode}")
    palette = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG")
    with pytest.raises(UserError, match=r"stored frame has shape \(64, 64\) uint8"):
        loader.decode_rgb(buf.getvalue(), rgb.shape[:2], "palette")
    with pytest.raises(UserError, match=r"shape \(64, 64, 3\) uint8, expected \(32, 32, 3\)"):
        loader.decode_rgb(_png(rgb), (32, 32), "small")


def test_damaged_png_decodes_as_pil_decodes_it_or_fails_as_pil_fails():
    """OpenCV may reject more than PIL does (then PIL decides); never less."""
    blob = _png(_images()["noise"], compress_level=1)
    rng = np.random.default_rng(3)
    outcomes = set()
    for trial in range(61):
        damaged = bytearray(blob)
        if trial == 60:
            damaged += b"bytes after IEND"                    # both read past them
        elif trial % 3 == 0:
            damaged = damaged[:int(rng.integers(8, len(blob)))]
        else:
            for pos in rng.integers(8, len(blob), 1 + trial % 4):
                damaged[pos] ^= int(rng.integers(1, 256))
        damaged = bytes(damaged)
        try:
            expected = _pil(damaged)
        except Exception:   # noqa: BLE001 - whatever PIL raises, ours must be an error too
            expected = None
        if expected is None or expected.shape != (37, 53, 3):
            with pytest.raises(UserError, match="item"):
                loader.decode_rgb(damaged, (37, 53), "item")
            outcomes.add("error")
        else:
            np.testing.assert_array_equal(loader.decode_rgb(damaged, (37, 53), "item"),
                                          expected)
            outcomes.add("decoded")
    assert outcomes == {"error", "decoded"}


# -- a store with a damaged record ------------------------------------------------------------

VIDEOS = ["a", "a", "a", "b", "b", "c", "c", "d", "d", "d"]   # frames in record order
LABELS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], np.int32)
RES = 8


def _store(damaged=(), damaged_depth=()):
    rng = np.random.default_rng(5)
    frames = rng.integers(0, 256, (len(VIDEOS), RES, RES, 3), dtype=np.uint8)
    images = [_png(f) for f in frames]
    depths = [faces.encode_depth(rng.random((RES, RES))) if y else b"" for y in LABELS]
    for i in damaged:
        images[i] = images[i][:len(images[i]) // 2]           # truncated: does not decode
    for i in damaged_depth:
        depths[i] = b"\x89PNG\r\n\x1a\n garbage"
    blobs = {k: np.empty(len(VIDEOS), object) for k in ("image", "depth")}
    blobs["image"][:], blobs["depth"][:] = images, depths
    n = len(VIDEOS)
    records = loader.Records([], np.zeros(n), np.arange(n), blobs)
    video = np.asarray([f"fas_t:{v}" for v in VIDEOS])
    names = np.asarray([f"fas_t/train record {k} (video {v}, frame 0)"
                        for k, v in enumerate(video)])
    domain = np.asarray(["site"] * n)
    encoded = loader.EncodedFrames(records, (RES, RES), names, video,
                                   loader._groups(LABELS, domain))
    depth = loader.DepthStore(records, LABELS, np.array([len(d) > 0 for d in depths]), RES, names)
    return encoded, depth, frames


def test_a_damaged_frame_is_an_error_naming_dataset_record_and_video():
    encoded, depth, _ = _store(damaged=[4])
    with pytest.raises(UserError, match=r"fas_t/train record 4 \(video fas_t:b, frame 0\): "
                                        r"stored image bytes cannot be decoded"):
        encoded.decode_one(4)
    encoded, depth, _ = _store(damaged_depth=[1])
    with pytest.raises(UserError, match=r"fas_t/train record 1 \(video fas_t:a, frame 0\): depth"):
        depth[np.array([0, 1])]


def test_a_damaged_frame_stops_the_prefetched_batches_at_the_step_that_needs_it():
    encoded, depth, _ = _store(damaged=[4])
    sampler = MetaBatchSampler(CachedFrames(len(VIDEOS), encoded.decode_one, 0, workers=2),
                               LABELS, depth, num_domains=2, per_domain_batch=2, depth_size=RES,
                               seed=0)
    pools = np.array([1, 0, 0, 0, 1, 0, 1, 1, 1, 0])   # both classes in both domains
    uses = [4 in sampler.meta_indices(pools, 0, s)[0] for s in range(20)]
    first = uses.index(True)
    got = []
    with pytest.raises(UserError, match="record 4"):
        for batch in Prefetcher(lambda s: sampler.meta_batch(pools, 0, s), range(20), depth=2):
            got.append(batch)
    assert first > 0 and len(got) == first    # every batch before it, none after


def test_a_decoding_thread_that_raises_is_reported_not_a_hang():
    def decode(i):
        if i == 3:
            raise RuntimeError("decoder crashed on frame 3")
        return np.zeros((RES, RES, 3), np.uint8)

    store = CachedFrames(8, decode, 1 << 20, workers=2)
    errors = []

    def read():
        try:
            store[np.arange(8)]
        except RuntimeError as err:
            errors.append(err)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=120)          # a bound on a hang, not a measurement
    assert not reader.is_alive()
    assert [str(e) for e in errors] == ["decoder crashed on frame 3"]


def test_skip_bad_replaces_a_frame_by_the_next_good_one_of_its_video(caplog):
    encoded, _, frames = _store(damaged=[3])
    bad = loader.BadRecords()
    skipping = encoded.with_bad(bad)
    with caplog.at_level(logging.WARNING, logger="d2am_jax.data.loader"):
        for _ in range(3):
            np.testing.assert_array_equal(skipping.decode_one(3), frames[4])  # video b: 3, 4
    assert len(bad) == 1
    [message] = bad.messages()
    assert "fas_t/train record 3 (video fas_t:b, frame 0)" in message
    assert "replaced by fas_t/train record 4 (video fas_t:b" in message
    assert sum("record 3" in r.getMessage() for r in caplog.records) == 1    # warned once
    # The last frame of a video wraps round to its first.
    encoded, _, frames = _store(damaged=[2])
    np.testing.assert_array_equal(encoded.with_bad(loader.BadRecords()).decode_one(2), frames[0])


def test_skip_bad_replaces_a_video_that_never_decodes_by_its_class_and_domain():
    encoded, _, frames = _store(damaged=[3, 4])              # all of video b (live)
    bad = loader.BadRecords()
    skipping = encoded.with_bad(bad)
    np.testing.assert_array_equal(skipping.decode_one(3), frames[0])   # wraps to live video a
    np.testing.assert_array_equal(skipping.decode_one(4), frames[0])
    assert len(bad) == 2
    encoded, _, _ = _store(damaged=[0, 1, 2, 3, 4])          # no live frame decodes
    with pytest.raises(UserError, match="no other frame of its video, class and domain"):
        encoded.with_bad(loader.BadRecords()).decode_one(0)


def test_skip_bad_replaces_a_damaged_depth_map_by_the_prior():
    encoded, depth, _ = _store(damaged_depth=[1])
    bad = loader.BadRecords()
    maps = depth.with_options(workers=2, bad=bad)[np.arange(len(VIDEOS))]
    np.testing.assert_array_equal(maps[1], loader._prior(RES))
    np.testing.assert_array_equal(maps[0], depth[np.array([0])][0])
    assert not maps[5:].any()                                    # spoof: zeros
    assert len(bad) == 1 and "record 1" in bad.messages()[0] and "prior" in bad.messages()[0]


def test_skip_bad_batches_stay_balanced_and_a_resumed_sampler_draws_the_same():
    def sampler():
        encoded, depth, _ = _store(damaged=[3, 8], damaged_depth=[0])
        bad = loader.BadRecords()
        frames = CachedFrames(len(VIDEOS), encoded.with_bad(bad).decode_one, 4 * RES * RES * 3,
                              workers=2)
        return MetaBatchSampler(frames, LABELS, depth.with_options(2, bad), num_domains=2,
                                per_domain_batch=4, depth_size=RES, seed=1), bad

    pools = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
    through, bad = sampler()
    batches = [through.meta_batch(pools, 2, s) for s in range(8)]
    resumed, bad_resumed = sampler()
    for s in (7, 5):
        later = resumed.meta_batch(pools, 2, s)
        for key in ("x", "y", "depth", "domains"):
            np.testing.assert_array_equal(later[key], batches[s][key])
    for batch in batches:
        assert batch["x"].shape == (2, 4, RES, RES, 3)
        np.testing.assert_array_equal(batch["y"].sum(axis=1), [2, 2])
    assert len(bad) == 3                                        # two frames, one depth map


def test_skip_bad_is_a_checked_boolean_field_off_by_default():
    config = default.get_config()
    assert config.data.skip_bad is False
    config_check.check(config)
    config.data.skip_bad = True
    config_check.check(config)
    config.data.skip_bad = None
    with pytest.raises(UserError, match=r"config.data.skip_bad: expected True or False"):
        config_check.check(config)
    config.data.skip_bad = True
    assert "data.skip_bad" in config_check.resumable_changes(
        config_check.as_dict(default.get_config()), config, "w")


def test_depth_maps_decoded_by_threads_equal_the_serial_ones():
    rng = np.random.default_rng(4)
    n = 12
    labels = np.arange(n) % 3 != 0                               # every third is spoof
    depths = [faces.encode_depth(rng.random((24, 24))) if y and k % 4 else b""
              for k, y in enumerate(labels)]                    # some live frames have no map
    blobs = {"image": np.empty(n, object), "depth": np.empty(n, object)}
    blobs["depth"][:] = depths
    records = loader.Records([], np.zeros(n), np.arange(n), blobs)
    serial = loader.DepthStore(records, labels.astype(np.int32),
                               np.array([len(d) > 0 for d in depths]), 8)
    idx = np.array([5, 0, 11, 5, 2, 7, 1])
    threaded = serial.with_options(workers=3)
    np.testing.assert_array_equal(threaded[idx], serial[idx])
    np.testing.assert_array_equal(threaded.take(idx)[np.arange(len(idx))], serial[idx])
    assert not serial[idx][labels[idx] == 0].any()


def test_the_frame_shape_survives_a_damaged_first_record():
    rgb = _images()["noise"]
    png, jpeg = _png(rgb), faces.encode_image(rgb, "jpeg")
    for first, second in ((png[:60], png), (jpeg[:60], jpeg)):   # header kept / not a PNG
        blobs = {"image": np.empty(2, object), "depth": np.empty(2, object)}
        blobs["image"][:] = [first, second]
        records = loader.Records([], np.zeros(2), np.arange(2), blobs)
        assert loader._frame_shape(records, "fas_t/train") == (37, 53)
    blobs["image"][:] = [jpeg[:60], jpeg[:70]]
    with pytest.raises(UserError, match="fas_t/train: no stored frame decodes"):
        loader._frame_shape(loader.Records([], np.zeros(2), np.arange(2), blobs), "fas_t/train")
