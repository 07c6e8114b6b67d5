"""Time of loading a clinical-size case (DICOM folder -> Case) with ``appliance.dicom.case_loader.load_case``.

Run: ``python -m benchmarks.bench_load [--repeats 5] [--slices 120] [--matrix 512]``.

A synthetic prostate case (``appliance.synth_dicom``: a CT series of ``slices`` x ``matrix`` x
``matrix`` pixels and an RT Structure Set of about 8 ROIs) is written by a child process, so
that the peak resident memory reported is the loader's (this process only loads). Prints a
markdown table: median, min and max wall time of ``load_case`` over the repeats, the slice and
voxel counts, the peak RSS of the loading process, and a breakdown of one load.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from appliance.config import StructureSettings
from appliance.dicom.case_loader import load_folder
from core.case import Prescription

_WRITE = (
    "import sys; from pathlib import Path; from appliance.synth_dicom import write_synth_case; "
    "w = write_synth_case(Path(sys.argv[1]), 11, n_slices=int(sys.argv[2]), matrix=int(sys.argv[3]), "
    "pixel_mm=450.0 / int(sys.argv[3])); print(len(w.roi_names))"
)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _stage_seconds(folder: Path, structures: StructureSettings, rx: Prescription) -> dict[str, float]:
    """Cumulative seconds of the loader's main stages in one profiled load."""
    prof = cProfile.Profile()
    prof.enable()
    load_folder(folder, structures=structures, prescription=rx)
    prof.disable()
    stats = pstats.Stats(prof)
    wanted = {
        "_scan_folder": "scan headers",
        "_read_ct_volume": "read CT pixels",
        "_structure_masks": "structures (parse + rasterise)",
        "rasterise_polygons": "  of which rasterise",
    }
    out: dict[str, float] = {}
    for (_file, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if name in wanted:
            out[wanted[name]] = out.get(wanted[name], 0.0) + float(row[3])
    return {label: out[label] for label in wanted.values() if label in out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed loads (median reported)")
    parser.add_argument("--slices", type=int, default=120, help="CT slices")
    parser.add_argument("--matrix", type=int, default=512, help="rows = columns of each slice")
    args = parser.parse_args(argv)

    structures = StructureSettings()
    rx = Prescription()
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        folder = Path(tmp) / "case"
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-c", _WRITE, str(folder), str(args.slices), str(args.matrix)],
            check=True, capture_output=True, text=True,
        )
        n_rois = int(res.stdout.strip().splitlines()[-1])
        write_s = time.perf_counter() - t0
        size_mib = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        rss_before = _peak_rss_mib()
        times = []
        case = None
        for _ in range(args.repeats):
            case = None  # free the previous case before the next load
            t = time.perf_counter()
            case = load_folder(folder, structures=structures, prescription=rx)
            times.append(time.perf_counter() - t)
        assert case is not None
        peak = _peak_rss_mib()
        stages = _stage_seconds(folder, structures, rx)

    voxels = int(case.ct_hu.size)
    print(f"# load_case: {args.slices} x {args.matrix} x {args.matrix} CT + RTSTRUCT ({n_rois} ROIs, "
          f"{len(case.masks)} mapped to roles), {size_mib:.0f} MiB on disk; written in {write_s:.1f} s\n")
    print("| median s | min s | max s | repeats | slices | voxels | peak RSS MiB | RSS before loads MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | {args.repeats} | "
          f"{case.grid.shape[0]} | {voxels:,} | {peak:.0f} | {rss_before:.0f} |")
    print("\nOne profiled load (profiling adds overhead), cumulative seconds per stage:\n")
    print("| stage | s |")
    print("|---|---:|")
    for name, secs in stages.items():
        print(f"| {name} | {secs:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
