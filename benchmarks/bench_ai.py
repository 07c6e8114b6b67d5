"""Benchmark of the AIRT AI planner against the optimizer on held-out synthetic cases.

For each seed (not in the model's training data): the optimizer plan (the teacher recipe of the
training cache, timed), the AI plan (full pipeline), the AI plan without dose feedback (F0
directly, "-DF") and AI plans with bladder or rectum suppression s_o = 0.2, 0.4. Every plan is
sequenced, its delivered fluence dosed by the reference engine on a 4 mm grid and MU-normalised
to PTV D95 = Rx, then evaluated (PTV HI, D98, D2, Paddick CI; bladder/rectum Dmean, D2). The fast
dose network is compared with the reference engine on the network grid for the AI plan's
delivered fluence (global gamma 3 %/3 mm, 10 % threshold, reference supersampled to 2 mm; MAE in
the PTV in % of Rx).

    .venv/bin/python -m benchmarks.bench_ai [--seeds 2000:2020] [--model DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from appliance.config import Settings
from pipeline.ai_planner import load_pipeline, predict_fluence, prepare_case
from pipeline.beam_model import load_beam_model
from pipeline.case import Role
from pipeline.dose_engine import ReferenceDoseEngine
from pipeline.dvh import structure_metrics
from pipeline.geometry import ArcGeometry
from pipeline.goals import normalisation_factor
from pipeline.synth import synth_case
from pipeline.training.data import (
    DEFAULT_HU_CURVE,
    PlanningRecipe,
    masks_on_grid,
    parse_seed_range,
    plan_synthetic_case,
)
from sequencing.fluence import fluence_from_sequence
from sequencing.machine import ArcSpec, MachineModel
from sequencing.sequencer import ArcSequence, sequence_arc

MACHINE = MachineModel()
ARC = ArcSpec()


def gamma_pass_rate(ref: np.ndarray, ev: np.ndarray, spacing_mm: float, dose_pct: float = 3.0,
                    dta_mm: float = 3.0, threshold_pct: float = 10.0, supersample: int = 4) -> float:
    """Global gamma pass rate (%) of ``ev`` against ``ref`` (same grid), brute-force search.

    The reference is supersampled ``supersample`` times (trilinear); candidate points are those
    within ``dta_mm`` on the fine grid. Points with ``ev`` or ``ref`` below ``threshold_pct`` of the
    reference maximum are not evaluated.
    """
    fine = ndimage.zoom(ref, supersample, order=1)
    h = spacing_mm / supersample
    r = int(np.floor(dta_mm / h))
    dd = dose_pct / 100.0 * float(ref.max())
    mask = (ref > threshold_pct / 100.0 * ref.max()) | (ev > threshold_pct / 100.0 * ref.max())
    idx = np.argwhere(mask)
    centre = np.clip(np.rint(idx * supersample + (supersample - 1) / 2.0).astype(int), 0, np.array(fine.shape) - 1)
    best = np.full(len(idx), np.inf)
    evv = ev[mask]
    for dz in range(-r, r + 1):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                dist2 = (dz * dz + dy * dy + dx * dx) * h * h
                if dist2 > dta_mm**2:
                    continue
                p = np.clip(centre + np.array([dz, dy, dx]), 0, np.array(fine.shape) - 1)
                g = (fine[p[:, 0], p[:, 1], p[:, 2]] - evv) ** 2 / dd**2 + dist2 / dta_mm**2
                best = np.minimum(best, g)
    return 100.0 * float(np.mean(best <= 1.0)) if len(best) else float("nan")


def evaluate(seq: ArcSequence, engine: ReferenceDoseEngine, masks: dict[Role, torch.Tensor], rx_fx: float,
             fractions: int) -> dict[str, float]:
    """Quality of a sequenced plan: reference dose, D95 = Rx, metrics (Gy over all fractions)."""
    delivered = fluence_from_sequence(seq, MACHINE)
    with torch.inference_mode():
        dose = engine(torch.as_tensor(delivered, dtype=torch.float32)).numpy()
    ptv = masks[Role.PTV].numpy()
    dose = dose * normalisation_factor(dose, ptv, rx_gy=rx_fx, mode="ptv_dx", volume_percent=95.0) * fractions
    vcc = engine.grid.voxel_volume_cc
    body = masks[Role.BODY].numpy() if Role.BODY in masks else None
    p = structure_metrics(dose, ptv, vcc, rx_gy=rx_fx * fractions, target=True, body_mask=body)
    row = {"HI": p["HI"], "D98_Gy": p["D98_Gy"], "D2_Gy": p["D2_Gy"], "CI": p["CI_paddick"]}
    for role in (Role.BLADDER, Role.RECTUM):
        m = structure_metrics(dose, masks[role].numpy(), vcc, rx_gy=rx_fx * fractions)
        row[f"{role.value}_Dmean_Gy"] = m["Dmean_Gy"]
        row[f"{role.value}_D2_Gy"] = m["D2_Gy"]
    return row


def run_case(seed: int, model_dir: str, recipe: PlanningRecipe) -> dict[str, Any]:
    """All plans and measurements of one held-out case."""
    case = synth_case(seed, spacing_mm=(4.0, 4.0, 4.0))
    rx_fx = case.prescription.dose_gy / case.prescription.fractions
    fx = case.prescription.fractions
    geometry = ArcGeometry(arc=ARC, isocenter_mm=case.ptv_centroid_mm(), position=case.patient_position,
                           machine=MACHINE)
    engine = ReferenceDoseEngine.for_case(case, geometry, load_beam_model(),
                                          hu_curve=DEFAULT_HU_CURVE, spacing_mm=4.0)
    masks = masks_on_grid(case, engine.grid)
    out: dict[str, Any] = {"seed": seed, "quality": {}, "time_s": {}, "sparing": {}}

    t0 = time.perf_counter()
    teacher = plan_synthetic_case(seed, machine=MACHINE, arc=ARC, recipe=recipe)
    out["time_s"]["optimizer"] = time.perf_counter() - t0
    out["quality"]["optimizer"] = evaluate(teacher.sequence, engine, masks, rx_fx, fx)

    def ai(sparing: dict[Role, float], feedback: bool = True) -> tuple[ArcSequence, float, dict[str, float]]:
        t = time.perf_counter()
        fl, ms = predict_fluence(case, model_dir, geometry=geometry, rx_gy=rx_fx, sparing=sparing, device="cpu",
                                 feedback=feedback)
        seq = sequence_arc(fl, ARC, MACHINE, threshold=Settings().planning.aperture_threshold)
        return seq, time.perf_counter() - t, ms

    predict_fluence(case, model_dir, geometry=geometry, rx_gy=rx_fx, sparing={}, device="cpu")  # warm-up
    seq_ai, t_ai, ms = ai({})
    out["time_s"]["ai"] = t_ai
    out["module_ms"] = ms
    out["quality"]["AI full"] = evaluate(seq_ai, engine, masks, rx_fx, fx)
    seq_df, _, _ = ai({}, feedback=False)
    out["quality"]["AI -DF"] = evaluate(seq_df, engine, masks, rx_fx, fx)
    for role in (Role.BLADDER, Role.RECTUM):
        out["sparing"][role.value] = {0.0: out["quality"]["AI full"][f"{role.value}_Dmean_Gy"]}
        for s in (0.2, 0.4):
            seq_s, _, _ = ai({role: s})
            out["sparing"][role.value][s] = evaluate(seq_s, engine, masks, rx_fx, fx)[f"{role.value}_Dmean_Gy"]

    # Fast dose vs reference engine on the network grid, for the AI plan's delivered fluence.
    pipe = load_pipeline(model_dir, "cpu")
    prep = prepare_case(case, geometry, pipe.spec, pipe.fast_dose.config, "cpu")  # type: ignore[arg-type]
    eng_net = ReferenceDoseEngine.for_case(case, geometry, load_beam_model(), hu_curve=pipe.spec.hu_to_density,
                                           spacing_mm=pipe.spec.net_grid_mm)
    delivered = torch.as_tensor(fluence_from_sequence(seq_ai, MACHINE), dtype=torch.float32)
    with torch.inference_mode():
        ref = eng_net(delivered).numpy() / rx_fx
        fast = pipe.fast_dose(delivered[None] / (pipe.spec.fluence_mu_per_rx_gy * rx_fx), prep.primary)[0, 0].numpy()
    ptv = prep.masks["ptv"].numpy() > 0
    out["fast_dose"] = {"gamma_3_3_pct": gamma_pass_rate(ref, fast, pipe.spec.net_grid_mm),
                        "mae_ptv_pct_rx": 100.0 * float(np.abs(fast - ref)[ptv].mean())}
    return out


def _med(vals: list[float]) -> float:
    v = [x for x in vals if np.isfinite(x)]
    return statistics.median(v) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="2000:2020", help="held-out synthetic seeds, A:B (B exclusive)")
    ap.add_argument("--model", default="", help="model folder (default: the shipped model)")
    ap.add_argument("--iterations", type=int, default=60, help="optimizer evaluations (the teacher recipe)")
    ap.add_argument("--plan-grid-mm", type=float, default=8.0, help="optimizer dose grid, mm (teacher recipe)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = PlanningRecipe(spacing_mm=args.plan_grid_mm, iterations=args.iterations)
    rows = []
    for seed in parse_seed_range(args.seeds):
        rows.append(run_case(seed, args.model, recipe))
        print(f"seed {seed} done", flush=True)
    n = len(rows)

    t_opt = _med([r["time_s"]["optimizer"] for r in rows])
    t_ai = _med([r["time_s"]["ai"] for r in rows])
    print(f"\n### Planning time, {n} held-out cases (CPU, {args.threads} threads; medians)\n")
    print("| method | median s | ratio optimizer / AI |\n|---|---|---|")
    print(f"| optimizer ({args.iterations} evaluations, {args.plan_grid_mm:g} mm) + sequencing | {t_opt:.2f} | |")
    print(f"| AI (fluence prediction + sequencing) | {t_ai:.2f} | {t_opt / t_ai:.1f} |")

    print("\n### AI modules, median ms (Table S4 shape)\n")
    print("| module | ms |\n|---|---|")
    for k in rows[0]["module_ms"]:
        print(f"| {k} | {_med([r['module_ms'][k] for r in rows]):.1f} |")

    cols = ["HI", "D98_Gy", "D2_Gy", "CI", "bladder_Dmean_Gy", "bladder_D2_Gy", "rectum_Dmean_Gy", "rectum_D2_Gy"]
    print(f"\n### Plan quality after sequencing (reference engine, 4 mm, PTV D95 = Rx = 40 Gy; medians of {n})\n")
    print("| method | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for method in ("optimizer", "AI full", "AI -DF"):
        print(f"| {method} | " + " | ".join(f"{_med([r['quality'][method][c] for r in rows]):.3f}" for c in cols)
              + " |")

    print(f"\n### Fast dose vs reference engine (network grid; medians of {n})\n")
    print("| gamma 3%/3mm pass % | MAE in PTV, % of Rx |\n|---|---|")
    print(f"| {_med([r['fast_dose']['gamma_3_3_pct'] for r in rows]):.1f} | "
          f"{_med([r['fast_dose']['mae_ptv_pct_rx'] for r in rows]):.2f} |")

    print(f"\n### Sparing controls: targeted organ Dmean, Gy (medians of {n})\n")
    print("| organ | s_o = 0 | s_o = 0.2 | s_o = 0.4 |\n|---|---|---|---|")
    for organ in ("bladder", "rectum"):
        print(f"| {organ} | " + " | ".join(f"{_med([r['sparing'][organ][s] for r in rows]):.2f}"
                                            for s in (0.0, 0.2, 0.4)) + " |")


if __name__ == "__main__":
    main()
