"""Synthetic prostate cases: the anatomy generator, its DICOM writer and ``airt synth``.

Independent checks: dciodvfy validates the written objects, plastimatch rasterises the written
RTSTRUCT on the written CT, matplotlib's point-in-polygon test checks the contour tracing and the
CT pixels are located from their own ImagePositionPatient/ImageOrientationPatient with pydicom.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath
from numpy.typing import NDArray
from scipy import ndimage

from appliance.cli import main as airt_main
from appliance.config import StructureSettings
from appliance.dicom.case_loader import load_folder
from appliance.synth_dicom import ORIENTATIONS, SynthWritten, mask_contours, write_synth_case
from core.case import Grid, PatientPosition, Prescription, Role
from core.errors import InputError
from pipeline import synth
from tests.conftest import require_tool

SMALL = {"n_slices": 48, "pixel_mm": 1.953, "slice_mm": 2.5, "matrix": 256}


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Dice coefficient of two masks (1.0 for two empty masks)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def centroid_mm(mask: NDArray[np.bool_], grid: Grid) -> NDArray[np.float64]:
    k, j, i = np.nonzero(mask)
    return np.asarray(grid.origin_mm) + np.asarray(grid.spacing_mm) * np.array([i.mean(), j.mean(), k.mean()])


# ---------------------------------------------------------------------------------------------
# The generator
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_case_and_different_seeds_differ() -> None:
    a, b, c = synth.synth_case(3), synth.synth_case(3), synth.synth_case(4)
    assert np.array_equal(a.ct_hu, b.ct_hu)
    for role in a.masks:
        assert np.array_equal(a.masks[role], b.masks[role]), role
    assert not np.array_equal(a.masks[Role.PTV], c.masks[Role.PTV])
    assert synth.draw_params(3) == synth.draw_params(3)


def test_negative_seed_is_refused() -> None:
    with pytest.raises(InputError, match="seed"):
        synth.draw_params(-1)


@pytest.mark.parametrize("seed", range(8))
def test_anatomy_is_plausible(seed: int) -> None:
    case = synth.synth_case(seed)
    g, m = case.grid, case.masks
    p = synth.draw_params(seed)
    vol = {r: float(m[r].sum()) * g.voxel_volume_cc for r in m}
    s3 = p.scale**3
    # Volumes: natural ranges times the augmentation scaling (0.8-1.2 linear).
    assert 25.0 * s3 < vol[Role.PTV] < 150.0 * s3, vol
    assert 80.0 * s3 < vol[Role.BLADDER] < 340.0 * s3, vol
    assert 30.0 * s3 < vol[Role.RECTUM] < 250.0 * s3, vol
    assert 9000.0 * s3 < vol[Role.BODY] < 40000.0 * s3, vol
    # Every structure lies in the body.
    for role in (Role.PTV, Role.BLADDER, Role.RECTUM, Role.FEMUR_HEAD_L, Role.FEMUR_HEAD_R):
        assert not (m[role] & ~m[Role.BODY]).any(), role
    ptv = centroid_mm(m[Role.PTV], g)
    bladder = centroid_mm(m[Role.BLADDER], g)
    assert bladder[2] > ptv[2] + 15.0  # superior
    assert bladder[1] < ptv[1] + 5.0  # not posterior (it sits anterior-superior)
    # Rectum posterior to the prostate on the prostate's central slice.
    kc = round(float(ptv[2] - g.origin_mm[2]) / g.spacing_mm[2])
    j_rect = np.nonzero(m[Role.RECTUM][kc])[0].mean()
    j_ptv = np.nonzero(m[Role.PTV][kc])[0].mean()
    assert (j_rect - j_ptv) * g.spacing_mm[1] > 15.0
    # Femoral heads: left on +x (LPS), about 9 cm from the midline (with scaling).
    left, right = centroid_mm(m[Role.FEMUR_HEAD_L], g), centroid_mm(m[Role.FEMUR_HEAD_R], g)
    assert 65.0 < left[0] - ptv[0] < 135.0 and 65.0 < ptv[0] - right[0] < 135.0
    # The PTV fits easily in a 20 x 20 cm field.
    k, j, i = np.nonzero(m[Role.PTV])
    for idx, sp in ((i, g.spacing_mm[0]), (j, g.spacing_mm[1]), (k, g.spacing_mm[2])):
        assert (idx.max() - idx.min() + 1) * sp < 150.0


def test_hounsfield_units_of_the_tissues() -> None:
    grid = Grid(origin_mm=(-200.0, -150.0, -60.0), spacing_mm=(2.0, 2.0, 2.0), shape=(60, 150, 200))
    a = synth.synth_anatomy(2, grid)
    ct, m = a.ct_hu, a.masks
    body = m[synth.BODY]
    air = ct[~ndimage.binary_dilation(body, iterations=3)]
    assert abs(float(np.median(air)) + 1000.0) < 5.0
    assert 5.0 < float(air.std()) < 25.0  # CT noise
    assert abs(float(np.median(ct[m[synth.FAT]])) + 100.0) < 15.0
    assert abs(float(np.median(ct[m[synth.MUSCLE]])) - 40.0) < 15.0
    lumen = ndimage.binary_erosion(m[synth.BLADDER], iterations=3)
    assert abs(float(np.median(ct[lumen])) - 10.0) < 10.0
    bone = m[synth.BONE_PELVIC]
    assert 200.0 < float(np.median(ct[ndimage.binary_erosion(bone, iterations=2)])) < 400.0  # trabecular
    assert float(np.percentile(ct[bone], 95)) > 700.0  # cortical shell
    assert float(ct[m[synth.RECTUM]].min()) < -500.0  # rectal gas


@pytest.mark.parametrize("seed", [0, 1, 4])
def test_targets_follow_table_s1(seed: int) -> None:
    """CTV = Prostate U ((Prostate + 3 mm) n SV), PTV = CTV + margin, checked with an EDT on the grid."""
    grid = Grid(origin_mm=(-80.0, -90.0, -70.0), spacing_mm=(1.0, 1.0, 1.5), shape=(110, 170, 160))
    a = synth.synth_anatomy(seed, grid, noise=False)
    m, sp = a.masks, (1.5, 1.0, 1.0)
    prostate, sv, ctv, ptv = m[synth.PROSTATE], m[synth.SEMINAL_VESICLES], m[synth.CTV], m[synth.PTV]
    assert not (ptv[0].any() or ptv[-1].any() or ptv[:, 0].any() or ptv[:, -1].any())
    assert (prostate <= ctv).all() and (ctv <= ptv).all()
    assert (ctv <= (prostate | sv)).all()
    # Grid distances between voxel centres differ from the distance to the true surface by up to
    # about half a voxel diagonal; 0.5 mm more for the generator's interpolated distance grid.
    tol = 0.5 * float(np.linalg.norm(sp)) + 0.5
    d_prostate = ndimage.distance_transform_edt(~prostate, sampling=sp)
    assert not (sv & (d_prostate > 3.0 + tol) & ctv).any()
    assert (sv & (d_prostate < 3.0 - tol) <= ctv).all()
    margin = a.params.ptv_margin_mm
    d_ctv = ndimage.distance_transform_edt(~ctv, sampling=sp)
    assert float(d_ctv[ptv].max()) <= margin + tol
    assert ptv[(d_ctv <= margin - tol) & m[synth.BODY]].all()
    assert 3.0 <= margin <= 6.0 and 0.0 <= a.params.rectum_margin_mm <= 5.0


def test_fast_path_matches_fine_grid() -> None:
    """Same anatomy at any resolution: masks agree at shared voxel centres, volumes within 5 %."""
    for seed in (0, 5):
        coarse = synth.synth_case(seed)
        g = coarse.grid
        # A 2 mm grid whose every other voxel centre is a coarse voxel centre, around the pelvis.
        lo = (20, 25, 35)  # coarse (k, j, i) of the sub-box corner
        n = (30, 45, 55)
        fine_grid = Grid(origin_mm=(g.origin_mm[0] + 4.0 * lo[2], g.origin_mm[1] + 4.0 * lo[1],
                                    g.origin_mm[2] + 4.0 * lo[0]),
                         spacing_mm=(2.0, 2.0, 2.0), shape=(2 * n[0] - 1, 2 * n[1] - 1, 2 * n[2] - 1))
        fine = synth.synth_anatomy(seed, fine_grid, noise=False)
        sub = tuple(slice(lo[a], lo[a] + n[a]) for a in range(3))
        for role, name in synth.ROLE_NAMES.items():
            shared = fine.masks[name][::2, ::2, ::2]
            assert dice(shared, coarse.masks[role][sub]) > 0.995, (seed, role)
        ptv_fine = fine.volume_cc(synth.PTV)
        ptv_coarse = float(coarse.masks[Role.PTV].sum()) * g.voxel_volume_cc
        assert fine.masks[synth.PTV][[0, -1]].sum() == 0  # the PTV is inside the sub-box
        assert abs(ptv_coarse / ptv_fine - 1.0) < 0.05, (ptv_coarse, ptv_fine)


def test_fast_path_is_fast_enough() -> None:
    import time

    start = time.perf_counter()
    for seed in range(3):
        synth.synth_case(100 + seed)
    per_case = (time.perf_counter() - start) / 3
    assert per_case < 2.0, per_case  # target 0.5 s on an idle core; generous on a loaded machine


# ---------------------------------------------------------------------------------------------
# Contour tracing
# ---------------------------------------------------------------------------------------------


def test_mask_contours_give_the_mask_back_by_even_odd_rule() -> None:
    rng = np.random.default_rng(7)
    for _ in range(6):
        field = ndimage.gaussian_filter(rng.standard_normal((60, 70)), 2.5)
        mask = field > 0.05  # blobs with holes, touching the border, diagonal saddles
        polys = mask_contours(mask)
        rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
        centres = np.column_stack([cols.ravel(), rows.ravel()]).astype(float)
        inside = np.zeros(len(centres), bool)
        for poly in polys:
            inside ^= MplPath(poly).contains_points(centres)
        assert np.array_equal(inside.reshape(mask.shape), mask)
    assert mask_contours(np.zeros((5, 5), bool)) == []


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> SynthWritten:
    return write_synth_case(tmp_path_factory.mktemp("synth_hfs"), 12, **SMALL)  # type: ignore[arg-type]


def run_dciodvfy(path: Path) -> None:
    tool = require_tool("dciodvfy")
    res = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert res.returncode == 0 and not errors, out


def test_dciodvfy_accepts_ct_and_rtstruct(written: SynthWritten) -> None:
    run_dciodvfy(written.ct_paths[0])
    run_dciodvfy(written.ct_paths[len(written.ct_paths) // 2])
    run_dciodvfy(written.rtstruct_path)


def test_written_files_are_named_by_uid_and_identify_a_synthetic_patient(written: SynthWritten) -> None:
    names = {p.name for p in written.folder.iterdir()}
    assert len(names) == SMALL["n_slices"] + 1
    assert all(re.fullmatch(r"(CT|RS)_[0-9.]+\.dcm", n) for n in names)
    rs = pydicom.dcmread(written.rtstruct_path)
    assert str(rs.PatientName) == "SYNTH^12" and rs.PatientID == "SYNTH12"
    assert [r.ROIName for r in rs.StructureSetROISequence] == list(written.roi_names)
    assert rs.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == written.frame_of_reference_uid
    ct = pydicom.dcmread(written.ct_paths[0], stop_before_pixels=True)
    assert ct.StudyInstanceUID == rs.StudyInstanceUID == written.study_instance_uid
    for ds in (rs, ct):  # DS values at most 16 characters
        for elem in ds.iterall():
            if elem.VR == "DS" and elem.value is not None:
                values = elem.value if elem.VM > 1 else [elem.value]
                assert all(len(str(v)) <= 16 for v in values), elem


def test_same_seed_writes_the_same_files(tmp_path: Path) -> None:
    kw = {"n_slices": 4, "pixel_mm": 1.953, "slice_mm": 2.5, "matrix": 256}
    a = write_synth_case(tmp_path / "a", 9, **kw)  # type: ignore[arg-type]
    b = write_synth_case(tmp_path / "b", 9, **kw)  # type: ignore[arg-type]
    assert a.ct_sop_instance_uids == b.ct_sop_instance_uids
    assert a.rtstruct_path.name == b.rtstruct_path.name
    assert a.rtstruct_path.read_bytes() == b.rtstruct_path.read_bytes()
    assert a.ct_paths[2].read_bytes() == b.ct_paths[2].read_bytes()


def test_unsupported_position_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="HFDL"):
        write_synth_case(tmp_path, 1, patient_position="HFDL", n_slices=2, matrix=16)


def check_pixels_against_anatomy(w: SynthWritten) -> None:
    """Locate each stored pixel from its own IPP/IOP and compare with the generator's CT."""
    a = w.anatomy
    g = a.grid
    for path in (w.ct_paths[0], w.ct_paths[-1]):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        assert tuple(iop) == ORIENTATIONS[w.patient_position]
        assert ds.PatientPosition == w.patient_position.value
        rows, cols = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        dr, dc = (float(v) for v in ds.PixelSpacing)
        pos = ipp[None, None, :] + cols[..., None] * dc * iop[None, None, :3] + rows[..., None] * dr * iop[None, None, 3:]
        i = np.rint((pos[..., 0] - g.origin_mm[0]) / g.spacing_mm[0]).astype(int)
        j = np.rint((pos[..., 1] - g.origin_mm[1]) / g.spacing_mm[1]).astype(int)
        k = int(np.rint((pos[0, 0, 2] - g.origin_mm[2]) / g.spacing_mm[2]))
        assert np.abs(hu - a.ct_hu[k][j, i]).max() <= 0.51


@pytest.mark.parametrize("position", ["HFS", "FFS", "HFP", "FFP"])
def test_round_trip_through_load_case(position: str, tmp_path: Path, written: SynthWritten) -> None:
    if position == "HFS":
        w = written
    else:
        w = write_synth_case(tmp_path, 12, **{**SMALL, "n_slices": 24}, patient_position=position)  # type: ignore[arg-type]
    check_pixels_against_anatomy(w)
    case = load_folder(w.folder, structures=StructureSettings(), prescription=Prescription())
    assert case.patient_position == PatientPosition(position)
    assert case.grid.shape == w.anatomy.grid.shape
    assert np.allclose(case.grid.origin_mm, w.anatomy.grid.origin_mm, atol=1e-3)
    assert np.abs(case.ct_hu - w.anatomy.ct_hu).max() <= 0.51
    checked = 0
    for role, name in synth.ROLE_NAMES.items():
        truth = w.anatomy.masks[name]
        if truth.sum() * w.anatomy.grid.voxel_volume_cc > 5.0:
            assert dice(case.masks[role], truth) >= 0.97, role
            checked += 1
    assert checked >= 4


def read_nrrd(path: Path) -> tuple[NDArray[np.uint8], NDArray[np.float64], NDArray[np.float64]]:
    """A tiny NRRD reader (raw or gzip encoding, 8-bit or 16/32-bit integer data, axis-aligned).

    Returns the data indexed [z, y, x] (NRRD stores the first axis fastest), the per-axis
    signed spacing (x, y, z) and the space origin (x, y, z), both in mm, LPS.
    """
    raw = path.read_bytes()
    head_end = raw.index(b"\n\n")
    header: dict[str, str] = {}
    for line in raw[:head_end].decode("ascii").splitlines()[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        header[key.strip()] = value.lstrip("=").strip()
    assert header["space"] in ("left-posterior-superior", "LPS"), header["space"]
    dtypes = {"unsigned char": np.uint8, "uchar": np.uint8, "uint8": np.uint8, "short": np.int16,
              "unsigned short": np.uint16, "int": np.int32, "unsigned int": np.uint32}
    dtype = np.dtype(dtypes[header["type"]]).newbyteorder("<" if header.get("endian", "little") == "little" else ">")
    body = raw[head_end + 2 :]
    if header["encoding"] in ("gzip", "gz"):
        body = gzip.decompress(body)
    else:
        assert header["encoding"] == "raw", header["encoding"]
    sizes = [int(v) for v in header["sizes"].split()]
    data = np.frombuffer(body, dtype=dtype, count=int(np.prod(sizes))).reshape(sizes[::-1])
    vectors = [[float(x) for x in v.split(",")] for v in re.findall(r"\(([^)]*)\)", header["space directions"])]
    directions = np.array(vectors)
    assert np.count_nonzero(directions) == 3, f"not axis-aligned: {directions}"
    spacing = np.array([directions[a, a] for a in range(3)])
    origin = np.array([float(v) for v in re.findall(r"[-+0-9.eE]+", header["space origin"])])
    return data, spacing, origin


def nrrd_on_grid(path: Path, grid: Grid) -> NDArray[np.bool_]:
    """An NRRD mask resampled (nearest, by voxel-centre coordinates) into the Case convention."""
    data, spacing, origin = read_nrrd(path)
    out = data != 0
    # Flip axes that run against +x/+y/+z so that indices increase along the patient axes.
    for axis_xyz, arr_axis in ((0, 2), (1, 1), (2, 0)):
        if spacing[axis_xyz] < 0:
            out = np.flip(out, axis=arr_axis)
            origin[axis_xyz] += spacing[axis_xyz] * (out.shape[arr_axis] - 1)
            spacing[axis_xyz] = -spacing[axis_xyz]
    assert np.allclose(spacing, grid.spacing_mm, atol=1e-3), (spacing, grid.spacing_mm)
    assert np.allclose(origin, grid.origin_mm, atol=1e-2), (origin, grid.origin_mm)
    assert out.shape == grid.shape
    return np.ascontiguousarray(out)


@pytest.mark.external
@pytest.mark.parametrize("position", ["HFS", "FFP"])
def test_plastimatch_rasterises_the_same_masks(position: str, tmp_path: Path, written: SynthWritten) -> None:
    tool = require_tool("plastimatch")
    if position == "HFS":
        w = written
    else:
        w = write_synth_case(tmp_path / "case", 12, **{**SMALL, "n_slices": 24}, patient_position=position)  # type: ignore[arg-type]
    ct_dir = tmp_path / "ct"
    ct_dir.mkdir()
    for p in w.ct_paths:
        (ct_dir / p.name).symlink_to(p)
    res = subprocess.run(
        [tool, "convert", "--input", str(w.rtstruct_path), "--referenced-ct", str(ct_dir),
         "--output-prefix", str(tmp_path / "masks"), "--prefix-format", "nrrd"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    checked = 0
    for name in w.roi_names:
        truth = w.anatomy.masks[name]
        if truth.sum() * w.anatomy.grid.voxel_volume_cc <= 5.0:
            continue
        got = nrrd_on_grid(tmp_path / "masks" / f"{name}.nrrd", w.anatomy.grid)
        assert dice(got, truth) >= 0.97, (name, dice(got, truth))
        checked += 1
    assert checked >= 6


def test_airt_synth_writes_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cases"
    status = airt_main(["-q", "synth", "--out", str(out), "--seed", "21", "--count", "2", "--slices", "6",
                        "--position", "FFS"])
    assert status == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for seed, line in zip((21, 22), lines):
        folder = out / f"case_{seed}"
        assert line.startswith(f"seed {seed}\t{folder}\tPTV ") and line.endswith(" cm3")
        assert float(line.split("PTV ")[1].split()[0]) > 0.0  # the PTV lies within 6 slices of z = 0
        files = sorted(folder.iterdir())
        assert len([f for f in files if f.name.startswith("CT_")]) == 6
        assert len([f for f in files if f.name.startswith("RS_")]) == 1
        assert pydicom.dcmread(files[0], stop_before_pixels=True).PatientPosition == "FFS"


def test_airt_synth_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert airt_main(["-q", "synth", "--out", str(tmp_path), "--count", "0"]) == 2
    assert "--count" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_case_is_valid_and_round_trips(tmp_path: Path) -> None:
    w = write_synth_case(tmp_path, 31)
    assert len(w.ct_paths) == 120
    ds = pydicom.dcmread(w.ct_paths[0], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (512, 512)
    run_dciodvfy(w.ct_paths[60])
    run_dciodvfy(w.rtstruct_path)
    case = load_folder(w.folder, structures=StructureSettings(), prescription=Prescription())
    for role, name in synth.ROLE_NAMES.items():
        assert dice(case.masks[role], w.anatomy.masks[name]) >= 0.97, role
    vol = float(case.masks[Role.PTV].sum()) * case.grid.voxel_volume_cc
    fast = synth.synth_case(31)
    vol_fast = float(fast.masks[Role.PTV].sum()) * fast.grid.voxel_volume_cc
    assert abs(vol_fast / vol - 1.0) < 0.05, (vol_fast, vol)


def test_heldout_anatomy_lies_outside_every_training_range() -> None:
    seeds = range(5000, 5040)
    train = [synth.draw_params(s) for s in range(0, 200)]
    held = [synth.draw_heldout_params(s) for s in seeds]

    def span(values: list[float]) -> tuple[float, float]:
        return min(values), max(values)

    for name, get in (("body width", lambda p: p.body_ab_mm[0]), ("body depth", lambda p: p.body_ab_mm[1]),
                      ("body shape", lambda p: p.body_exponent), ("fat", lambda p: p.fat_mm),
                      ("bladder", lambda p: p.bladder_volume_cc), ("rectum", lambda p: p.rectum_radius_mm),
                      ("prostate", lambda p: p.prostate_r_mm[0]), ("femoral heads", lambda p: p.femur_head_x_mm)):
        lo, hi = span([get(p) for p in train])
        outside = [get(p) < lo or get(p) > hi for p in held]
        assert all(outside), (name, lo, hi, [get(p) for p in held])
        # both sides of the training range are drawn
        assert any(get(p) < lo for p in held) and any(get(p) > hi for p in held), name
    assert all(len(p.gas_pockets) >= 4 and min(g[2] for g in p.gas_pockets) >= 8.0 for p in held)
    # the seed's augmentation draws are kept, the anatomy is deterministic
    assert synth.draw_heldout_params(5000) == synth.draw_heldout_params(5000)
    assert held[0].augmented == synth.draw_params(5000).augmented


def test_heldout_case_has_clinical_names_its_own_uids_and_loads(tmp_path: Path) -> None:
    from appliance.synth_dicom import HELDOUT_ROI_NAMES

    held = write_synth_case(tmp_path / "held", 5001, n_slices=40, pixel_mm=3.0, slice_mm=3.0, matrix=170,
                            patient_position="FFS", heldout=True)
    plain = write_synth_case(tmp_path / "plain", 5001, n_slices=40, pixel_mm=3.0, slice_mm=3.0, matrix=170,
                             patient_position="FFS")
    assert set(held.roi_names) <= set(HELDOUT_ROI_NAMES.values())
    assert not set(held.roi_names) & set(plain.roi_names)
    assert held.study_instance_uid != plain.study_instance_uid
    assert held.anatomy.volume_cc(synth.BLADDER) != pytest.approx(plain.anatomy.volume_cc(synth.BLADDER), rel=0.05)
    # the default structure mapping recognises every planning role under its clinical name
    case = load_folder(tmp_path / "held", structures=StructureSettings(), prescription=Prescription())
    assert set(case.masks) == {Role.PTV, Role.BLADDER, Role.RECTUM, Role.BODY, Role.FEMUR_HEAD_L, Role.FEMUR_HEAD_R}
    assert case.structure_names[Role.PTV] == "PTV_4000" and case.patient_position is PatientPosition.FFS
