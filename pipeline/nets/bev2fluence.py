"""Bev2Fluence: BEV dose stack -> fluence maps, and the fluence correction network (paper eq. 3, 14).

A 3D MedNeXt encoder-decoder (:class:`pipeline.nets.blocks.MedNeXtUNet`) over the stack of
control-point BEV images treated as one volume ``(n_cp, rows, cols)`` = ``(180, 40, 40)``:
the control-point axis is the depth axis, so neighbouring control points share features
(the coupling that VMAT delivery and dose accumulation impose). A 1x1x1 stem maps the input
channels to ``channels[0]``, a 1x1x1 head maps back to one channel, and ``abs`` makes the
fluence non-negative (the dose module never sees negative fluence).

The same class is the fluence correction network with ``in_channels=2``: channel 0 is the
initial fluence ``F0``, channel 1 the BEV projection of the dose error ``B_err``.
The fluence-map convention (row = leaf-pair axis y, column = leaf-travel axis x) is the one of
:mod:`core.machine`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from core.errors import InputError
from pipeline.nets.blocks import MedNeXtUNet


@dataclass(frozen=True)
class Bev2FluenceConfig:
    """Sizes of a :class:`Bev2Fluence` network.

    Parameters
    ----------
    in_channels
        1 for Bev2Fluence (BEV dose), 2 for the correction network (F0, B_err).
    channels
        Widths per resolution level, the last being the bottleneck (``len - 1`` downsamplings).
    blocks
        MedNeXt blocks per stage, ``2 * (len(channels) - 1) + 1`` entries.
    expansion
        Expansion ratio per stage, same length as ``blocks``.
    kernel_size
        Odd depthwise kernel size.
    """

    in_channels: int = 1
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024)
    blocks: tuple[int, ...] = (2, 2, 2, 2, 2, 2, 2, 2, 2)
    expansion: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4, 4, 4)
    kernel_size: int = 3

    def __post_init__(self) -> None:
        n = 2 * (len(self.channels) - 1) + 1
        if len(self.channels) < 2 or len(self.blocks) != n or len(self.expansion) != n:
            raise ValueError(
                f"Bev2FluenceConfig: {len(self.channels)} widths need {n} blocks and expansion entries, "
                f"got {len(self.blocks)} and {len(self.expansion)}"
            )
        if self.in_channels < 1 or min(self.channels) < 1 or min(self.expansion) < 1:
            raise ValueError("Bev2FluenceConfig: in_channels, channels and expansion must be >= 1")

    @classmethod
    def paper(cls, in_channels: int = 1) -> Bev2FluenceConfig:
        """The paper's widths: 64 -> 128 -> 256 -> 512, bottleneck 1024, expansion 4 (~40.8 M)."""
        return cls(in_channels=in_channels)

    @classmethod
    def small(cls, in_channels: int = 1) -> Bev2FluenceConfig:
        """A CPU size for 2 cores: 8 -> 16 -> 32, bottleneck 64, one block per stage, expansion 2."""
        return cls(
            in_channels=in_channels,
            channels=(8, 16, 32, 64),
            blocks=(1, 1, 1, 1, 1, 1, 1),
            expansion=(2, 2, 2, 2, 2, 2, 2),
        )


class Bev2Fluence(nn.Module):
    """Map ``(B, in_channels, n_cp, rows, cols)`` BEV stacks to ``(B, 1, n_cp, rows, cols)`` fluence.

    The output is non-negative (``abs``), in the fluence units of the training targets (MU per
    pixel unless the model folder's ``normalisation`` says otherwise). Any stack size works:
    it is zero-padded to a multiple of ``2**(len(channels) - 1)`` and cropped back.
    """

    def __init__(self, config: Bev2FluenceConfig) -> None:
        super().__init__()
        self.config = config
        self.unet = MedNeXtUNet(
            config.in_channels, 1, config.channels, config.blocks, config.expansion, config.kernel_size
        )

    def forward(self, x: Tensor) -> Tensor:
        """Predict fluence maps from a BEV stack (see the class docstring for shapes)."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"Bev2Fluence expects (B, {self.config.in_channels}, n_cp, rows, cols), got {tuple(x.shape)}"
            )
        return self.unet(x).abs()
