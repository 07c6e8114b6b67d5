"""The project's exceptions (torch-free, shared by every package).

A message says what was wrong, with which input, and what to do about it; a job that
fails stores ``str(exc)`` for the physicist.
"""

from __future__ import annotations


class AirtError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(AirtError):
    """A configuration file or value is invalid."""


class InputError(AirtError):
    """The DICOM input (CT series, RT Structure Set) cannot be planned as it is."""


class PlanningError(AirtError):
    """The planning pipeline (optimizer, networks, dose engine) failed."""


class SequencingError(AirtError):
    """Fluence maps could not be turned into a deliverable leaf sequence."""


class ExportError(AirtError):
    """An RT Plan or RT Dose could not be written or read back."""
