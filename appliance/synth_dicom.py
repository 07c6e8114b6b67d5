"""Write a synthetic prostate case (``pipeline.synth``) as standard DICOM: a CT Image Storage
series and an RT Structure Set whose contours are traced from the generator's masks.

Geometry: the CT grid is ``matrix x matrix`` pixels of ``pixel_mm`` centred on x = y = 0 and
``n_slices`` axial slices of ``slice_mm`` centred on z = 0 (the reference prostate level).
The anatomy lives in patient coordinates (LPS), so it is the same for every patient position;
the position only changes ImageOrientationPatient and the order in which pixels are stored:

======  ===========================  ====================================================
HFS     (1, 0, 0, 0, 1, 0)           rows run to the patient's left, columns posterior
FFS     (-1, 0, 0, 0, 1, 0)          rows run to the patient's right
HFP     (-1, 0, 0, 0, -1, 0)         rows to the right, columns anterior
FFP     (1, 0, 0, 0, -1, 0)          rows to the left, columns anterior
======  ===========================  ====================================================

Contours are the 0.5 iso-lines of each slice's mask (``contourpy``, a matplotlib dependency),
so a voxel centre lies inside the polygons (even-odd rule; holes are separate contours)
exactly when the mask is set: rasterising the RTSTRUCT at the CT voxel centres gives the masks
back. Everything is deterministic for a seed and a geometry: UIDs come from
``pydicom.uid.generate_uid`` with entropy sources, dates are fixed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import contourpy
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.dicom.common import save_dataset, software_version
from appliance.dicom.ct import ct_slice_dataset
from appliance.dicom.rtstruct import RoiContours, RoiInterpretedType, structure_set_dataset
from core.case import Grid, PatientPosition
from core.errors import InputError
from pipeline import synth
from pipeline.synth import ct_grid

log = logging.getLogger(__name__)

#: ImageOrientationPatient of each supported patient position (row cosines, column cosines).
ORIENTATIONS: dict[PatientPosition, tuple[float, float, float, float, float, float]] = {
    PatientPosition.HFS: (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    PatientPosition.FFS: (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    PatientPosition.HFP: (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    PatientPosition.FFP: (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}

#: ROIs written to the structure set: (generator structure name, RTROIInterpretedType, colour).
ROIS: tuple[tuple[str, RoiInterpretedType, tuple[int, int, int]], ...] = (
    (synth.BODY, RoiInterpretedType.EXTERNAL, (0, 255, 0)),
    (synth.PTV, RoiInterpretedType.PTV, (255, 0, 0)),
    (synth.CTV, RoiInterpretedType.CTV, (255, 128, 0)),
    (synth.PROSTATE, RoiInterpretedType.ORGAN, (0, 128, 255)),
    (synth.SEMINAL_VESICLES, RoiInterpretedType.ORGAN, (128, 0, 255)),
    (synth.BLADDER, RoiInterpretedType.ORGAN, (255, 255, 0)),
    (synth.RECTUM, RoiInterpretedType.ORGAN, (128, 64, 0)),
    (synth.FEMUR_HEAD_L, RoiInterpretedType.ORGAN, (0, 255, 255)),
    (synth.FEMUR_HEAD_R, RoiInterpretedType.ORGAN, (255, 0, 255)),
    (synth.BONE_PELVIC, RoiInterpretedType.ORGAN, (230, 230, 230)),
)

#: ROI names of held-out cases: the clinical spellings the structure mapping must recognise
#: (``[structures.patterns]``), none of them the generator's TG-263 names.
HELDOUT_ROI_NAMES: dict[str, str] = {
    synth.BODY: "External", synth.PTV: "PTV_4000", synth.CTV: "CTV_4000", synth.PROSTATE: "Prostate_Gland",
    synth.SEMINAL_VESICLES: "SV", synth.BLADDER: "BLADDER", synth.RECTUM: "Rectum_O",
    synth.FEMUR_HEAD_L: "FemoralHead_L", synth.FEMUR_HEAD_R: "Femoral Head R", synth.BONE_PELVIC: "Pelvis_Bones",
}

MANUFACTURER = "AIRT synthetic phantom"
STUDY_DATE = "20250101"
STUDY_TIME = "120000"
RESCALE_INTERCEPT = -1024


@dataclass(frozen=True, eq=False)
class SynthWritten:
    """What :func:`write_synth_case` wrote.

    Attributes
    ----------
    folder
        The output folder.
    ct_paths
        CT slice files, in increasing z (patient superior direction).
    rtstruct_path
        The RT Structure Set file.
    study_instance_uid, frame_of_reference_uid, ct_series_instance_uid, rtstruct_series_instance_uid,
    rtstruct_sop_instance_uid, ct_sop_instance_uids
        The UIDs written (``ct_sop_instance_uids`` in increasing z).
    patient_position
        PatientPosition of the CT.
    anatomy
        The generator's CT and masks on the CT grid, in the Case convention ([z, y, x], indices
        increasing along +x, +y, +z whatever the patient position).
    roi_names
        ROI names written, in ROINumber order (1-based).
    """

    folder: Path
    ct_paths: tuple[Path, ...]
    rtstruct_path: Path
    study_instance_uid: str
    frame_of_reference_uid: str
    ct_series_instance_uid: str
    rtstruct_series_instance_uid: str
    rtstruct_sop_instance_uid: str
    ct_sop_instance_uids: tuple[str, ...]
    patient_position: PatientPosition
    anatomy: synth.SynthAnatomy
    roi_names: tuple[str, ...]


def mask_contours(mask2d: NDArray[np.bool_]) -> list[NDArray[np.float64]]:
    """Closed polygons bounding ``mask2d`` ([y, x]) in fractional pixel coordinates (column, row).

    The polygons are the 0.5 iso-lines of the mask: each vertex lies halfway between a set and
    an unset pixel centre, so by the even-odd rule a pixel centre is inside exactly when the
    pixel is set (holes come out as separate polygons). The closing vertex is not repeated and
    collinear vertices are dropped (the polygon is unchanged).
    """
    if not mask2d.any():
        return []
    padded = np.zeros((mask2d.shape[0] + 2, mask2d.shape[1] + 2), np.float64)
    padded[1:-1, 1:-1] = mask2d
    gen = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    out: list[NDArray[np.float64]] = []
    for line in gen.lines(0.5):
        pts = np.asarray(line, np.float64) - 1.0
        if len(pts) > 1 and np.allclose(pts[0], pts[-1]):
            pts = pts[:-1]
        if len(pts) < 3:
            continue
        prev = np.roll(pts, 1, axis=0)
        nxt = np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
        pts = pts[np.abs(cross) > 1e-9]
        if len(pts) >= 3:
            out.append(pts)
    return out


def _uid(seed: int, geometry: str, *parts: object) -> str:
    return str(generate_uid(entropy_srcs=["airt-synth", str(seed), geometry, *[str(p) for p in parts]]))


def _common(ds: Dataset, seed: int, study_uid: str, frame_uid: str) -> None:
    """Patient, General Study, Frame of Reference, General Equipment, SOP Common (CT and RTSTRUCT)."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"SYNTH^{seed}"
    ds.PatientID = f"SYNTH{seed}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"SYN{seed}"[:16]
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic prostate case"
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "pipeline.synth"
    ds.SoftwareVersions = software_version()
    ds.InstanceCreationDate = STUDY_DATE
    ds.InstanceCreationTime = STUDY_TIME


def write_synth_case(
    out_dir: Path,
    seed: int,
    *,
    n_slices: int = 120,
    pixel_mm: float = 0.977,
    slice_mm: float = 2.5,
    patient_position: str = "HFS",
    matrix: int = 512,
    include_bones: bool = True,
    heldout: bool = False,
) -> SynthWritten:
    """Write synthetic case ``seed`` into ``out_dir`` (created if missing).

    Parameters
    ----------
    out_dir
        Output folder; files are named ``CT_<SOPInstanceUID>.dcm`` and ``RS_<SOPInstanceUID>.dcm``.
    seed
        Case seed (>= 0); see :func:`pipeline.synth.synth_anatomy`.
    n_slices
        Number of axial slices (>= 2), centred on the reference prostate level.
    pixel_mm
        In-plane pixel size, mm; ``matrix * pixel_mm`` should be about 450 mm or more so that
        the body (up to about 460 x 320 mm with the +20 % scaling) fits.
    slice_mm
        Slice spacing and SliceThickness, mm.
    patient_position
        ``HFS``, ``FFS``, ``HFP`` or ``FFP``.
    matrix
        Rows and columns of each slice (512 for a clinical CT; 256 with a 1.95 mm pixel for
        quick tests).
    include_bones
        Also write a ``Bone_Pelvic`` ROI (pelvic bones without the femora).
    heldout
        A held-out case: anatomy from :func:`pipeline.synth.draw_heldout_params` (ranges no training
        case has), ROIs named as in :data:`HELDOUT_ROI_NAMES`, UIDs distinct from the training case
        of the same seed.

    Returns
    -------
    SynthWritten
        Paths, UIDs and the generator's masks on the CT grid.

    Raises
    ------
    InputError
        For an unsupported patient position or a degenerate geometry.
    """
    try:
        position = PatientPosition(patient_position.upper())
    except ValueError:
        raise InputError(
            f"patient position {patient_position!r} is not supported; use one of "
            f"{', '.join(p.value for p in PatientPosition)}"
        ) from None
    grid = ct_grid(n_slices, pixel_mm, slice_mm, matrix)
    anatomy = synth.synth_anatomy(seed, grid, heldout=heldout)
    geometry = f"{n_slices}x{matrix}x{matrix}@{pixel_mm:g},{slice_mm:g}:{position.value}" + (":heldout" if heldout else "")
    study_uid = _uid(seed, geometry, "study")
    frame_uid = _uid(seed, geometry, "frame")
    ct_series_uid = _uid(seed, geometry, "ct-series")
    rs_series_uid = _uid(seed, geometry, "rtstruct-series")
    rs_uid = _uid(seed, geometry, "rtstruct")
    ct_uids = tuple(_uid(seed, geometry, "ct", k) for k in range(n_slices))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    iop = ORIENTATIONS[position]
    flip_x, flip_y = iop[0] < 0, iop[4] < 0
    x_axis, y_axis, z_axis = grid.axes_mm()
    first_x = float(x_axis[-1] if flip_x else x_axis[0])
    first_y = float(y_axis[-1] if flip_y else y_axis[0])
    stored = np.clip(np.rint(anatomy.ct_hu - RESCALE_INTERCEPT), 0, 4095).astype(np.uint16)
    ct_paths: list[Path] = []
    for k in range(n_slices):
        img = stored[k]
        if flip_x:
            img = img[:, ::-1]
        if flip_y:
            img = img[::-1, :]
        ds = ct_slice_dataset(
            sop_instance_uid=ct_uids[k], series_instance_uid=ct_series_uid, instance_number=k + 1,
            patient_position=position, orientation=iop, position_mm=(first_x, first_y, float(z_axis[k])),
            pixel_mm=pixel_mm, slice_mm=slice_mm, stored=img, bits_stored=12, rescale_intercept=RESCALE_INTERCEPT,
        )
        _common(ds, seed, study_uid, frame_uid)
        ds.SeriesDate = STUDY_DATE
        ds.SeriesTime = STUDY_TIME
        ds.ContentDate = STUDY_DATE
        ds.ContentTime = STUDY_TIME
        ds.AcquisitionDate = STUDY_DATE
        ds.AcquisitionTime = STUDY_TIME
        ds.SeriesNumber = 1
        ds.SeriesDescription = "Synthetic planning CT"
        ds.BodyPartExamined = "PELVIS"
        ds.KVP = "120"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        path = out_dir / f"CT_{ct_uids[k]}.dcm"
        save_dataset(ds, path)
        ct_paths.append(path)

    roi_names = tuple(name for name, _, _ in ROIS if include_bones or name != synth.BONE_PELVIC)
    written_names = {name: HELDOUT_ROI_NAMES[name] if heldout else name for name in roi_names}
    rs = _structure_set(seed, anatomy, grid, roi_names, study_uid=study_uid, frame_uid=frame_uid,
                        ct_series_uid=ct_series_uid, rs_series_uid=rs_series_uid, rs_uid=rs_uid, ct_uids=ct_uids,
                        written_names=written_names)
    rs_path = out_dir / f"RS_{rs_uid}.dcm"
    save_dataset(rs, rs_path)
    log.info("synthetic case %d written to %s: CT series %s (%d slices, %s), RTSTRUCT %s", seed, out_dir,
             ct_series_uid, n_slices, position.value, rs_uid)
    return SynthWritten(
        folder=out_dir, ct_paths=tuple(ct_paths), rtstruct_path=rs_path, study_instance_uid=study_uid,
        frame_of_reference_uid=frame_uid, ct_series_instance_uid=ct_series_uid,
        rtstruct_series_instance_uid=rs_series_uid, rtstruct_sop_instance_uid=rs_uid,
        ct_sop_instance_uids=ct_uids, patient_position=position, anatomy=anatomy,
        roi_names=tuple(written_names[n] for n in roi_names),
    )


def _structure_set(
    seed: int, anatomy: synth.SynthAnatomy, grid: Grid, roi_names: tuple[str, ...], *, study_uid: str,
    frame_uid: str, ct_series_uid: str, rs_series_uid: str, rs_uid: str, ct_uids: tuple[str, ...],
    written_names: dict[str, str],
) -> Dataset:
    """The RT Structure Set of the case, its contours traced from the generator's masks;
    ``written_names`` maps the generator's structure names to the ROI names written."""
    kinds = {name: (kind, colour) for name, kind, colour in ROIS}
    ox, oy, _ = grid.origin_mm
    dx, dy, _ = grid.spacing_mm
    _, _, z_axis = grid.axes_mm()
    rois = []
    for name in roi_names:
        kind, colour = kinds[name]
        contours = []
        mask = anatomy.masks[name]
        for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
            for poly in mask_contours(mask[k]):
                xyz = np.empty((len(poly), 3))
                xyz[:, 0] = ox + dx * poly[:, 0]
                xyz[:, 1] = oy + dy * poly[:, 1]
                xyz[:, 2] = z_axis[k]
                contours.append((ct_uids[int(k)], xyz))
        if not contours:
            log.warning("synthetic case %d: ROI %s has no voxel on the CT grid", seed, name)
        rois.append(RoiContours(name=written_names[name], interpreted_type=kind, colour=colour,
                                contours=tuple(contours)))
    ds = structure_set_dataset(
        sop_instance_uid=rs_uid, series_instance_uid=rs_series_uid, study_instance_uid=study_uid,
        frame_of_reference_uid=frame_uid, ct_series_instance_uid=ct_series_uid, ct_sop_instance_uids=ct_uids,
        rois=rois, label=f"SYNTH{seed}"[:16], name="Synthetic", date=STUDY_DATE, time=STUDY_TIME,
    )
    _common(ds, seed, study_uid, frame_uid)
    ds.SeriesNumber = 2
    ds.SeriesDescription = "Synthetic structures"
    ds.SeriesDate = STUDY_DATE
    ds.SeriesTime = STUDY_TIME
    return ds
