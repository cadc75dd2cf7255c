"""3-D VNet of UA-MT / BCP on LA: 16 filters, batch norm, dropout at the bottleneck and
before the classifier, additive skip connections."""
from __future__ import annotations

import torch
from torch import nn


class Conv3d(nn.Conv3d):
    """nn.Conv3d that avoids a oneDNN defect: on the CPU in bf16, the weight gradient of a
    3x3x3 convolution whose input has depth 2 (the first spatial axis) reads memory it never
    wrote: run to run it differs, at times 1e36 or NaN (torch 2.13, AVX512-BF16; depths 1 and
    >= 3, fp32 and 2-D are exact; docs/method_choices.md, "Precision"). Such an input is a
    tiny bottleneck (a 32-voxel patch side / 16), so computing it in fp32 costs nothing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.shape[2] == 2 and self.kernel_size[0] == 3
                and torch.is_autocast_enabled("cpu")):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _stage(n: int, cin: int, cout: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [Conv3d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def _up(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose3d(cin, cout, 2, stride=2), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


class VNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, filters: int = 16, dropout: float = 0.5):
        super().__init__()
        f = [filters * 2 ** i for i in range(5)]
        stages = [1, 2, 3, 3, 3]
        self.enc = nn.ModuleList(_stage(stages[i], in_channels if i == 0 else f[i], f[i]) for i in range(5))
        self.down = nn.ModuleList(_down(f[i], f[i + 1]) for i in range(4))
        self.up = nn.ModuleList(_up(f[i + 1], f[i]) for i in reversed(range(4)))
        self.dec = nn.ModuleList(_stage(stages[i], f[i], f[i]) for i in reversed(range(4)))
        self.drop = nn.Dropout3d(dropout)
        self.out = nn.Conv3d(f[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x)
            if i < 4:
                skips.append(x)
                x = self.down[i](x)
        x = self.drop(x)
        for up, dec in zip(self.up, self.dec):
            x = dec(up(x) + skips.pop())
        return self.out(self.drop(x))
