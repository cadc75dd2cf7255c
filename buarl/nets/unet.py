"""2-D UNet of the SSL4MIS / BCP protocol: [16, 32, 64, 128, 256] channels,
encoder dropout [0.05, 0.1, 0.2, 0.3, 0.5], bilinear up-sampling decoder."""
from __future__ import annotations

import torch
from torch import nn



class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int, p: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
            nn.Dropout(p),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.reduce = nn.Conv2d(cin, cskip, 1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = ConvBlock(2 * cskip, cout, 0.0)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(self.reduce(x))], 1))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 4,
                 features=(16, 32, 64, 128, 256), dropout=(0.05, 0.1, 0.2, 0.3, 0.5)):
        super().__init__()
        f, p = features, dropout
        self.inc = ConvBlock(in_channels, f[0], p[0])
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBlock(f[i], f[i + 1], p[i + 1])) for i in range(4))
        self.up = nn.ModuleList(Up(f[i + 1], f[i], f[i]) for i in reversed(range(4)))
        self.out = nn.Conv2d(f[0], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.up:
            x = up(x, skips.pop())
        return self.out(x)
