"""CT pixel data: the transfer syntaxes a CT is accepted in, and one stored slice decoded to
Hounsfield units.

A CT in a lossy transfer syntax (or marked LossyImageCompression 01) is refused with the reason:
its values are not the scanner's HU. Uncompressed little-endian 16-bit pixels are read straight
from the bytes; everything else goes through pydicom's decoders (with the pylibjpeg plugins for
JPEG Lossless, JPEG-LS and JPEG 2000; RLE is pydicom's own). The Storage SCP negotiates with the
same tables (:data:`LOSSLESS_SYNTAXES`, :data:`LOSSY_SYNTAXES`).
"""

from __future__ import annotations

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from appliance.dicom.common import DicomFile
from core.errors import InputError

#: Uncompressed transfer syntaxes (Implicit, Explicit LE, Explicit BE, Deflated).
UNCOMPRESSED_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
}
#: Lossless compressed transfer syntaxes a CT is accepted and decoded in (pydicom's decoders with the
#: pylibjpeg plugins: libjpeg for JPEG Lossless and JPEG-LS, OpenJPEG for JPEG 2000; RLE is pydicom's own).
LOSSLESS_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless (Process 14, SV1)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 (Lossless Only)",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 (Lossless Only)",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
#: Lossy transfer syntaxes: a CT in one of them is refused (its HU are not the scanner's), with the reason.
LOSSY_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (lossy)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (lossy)",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 (lossy)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 (lossy)",
}


def lossy_reason(transfer_syntax: str, lossy_flag: object = None) -> str | None:
    """Why a CT image is lossy-compressed (its transfer syntax, or LossyImageCompression = 01), or None."""
    if transfer_syntax in LOSSY_SYNTAXES:
        return f"its transfer syntax is {LOSSY_SYNTAXES[transfer_syntax]} ({transfer_syntax})"
    if str(lossy_flag or "").strip() == "01":
        return "LossyImageCompression is 01 (the image was lossy-compressed before)"
    return None


def read_slice_hu(inst: DicomFile, rows: int, cols: int) -> NDArray[np.float32]:
    """One CT slice in HU, as stored (``rows`` x ``cols``, float32).

    Raises
    ------
    InputError
        When the slice cannot be read again, has no or wrongly sized pixel data, is not greyscale, is
        lossy-compressed, cannot be decoded, or lacks RescaleSlope or RescaleIntercept; the message
        names the slice and says what to do.
    """
    try:
        ds = pydicom.dcmread(inst.path, force=True)
    except Exception as exc:
        raise InputError(f"CT slice {inst.sop_uid} ({inst.path.name}) cannot be read again: {exc}") from exc
    if "PixelData" not in ds:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) has no pixel data; send the series again"
        )
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith("MONOCHROME"):
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) is not a greyscale image (SamplesPerPixel {spp}, "
            f"{ds.get('PhotometricInterpretation')}); send the original CT series"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    lossy = lossy_reason(syntax, ds.get("LossyImageCompression"))
    if lossy:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) is lossy-compressed: {lossy}. Its values are not the "
            "scanner's HU; send the original or a lossless copy (uncompressed, JPEG Lossless, JPEG-LS lossless, "
            "JPEG 2000 lossless or RLE)"
        )
    bits = int(ds.get("BitsAllocated", 16))
    if syntax in UNCOMPRESSED_SYNTAXES or not syntax:
        expected = rows * cols * bits // 8
        got = len(ds.PixelData)
        if got not in (expected, expected + 1):  # one padding byte keeps the value length even
            raise InputError(
                f"CT slice {inst.sop_uid} ({inst.path.name}) has {got} bytes of pixel data, expected "
                f"{expected} for {rows}x{cols} pixels of {bits} bits; the file is damaged: send the series "
                "again"
            )
    try:
        arr = _native_pixels(ds, syntax, rows, cols)
        if arr is None:
            arr = ds.pixel_array
    except Exception as exc:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}): pixel data cannot be decoded (transfer syntax "
            f"{syntax}: {type(exc).__name__}: {exc}); send the CT uncompressed (Explicit VR Little Endian)"
        ) from exc
    if arr.shape != (rows, cols):
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) decodes to shape {arr.shape}, expected "
            f"({rows}, {cols}); the file is damaged: send the series again"
        )
    absent = [k for k in ("RescaleIntercept", "RescaleSlope") if ds.get(k) in (None, "")]
    if absent:
        raise InputError(
            f"CT slice {inst.sop_uid} ({inst.path.name}) lacks {' and '.join(absent)} (Type 1 in the CT Image "
            "module): its stored values cannot be turned into Hounsfield units, and a guess would put a "
            "wrong density under the dose. Send the series as the scanner wrote it"
        )
    slope = float(ds.RescaleSlope)
    intercept = float(ds.RescaleIntercept)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _native_pixels(ds: Dataset, syntax: str, rows: int, cols: int) -> NDArray[np.integer] | None:
    """Uncompressed little-endian 16-bit pixels straight from the bytes (pydicom's decoder
    framework costs more than the copy); None for anything else, which pydicom decodes."""
    if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):
        return None
    stored = int(ds.get("BitsStored", 16))
    high_bit = int(ds.get("HighBit", stored - 1))
    if int(ds.get("BitsAllocated", 0)) != 16 or not 1 <= stored <= 16 or high_bit != stored - 1:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    arr = np.frombuffer(ds.PixelData, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    if stored < 16:  # bits above BitsStored are not part of the value: sign-extend or mask them
        shift = 16 - stored
        arr = (arr << shift) >> shift if signed else arr & np.uint16((1 << stored) - 1)
    return arr
