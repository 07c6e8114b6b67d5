"""The DICOM helpers (appliance.dicom.common): DS formatting, value-length checks, the patient/study
copy, the Image Plane and Image Pixel modules and atomic saving, each written, saved, read back and
compared."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RTPlanStorage

from appliance.dicom.common import (
    copy_patient_study,
    format_ds,
    format_ds_list,
    length_violations,
    save_dataset,
    set_image_pixel,
    set_image_plane,
)
from appliance.dicom.uids import new_uid
from core.errors import ExportError

# --------------------------------------------------------------------------------------------
# DS formatting
# --------------------------------------------------------------------------------------------

EXTREMES = [
    0.0, -0.0, 1.0, -1.0, 1 / 3, -2 / 3, 1e-300, -1e-300, 5e-324, 2.2250738585072014e-308,
    1.7976931348623157e308, -1.7976931348623157e308, 123456789012345678.0, -9.87654321098765e-12,
    359.99999999999994, 0.1 + 0.2, 1e16, 1e15 + 0.5, 2**52 + 0.5, -123456.78901234567,
    9.999999999999998, -9.999999999999998, 1.7976931345e308,
]


def _ds_rel_tol(value: float) -> float:
    """At least 10 significant digits within [1e-99, 1e99], 8 with three-digit exponents."""
    return 5e-10 if value == 0 or 1e-99 <= abs(value) < 1e99 else 5e-8


@pytest.mark.parametrize("value", EXTREMES)
def test_format_ds_fits_and_reads_back(value: float) -> None:
    text = format_ds(value)
    assert len(text) <= 16
    assert math.isclose(float(text), value, rel_tol=_ds_rel_tol(value))
    pydicom.valuerep.DSfloat(text, validation_mode=pydicom.config.RAISE)  # a valid DS string


@settings(max_examples=400, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_format_ds_any_finite_float(value: float) -> None:
    text = format_ds(value)
    assert len(text) <= 16
    back = float(text)
    if len(repr(value)) <= 16:
        assert back == value  # exact when the shortest representation fits
    else:
        assert math.isclose(back, value, rel_tol=_ds_rel_tol(value))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_ds_refuses_non_finite(value: float) -> None:
    with pytest.raises(ExportError, match="finite"):
        format_ds(value)


def test_format_ds_where_pydicom_alone_is_not_enough() -> None:
    # pydicom's format_number_as_ds gives '10.00000000000000' (17 characters) and '1.797693135e+308'
    # (infinity when read back) for these; format_ds keeps both within the rules.
    assert format_ds(9.999999999999998) == "10.0"
    assert format_ds(-9.999999999999998) == "-10.0"
    assert format_ds(1.7976931348623157e308) == "1.797693134e+308"
    assert format_ds(-1.7976931348623157e308) == "-1.79769313e+308"


def test_format_ds_takes_ints_and_numpy_scalars() -> None:
    values = [6, np.float32(0.5), np.float64(-2.25), np.int64(1000)]
    assert [float(t) for t in format_ds_list(values)] == [6.0, 0.5, -2.25, 1000.0]


def test_length_violations_finds_a_long_ds() -> None:
    ds = Dataset()
    item = Dataset()
    item.SourceAxisDistance = pydicom.valuerep.DSfloat("1000.000000000001", validation_mode=pydicom.config.IGNORE)
    ds.BeamSequence = Sequence([item])
    problems = length_violations(ds)
    assert len(problems) == 1 and "SourceAxisDistance" in problems[0]


# --------------------------------------------------------------------------------------------
# Written -> saved -> read back
# --------------------------------------------------------------------------------------------


#: Patient, study and frame-of-reference attributes of the source CT (UIDs added per test).
SOURCE_VALUES: dict[str, str] = {
    "SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Anna", "PatientID": "P-001",
    "PatientBirthDate": "19600101", "PatientSex": "F", "PatientWeight": "71.5", "StudyDate": "20240102",
    "StudyTime": "101500", "ReferringPhysicianName": "", "StudyID": "S1", "AccessionNumber": "A123",
    "PositionReferenceIndicator": "", "InstitutionName": "not copied",
}


def _source_ct() -> Dataset:
    src = Dataset()
    for keyword, value in SOURCE_VALUES.items():
        setattr(src, keyword, value)
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        setattr(src, keyword, new_uid())
    other = Dataset()
    other.PatientID = "ALT-7"
    other.TypeOfPatientID = "TEXT"
    src.OtherPatientIDsSequence = Sequence([other])
    return src


def _plan_shell() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = new_uid()
    ds.Modality = "RTPLAN"
    return ds


def test_copy_patient_study_round_trip(tmp_path: Path) -> None:
    src = _source_ct()
    del src.StudyTime  # Type 2 in the target: written empty
    target = _plan_shell()
    copy_patient_study(src, target)
    path = tmp_path / "plan.dcm"
    save_dataset(target, path)
    back = pydicom.dcmread(path)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientWeight",
                    "StudyInstanceUID", "StudyDate", "AccessionNumber", "FrameOfReferenceUID", "SpecificCharacterSet"):
        assert back[keyword].value == src[keyword].value, keyword
    assert str(back.PatientName) == "Müller^Anna"  # the character set travelled with the name
    assert back.StudyTime == ""
    assert back.OtherPatientIDsSequence[0].PatientID == "ALT-7"
    assert "InstitutionName" not in back
    # Sequences are copies: editing the target never touches the source.
    target.OtherPatientIDsSequence[0].PatientID = "changed"
    assert src.OtherPatientIDsSequence[0].PatientID == "ALT-7"


@pytest.mark.parametrize("missing", ["StudyInstanceUID", "FrameOfReferenceUID"])
def test_copy_patient_study_refuses_a_source_without_links(missing: str) -> None:
    src = _source_ct()
    delattr(src, missing)
    with pytest.raises(ExportError, match=missing):
        copy_patient_study(src, _plan_shell())


def test_image_plane_and_pixel_round_trip(tmp_path: Path) -> None:
    ds = _plan_shell()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.2"  # RT Dose Storage
    ds.Modality = "RTDOSE"
    orientation = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    position = (250.123456789012345, -180.5, 1 / 3)
    set_image_plane(ds, orientation=orientation, position_mm=position, pixel_spacing_mm=(2.5, 1.25),
                    slice_thickness_mm=3.0)
    set_image_pixel(ds, rows=3, columns=4, bits_allocated=16, bits_stored=12)
    pixels = np.arange(12, dtype="<u2").reshape(3, 4) * 300
    ds.PixelData = pixels.tobytes()
    path = tmp_path / "image.dcm"
    save_dataset(ds, path)
    back = pydicom.dcmread(path)
    assert [float(v) for v in back.ImageOrientationPatient] == list(orientation)
    assert np.allclose([float(v) for v in back.ImagePositionPatient], position, rtol=5e-10, atol=0)
    assert [float(v) for v in back.PixelSpacing] == [2.5, 1.25] and float(back.SliceThickness) == 3.0
    assert (back.Rows, back.Columns, back.BitsAllocated, back.BitsStored, back.HighBit) == (3, 4, 16, 12, 11)
    assert (back.SamplesPerPixel, back.PhotometricInterpretation, back.PixelRepresentation) == (1, "MONOCHROME2", 0)
    np.testing.assert_array_equal(back.pixel_array, pixels)


def test_save_dataset_writes_part10_atomically(tmp_path: Path) -> None:
    ds = _plan_shell()
    ds.RTPlanLabel = "label"
    path = tmp_path / "sub" / "plan.dcm"
    save_dataset(ds, path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert back.file_meta.MediaStorageSOPClassUID == RTPlanStorage
    assert back.RTPlanLabel == "label"
    assert [p.name for p in path.parent.iterdir()] == ["plan.dcm"]  # no temporary file left


def test_save_dataset_refuses_a_value_too_long(tmp_path: Path) -> None:
    ds = _plan_shell()
    with pytest.warns(UserWarning, match="exceeds the maximum length"):
        ds.RTPlanLabel = "x" * 17  # SH: at most 16 characters
    path = tmp_path / "plan.dcm"
    with pytest.raises(ExportError, match="RTPlanLabel"):
        save_dataset(ds, path)
    assert not path.exists()
