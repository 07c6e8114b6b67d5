"""Sequencing fidelity: the dose of the sequenced (deliverable) plan vs the dose of the optimizer's
unsequenced fluence, on synthetic cases (fast path, 4 mm), both by the reference engine and with
the same MU normalisation (PTV D95 = Rx on the unsequenced dose).

    .venv/bin/python -m benchmarks.bench_fidelity [--seeds 1 2 3 4 5] [--iterations 150]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from appliance.config import Settings
from core.case import Role
from pipeline.dvh import structure_metrics
from pipeline.gamma import gamma_pass_rate
from pipeline.goals import normalisation_factor
from pipeline.optimizer import optimize_fluence
from pipeline.problem import build_problem
from pipeline.synth import synth_case
from sequencing.deliverability import check_deliverable, delivery_time_s
from sequencing.fluence import fluence_from_sequence
from sequencing.sequencer import sequence_arc


def run_case(seed: int, iterations: int) -> dict[str, float]:
    """One row: PTV HI/D98 before and after sequencing, gamma 3%/3mm, sequencing time."""
    st = Settings()
    case = synth_case(seed, spacing_mm=(4.0, 4.0, 4.0))
    machine, arc = st.machine.model(), st.machine.arc()
    prob = build_problem(case, arc, machine, hu_curve=st.planning.hu_to_density, spacing_mm=4.0)
    fx = case.prescription.fractions
    rx_fx = case.prescription.dose_gy / fx
    res = optimize_fluence(prob.engine, prob.masks, rx_gy=rx_fx, iterations=iterations)
    ptv = prob.masks[Role.PTV].numpy()
    factor = normalisation_factor(res.dose, ptv, rx_gy=rx_fx)
    fluence = res.fluence * factor
    t0 = time.perf_counter()
    seq = sequence_arc(fluence, arc, machine, threshold=st.planning.aperture_threshold)
    seq_ms = 1000 * (time.perf_counter() - t0)
    assert check_deliverable(seq, machine) == []
    with torch.inference_mode():
        d0 = prob.engine(torch.as_tensor(fluence, dtype=torch.float32)).numpy() * fx
        d1 = prob.engine(torch.as_tensor(fluence_from_sequence(seq, machine), dtype=torch.float32)).numpy() * fx
    vcc = prob.grid.voxel_volume_cc
    rx = case.prescription.dose_gy
    m0 = structure_metrics(d0, ptv, vcc, rx_gy=rx)
    m1 = structure_metrics(d1, ptv, vcc, rx_gy=rx)
    body = prob.masks[Role.BODY].numpy()
    return {
        "seed": seed, "HI_unseq": m0["HI"], "HI_seq": m1["HI"], "D98_unseq": m0["D98_Gy"], "D98_seq": m1["D98_Gy"],
        "gamma_3_3": 100 * gamma_pass_rate(d0, d1, prob.grid.spacing_mm, mask=body),
        "gamma_2_2": 100 * gamma_pass_rate(d0, d1, prob.grid.spacing_mm, dose_percent=2.0, dta_mm=2.0, mask=body),
        "seq_ms": seq_ms, "MU": seq.total_mu, "delivery_s": delivery_time_s(seq, machine),
    }


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--iterations", type=int, default=Settings().planning.optimizer_iterations)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [run_case(s, args.iterations) for s in args.seeds]
    cols = ["seed", "HI_unseq", "HI_seq", "D98_unseq", "D98_seq", "gamma_3_3", "gamma_2_2", "seq_ms", "MU", "delivery_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    med = {c: statistics.median(float(r[c]) for r in rows) for c in cols[1:]}
    print("| median | " + " | ".join(f"{med[c]:.3f}" for c in cols[1:]) + " |")
    print()
    print(f"PTV HI change (sequenced - unsequenced), median: {med['HI_seq'] - med['HI_unseq']:+.3f}; "
          f"gamma 3%/3mm (global, >10% of max, in body) median {med['gamma_3_3']:.1f} %")


if __name__ == "__main__":
    main()
