"""`impasto-tiny-segmenter`: a dichotomous-segmentation model published the way BiRefNet and
RMBG-2.0 are, so offline tests load it through the same path as the real ones.

Like those repositories, the directory holds its own model code: `config.json` has an
`auto_map` naming `configuration_tiny_segmenter.TinySegmenterConfig` (AutoConfig) and
`modeling_tiny_segmenter.TinySegmenter` (AutoModelForImageSegmentation), python files beside
it, and random weights saved with `save_pretrained` (model.safetensors). Loading it needs
`trust_remote_code=True`, and transformers copies the two files into its modules cache
(HF_MODULES_CACHE), as it does for BiRefNet.

The model takes ImageNet-normalised [B, 3, R, R] pixels (any R divisible by 8) and returns,
like BiRefNet in eval mode, a list of logit maps from coarse to fine whose last is full
resolution [B, 1, R, R]. Its weights are random: masks are noise-like, shapes and types real.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import json
import sys
import uuid
from pathlib import Path

from impasto.backends.tiny import build_atomically
from impasto.backends.tiny_assets import _seeded

# Bump when the architecture or the files change, so old copies are rebuilt.
TINY_SEGMENTER_VERSION = 1
TINY_SEGMENTER_NAME = "impasto-tiny-segmenter"
# Settings for the models-file entry that runs it: 64 px keeps a CPU test in milliseconds.
TINY_SEGMENTER_SETTINGS: dict[str, object] = {"resolution": 64}
_SEED = 20261203

_CONFIGURATION_SOURCE = '''\
"""Configuration of impasto's tiny segmenter (a stand-in for BiRefNet in tests)."""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4 spells it PretrainedConfig
    from transformers import PretrainedConfig as PreTrainedConfig


class TinySegmenterConfig(PreTrainedConfig):
    model_type = "impasto_tiny_segmenter"

    def __init__(self, channels=(8, 16, 16), **kwargs):
        self.channels = list(channels)
        super().__init__(**kwargs)
'''

_MODELING_SOURCE = '''\
"""impasto's tiny segmenter: three stride-2 convolutions down to 1/8, two decoder steps back
to full resolution, a logit head at each scale. Returns [1/8, 1/4, full] logit maps, the last
[B, 1, H, W], as BiRefNet does."""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

try:
    from transformers import initialization as init
except ImportError:  # transformers 4
    from torch.nn import init

from .configuration_tiny_segmenter import TinySegmenterConfig


class TinySegmenter(PreTrainedModel):
    config_class = TinySegmenterConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        c1, c2, c3 = config.channels
        self.down1 = nn.Conv2d(3, c1, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.down3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.head8 = nn.Conv2d(c3, 1, 1)
        self.up4 = nn.Conv2d(c3 + c2, c2, 3, padding=1)
        self.head4 = nn.Conv2d(c2, 1, 1)
        self.up1 = nn.Conv2d(c2 + 3, c1, 3, padding=1)
        self.head1 = nn.Conv2d(c1, 1, 1)
        self.post_init()

    def _init_weights(self, module):
        # torch's own convolution init: transformers' default (normal, std 0.02, zero bias)
        # would give a flat mask.
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            fan_in = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            init.uniform_(module.bias, -bound, bound)

    def forward(self, x):
        f2 = F.relu(self.down1(x))
        f4 = F.relu(self.down2(f2))
        f8 = F.relu(self.down3(f4))
        up = F.interpolate(f8, size=f4.shape[2:], mode="bilinear", align_corners=False)
        d4 = F.relu(self.up4(torch.cat([up, f4], dim=1)))
        up = F.interpolate(d4, size=x.shape[2:], mode="bilinear", align_corners=False)
        d1 = F.relu(self.up1(torch.cat([up, x], dim=1)))
        return [self.head8(f8), self.head4(d4), self.head1(d1)]
'''

_AUTO_MAP = {
    "AutoConfig": "configuration_tiny_segmenter.TinySegmenterConfig",
    "AutoModelForImageSegmentation": "modeling_tiny_segmenter.TinySegmenter",
}


def _build(directory: Path) -> None:
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configuration_tiny_segmenter.py").write_text(_CONFIGURATION_SOURCE)
    (directory / "modeling_tiny_segmenter.py").write_text(_MODELING_SOURCE)
    # Import the files just written as a throwaway package (the modeling file imports its
    # config relatively, as BiRefNet's does), so the weights are made by the very code that
    # will load them.
    package = f"_impasto_tiny_segmenter_{uuid.uuid4().hex}"
    spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
    module = importlib.util.module_from_spec(spec)
    module.__path__ = [str(directory)]
    sys.modules[package] = module
    try:
        configuration = importlib.import_module(f"{package}.configuration_tiny_segmenter")
        modeling = importlib.import_module(f"{package}.modeling_tiny_segmenter")
        with _seeded(_SEED):
            model = modeling.TinySegmenter(configuration.TinySegmenterConfig())
        # Widen the last head: with torch's init the full-resolution logits stay within
        # +-0.1, a mask of 128 +- 4; eight times that spans a visible range of alpha.
        with torch.no_grad():
            model.head1.weight.mul_(8)
        model.save_pretrained(directory)
    finally:
        for name in [name for name in sys.modules if name.startswith(package)]:
            del sys.modules[name]
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = _AUTO_MAP
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for cache in directory.glob("__pycache__"):
        for compiled in cache.iterdir():
            compiled.unlink()
        cache.rmdir()


def ensure_tiny_segmenter(directory: Path) -> Path:
    """Build the tiny segmenter into `directory` unless a current copy is there; returns it."""
    return build_atomically(
        directory, _build, {"version": TINY_SEGMENTER_VERSION, "model": TINY_SEGMENTER_NAME}
    )
