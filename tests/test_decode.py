"""Stored frames and depth maps decode to PIL's pixels exactly (OpenCV reads the builders' 8-bit
PNG, PIL the rest), and what does not decode is an error as PIL words it."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from d2am_jax.data import faces, loader
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
