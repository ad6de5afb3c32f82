"""Tests for d2am_jax.pretrained: real ImageNet weights, torch-file reading, ResNet conversion.

ResNet checkpoints are written here in torch's zip layout with random weights and checked against an
independent numpy forward pass that follows torchvision's definitions.
"""

import collections
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import data

from d2am_jax import pretrained
from d2am_jax.errors import UserError

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


# ---------------------------------------------------------------- a torch.save (zip) writer
# Enough of torch's format to write a state dict without torch: protocol-2 pickle in
# '<name>/data.pkl' naming torch._utils._rebuild_tensor_v2 and torch.<X>Storage, storages as raw
# little-endian bytes in '<name>/data/<key>'.

def _torch_name(module, name):
    return type(name, (), {"__module__": module, "__qualname__": name})


_REBUILD_V2 = _torch_name("torch._utils", "_rebuild_tensor_v2")
_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Storage:
    def __init__(self, key, array, numel=None):
        self.key, self.array = key, np.ascontiguousarray(array).ravel()
        self.numel = self.array.size if numel is None else numel  # what the file will claim


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride))

    def __reduce__(self):
        return _REBUILD_V2, self.args + (False, collections.OrderedDict())


class _TorchPickler(pickle._Pickler):
    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if module.startswith("torch"):  # there is no torch to import: write the reference as is
            self.write(pickle.GLOBAL + f"{module}\n{obj.__qualname__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            kind = _torch_name("torch", _STORAGE_NAMES[obj.array.dtype])
            return ("storage", kind, obj.key, "cpu", obj.numel)
        return None


class _LegacyPickler(_TorchPickler):
    def persistent_id(self, obj):
        pid = super().persistent_id(obj)
        return None if pid is None else pid + (None,)  # no view


def write_torch_legacy(path, tensors, storages):
    """torch's pre-1.6 torch.save stream: magic, protocol, sys_info, the pickle, its storage
    keys, then per storage an int64 element count and the raw little-endian bytes."""
    buf = io.BytesIO()
    for header in (pretrained._LEGACY_MAGIC, 1001,
                   {"protocol_version": 1001, "little_endian": True, "type_sizes": {}}):
        pickle.dump(header, buf, protocol=2)
    _LegacyPickler(buf, protocol=2).dump(collections.OrderedDict(tensors))
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        little = s.array.astype(s.array.dtype.newbyteorder("<"))
        buf.write(struct.pack("<q", s.numel) + little.tobytes())
    path.write_bytes(buf.getvalue())


def write_torch_zip(path, tensors, storages):
    """tensors: name → _Tensor; storages: the _Storage objects they use."""
    state_dict = collections.OrderedDict(tensors)
    # torch's state_dict() carries per-module versions as an attribute (pickled with BUILD).
    state_dict._metadata = collections.OrderedDict({"": {"version": 1}, "bn1": {"version": 2}})
    buf = io.BytesIO()
    _TorchPickler(buf, protocol=2).dump(state_dict)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")
        for s in storages:
            little = s.array.astype(s.array.dtype.newbyteorder("<"))
            zf.writestr(f"archive/data/{s.key}", little.tobytes())


def save_state_dict(path, state_dict):
    tensors, storages = {}, []
    for i, (name, value) in enumerate(state_dict.items()):
        value = np.asarray(value)
        storage = _Storage(str(i), value)
        strides = [int(np.prod(value.shape[k + 1:])) for k in range(value.ndim)]
        tensors[name] = _Tensor(storage, 0, value.shape, strides)
        storages.append(storage)
    write_torch_zip(path, tensors, storages)


# ---------------------------------------------------------------- torchvision ResNet, in numpy

def torchvision_resnet_state_dict(depth, rng):
    """Random weights under torchvision's ResNet key names and shapes (resnet.py)."""
    bottleneck, blocks = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
    sd = collections.OrderedDict()

    def conv(name, o, i, k):
        he = np.sqrt(2.0 / (i * k * k))
        sd[name + ".weight"] = rng.normal(0, he, (o, i, k, k)).astype(np.float32)

    def bn(name, c):
        sd[name + ".weight"] = rng.uniform(0.5, 1.0, c).astype(np.float32)
        sd[name + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[name + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[name + ".running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[name + ".num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inplanes, expansion = 64, 4 if bottleneck else 1
    for layer, n in enumerate(blocks, 1):
        planes = 64 * 2 ** (layer - 1)
        for j in range(n):
            p = f"layer{layer}.{j}"
            if bottleneck:
                conv(p + ".conv1", planes, inplanes, 1), bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3), bn(p + ".bn2", planes)
                conv(p + ".conv3", planes * 4, planes, 1), bn(p + ".bn3", planes * 4)
            else:
                conv(p + ".conv1", planes, inplanes, 3), bn(p + ".bn1", planes)
                conv(p + ".conv2", planes, planes, 3), bn(p + ".bn2", planes)
            stride = 2 if layer > 1 and j == 0 else 1
            if j == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(p + ".downsample.0", planes * expansion, inplanes, 1)
                bn(p + ".downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = rng.normal(0, 0.01, (1000, inplanes)).astype(np.float32)
    sd["fc.bias"] = rng.normal(0, 0.01, 1000).astype(np.float32)
    return sd


def _np_conv(x, w, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(x, w.shape[2:], axis=(1, 2))
    win = win[:, ::stride, ::stride]
    return np.einsum("nhwcij,ocij->nhwo", win, w.astype(np.float64), optimize=True)


def _np_bn(x, sd, p):
    std = np.sqrt(sd[p + ".running_var"].astype(np.float64) + 1e-5)
    return (x - sd[p + ".running_mean"]) / std * sd[p + ".weight"] + sd[p + ".bias"]


def numpy_resnet(sd, x, depth):
    """torchvision's ResNet forward in float64: feature maps by stage name, and logits."""
    relu = lambda v: np.maximum(v, 0)
    bottleneck, blocks = {18: (False, (2, 2, 2, 2)), 50: (True, (3, 4, 6, 3))}[depth]
    maps = {}
    x = maps["stem"] = relu(_np_bn(_np_conv(x, sd["conv1.weight"], 2, 3), sd, "bn1"))
    x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    x = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))[:, ::2, ::2]
    x = x.max(axis=(-2, -1))
    for layer, n in enumerate(blocks, 1):
        for j in range(n):
            p, s = f"layer{layer}.{j}", 2 if layer > 1 and j == 0 else 1
            if bottleneck:  # v1.5: stride on the 3×3
                y = relu(_np_bn(_np_conv(x, sd[p + ".conv1.weight"], 1, 0), sd, p + ".bn1"))
                y = relu(_np_bn(_np_conv(y, sd[p + ".conv2.weight"], s, 1), sd, p + ".bn2"))
                y = _np_bn(_np_conv(y, sd[p + ".conv3.weight"], 1, 0), sd, p + ".bn3")
            else:
                y = relu(_np_bn(_np_conv(x, sd[p + ".conv1.weight"], s, 1), sd, p + ".bn1"))
                y = _np_bn(_np_conv(y, sd[p + ".conv2.weight"], 1, 1), sd, p + ".bn2")
            if p + ".downsample.0.weight" in sd:
                x = _np_bn(_np_conv(x, sd[p + ".downsample.0.weight"], s, 0), sd,
                           p + ".downsample.1")
            x = relu(y + x)
        maps[f"layer{layer}"] = x
    logits = x.mean(axis=(1, 2)) @ sd["fc.weight"].T.astype(np.float64) + sd["fc.bias"]
    return maps, logits


def _np_stats(maps, eps):
    return np.concatenate([np.concatenate([m.mean(axis=(1, 2)),
                                           np.sqrt(m.var(axis=(1, 2)) + eps)], -1)
                           for m in maps], -1)


def _n_trainable(sd):
    return sum(v.size for k, v in sd.items() if "running" not in k and "num_batches" not in k)


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def lite0():
    return pretrained.load_feature_extractor("efficientnet_lite0")


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    sd = torchvision_resnet_state_dict(18, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("ckpt") / "resnet18-random.pth"
    save_state_dict(path, sd)
    return path, sd


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    sd = torchvision_resnet_state_dict(50, np.random.default_rng(1))
    path = tmp_path_factory.mktemp("ckpt") / "resnet50-random.pth"
    save_state_dict(path, sd)
    return path, sd


# ---------------------------------------------------------------- EfficientNet-Lite0, real weights

def test_chelsea_is_classified_as_a_cat(lite0):
    image = pretrained.center_crop_resize(data.chelsea(), size=224)
    logits = lite0.classify(image[None])
    assert logits.shape == (1, 1000)
    top5 = np.argsort(-logits[0])[:5]
    assert CAT_CLASSES & set(top5.tolist()), f"top-5 {top5} has no cat class"
    assert top5[0] in CAT_CLASSES
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    assert probs[sorted(CAT_CLASSES)].sum() > 0.5


def test_features_shape_finite_and_independent_of_batch(lite0):
    rng = np.random.default_rng(0)
    cat = np.asarray(Image.fromarray(data.chelsea()).resize((64, 64)))
    others = rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    traces_before = lite0.traces
    alone = lite0.features(cat[None], batch_size=4)                    # 3 padding images
    mixed = lite0.features(np.concatenate([others[:2], cat[None], others[2:]]), batch_size=4)
    assert alone.shape == (1, lite0.feature_dim) and mixed.shape == (6, lite0.feature_dim)
    assert lite0.feature_dim == 2 * (16 + 24 + 40 + 80)  # default layers stage1–stage4
    assert alone.dtype == np.float32 and np.isfinite(mixed).all()
    np.testing.assert_allclose(mixed[2], alone[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(mixed[0], mixed[1])
    assert lite0.traces - traces_before == 1  # three batches of one shape: one compile
    as_float = lite0.features(cat[None].astype(np.float32) / 255.0, batch_size=4)
    np.testing.assert_allclose(as_float, alone, rtol=1e-4, atol=1e-4)
    assert lite0.features(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, lite0.feature_dim)


@pytest.mark.parametrize("size,kernel,stride", [(8, 3, 2), (7, 5, 1)])
def test_depthwise_shifted_sum_equals_grouped_conv(size, kernel, stride):
    rng = np.random.default_rng(size)
    x = rng.normal(size=(2, size, size, 6)).astype(np.float32)
    variables = {"params": {"kernel": rng.normal(size=(kernel, kernel, 1, 6)).astype(np.float32)}}
    conv = pretrained._DepthwiseConv(kernel, stride, impl="conv")
    shifted = pretrained._DepthwiseConv(kernel, stride, impl="shifted")
    want = np.asarray(jax.jit(conv.apply)(variables, x))
    got = np.asarray(jax.jit(shifted.apply)(variables, x))
    assert got.shape == want.shape == (2, -(-size // stride), -(-size // stride), 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_instance_stats_hand_computed():
    f = np.array([1.0, 3.0, 5.0, 7.0], np.float32).reshape(1, 2, 2, 1)   # μ 4, var 5
    # channel 0: μ 2, var 0; channel 1: μ 1, var 3
    g = np.stack([np.full((2, 2), 2.0), np.array([[0.0, 0.0], [0.0, 4.0]])], -1)[None]
    out = np.asarray(pretrained.instance_stats([f, g.astype(np.float32)], eps=1.0))
    np.testing.assert_allclose(out, [[4.0, np.sqrt(6.0), 2.0, 1.0, 1.0, 2.0]], rtol=1e-6)


def test_bad_images_are_refused(lite0):
    with pytest.raises(ValueError, match=r"\[n, height, width, 3\]"):
        lite0.features(np.zeros((2, 8, 8, 6), np.uint8))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        lite0.features(np.full((1, 8, 8, 3), 200.0, np.float32))


# ---------------------------------------------------------------- torch file reading

def test_zip_reader_honours_offset_and_strides(tmp_path):
    base = _Storage("0", np.arange(12, dtype=np.float32))
    ints = _Storage("1", np.array([5], np.int64))
    tensors = {"rows": _Tensor(base, 2, (2, 3), (3, 1)),        # base[2:8] as 2×3
               "transposed": _Tensor(base, 0, (3, 4), (1, 3)),  # base.reshape(4, 3).T
               "count": _Tensor(ints, 0, (), ())}
    write_torch_zip(tmp_path / "t.pth", tensors, [base, ints])
    sd = pretrained.load_torch_checkpoint(tmp_path / "t.pth")
    np.testing.assert_array_equal(sd["rows"], np.arange(2, 8).reshape(2, 3))
    np.testing.assert_array_equal(sd["transposed"], np.arange(12).reshape(4, 3).T)
    assert sd["count"].dtype == np.int64 and int(sd["count"]) == 5


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_unpickler_refuses_foreign_globals(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(pickle.dumps(pretrained._LEGACY_MAGIC, protocol=2)
                       + pickle.dumps(1001, protocol=2)
                       + pickle.dumps({"little_endian": True}, protocol=2) + payload)
    zipped = tmp_path / "zipped.pth"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
    for path in (legacy, zipped):
        where = re.escape(str(path))
        with pytest.raises(UserError,
                           match=rf"{where}: refusing to load global '(os|posix)\.system'") as e:
            pretrained.load_torch_checkpoint(path)
        assert isinstance(e.value, pickle.UnpicklingError)  # for callers that catch those
    assert not marker.exists()


WRITERS = {"zip": write_torch_zip, "legacy": write_torch_legacy}

# A crafted tensor 'w' on a storage of 4 floats: (offset, size, stride, what the refusal says).
CRAFTED = {
    "negative_stride": (0, (4,), (-1,), r"stride \(-1,\); expected a tuple of integers ≥ 0"),
    "negative_offset": (-2, (4,), (1,), r"storage offset -2; expected an integer ≥ 0"),
    "far_negative_stride": (0, (2,), (-2**40,), r"expected a tuple of integers ≥ 0"),
    "far_stride": (0, (2,), (2**40,), r"reach element 1099511627776 of storage '0' that holds 4"),
    "broadcast_2_40": (0, (2**20, 2**20), (0, 0), r"1099511627776 elements, more than the 4"),
    "scalar_past_the_end": (7, (), (), r"reach element 7 of storage '0'"),
    "lengths_differ": (0, (2, 2), (1,), r"size \(2, 2\) and stride \(1,\) differ in length"),
    "offset_not_an_int": ("0", (4,), (1,), r"storage offset '0'"),
}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_layouts_are_refused_naming_the_tensor(tmp_path, fmt, case):
    offset, size, stride, message = CRAFTED[case]
    base = _Storage("0", np.arange(4, dtype=np.float32))
    path = tmp_path / "t.pth"
    WRITERS[fmt](path, {"ok": _Tensor(base, 0, (4,), (1,)),
                        "w": _Tensor(base, offset, size, stride)}, [base])
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: tensor 'w': .*{message}"):
        pretrained.load_torch_checkpoint(path)


def test_far_negative_stride_does_not_crash_the_process(tmp_path):
    # Before the bounds checks this read 2^42 bytes before the storage: a segfault, which only
    # a separate process can observe.
    base = _Storage("0", np.arange(4, dtype=np.float32))
    path = tmp_path / "t.pth"
    write_torch_legacy(path, {"w": _Tensor(base, 3, (2,), (-2**40,))}, [base])
    code = ("import sys\nfrom d2am_jax import pretrained\ntry:\n"
            f"    pretrained.load_torch_checkpoint({str(path)!r})\n"
            "except pretrained.UserError as e:\n    print('refused:', e)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(pretrained.__file__)))
    assert done.returncode == 3, done.stderr[-2000:]
    assert "tensor 'w'" in done.stdout


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_storage_claiming_2_40_elements_is_refused_before_reading(tmp_path, fmt):
    huge = _Storage("0", np.arange(4, dtype=np.float32), numel=2**40)
    path = tmp_path / "t.pth"
    WRITERS[fmt](path, {"w": _Tensor(huge, 0, (4,), (1,))}, [huge])
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: storage '0' (has 16 bytes, "
                                        rf"expected 4398046511104|claims 1099511627776 × float32)"):
        pretrained.load_torch_checkpoint(path)


class _Odd:
    """Pickled as a persistent id a torch file never has."""


class _OddPickler(_TorchPickler):
    def persistent_id(self, obj):
        return ("module", "os") if isinstance(obj, _Odd) else super().persistent_id(obj)


class _BadRebuild:
    def __reduce__(self):  # _rebuild_tensor_v2 with too few arguments
        return _REBUILD_V2, ("x",)


def _zip_with_pickle(path, data):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
    return path


@pytest.mark.parametrize("payload, message", [
    (lambda: _pickled(_OddPickler, {"w": _Odd()}),
     r"refusing persistent id \('module', 'os'\)"),
    (lambda: _pickled(_TorchPickler, {"w": _Tensor("abc", 0, (1,), (1,))}),
     r"tensor 'w': its storage is a str, not a torch storage"),
    (lambda: _pickled(_TorchPickler, {"w": _BadRebuild()}),
     r"not a readable torch checkpoint \(TypeError: "),
    (lambda: b"\x80\x02\xff garbage", r"not a readable torch checkpoint"),
    (lambda: _pickled(_TorchPickler, {"w": list(range(100))})[:40],
     r"not a readable torch checkpoint \((EOFError|UnpicklingError)"),
], ids=["persistent_id", "not_a_storage", "wrong_arguments", "garbage", "truncated"])
def test_malformed_pickles_are_user_errors_naming_the_file(tmp_path, payload, message):
    path = _zip_with_pickle(tmp_path / "t.pth", payload())
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: .*{message}"):
        pretrained.load_torch_checkpoint(path)


def test_shared_containers_are_converted_once(tmp_path):
    # [x, x] nested 20 deep is 1 kB of pickle and 2^20 paths; 60 deep would never finish if
    # every path were walked.
    nested = []
    for _ in range(20):
        nested = [nested, nested]
    got = pretrained.load_torch_checkpoint(_zip_with_pickle(tmp_path / "t.pth",
                                                            pickle.dumps(nested, protocol=2)))
    assert got[0] is got[1] and got[0][0][0] is got[1][1][1]


def test_a_file_that_is_no_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"these are not weights\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))}: not a readable torch"):
        pretrained.load_torch_checkpoint(path)


def _pickled(pickler, obj):
    buf = io.BytesIO()
    pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_shipped_efficientnet_weights_still_load():
    path = pretrained.default_checkpoint_path("efficientnet_lite0")
    sd = pretrained.load_state_dict(path)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in sd.values() if v.dtype.kind == "f")
    # every key is an EfficientNet-Lite0 weight of the right shape, and none is missing
    variables = pretrained.convert_state_dict(sd, "efficientnet_lite0", source=path)
    kept = {k: v for k, v in sd.items() if "num_batches" not in k}
    assert len(jax.tree_util.tree_leaves(variables)) == len(kept)


def test_missing_file_unknown_arch_and_layer(tmp_path):
    missing = tmp_path / "nowhere" / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        pretrained.load_feature_extractor("resnet18", checkpoint_path=missing)
    with pytest.raises(ValueError, match="unknown pretrained architecture 'vgg16'"):
        pretrained.load_feature_extractor("vgg16")
    with pytest.raises(ValueError, match="checkpoint_path"):
        pretrained.load_feature_extractor("resnet50")
    with pytest.raises(ValueError, match=r"unknown feature layer.*layer9"):
        pretrained.load_feature_extractor(layers=("stage2", "layer9"))
    with pytest.raises(ValueError, match="sequence of layer names"):
        pretrained.load_feature_extractor(layers="stage2")


def test_wrong_architecture_names_the_first_mismatch(resnet50_file):
    lite_path = pretrained.default_checkpoint_path("efficientnet_lite0")
    with pytest.raises(ValueError, match=r"'_conv_stem\.weight'.*not part of resnet18"):
        pretrained.load_feature_extractor("resnet18", checkpoint_path=lite_path)
    path, _ = resnet50_file
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight' has shape \(64, 64, 1, 1\), "
                                         r"resnet18 expects \(64, 64, 3, 3\)"):
        pretrained.load_feature_extractor("resnet18", checkpoint_path=path)


def test_missing_weight_is_named(tmp_path, resnet18_file):
    _, sd = resnet18_file
    partial = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(ValueError,
                       match=r"first 'layer3\.1\.bn2\.running_var' \(expected shape \(256,\)\)"):
        pretrained.convert_state_dict(partial, "resnet18")


# ---------------------------------------------------------------- ResNet conversion

def test_resnet18_matches_numpy_torchvision(resnet18_file):
    path, sd = resnet18_file
    assert _n_trainable(sd) == 11_689_512  # torchvision resnet18's parameter count
    fe = pretrained.load_feature_extractor("resnet18", checkpoint_path=path,
                                           layers=("stem", "layer1", "layer2", "layer3"))
    # An even size: there TF's SAME and torch's symmetric padding differ at stride 2.
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    x = (images / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    maps, logits = numpy_resnet(sd, x, 18)
    expected = _np_stats([maps[k] for k in fe.layers], fe.eps)
    got = fe.features(images, batch_size=2)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    np.testing.assert_allclose(fe.classify(images), logits, rtol=2e-4,
                               atol=2e-4 * np.abs(logits).max())


def test_resnet50_every_key_consumed_and_blocks_match_numpy(resnet50_file):
    path, sd = resnet50_file
    assert _n_trainable(sd) == 25_557_032  # torchvision resnet50's parameter count
    variables = pretrained.convert_state_dict(pretrained.load_state_dict(path), "resnet50")
    leaves = jax.tree_util.tree_leaves(variables)
    kept = {k: v for k, v in sd.items() if "num_batches" not in k}
    assert len(leaves) == len(kept)
    assert sum(leaf.size for leaf in leaves) == sum(v.size for v in kept.values())
    np.testing.assert_array_equal(variables["params"]["layer2_0"]["conv2"]["kernel"],
                                  sd["layer2.0.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], sd["fc.weight"].T)
    # The first block of layer2 (stride 2 on the 3×3, projection shortcut) against numpy.
    block = pretrained.Bottleneck(128, stride=2, downsample=True)
    block_vars = {c: variables[c]["layer2_0"] for c in ("params", "batch_stats")}
    x = np.random.default_rng(3).normal(size=(1, 9, 9, 256)).astype(np.float32)
    got = np.asarray(block.apply(block_vars, x))
    sub = {k[len("layer2.0."):]: v for k, v in sd.items() if k.startswith("layer2.0.")}
    relu = lambda v: np.maximum(v, 0)
    y = relu(_np_bn(_np_conv(x, sub["conv1.weight"], 1, 0), sub, "bn1"))
    y = relu(_np_bn(_np_conv(y, sub["conv2.weight"], 2, 1), sub, "bn2"))
    y = _np_bn(_np_conv(y, sub["conv3.weight"], 1, 0), sub, "bn3")
    want = relu(y + _np_bn(_np_conv(x, sub["downsample.0.weight"], 2, 0), sub, "downsample.1"))
    assert got.shape == want.shape == (1, 5, 5, 512)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
