"""The CT series (appliance.dicom.ct): slices written by ct_slice_dataset, saved, read back through
ct_geometry and read_ct_volume, give the same grid, HU and patient position in every patient position."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance.dicom.common import DicomFile, save_dataset
from appliance.dicom.ct import ct_geometry, ct_slice_dataset, patient_position, read_ct_volume
from appliance.dicom.ct_pixels import LOSSLESS_SYNTAXES, LOSSY_SYNTAXES, UNCOMPRESSED_SYNTAXES, lossy_reason
from appliance.dicom.uids import new_uid
from core.case import Grid, PatientPosition
from core.errors import InputError

#: ImageOrientationPatient of an axial CT per patient position (rows along x, columns along y).
ORIENTATION: dict[PatientPosition, tuple[float, float, float, float, float, float]] = {
    PatientPosition.HFS: (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    PatientPosition.FFS: (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    PatientPosition.HFP: (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
    PatientPosition.FFP: (1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
}
INTERCEPT = -1024.0


def write_series(folder: Path, hu: np.ndarray, grid: Grid, position: PatientPosition) -> list[Path]:
    """Write the canonical HU volume ``hu`` on ``grid`` as one CT slice file per z, in ``position``."""
    iop = ORIENTATION[position]
    flip_x, flip_y = iop[0] < 0, iop[4] < 0
    x, y, z = grid.axes_mm()
    series, study, frame = new_uid(), new_uid(), new_uid()
    paths = []
    for k in range(grid.shape[0]):
        stored = np.rint(hu[k] - INTERCEPT).astype(np.uint16)
        if flip_x:
            stored = stored[:, ::-1]
        if flip_y:
            stored = stored[::-1, :]
        ds = ct_slice_dataset(
            sop_instance_uid=new_uid(), series_instance_uid=series, instance_number=k + 1,
            patient_position=position, orientation=iop,
            position_mm=(float(x[-1] if flip_x else x[0]), float(y[-1] if flip_y else y[0]), float(z[k])),
            pixel_mm=grid.spacing_mm[0], slice_mm=grid.spacing_mm[2], stored=stored, bits_stored=12,
            rescale_intercept=INTERCEPT,
        )
        ds.StudyInstanceUID = study
        ds.FrameOfReferenceUID = frame
        path = folder / f"ct_{k:03d}.dcm"
        save_dataset(ds, path)
        paths.append(path)
    return paths


def read_series(paths: list[Path]) -> list[DicomFile]:
    return [DicomFile(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]


@pytest.mark.parametrize("position", list(PatientPosition))
def test_written_series_reads_back_on_the_same_grid(tmp_path: Path, position: PatientPosition) -> None:
    grid = Grid(origin_mm=(-20.5, -12.25, -7.5), spacing_mm=(1.5, 1.5, 2.5), shape=(4, 6, 7))
    rng = np.random.default_rng(3)
    hu = rng.integers(-1000, 2000, size=grid.shape).astype(np.float32)
    paths = write_series(tmp_path, hu, grid, position)
    rng.shuffle(paths)  # file order never matters
    files = read_series(paths)
    geometry = ct_geometry(str(files[0].ds.SeriesInstanceUID), files)
    assert geometry.grid.shape == grid.shape
    np.testing.assert_allclose(geometry.grid.origin_mm, grid.origin_mm, rtol=0, atol=1e-9)
    np.testing.assert_allclose(geometry.grid.spacing_mm, grid.spacing_mm, rtol=0, atol=1e-9)
    assert geometry.iop == ORIENTATION[position]
    np.testing.assert_array_equal(read_ct_volume(geometry), hu)
    assert patient_position(geometry) is position


def test_written_slice_carries_the_ct_image_attributes(tmp_path: Path) -> None:
    grid = Grid(origin_mm=(0.0, 0.0, 0.0), spacing_mm=(0.977, 0.977, 2.5), shape=(2, 3, 5))
    paths = write_series(tmp_path, np.zeros(grid.shape, np.float32), grid, PatientPosition.HFS)
    ds = pydicom.dcmread(paths[1])
    assert (ds.Modality, ds.SOPClassUID, ds.InstanceNumber, ds.PatientPosition) == ("CT", pydicom.uid.CTImageStorage,
                                                                                   2, "HFS")
    assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (3, 5, 16, 12, 11)
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1.0, INTERCEPT, "HU")
    assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2]) == 2.5
    assert [float(v) for v in ds.PixelSpacing] == [0.977, 0.977] and float(ds.SliceThickness) == 2.5


def test_one_slice_is_not_a_volume(tmp_path: Path) -> None:
    grid = Grid(origin_mm=(0.0, 0.0, 0.0), spacing_mm=(1.0, 1.0, 2.0), shape=(2, 4, 4))
    paths = write_series(tmp_path, np.zeros(grid.shape, np.float32), grid, PatientPosition.HFS)
    files = read_series(paths[:1])
    with pytest.raises(InputError, match="only 1 slice"):
        ct_geometry(str(files[0].ds.SeriesInstanceUID), files)


def test_transfer_syntax_tables_are_disjoint_and_lossy_ones_are_named() -> None:
    tables = [set(UNCOMPRESSED_SYNTAXES), set(LOSSLESS_SYNTAXES), set(LOSSY_SYNTAXES)]
    assert not (tables[0] & tables[1]) and not (tables[0] & tables[2]) and not (tables[1] & tables[2])
    for uid, name in LOSSY_SYNTAXES.items():
        reason = lossy_reason(uid)
        assert reason is not None and name in reason
    assert lossy_reason("1.2.840.10008.1.2.1") is None
    assert lossy_reason("1.2.840.10008.1.2.1", "01") is not None  # lossy once, stored uncompressed since
    assert lossy_reason("1.2.840.10008.1.2.4.70", "00") is None
