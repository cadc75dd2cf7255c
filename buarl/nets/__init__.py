"""Networks of the protocol: UNet for 2-D ACDC, VNet for 3-D LA."""
from __future__ import annotations

from torch import nn

from buarl.nets.unet import UNet
from buarl.nets.vnet import VNet


def build(dataset: str, num_classes: int, in_channels: int = 1) -> nn.Module:
    return UNet(in_channels, num_classes) if dataset == "acdc" else VNet(in_channels, num_classes)
