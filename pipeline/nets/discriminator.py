"""Fluence-map discriminator (StyleGAN2-like) and the adversarial losses (paper eq. 15-17).

The discriminator scores one fluence map at a time: a ``(rows, cols)`` = ``(40, 40)`` map is
zero-padded (centred) to ``image_size`` = 64 and the control points of a plan are stacked on
the batch dimension. Residual downsampling blocks (StyleGAN2's discriminator block: a 1x1
residual conv, two 3x3 convs with leaky ReLU 0.2, blur + stride-2 3x3 conv) halve the
resolution ``log2(image_size) - 1`` times while the width doubles from ``base_channels`` up to
``max_channels``; a last block keeps the resolution, then a 3x3 conv, flatten and a linear
layer give one logit per map (no sigmoid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.errors import InputError
from pipeline.nets.blocks import DiscriminatorBlock


@dataclass(frozen=True)
class DiscriminatorConfig:
    """Sizes of a :class:`FluenceDiscriminator`.

    Parameters
    ----------
    image_size
        Side of the padded square input, a power of two >= 8 (64 in the paper).
    base_channels
        Width of the first block (64 in the paper).
    max_channels
        Width cap (512 in the paper).
    """

    image_size: int = 64
    base_channels: int = 64
    max_channels: int = 512

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ValueError(f"DiscriminatorConfig image_size must be a power of two >= 8, got {self.image_size}")
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError("DiscriminatorConfig needs 1 <= base_channels <= max_channels")

    @classmethod
    def paper(cls) -> DiscriminatorConfig:
        """The paper's size: 64 -> 512 channels on 64 x 64 inputs (about 22.7 M parameters)."""
        return cls()

    @classmethod
    def small(cls) -> DiscriminatorConfig:
        """A CPU size: 8 -> 64 channels on 64 x 64 inputs."""
        return cls(base_channels=8, max_channels=64)


class FluenceDiscriminator(nn.Module):
    """Score fluence maps ``(N, rows, cols)`` or ``(N, 1, rows, cols)``: one logit per map, ``(N,)``."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = config
        n_down = int(math.log2(config.image_size)) - 1
        widths = [min(config.base_channels * 2**i, config.max_channels) for i in range(n_down + 1)]
        ins = [1, *widths[:-1]]
        self.blocks = nn.Sequential(
            *(DiscriminatorBlock(a, b, downsample=i < n_down) for i, (a, b) in enumerate(zip(ins, widths)))
        )
        last = widths[-1]
        final_side = config.image_size // 2**n_down  # 2
        self.final_conv = nn.Conv2d(last, last, 3, padding=1)
        self.to_logit = nn.Linear(last * final_side * final_side, 1)

    def pad(self, maps: Tensor) -> Tensor:
        """Zero-pad maps ``(N, rows, cols)`` (or ``(N, 1, rows, cols)``) to ``(N, 1, S, S)``, centred."""
        if maps.ndim == 3:
            maps = maps[:, None]
        if maps.ndim != 4 or maps.shape[1] != 1:
            raise InputError(f"the discriminator expects (N, rows, cols) fluence maps, got {tuple(maps.shape)}")
        s = self.config.image_size
        rows, cols = int(maps.shape[2]), int(maps.shape[3])
        if rows > s or cols > s:
            raise InputError(f"fluence maps of {rows} x {cols} do not fit the discriminator's {s} x {s} input")
        top, left = (s - rows) // 2, (s - cols) // 2
        return F.pad(maps, (left, s - cols - left, top, s - rows - top))

    def forward(self, maps: Tensor) -> Tensor:
        """One real-vs-generated logit per map (positive = looks like a TPS-optimised map)."""
        x = self.blocks(self.pad(maps))
        x = self.final_conv(x)
        return self.to_logit(torch.flatten(x, 1)).squeeze(1)


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss (eq. 16): ``E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]``."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_hinge_loss(fake_logits: Tensor) -> Tensor:
    """Generator hinge loss (eq. 17): ``-E[D(G(z))]``."""
    return -fake_logits.mean()


def r1_penalty(d: nn.Module, real: Tensor, gamma: float) -> Tensor:
    """R1 gradient penalty on real samples (second term of eq. 15): ``gamma/2 E[||grad_x D(x)||^2]``.

    Parameters
    ----------
    d
        The discriminator.
    real
        Real (TPS) fluence maps ``(N, rows, cols)``; not modified.
    gamma
        Penalty weight (>= 0; the paper uses 0.0025).

    Returns
    -------
    Tensor
        Scalar penalty, differentiable with respect to the discriminator's parameters.
    """
    if gamma < 0:
        raise ValueError(f"r1_penalty gamma must be >= 0, got {gamma}")
    x = real.detach().requires_grad_(True)
    logits = d(x)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return 0.5 * gamma * grad.pow(2).flatten(1).sum(1).mean()
