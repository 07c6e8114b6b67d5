"""DICOM input: the CT series and RT Structure Set of a :class:`~core.request.CaseRequest` become a
planning :class:`Case`.

:func:`load_case` reads exactly the files a request names (the node's scheduler chose them) and
checks they are what it says; :func:`request_from_folder` makes a request from a folder (``airt
plan``) by the same choice rule, and :func:`load_folder` does both. The CT volume is built in
Hounsfield units on the canonical grid of :mod:`core.case` (indices increasing along +x, +y, +z of
the DICOM patient coordinate system), and the closed planar contours of every ROI whose name maps
to a planning role are rasterised onto that grid.

Everything the planner cannot trust is refused with an :class:`~core.errors.InputError`
whose message says what was wrong, with which UID, ROI or file, and what to do: a folder with
no CT or no RT Structure Set, several CT series with no way to choose, missing slices, uneven
slice spacing, gantry tilt or a non-axial orientation, slices that disagree on rows, columns or
pixel spacing, pixel data of the wrong size, an RT Structure Set in another frame of reference,
no PTV, or an empty PTV.

This module scans a folder or reads a request's files, checks the structure set's image
references and puts the case together; the parts live beside it: the CT
series' geometry and volume in :mod:`appliance.dicom.ct` (pixel decoding in
:mod:`appliance.dicom.ct_pixels`), the structure set's references and contour points in
:mod:`appliance.dicom.rtstruct`, the role masks in :mod:`appliance.dicom.structures` and the
polygon filling in :mod:`appliance.dicom.rasterise`.

pydicom is used directly rather than highdicom's volume support: the loader needs the exact
refusals above (with the project's messages) and the one canonical flip of
:mod:`core.case`, and ``ContourData`` is parsed from the raw element bytes, which is 20x
faster than pydicom's per-value ``DSfloat`` conversion on large structure sets.

Patient names are never read into messages or logs; UIDs and file names are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, RTStructureSetStorage

from appliance.config import StructureSettings
from appliance.dicom.common import DicomFile
from appliance.dicom.ct import ct_geometry, patient_position, read_ct_volume
from appliance.dicom.rtstruct import rtstruct_frames, rtstruct_image_refs, rtstruct_series_and_images
from appliance.dicom.structures import structure_masks
from core.case import Case, DicomRefs, Prescription
from core.errors import InputError
from core.request import CaseRequest, SeriesSeen, StructureSetSeen, choose_ct_series

logger = logging.getLogger(__name__)


def request_from_folder(folder: Path, *, case_id: str | None = None) -> CaseRequest:
    """Choose the RT Structure Set and the CT series to plan from a folder of DICOM files.

    The node's scheduler makes this choice over the instances it stored; this is the same rule
    (:func:`core.request.choose_ct_series`) for a folder (``airt plan``, benchmarks, teacher data).
    Among several RT Structure Sets the most recent one (StructureSetDate/Time) on a CT series'
    frame of reference is planned.

    Parameters
    ----------
    folder
        Folder searched recursively; files that are not DICOM are ignored (debug log).
    case_id
        Identifier of the case; None: the sanitised StudyInstanceUID of the CT.

    Returns
    -------
    CaseRequest
        The chosen files and their UIDs.

    Raises
    ------
    InputError
        No CT, no RT Structure Set, or no way to choose; the message says what to send.
    """
    request, _, _ = _choose_in_folder(Path(folder), case_id)
    return request


def load_folder(folder: Path, *, structures: StructureSettings, prescription: Prescription,
                case_id: str | None = None) -> Case:
    """:func:`request_from_folder`, then :func:`load_case` on the files it chose (headers read once)."""
    request, cts, rtstruct = _choose_in_folder(Path(folder), case_id)
    return _load_chosen(request, cts, rtstruct, structures, prescription)


def load_case(
    request: CaseRequest,
    *,
    structures: StructureSettings,
    prescription: Prescription,
) -> Case:
    """Build a planning case from the CT series and RT Structure Set a :class:`CaseRequest` names.

    Nothing is chosen here: every file of the request is read and must be what the request says (a CT
    image of its CT series, its RT Structure Set), or the case is refused.

    Parameters
    ----------
    request
        The files and UIDs chosen by the scheduler (or :func:`request_from_folder`).
    structures
        ROI name -> role mapping (``[structures]`` of the configuration). Only ROIs that map to a
        role are rasterised; several ROIs of one role: the largest (in voxels) is kept.
    prescription
        Dose prescribed to the PTV, copied into the case.

    Returns
    -------
    Case
        CT in HU (float32, ``[z, y, x]``, canonical LPS-increasing grid), boolean masks by role,
        the original ROI names, patient position, prescription and the source UIDs.

    Raises
    ------
    InputError
        When the files cannot be planned as they are; the message names the file, UID or ROI and
        says what to do.
    """
    rtstruct = _read_named(request.rtstruct_file, RTStructureSetStorage, "RT Structure Set")
    if rtstruct.sop_uid != request.rtstruct_uid:
        raise InputError(
            f"{request.rtstruct_file.name} holds RT Structure Set {rtstruct.sop_uid}, not {request.rtstruct_uid} "
            "that this case was scheduled on; the stored files changed: send the study again"
        )
    cts = [_read_named(p, CTImageStorage, "CT image") for p in request.ct_files]
    other = sorted({str(c.ds.get("SeriesInstanceUID", "")) for c in cts} - {request.ct_series_uid})
    if other:
        raise InputError(
            f"the CT files of this case belong to series {other}, not only to {request.ct_series_uid} that it was "
            "scheduled on; the stored files changed: send the study again"
        )
    return _load_chosen(request, cts, rtstruct, structures, prescription)


def _read_named(path: Path, sop_class: str, what: str) -> DicomFile:
    """A file a request names, read without pixel data; it must exist and be of ``sop_class``."""
    ds = _read_header(path) if path.is_file() else None
    if ds is None:
        raise InputError(f"{what} file {path} of this case is missing or not DICOM; send the study again")
    found = str(ds.get("SOPClassUID", ""))
    if found != sop_class:
        raise InputError(f"{path.name} should be a {what} but its SOP class is {found}; send the study again")
    return DicomFile(path, ds)


def _choose_in_folder(folder: Path, case_id: str | None) -> tuple[CaseRequest, list[DicomFile], DicomFile]:
    if not folder.is_dir():
        raise InputError(
            f"case folder {folder} does not exist or is not a folder; pass a folder of DICOM files"
        )
    cts, rtstructs = _scan_folder(folder)
    if not cts:
        raise InputError(
            f"no CT image (CT Image Storage, single-frame) found under {folder}; "
            "send the planning CT series together with the RT Structure Set"
        )
    if not rtstructs:
        raise InputError(
            f"no RT Structure Set found under {folder} (CT series: {sorted(cts)}); "
            "send the RT Structure Set that contours the planning CT"
        )
    rtstruct = _choose_rtstruct(rtstructs, cts)
    series_uid = _choose_ct_series(cts, rtstruct, folder)
    slices = cts[series_uid]
    request = CaseRequest(
        study_uid=str(slices[0].ds.get("StudyInstanceUID", "")), ct_series_uid=series_uid,
        rtstruct_uid=rtstruct.sop_uid, ct_files=tuple(i.path for i in slices), rtstruct_file=rtstruct.path,
        case_id=case_id)
    return request, slices, rtstruct


def _load_chosen(request: CaseRequest, slices: list[DicomFile], rtstruct: DicomFile,
                 structures: StructureSettings, prescription: Prescription) -> Case:
    series_uid = request.ct_series_uid
    _check_referenced_images(rtstruct, series_uid, slices)
    geometry = ct_geometry(series_uid, slices)
    ct_hu = read_ct_volume(geometry)
    ct_for = str(geometry.slices[0].ds.FrameOfReferenceUID)
    masks, names = structure_masks(rtstruct, ct_for, geometry, structures)

    first = geometry.slices[0].ds
    study_uid = str(first.get("StudyInstanceUID", ""))
    if not study_uid:
        raise InputError(f"CT series {series_uid} has no StudyInstanceUID; the CT files are not valid DICOM")
    rs_study = str(rtstruct.ds.get("StudyInstanceUID", ""))
    if rs_study and rs_study != study_uid:
        logger.warning(
            "RT Structure Set %s belongs to study %s, the CT to study %s; using the CT's study",
            rtstruct.sop_uid, rs_study, study_uid,
        )
    refs = DicomRefs(
        study_instance_uid=study_uid,
        frame_of_reference_uid=ct_for,
        ct_series_instance_uid=series_uid,
        rtstruct_sop_instance_uid=rtstruct.sop_uid,
        source_ct_path=str(geometry.slices[0].path),
        rtstruct_path=str(rtstruct.path),
        image_orientation=geometry.iop,
    )
    cid = sanitise_case_id(request.case_id if request.case_id is not None else study_uid)
    case = Case(
        case_id=cid,
        ct_hu=ct_hu,
        grid=geometry.grid,
        masks=masks,
        structure_names=names,
        patient_position=patient_position(geometry),
        prescription=prescription,
        dicom=refs,
    )
    logger.info(
        "case %s loaded: CT series %s (%d slices, grid %s, spacing %s mm), RT Structure Set %s, roles %s",
        cid, series_uid, len(geometry.slices), geometry.grid.shape,
        tuple(round(s, 4) for s in geometry.grid.spacing_mm), rtstruct.sop_uid,
        sorted(r.value for r in masks),
    )
    return case


def sanitise_case_id(text: str) -> str:
    """A case identifier safe for file names and logs.

    Parameters
    ----------
    text
        Usually a StudyInstanceUID (digits and dots, at most 64 characters).

    Returns
    -------
    str
        ``text`` with every character outside ``[A-Za-z0-9._-]`` replaced by ``_``, leading dots
        removed, at most 64 characters; ``"case"`` when nothing is left.
    """
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text.strip()).lstrip(".")[:64]
    return cleaned or "case"


def _read_header(path: Path) -> Dataset | None:
    """The dataset of a DICOM file without pixel data, or None when the file is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        pass
    except Exception as exc:  # a truncated or corrupt file must not stop the whole folder
        logger.warning("ignoring %s: not readable as DICOM (%s: %s)", path, type(exc).__name__, exc)
        return None
    # No 128-byte preamble: accept a raw dataset that starts with a group 0x0008 element.
    try:
        with path.open("rb") as fh:
            head = fh.read(2)
        if head != b"\x08\x00":
            return None
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return ds if "SOPClassUID" in ds else None
    except Exception as exc:
        logger.debug("ignoring %s: not DICOM (%s)", path, exc)
        return None


def _scan_folder(folder: Path) -> tuple[dict[str, list[DicomFile]], list[DicomFile]]:
    """CT instances grouped by SeriesInstanceUID, and the RT Structure Sets, found under a folder."""
    cts: dict[str, list[DicomFile]] = {}
    rtstructs: list[DicomFile] = []
    seen: set[str] = set()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = _read_header(path)
        if ds is None:
            logger.debug("ignoring %s: not a DICOM file", path)
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        inst = DicomFile(path, ds)
        if inst.sop_uid and inst.sop_uid in seen:
            logger.debug("ignoring %s: duplicate of SOP instance %s", path, inst.sop_uid)
            continue
        seen.add(inst.sop_uid)
        if sop_class == CTImageStorage:
            cts.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(inst)
        elif sop_class == RTStructureSetStorage:
            rtstructs.append(inst)
        elif sop_class == EnhancedCTImageStorage:
            logger.warning(
                "ignoring %s (SOP instance %s): Enhanced CT (multi-frame) is not supported; "
                "export the CT as classic single-frame CT Image Storage", path, inst.sop_uid,
            )
        else:
            logger.debug("ignoring %s: SOP class %s is neither CT nor RT Structure Set", path, sop_class)
    return cts, rtstructs


# ---------------------------------------------------------------------------------------------
# Choosing the RT Structure Set and the CT series


def _series_frame(instances: Sequence[DicomFile]) -> str:
    return str(instances[0].ds.get("FrameOfReferenceUID", ""))


def _choose_rtstruct(rtstructs: list[DicomFile], cts: dict[str, list[DicomFile]]) -> DicomFile:
    """The RT Structure Set to plan on: the most recent one whose frame matches a CT series."""
    if len(rtstructs) == 1:
        return rtstructs[0]
    ct_frames = {_series_frame(v) for v in cts.values()}
    matching = [r for r in rtstructs if rtstruct_frames(r.ds) & ct_frames] or rtstructs

    def stamp(r: DicomFile) -> str:
        d = r.ds
        return (
            f"{d.get('StructureSetDate', '') or d.get('InstanceCreationDate', '')}"
            f"{d.get('StructureSetTime', '') or d.get('InstanceCreationTime', '')}"
        )

    ranked = sorted(matching, key=stamp, reverse=True)
    if len(ranked) > 1 and stamp(ranked[0]) == stamp(ranked[1]):
        raise InputError(
            f"several RT Structure Sets ({sorted(r.sop_uid for r in matching)}) fit the CT and none is "
            "more recent (StructureSetDate/Time); send only the structure set to plan on"
        )
    logger.info(
        "%d RT Structure Sets received; using the most recent, %s", len(rtstructs), ranked[0].sop_uid
    )
    return ranked[0]


def _choose_ct_series(cts: dict[str, list[DicomFile]], rtstruct: DicomFile, folder: Path) -> str:
    """The SeriesInstanceUID of the CT series the RT Structure Set contours (:func:`core.request.choose_ct_series`)."""
    frames = rtstruct_frames(rtstruct.ds)
    if not frames:
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} ({rtstruct.path.name}) names no frame of reference "
            "(ReferencedFrameOfReferenceSequence is empty); export it again from the contouring system"
        )
    series_refs, image_refs = rtstruct_series_and_images(rtstruct.ds)
    seen = [SeriesSeen(uid, _series_frame(inst), frozenset(i.sop_uid for i in inst)) for uid, inst in cts.items()]
    chosen = choose_ct_series(StructureSetSeen(rtstruct.sop_uid, frozenset(frames), frozenset(series_refs)),
                              seen, lambda: image_refs, f"folder {folder}")
    if chosen is None:
        found = ", ".join(f"{uid} (frame {_series_frame(inst)})" for uid, inst in sorted(cts.items()))
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} is in frame of reference {sorted(frames)}, which does not "
            f"match the frame of reference of any CT series received: {found}; send the CT series the "
            "structures were drawn on"
        )
    return chosen.series_uid


def _check_referenced_images(rtstruct: DicomFile, series_uid: str, slices: Sequence[DicomFile]) -> None:
    """Every CT image the structure set's contours reference is in the chosen series: a truncated
    series (slices not received) or a structure set drawn on other images is not planned."""
    refs = rtstruct_image_refs(rtstruct.ds)
    if not refs:
        return  # ContourImageSequence is optional; the frame of reference was checked
    present = {i.sop_uid for i in slices}
    missing = sorted(refs - present)
    if not missing:
        return
    if len(missing) == len(refs):
        raise InputError(
            f"RT Structure Set {rtstruct.sop_uid} references {len(refs)} CT images and none of them is in CT "
            f"series {series_uid} ({len(slices)} images); the structures were drawn on other images: send the "
            "CT series they were drawn on"
        )
    raise InputError(
        f"RT Structure Set {rtstruct.sop_uid} references {len(refs)} CT images of which {len(missing)} were not "
        f"received (e.g. {missing[0]}); CT series {series_uid} has {len(slices)} images. The CT is incomplete: "
        "send the whole planning CT series, then the job is planned again (or airt jobs retry)"
    )
