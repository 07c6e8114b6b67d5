"""Building blocks shared by the AIRT networks: residual and plain conv blocks, MedNeXt blocks.

The MedNeXt blocks and the :class:`MedNeXtUNet` backbone follow the design of MedNeXt
(Roy et al., "MedNeXt: Transformer-driven Scaling of ConvNets for Medical Image
Segmentation", MICCAI 2023): a depthwise convolution with a large receptive field, a
channel-wise GroupNorm, an inverted bottleneck (1x1x1 expansion by ``r``, GELU, 1x1x1
compression) and a residual connection; downsampling and upsampling are themselves
MedNeXt blocks whose depthwise convolution is strided (or transposed) and whose residual
path is a strided 1x1x1 convolution; the decoder adds (not concatenates) the encoder
features of the same resolution. The code here is a fresh implementation of that design
(MONAI and the original repository are not dependencies).

Every module takes plain ints and tuples so that a frozen config dataclass can build any
size; nothing here prints or touches a device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, ...]]:
    """Zero-pad the spatial dimensions of ``x`` at their high end to a multiple of ``multiple``.

    Parameters
    ----------
    x
        Tensor ``(B, C, *spatial)`` with 2 or 3 spatial dimensions.
    multiple
        Every spatial size is rounded up to a multiple of this (``2**n_downsamplings``), >= 1.

    Returns
    -------
    padded, original_spatial_shape
        The padded tensor and the spatial shape to crop back to with :func:`crop_to`.
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    pads: list[int] = []
    for s in reversed(spatial):  # F.pad wants the last dimension first
        pads += [0, (-s) % multiple]
    if any(pads):
        x = F.pad(x, pads)
    return x, spatial


def crop_to(x: Tensor, spatial: Sequence[int]) -> Tensor:
    """Crop the spatial dimensions of ``x`` back to ``spatial`` (undo :func:`pad_to_multiple`)."""
    index = (slice(None), slice(None), *(slice(0, int(s)) for s in spatial))
    return x[index]


class ResBlock3d(nn.Module):
    """ResNet-style 3D block: conv3-IN-ReLU-conv3-IN plus a conv1-IN shortcut, then ReLU.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts (>= 1).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
            nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
            nn.InstanceNorm3d(out_channels, affine=True),
        )
        self.shortcut = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 1),
            nn.InstanceNorm3d(out_channels, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(B, in_channels, D, H, W)``; same spatial size out."""
        return F.relu(self.body(x) + self.shortcut(x))


class ConvBlock3d(nn.Module):
    """Plain 3D block: conv3 (stride 1, padding 1) - InstanceNorm - ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm = nn.InstanceNorm3d(out_channels, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(B, in_channels, D, H, W)``."""
        return F.relu(self.norm(self.conv(x)))


class MedNeXtBlock(nn.Module):
    """A MedNeXt block: depthwise conv k - GroupNorm - 1x1 expand x r - GELU - 1x1 compress.

    With ``mode="same"`` the output has ``in_channels`` channels and a plain residual; with
    ``mode="down"`` the depthwise conv has stride 2, the output has ``out_channels`` channels
    and the residual is a stride-2 1x1x1 conv; with ``mode="up"`` the depthwise conv is a
    stride-2 transposed conv and the residual a stride-2 1x1x1 transposed conv.

    Parameters
    ----------
    in_channels, out_channels
        Channel counts (>= 1); must be equal for ``mode="same"``.
    expansion
        Inverted-bottleneck expansion ratio ``r`` (>= 1).
    kernel_size
        Odd depthwise kernel size (3, 5, 7).
    mode
        ``"same"``, ``"down"`` or ``"up"``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expansion: int,
        kernel_size: int = 3,
        mode: str = "same",
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"MedNeXt kernel_size must be odd, got {kernel_size}")
        if mode == "same" and in_channels != out_channels:
            raise ValueError("a MedNeXt block of mode 'same' needs in_channels == out_channels")
        pad = kernel_size // 2
        self.mode = mode
        self.dw: nn.Module
        self.res: nn.Module | None
        if mode == "same":
            self.dw = nn.Conv3d(in_channels, in_channels, kernel_size, padding=pad, groups=in_channels)
            self.res = None
        elif mode == "down":
            self.dw = nn.Conv3d(
                in_channels, in_channels, kernel_size, stride=2, padding=pad, groups=in_channels
            )
            self.res = nn.Conv3d(in_channels, out_channels, 1, stride=2)
        elif mode == "up":
            self.dw = nn.ConvTranspose3d(
                in_channels,
                in_channels,
                kernel_size,
                stride=2,
                padding=pad,
                output_padding=1,
                groups=in_channels,
            )
            self.res = nn.ConvTranspose3d(in_channels, out_channels, 1, stride=2, output_padding=1)
        else:
            raise ValueError(f"MedNeXt block mode must be 'same', 'down' or 'up', got {mode!r}")
        # GroupNorm with one group per channel, as MedNeXt does.
        self.norm = nn.GroupNorm(in_channels, in_channels)
        self.expand = nn.Conv3d(in_channels, expansion * in_channels, 1)
        self.compress = nn.Conv3d(expansion * in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(B, in_channels, D, H, W)`` (even sizes for down blocks)."""
        y = self.compress(F.gelu(self.expand(self.norm(self.dw(x)))))
        return y + (x if self.res is None else self.res(x))


def _stage(channels: int, n_blocks: int, expansion: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        *(MedNeXtBlock(channels, channels, expansion, kernel_size) for _ in range(n_blocks))
    )


class MedNeXtUNet(nn.Module):
    """A 3D MedNeXt encoder-decoder (the backbone of Bev2Fluence and of the fast dose stage 2).

    ``n_levels = len(channels) - 1`` downsamplings; stage ``i`` of the encoder works at
    ``channels[i]`` and the bottleneck at ``channels[-1]``. Inputs of any spatial size are
    zero-padded to a multiple of ``2**n_levels`` and cropped back, so the output has the
    spatial size of the input.

    Parameters
    ----------
    in_channels, out_channels
        Channels of the input volume and of the output (>= 1).
    channels
        Widths per resolution level, the last one being the bottleneck, e.g.
        ``(64, 128, 256, 512, 1024)`` (the paper's Bev2Fluence).
    blocks
        MedNeXt blocks per stage: ``2 * n_levels + 1`` ints (encoder stages, bottleneck, decoder
        stages from deep to shallow), each >= 0.
    expansion
        Expansion ratio per stage (same length as ``blocks``), each >= 1; also used by the
        down block leaving an encoder stage and the up block entering a decoder stage.
    kernel_size
        Odd depthwise kernel size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        blocks: Sequence[int],
        expansion: Sequence[int],
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        n_levels = len(channels) - 1
        if n_levels < 1:
            raise ValueError(f"MedNeXtUNet needs at least two widths, got channels={tuple(channels)}")
        if len(blocks) != 2 * n_levels + 1 or len(expansion) != 2 * n_levels + 1:
            raise ValueError(
                f"MedNeXtUNet with {n_levels} levels needs {2 * n_levels + 1} entries in blocks and "
                f"expansion, got {len(blocks)} and {len(expansion)}"
            )
        self.n_levels = n_levels
        self.stem = nn.Conv3d(in_channels, channels[0], 1)
        self.enc = nn.ModuleList(
            _stage(channels[i], blocks[i], expansion[i], kernel_size) for i in range(n_levels)
        )
        self.down = nn.ModuleList(
            MedNeXtBlock(channels[i], channels[i + 1], expansion[i], kernel_size, mode="down")
            for i in range(n_levels)
        )
        self.bottleneck = _stage(channels[-1], blocks[n_levels], expansion[n_levels], kernel_size)
        # Decoder from the deepest level up: stage s = n_levels + 1 + j works at channels[n_levels - 1 - j].
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for j in range(n_levels):
            level = n_levels - 1 - j
            s = n_levels + 1 + j
            self.up.append(
                MedNeXtBlock(channels[level + 1], channels[level], expansion[s], kernel_size, mode="up")
            )
            self.dec.append(_stage(channels[level], blocks[s], expansion[s], kernel_size))
        self.head = nn.Conv3d(channels[0], out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``(B, in_channels, D, H, W)`` to ``(B, out_channels, D, H, W)`` (no output activation)."""
        x, spatial = pad_to_multiple(x, 2**self.n_levels)
        x = self.stem(x)
        skips: list[Tensor] = []
        for stage, down in zip(self.enc, self.down):
            x = stage(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, stage in zip(self.up, self.dec):
            x = stage(up(x) + skips.pop())
        return crop_to(self.head(x), spatial)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class Blur2d(nn.Module):
    """Low-pass [1, 2, 1] x [1, 2, 1] / 16 filter applied per channel (StyleGAN2's Blur), same size."""

    def __init__(self) -> None:
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        kernel = (k[:, None] * k[None, :]) / 16.0
        self.register_buffer("kernel", kernel[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Blur ``(B, C, H, W)`` with reflect padding."""
        c = x.shape[1]
        kernel: Tensor = self.kernel  # type: ignore[assignment]
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, kernel.expand(c, 1, 3, 3), groups=c)


class DiscriminatorBlock(nn.Module):
    """StyleGAN2 residual discriminator block.

    Main path: conv3 - leaky ReLU(0.2) - conv3 - leaky ReLU(0.2) [- Blur - stride-2 conv3];
    residual: a 1x1 conv (stride 2 when downsampling); the sum is scaled by 1/sqrt(2).
    """

    def __init__(self, in_channels: int, out_channels: int, downsample: bool) -> None:
        super().__init__()
        self.res = nn.Conv2d(in_channels, out_channels, 1, stride=2 if downsample else 1)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.down: nn.Module = (
            nn.Sequential(Blur2d(), nn.Conv2d(out_channels, out_channels, 3, padding=1, stride=2))
            if downsample
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block to ``(B, in_channels, H, W)`` (H, W even when downsampling)."""
        return (self.down(self.net(x)) + self.res(x)) / math.sqrt(2.0)
