"""What to plan: the CT series and the RT Structure Set chosen for a case, as one value.

The choice is made once, where the instances are known: by the node's scheduler over the stored
instances (:func:`appliance.scheduler.decide`), or by :func:`appliance.dicom.case_loader.request_from_folder`
over a folder's headers for ``airt plan``. Both apply :func:`choose_ct_series` to the same
description of what was received; the loader then reads exactly the files the
:class:`CaseRequest` names and checks they are what it says, and never chooses again.

The rule (:func:`choose_ct_series`), for one RT Structure Set: the CT series on one of its frames of
reference; among several, the one it names (RTReferencedSeriesSequence), else the one holding the
images its contours reference (ContourImageSequence). Several candidates and nothing to tell them
apart (a CBCT or a second reconstruction of the same scan) is refused: the structures are never
planned on a CT they may not have been drawn on.

Torch-free, no pydicom: plain values, picklable into a planning process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError


@dataclass(frozen=True)
class CaseRequest:
    """One case to plan: the files of one CT series and of one RT Structure Set, with their UIDs.

    Parameters
    ----------
    study_uid
        StudyInstanceUID of the CT series.
    ct_series_uid
        SeriesInstanceUID of the CT series to plan on.
    rtstruct_uid
        SOPInstanceUID of the RT Structure Set to plan.
    ct_files
        Every file of that CT series (one image each).
    rtstruct_file
        The RT Structure Set's file.
    called_aets, calling_aets
        The AE titles the study came by (they may choose its protocol profile); empty for a folder.
    case_id
        Identifier of the case for logs and file names; None: the sanitised StudyInstanceUID.
    """

    study_uid: str
    ct_series_uid: str
    rtstruct_uid: str
    ct_files: tuple[Path, ...]
    rtstruct_file: Path
    called_aets: tuple[str, ...] = ()
    calling_aets: tuple[str, ...] = ()
    case_id: str | None = None

    def __post_init__(self) -> None:
        if not self.ct_files:
            raise InputError(f"the request for CT series {self.ct_series_uid} names no CT file; "
                             "send the planning CT series with the structure set")


@dataclass(frozen=True)
class SeriesSeen:
    """A received CT series, as the choice needs it."""

    series_uid: str
    frame_of_reference_uid: str
    image_uids: frozenset[str]


@dataclass(frozen=True)
class StructureSetSeen:
    """A received RT Structure Set, as the choice needs it."""

    sop_uid: str
    frame_of_reference_uids: frozenset[str]
    referenced_series_uids: frozenset[str]


def choose_ct_series(rtstruct: StructureSetSeen, series: Sequence[SeriesSeen],
                     image_refs: Callable[[], set[str]], where: str) -> SeriesSeen | None:
    """The CT series an RT Structure Set was drawn on (the rule of the module docstring).

    Parameters
    ----------
    rtstruct
        The structure set.
    series
        The CT series received with it.
    image_refs
        The SOP Instance UIDs its contours and series list reference; called only when several
        series share its frame of reference (reading them may cost a file read).
    where
        What holds the instances, for the message (e.g. ``"study 1.2.3"``).

    Returns
    -------
    SeriesSeen or None
        The series; None when no series is on the structure set's frames of reference.

    Raises
    ------
    InputError
        Several series on its frame of reference and neither its series nor its image references
        pick one.
    """
    candidates = [s for s in series if s.frame_of_reference_uid in rtstruct.frame_of_reference_uids]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    named = [s for s in candidates if s.series_uid in rtstruct.referenced_series_uids]
    if len(named) == 1:
        return named[0]
    refs = image_refs()
    by_image = [s for s in candidates if s.image_uids & refs]
    if len(by_image) == 1:
        return by_image[0]
    listed = ", ".join(f"{s.series_uid} ({len(s.image_uids)} images)" for s in candidates)
    raise InputError(
        f"{where}: {len(candidates)} CT series share the Frame of Reference of RT Structure "
        f"Set {rtstruct.sop_uid} ({listed}) and its references "
        + ("point into several of them" if by_image else "name none of them")
        + "; the structures are not planned on a CT they may not have been drawn on. Send only the planning "
        "CT series with the structure set")
