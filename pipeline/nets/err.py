"""Err: the parameter-free dose error module of the pipeline (paper eq. 5-12).

A thin :class:`torch.nn.Module` around :func:`pipeline.objectives.err_map` (the closed-form
gradient of the PTV hot/cold objective plus the optional OAR suppression terms), so that the
pipeline is a chain of modules and the two Err instances of training (inside the pipeline and
in the dose-error loss) share one implementation.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from core.errors import InputError
from pipeline.objectives import err_map


class ErrModule(nn.Module):
    """Dose error map ``E = E_PTV + sum_o E_o`` (Gy), differentiable in the dose.

    Parameters
    ----------
    lambda_plus, lambda_minus
        Overdose and underdose weights of the PTV term, > 0 (the paper: ``lambda_plus > lambda_minus``).
    """

    def __init__(self, lambda_plus: float, lambda_minus: float) -> None:
        super().__init__()
        if not (lambda_plus > 0 and lambda_minus > 0):
            raise InputError(f"Err weights must be > 0, got lambda+={lambda_plus}, lambda-={lambda_minus}")
        self.lambda_plus = float(lambda_plus)
        self.lambda_minus = float(lambda_minus)

    def forward(
        self,
        dose: Tensor,
        masks: Mapping[str, Tensor],
        rx: float | Tensor,
        sparing: Mapping[str, float] | None = None,
        dose0: Tensor | None = None,
    ) -> Tensor:
        """Error map of ``dose`` (any shape the masks broadcast to, e.g. ``(B, 1, nz, ny, nx)``).

        ``masks`` by role value (``"ptv"`` required), ``rx`` the prescription (same dose units),
        ``sparing`` the suppression factor ``s_o`` in [0, 1) per OAR role value, ``dose0`` the
        baseline dose of eq. 9 (``None``: ``dose`` itself).
        """
        return err_map(dose, masks, rx, self.lambda_plus, self.lambda_minus, sparing, dose0)

    def extra_repr(self) -> str:
        """Shown by ``print(module)``."""
        return f"lambda_plus={self.lambda_plus}, lambda_minus={self.lambda_minus}"
