"""UIDs (appliance.dicom.uids): new UIDs are strict and unique, survive a file round trip, and the
checks for received and written UIDs apply their own rules."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import RTPlanStorage

from appliance.dicom.common import save_dataset
from appliance.dicom.uids import check_uid, check_written_uid, is_strict_uid, new_uid
from core.errors import ExportError, InputError


def test_new_uids_are_strict_unique_and_read_back(tmp_path: Path) -> None:
    uids = [new_uid() for _ in range(50)]
    assert len(set(uids)) == 50
    assert all(u.startswith("2.25.") and is_strict_uid(u) for u in uids)
    ds = Dataset()
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = check_written_uid(uids[0], "plan SOP Instance UID")
    ds.Modality = "RTPLAN"
    save_dataset(ds, tmp_path / "plan.dcm")
    back = pydicom.dcmread(tmp_path / "plan.dcm")
    assert check_uid(back.SOPInstanceUID, "SOPInstanceUID") == uids[0]


def test_received_uids_may_have_leading_zeros_written_ones_may_not() -> None:
    assert check_uid("1.2.03", "SeriesInstanceUID") == "1.2.03"
    with pytest.raises(ExportError, match=r"plan Series Instance UID '1\.2\.03'.*appliance\.dicom\.uids\.new_uid"):
        check_written_uid("1.2.03", "plan Series Instance UID")


@pytest.mark.parametrize("bad", ["", "1..2", "1.2.", "1.2.x", "1" * 65, None, 12])
def test_bad_uids_are_refused_naming_the_attribute(bad: object) -> None:
    with pytest.raises(InputError, match="StudyInstanceUID"):
        check_uid(bad, "StudyInstanceUID")
    with pytest.raises(ExportError, match="dose SOP Instance UID"):
        check_written_uid(bad, "dose SOP Instance UID")
