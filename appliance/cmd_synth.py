"""``airt synth --out DIR [--seed N] [--count K] [--slices N] [--slice-mm MM] [--pixel-mm MM]
[--matrix N] [--position HFS] [--heldout]``.

Writes K synthetic prostate cases (CT series + RT Structure Set) into ``DIR/case_<seed>/``,
seeds N, N+1, ..., and prints one line per case: seed, folder and PTV volume in cm3. With
``--heldout`` the anatomy is drawn outside every range the training cases use and the ROIs carry
clinical names (``appliance.synth_dicom.HELDOUT_ROI_NAMES``): cases for judging the planner on
anatomy it was not tuned on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.case import PatientPosition
from core.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt synth``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (>= 0; default 0)")
    parser.add_argument("--count", type=int, default=1, help="number of cases, seeds SEED..SEED+COUNT-1 (default 1)")
    parser.add_argument("--slices", type=int, default=120,
                        help="axial slices per CT, centred on the prostate (default 120)")
    parser.add_argument("--slice-mm", type=float, default=2.5, help="slice spacing and thickness, mm (default 2.5)")
    parser.add_argument("--pixel-mm", type=float, default=0.977, help="in-plane pixel size, mm (default 0.977)")
    parser.add_argument("--matrix", type=int, default=512, help="rows and columns of each slice (default 512)")
    parser.add_argument("--position", default="HFS", choices=[p.value for p in PatientPosition],
                        help="DICOM PatientPosition of the CT (default HFS)")
    parser.add_argument("--heldout", action="store_true",
                        help="held-out anatomy (outside the training ranges) with clinical ROI names")


def run(args: argparse.Namespace) -> int:
    """Write the cases; bad arguments raise InputError (exit status 2 with the message)."""
    from appliance.synth_dicom import write_synth_case
    from pipeline.synth import PTV

    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.count < 1:
        raise InputError(f"--count must be >= 1, got {args.count}")
    if args.slices < 2:
        raise InputError(f"--slices must be >= 2, got {args.slices}")
    if not (0.3 <= args.pixel_mm <= 3.0 and 0.5 <= args.slice_mm <= 10.0 and 64 <= args.matrix <= 1024):
        raise InputError(f"--pixel-mm must be in [0.3, 3], --slice-mm in [0.5, 10] and --matrix in [64, 1024]; got "
                         f"{args.pixel_mm}, {args.slice_mm}, {args.matrix}")
    for seed in range(args.seed, args.seed + args.count):
        folder = Path(args.out) / f"case_{seed}"
        written = write_synth_case(folder, seed, n_slices=args.slices, patient_position=args.position,
                                   pixel_mm=args.pixel_mm, slice_mm=args.slice_mm, matrix=args.matrix,
                                   heldout=args.heldout)
        print(f"seed {seed}\t{folder}\tPTV {written.anatomy.volume_cc(PTV):.1f} cm3", flush=True)
    return 0
