"""Fuzzing the DICOM input path with hypothesis, for a bounded time: the SCP's header parser on mutated
bytes, and the case loader on a small synthetic series whose files or contour data are mutated. The
only exceptions allowed out are the project's refusals (StoreRefusedError / InputError); a hang
fails the example's deadline. Derandomised so that CI runs are repeatable (about a minute in all).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from appliance.config import StructureSettings
from appliance.cstore import StoreRefusedError, parse_header
from appliance.dicom.case_loader import load_folder
from appliance.synth_dicom import SynthWritten
from core.case import Prescription
from core.errors import InputError
from tests.node_helpers import tiny_case

FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))

Mutation = tuple[str, int, int]
mutations = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                               st.integers(0, 2**31), st.integers(0, 255)), min_size=1, max_size=6)


def mutate(data: bytes, muts: list[Mutation], *, window: int | None = None) -> bytes:
    """Apply byte mutations (positions modulo the data length, or the first ``window`` bytes)."""
    buf = bytearray(data)
    for kind, pos, val in muts:
        if not buf:
            break
        i = pos % min(len(buf), window or len(buf))
        if kind == "flip":
            buf[i] ^= 1 << (val % 8)
        elif kind == "set":
            buf[i] = val
        elif kind == "insert":
            buf[i:i] = bytes([val]) * (1 + val % 7)
        elif kind == "delete":
            del buf[i:i + 1 + val % 7]
        else:
            del buf[i:]
    return bytes(buf)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> SynthWritten:
    return tiny_case(tmp_path_factory.mktemp("fuzz") / "case", seed=6, n_slices=12)


def _expected(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


def test_header_parser_on_mutated_bytes(pristine: SynthWritten) -> None:
    sources = [(p.read_bytes(), *_expected(p)) for p in (pristine.ct_paths[3], pristine.rtstruct_path)]

    @settings(FUZZ, max_examples=1500, deadline=5000)
    @given(which=st.integers(0, 1), muts=mutations, header_only=st.booleans())
    def run(which: int, muts: list[Mutation], header_only: bool) -> None:
        data, sop_class, sop_uid = sources[which]
        bad = mutate(data, muts, window=2048 if header_only else None)
        try:
            hdr = parse_header(bad, expected_class=sop_class, expected_uid=sop_uid)
        except StoreRefusedError as exc:
            assert 0xA700 <= exc.status <= 0xCFFF and str(exc)
            return
        assert hdr.sop_instance_uid == sop_uid and hdr.study_uid.replace(".", "").isdigit()

    run()


STRUCTURES = StructureSettings()


def _load(folder: Path) -> None:
    try:
        case = load_folder(folder, structures=STRUCTURES, prescription=Prescription())
    except InputError as exc:
        assert str(exc)
        return
    assert case.ct_hu.shape == case.grid.shape and np.isfinite(case.ct_hu).all()


def test_loader_on_a_series_with_mutated_files(pristine: SynthWritten, tmp_path_factory: pytest.TempPathFactory
                                               ) -> None:
    files = [*pristine.ct_paths, pristine.rtstruct_path]

    @settings(FUZZ, max_examples=150, deadline=30000)
    @given(picks=st.lists(st.tuples(st.integers(0, len(files) - 1), mutations, st.booleans()), min_size=1,
                          max_size=3))
    def run(picks: list[tuple[int, list[Mutation], bool]]) -> None:
        folder = tmp_path_factory.mktemp("mut")
        shutil.copytree(pristine.folder, folder, dirs_exist_ok=True)
        for k, muts, header_only in picks:
            target = folder / files[k].name
            target.write_bytes(mutate(target.read_bytes(), muts, window=3000 if header_only else None))
        _load(folder)
        shutil.rmtree(folder, ignore_errors=True)

    run()


finite = st.floats(-1e4, 1e4, allow_nan=False)
odd = st.one_of(finite, st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -0.0]))


def test_loader_on_hostile_contour_data(pristine: SynthWritten, tmp_path_factory: pytest.TempPathFactory) -> None:
    @settings(FUZZ, max_examples=120, deadline=30000)
    @given(roi=st.sampled_from(["PTV", "Body", "Rectum"]), points=st.lists(odd, min_size=0, max_size=40),
           n_declared=st.integers(0, 50), geometric=st.sampled_from(["CLOSED_PLANAR", "POINT", "OPEN_PLANAR", ""]))
    def run(roi: str, points: list[float], n_declared: int, geometric: str) -> None:
        folder = tmp_path_factory.mktemp("contour")
        shutil.copytree(pristine.folder, folder, dirs_exist_ok=True)
        rs = folder / pristine.rtstruct_path.name
        ds = pydicom.dcmread(rs)
        number = next(r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == roi)
        item = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number)
        assume(len(item.get("ContourSequence", [])) > 0)  # the ROI is drawn on these 12 slices
        contour: Dataset = item.ContourSequence[len(item.ContourSequence) // 2]
        contour.ContourData = [f"{v:.6g}" for v in points] if points else []
        contour.NumberOfContourPoints = n_declared
        contour.ContourGeometricType = geometric
        ds.save_as(rs)
        _load(folder)
        shutil.rmtree(folder, ignore_errors=True)

    run()
