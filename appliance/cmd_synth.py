"""``airt synth --out DIR [--seed N] [--count K] [--slices N] [--position HFS]``.

Writes K synthetic prostate cases (CT series + RT Structure Set) into ``DIR/case_<seed>/``,
seeds N, N+1, ..., and prints one line per case: seed, folder and PTV volume in cm3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.case import PatientPosition
from pipeline.errors import InputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``airt synth``."""
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first case (>= 0; default 0)")
    parser.add_argument("--count", type=int, default=1, help="number of cases, seeds SEED..SEED+COUNT-1 (default 1)")
    parser.add_argument("--slices", type=int, default=120,
                        help="axial slices per CT, 2.5 mm apart, centred on the prostate (default 120)")
    parser.add_argument("--position", default="HFS", choices=[p.value for p in PatientPosition],
                        help="DICOM PatientPosition of the CT (default HFS)")


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
    for seed in range(args.seed, args.seed + args.count):
        folder = Path(args.out) / f"case_{seed}"
        written = write_synth_case(folder, seed, n_slices=args.slices, patient_position=args.position)
        print(f"seed {seed}\t{folder}\tPTV {written.anatomy.volume_cc(PTV):.1f} cm3", flush=True)
    return 0
