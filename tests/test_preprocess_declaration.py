"""An encoder plugin's `preprocess(opts)` is checked where it is declared: a value the eval transform
cannot use (an interpolation or resize mode it does not know, a mean or std that is not three
numbers, a zero std) fails `vlbridge validate` and check_plugin with the encoder's name, instead of
passing validation and failing the build in torchvision with no name."""

from __future__ import annotations

import pytest

import vlbridge
from tests import fake_plugins as fake
from vlbridge import EncoderSpec, PluginError, TokenShape
from vlbridge.errors import AssemblyError
from vlbridge.plugin.specs import Preprocess
from vlbridge.plugintest.check import check_plugin, using_registry

GOOD = {"image_size": 28, "mean": (0.5,) * 3, "std": (0.5,) * 3}
BAD = [
    ({"interpolation": "nearest"}, "interpolation 'nearest' is not one of 'bicubic', 'bilinear'"),
    ({"resize_mode": "shorter"}, "resize_mode 'shorter' is not one of 'squash', 'shortest'"),
    ({"crop_offset": "ceil"}, "crop_offset 'ceil' is not one of 'round', 'floor'"),
    ({"mean": (0.5,)}, r"mean must be three numbers \(R, G, B, for pixels in \[0, 1\]\); got \(0.5,\)"),
    ({"std": 0.5}, "std must be three numbers"),
    ({"std": (0.5, 0.0, 0.5)}, r"std \(0.5, 0.0, 0.5\) must be positive in each channel"),
    # 8-bit levels (as some libraries write them) normalised every [0, 1] pixel to about -2, silently
    ({"mean": (123.675, 116.28, 103.53)}, r"mean \(123.675, 116.28, 103.53\) must lie in \[0, 1\] in each channel: "
                                          r"vlbridge scales pixels to \[0, 1\] before normalising, so give 8-bit levels "
                                          r"divided by 255 \(e.g. 123.675 -> 0.485\)"),
    ({"std": (58.395, 57.12, 57.375)}, r"std \(58.395, 57.12, 57.375\) must lie in \[0, 1\] in each channel"),
    ({"mean": (0.5, float("nan"), 0.5)}, r"mean \(0.5, nan, 0.5\) must lie in \[0, 1\]"),
]


def encoder_plugin(**changes):
    spec = EncoderSpec(name="patches", factory="tests.fake_plugins:build_plain_encoder", output=lambda o: TokenShape(16, 8),
                       preprocess=lambda o: Preprocess(**{**GOOD, **changes}))
    return fake.plugin("patches", encoders=[spec])


@pytest.mark.parametrize("changes, message", BAD)
def test_a_preprocess_the_transform_cannot_use_is_refused_by_name(changes, message):
    plugin = encoder_plugin(**changes)
    with pytest.raises(PluginError, match=rf"encoder 'patches' .*: a shape function raised ValueError: {message}"):
        check_plugin(plugin, build=False)
    with using_registry(fake.registry(patches=plugin)):
        with pytest.raises(AssemblyError, match=rf"encoder 'patches' \(plugin vlbridge-patches\): preprocess\(\) raised ValueError: {message}"):
            vlbridge.load_assembly(fake.assembly(encoder="patches", connector="linear"))


def test_lists_and_the_defaults_are_accepted():
    assert Preprocess(28, [0.5, 0.5, 0.5], [1, 1, 1]).interpolation == "bicubic"
    pre = Preprocess(28, [0.5, 0.5, 0.5], [1, 1, 1])  # a list left in the frozen dataclass made it unhashable
    assert (pre.mean, pre.std) == ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0)) and hash(pre) == hash(Preprocess(28, (0.5,) * 3, (1,) * 3))
    check_plugin(encoder_plugin(), build=False)


def test_numpy_int_sizes_are_accepted_as_plain_ints():
    """The int check refused a size computed with numpy (np.int64(224)), which torch and torchvision
    take as they take 224; it is kept as a plain int."""
    import numpy as np

    pre = Preprocess(np.int64(28), (0.5,) * 3, (0.5,) * 3, resize_size=np.int32(32))
    assert (pre.image_size, pre.resize_size) == (28, 32) and type(pre.image_size) is int and type(pre.resize_size) is int
    check_plugin(encoder_plugin(image_size=np.int64(28)), build=False)
