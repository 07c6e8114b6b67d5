"""C-STORE as the node answers it: the statuses, the SOP classes and transfer syntaxes it stores,
and the check of a received instance's header (:func:`parse_header`), which refuses with the
status to answer (:class:`StoreRefusedError`). The Storage SCP (:mod:`appliance.scp`) and the
service's start-up re-check of stored files use them.

C-STORE statuses the node answers
---------------------------------
========  ====================================================================================
0x0000    Success: the file is on disk (fsynced, renamed) and its row committed; also for an
          exact duplicate (same SOP Instance UID, same bytes).
0xA700    Out of resources: free disk below ``storage.min_free_disk_mb``, or the disk filled up
          while the file was written (nothing of it remains).
0xA701    Out of resources: the dataset is larger than ``node.max_dataset_bytes``.
0xA900    Dataset does not match SOP class: SOP Class/Instance UID in the dataset differ from
          the C-STORE request.
0xC210    Cannot understand: the dataset cannot be parsed, or required attributes are missing.
0xC211    Cannot understand: a UID (study, series, SOP instance, frame of reference) is not a
          valid UID; nothing is written (UIDs become file names only after validation).
0xC212    Refused: an instance with this SOP Instance UID but different content is already
          stored. The first version is kept and a ``node_events`` row records the conflict.
          (A failure, not a warning: a warning would tell the sender the data was stored.)
0xC213    Processing failure: the node could not write the file or the row (see its log).
0xC214    Refused: a lossy-compressed CT image (JPEG Baseline/Extended, JPEG-LS near-lossless,
          lossy JPEG 2000, or LossyImageCompression = 01); a ``node_events`` row lets the
          study's job say why its CT is missing.
========  ====================================================================================

Every failure status carries an ErrorComment (64 characters) saying why. CT images are accepted
uncompressed and losslessly compressed (JPEG Lossless, JPEG-LS lossless, JPEG 2000 lossless, RLE);
they are stored as sent and decoded when the case is loaded.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage  # type: ignore[attr-defined]

from appliance.dicom.ct_pixels import LOSSLESS_SYNTAXES, LOSSY_SYNTAXES, lossy_reason
from appliance.dicom.uids import check_uid
from core.errors import AirtError, InputError
from storage.instances import InstanceHeader

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_TOO_LARGE = 0xA701
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_INVALID_UID = 0xC211
STATUS_CONFLICT = 0xC212
STATUS_PROCESSING_FAILURE = 0xC213
STATUS_LOSSY_REFUSED = 0xC214

TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
"""Transfer syntaxes accepted for storage (listed explicitly, not 'everything pydicom knows')."""
CT_TRANSFER_SYNTAXES = [*TRANSFER_SYNTAXES, *LOSSLESS_SYNTAXES, *LOSSY_SYNTAXES]
"""A CT is also accepted losslessly compressed (decoded at planning, same HU), and lossy-compressed
syntaxes are accepted in negotiation so that each such image is refused with the reason (0xC214 and
an ErrorComment the sender shows, a node event the job's failure reason repeats) instead of a
silent 'no presentation context'."""

STORAGE_SOP_CLASSES = {str(CTImageStorage): "CT", str(RTStructureSetStorage): "RTSTRUCT"}
"""SOP classes accepted for storage -> the modality the node files them under."""


class StoreRefusedError(AirtError):
    """An instance was refused; ``status`` is the C-STORE status to answer. With ``study_uid`` the
    refusal is also a ``node_events`` row, so that the study's job can say why an image is missing."""

    def __init__(self, status: int, message: str, study_uid: str | None = None, comment: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.study_uid = study_uid
        self.comment = comment or message
        """The ErrorComment answered (64 characters): the reason first."""


def failure_response(status: int, comment: str) -> Dataset:
    """A C-STORE failure response: the status and an ErrorComment (LO, 64 characters) the sender shows."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = "".join(c if c.isprintable() and c != "\\" else " " for c in comment)[:64]
    return rsp


def _first(ds: Dataset, *path: str) -> Any:
    """Follow ``Seq, Seq, ..., Attribute`` through the first item of each sequence (None if absent)."""
    cur: Any = ds
    for name in path[:-1]:
        seq = getattr(cur, name, None)
        if not seq:
            return None
        cur = seq[0]
    return getattr(cur, path[-1], None)


def parse_header(source: Path | bytes | BinaryIO, *, expected_class: str, expected_uid: str) -> InstanceHeader:
    """Parse and validate the header of a received instance (DICOM file format, with file meta).

    Parameters
    ----------
    source
        A file path, the encoded bytes or a seekable binary file (preamble, file meta, dataset).
    expected_class, expected_uid
        AffectedSOPClassUID and AffectedSOPInstanceUID of the C-STORE request.

    Raises
    ------
    StoreRefusedError
        With the status to answer (0xC210, 0xC211 or 0xA900) and a message naming the attribute.
    """
    try:
        fp: Any = io.BytesIO(source) if isinstance(source, bytes) else source
        ds = dcmread(fp, stop_before_pixels=True)
        ts = str(ds.file_meta.TransferSyntaxUID)
        sop_class = str(ds.SOPClassUID)
        sop_uid = ds.SOPInstanceUID
        study_uid, series_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID
        modality = STORAGE_SOP_CLASSES.get(sop_class)
        lossy = None
        if modality == "CT":
            for_uid = ds.FrameOfReferenceUID
            ref_series = None
            lossy = lossy_reason(ts, ds.get("LossyImageCompression"))
        else:
            for_uid = _first(ds, "ReferencedFrameOfReferenceSequence", "FrameOfReferenceUID")
            if for_uid is None:  # the sequence is Type 3; every ROI names its frame (Type 1)
                for_uid = _first(ds, "StructureSetROISequence", "ReferencedFrameOfReferenceUID")
            ref_series = _first(ds, "ReferencedFrameOfReferenceSequence", "RTReferencedStudySequence",
                                "RTReferencedSeriesSequence", "SeriesInstanceUID")
    except Exception as exc:  # corrupt input makes pydicom raise many types (struct.error, ...: fuzzing)
        raise StoreRefusedError(STATUS_CANNOT_UNDERSTAND,
                           f"instance {expected_uid}: cannot parse the dataset: {exc}") from exc
    if sop_class != expected_class or str(sop_uid) != expected_uid:
        raise StoreRefusedError(STATUS_DATASET_MISMATCH,
                           f"dataset SOP Class/Instance UID {sop_class}/{sop_uid} differ from the C-STORE "
                           f"request's {expected_class}/{expected_uid}")
    if modality is None:
        raise StoreRefusedError(STATUS_DATASET_MISMATCH, f"SOP class {sop_class} is not stored by this node")
    if lossy is not None:
        raise StoreRefusedError(
            STATUS_LOSSY_REFUSED, f"CT image {sop_uid} refused: {lossy}; lossy-compressed CT is not planned "
            "on (its values are not the scanner's HU). Send the original or a lossless copy",
            study_uid=str(study_uid), comment=f"lossy CT refused ({lossy.split(' (')[0].split(' is ')[-1]}); send lossless")
    try:
        hdr = InstanceHeader(
            study_uid=check_uid(study_uid, "StudyInstanceUID"),
            series_uid=check_uid(series_uid, "SeriesInstanceUID"),
            sop_instance_uid=check_uid(sop_uid, "SOPInstanceUID"),
            sop_class_uid=sop_class,
            modality=modality,
            transfer_syntax_uid=check_uid(ts, "TransferSyntaxUID"),
            frame_of_reference_uid=None if for_uid is None else check_uid(for_uid, "FrameOfReferenceUID"),
            referenced_series_uid=None if ref_series is None else check_uid(ref_series, "referenced SeriesInstanceUID"),
        )
    except InputError as exc:
        raise StoreRefusedError(STATUS_INVALID_UID, str(exc)) from exc
    return hdr
