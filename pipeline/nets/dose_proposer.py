"""DoseProposer: a 3D ResUNet that proposes a dose from the CT and the structures (paper eq. 1).

Architecture (paper Supplementary Note S1, Fig. S1): a 3x3x3 conv stem, residual blocks
(conv-IN-ReLU-conv-IN with a 1x1x1 conv + IN shortcut) separated by 3D max pooling
(kernel 3, stride 2, padding 1), a decoder of conv-IN-ReLU blocks with trilinear
upsampling and skip connections (concatenation), a 1x1x1 head and a Softplus so the
proposed dose is non-negative.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import Tensor, nn

from core.errors import InputError
from pipeline.nets.blocks import ConvBlock3d, ResBlock3d, crop_to, pad_to_multiple

#: CT window of the proposer's first input channel, HU (clipped, then rescaled to [0, 1]).
CT_WINDOW_HU: tuple[float, float] = (-900.0, 900.0)


@dataclass(frozen=True)
class DoseProposerConfig:
    """Sizes of a :class:`DoseProposer`.

    Parameters
    ----------
    in_channels
        Input channels (4: CT, body, PTV, bladder/rectum label map).
    stem_channels
        Width of the 3x3x3 stem conv.
    channels
        Output width of each residual block; a max pooling follows every block but the last,
        so there are ``len(channels) - 1`` downsamplings.
    decoder_convs
        conv-IN-ReLU blocks per decoder level (>= 1).
    """

    in_channels: int = 4
    stem_channels: int = 16
    channels: tuple[int, ...] = (64, 128, 256, 256)
    decoder_convs: int = 2

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or min(self.channels) < 1 or self.stem_channels < 1:
            raise ValueError(f"DoseProposerConfig needs >= 2 positive widths, got {self.channels}")
        if self.decoder_convs < 1 or self.in_channels < 1:
            raise ValueError("DoseProposerConfig decoder_convs and in_channels must be >= 1")

    @classmethod
    def paper(cls) -> DoseProposerConfig:
        """The paper's widths (4 -> 16 -> 64 -> 128 -> 256 -> 256; about 17 M parameters)."""
        return cls()

    @classmethod
    def small(cls) -> DoseProposerConfig:
        """A CPU size (~0.2 M parameters): about 0.2 s of CPU time on an 8 mm pelvis box, 0.8 s at 4 mm."""
        return cls(stem_channels=8, channels=(8, 16, 32, 32), decoder_convs=1)


class DoseProposer(nn.Module):
    """3D ResUNet mapping ``(B, 4, D, H, W)`` inputs to a ``(B, 1, D, H, W)`` non-negative dose.

    The output is in the units of the training targets (the model folder's ``normalisation``
    records which, e.g. Gy or fraction of the prescription). Any spatial size is accepted:
    the input is zero-padded to a multiple of ``2**(len(channels) - 1)`` and cropped back.
    """

    def __init__(self, config: DoseProposerConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        self.n_down = len(ch) - 1
        self.stem = nn.Conv3d(config.in_channels, config.stem_channels, 3, padding=1)
        widths_in = (config.stem_channels, *ch[:-1])
        self.enc = nn.ModuleList(ResBlock3d(a, b) for a, b in zip(widths_in, ch))
        self.pool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        self.dec = nn.ModuleList()
        deep = ch[-1]
        for level in range(self.n_down - 1, -1, -1):
            convs: list[nn.Module] = [ConvBlock3d(deep + ch[level], ch[level])]
            convs += [ConvBlock3d(ch[level], ch[level]) for _ in range(config.decoder_convs - 1)]
            self.dec.append(nn.Sequential(*convs))
            deep = ch[level]
        self.head = nn.Conv3d(ch[0], 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Propose a dose for ``x`` of shape ``(B, in_channels, D, H, W)`` (see :func:`proposer_inputs`)."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise InputError(
                f"DoseProposer expects (B, {self.config.in_channels}, D, H, W) inputs, got {tuple(x.shape)}"
            )
        x, spatial = pad_to_multiple(x, 2**self.n_down)
        x = self.stem(x)
        skips: list[Tensor] = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < self.n_down:
                skips.append(x)
                x = self.pool(x)
        for dec in self.dec:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return crop_to(F.softplus(self.head(x)), spatial)


def proposer_inputs(
    ct_hu: ArrayLike,
    body: ArrayLike,
    ptv: ArrayLike,
    bladder: ArrayLike | None,
    rectum: ArrayLike | None,
) -> Tensor:
    """Build the DoseProposer's 4 input channels from a CT and its masks (paper Note S1).

    Parameters
    ----------
    ct_hu
        CT in HU, ``(nz, ny, nx)``; clipped to [-900, 900] HU and rescaled to [0, 1].
    body, ptv
        Boolean masks of the same shape.
    bladder, rectum
        Boolean masks of the same shape, or ``None`` when the case has no such structure.

    Returns
    -------
    Tensor
        float32 ``(4, nz, ny, nx)``: CT in [0, 1], body {0, 1}, PTV {0, 1} and the OAR label
        map (0 none, 1 bladder, 2 rectum, 3 both).
    """
    ct = np.asarray(ct_hu, dtype=np.float32)
    if ct.ndim != 3:
        raise InputError(f"proposer_inputs needs a 3D CT (nz, ny, nx), got shape {ct.shape}")
    lo, hi = CT_WINDOW_HU
    channels = [(np.clip(ct, lo, hi) - lo) / (hi - lo)]
    labels = np.zeros(ct.shape, dtype=np.float32)
    for name, mask, value in (("body", body, None), ("ptv", ptv, None), ("bladder", bladder, 1.0),
                              ("rectum", rectum, 2.0)):
        if mask is None:
            if value is None:
                raise InputError(f"proposer_inputs needs a {name} mask")
            continue
        m = np.asarray(mask).astype(bool)
        if m.shape != ct.shape:
            raise InputError(f"{name} mask shape {m.shape} does not match the CT shape {ct.shape}")
        if value is None:
            channels.append(m.astype(np.float32))
        else:
            labels += value * m
    channels.append(labels)
    return torch.from_numpy(np.stack(channels).astype(np.float32))
