"""DICOM UIDs: validation of the UIDs received (a UID becomes part of a file path only after it
passed :func:`check_uid`), of the UIDs written (:func:`check_written_uid`), and new UIDs
(:func:`new_uid`)."""

from __future__ import annotations

import re

from pydicom.uid import generate_uid

from core.errors import ExportError, InputError

UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
"""A DICOM UID (PS3.5 9.1): dot-separated numeric components without leading zeros."""

LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
"""Digits and single dots only. Some devices write components with leading zeros; such UIDs are
accepted (they are still harmless as file names) but :func:`is_strict_uid` tells them apart."""

MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a string of digits and single dots, 1-64 characters, no empty part."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and bool(LENIENT_UID_RE.fullmatch(value))


def is_strict_uid(value: object) -> bool:
    """True when ``value`` is a UID exactly as PS3.5 9.1 defines it (no leading zeros)."""
    return is_valid_uid(value) and bool(UID_RE.fullmatch(str(value)))


def new_uid() -> str:
    """A new globally unique UID under the UUID-derived root ``2.25`` (no registered root needed)."""
    return str(generate_uid(prefix=None))


def check_uid(value: object, what: str) -> str:
    """Return ``value`` if it is a valid UID (see :func:`is_valid_uid`), else raise.

    Parameters
    ----------
    value
        The candidate UID (any type: values come from untrusted datasets).
    what
        The attribute it came from, for the message (e.g. ``"SOPInstanceUID"``).

    Raises
    ------
    InputError
        Naming the attribute and the offending value (shortened to 80 characters).
    """
    if not is_valid_uid(value):
        raise InputError(f"{what} {_shown(value)} is not a valid DICOM UID (digits and dots, at most "
                         f"{MAX_UID_LENGTH} characters); fix the sending system's UID generation")
    return str(value)


def check_written_uid(value: object, what: str) -> str:
    """Return ``value`` if it is a UID exactly as PS3.5 9.1 defines it (:func:`is_strict_uid`), for UIDs
    this node writes; else raise :class:`~core.errors.ExportError` naming it."""
    if not is_strict_uid(value):
        raise ExportError(f"{what} {_shown(value)} is not a valid DICOM UID (digits and dots, at most "
                          f"{MAX_UID_LENGTH} characters, no leading zeros); pass a UID made by "
                          "appliance.dicom.uids.new_uid or leave it unset")
    return str(value)


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."
