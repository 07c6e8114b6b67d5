"""The pyRadPlan half of ``benchmarks/bench_pyradplan.py``: an IMRT plan of one case, made by pyRadPlan.

Runs inside pyRadPlan's own virtual environment (``<venv>/bin/python benchmarks/_plan_pyradplan.py IN.npz
OUT.npz``) and imports only numpy, SimpleITK and pyRadPlan, never the project's packages.

Input (``IN.npz``)
    ``density`` (nz, ny, nx) relative electron density on the planning grid (the project's dose grid:
    its CT resampled, air outside the body), converted to HU by inverting pyRadPlan's own default HU
    look-up table as ``_xcheck_pyradplan.py`` does, so both planners see the same density;
    ``origin_mm``, ``spacing_mm`` (x, y, z) of the grid (voxel centres, DICOM LPS, mm); ``iso_mm`` the
    isocenter (PTV centroid, x, y, z); ``mask_<role>`` (nz, ny, nx) uint8 structure masks on the grid
    (``ptv``, ``bladder``, ``rectum``, ``body``, ``femur_head_l``, ``femur_head_r``, whichever exist);
    ``config`` a JSON string: ``rx_fx_gy``, ``fractions``, ``goals`` (list of ``{structure, metric,
    comparison, limit, priority}``, limits in total dose), ``gantry_deg``, ``bixel_mm``, ``max_iter``,
    ``solver`` (``"ipopt"`` or ``"scipy"``), ``body_max_rel`` (0: no body objective),
    ``forward_cutoff_mm`` (0: no forward recalculation).

Plan
    Photons, pyRadPlan's "Generic" 6 MV machine, one coplanar beam per gantry angle (couch 0; pyRadPlan's
    gantry 0 has its source at ``iso - SAD * y``, anterior for a supine patient in LPS, the same as the
    project's gantry 0; an equispaced set is the same set whichever way the gantry turns, so the HFS/FFS
    direction of rotation does not matter), ``photonIMRT`` steering with square bixels, SVDPB dose
    influence matrix with pyRadPlan's defaults (50 mm geometric lateral cut-off, 0.995 dosimetric
    cut-off, matRad's dij sampling of the low-dose tail), on the planning grid (the CT given here *is*
    that grid). The objectives are what a planner types into matRad from the protocol (see
    :func:`objectives_from_goals`); doses in the objectives are per fraction (pyRadPlan does not scale
    them by the fraction number). Overlaps are resolved by pyRadPlan (PTV before the OARs before the
    body). The optimiser is pyRadPlan's ``nonlin_fluence`` problem with the configured solver (IPOPT,
    pyRadPlan's and matRad's default, when ``ipyopt`` is installed; else SciPy L-BFGS-B).

Output (``OUT.npz``)
    ``dose`` (nz, ny, nx) float32, the optimised plan's dose per fraction on the grid as pyRadPlan
    computes it from its dose influence matrix (its own units: the Generic machine is not calibrated in
    Gy per MU; the caller normalises); ``dose_forward`` the same weights recomputed by a forward
    calculation with ``forward_cutoff_mm`` lateral cut-off and no dosimetric cut-off (only when asked);
    ``weights``; ``info`` a JSON string: objectives used, goals not translated, bixels per beam, solver,
    iterations, seconds per stage, versions.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

#: Objective weights (matRad "penalty") by goal priority: target DVH terms, OAR terms.
TARGET_WEIGHTS = {1: 1000.0, 2: 300.0, 3: 100.0}
OAR_WEIGHTS = {1: 300.0, 2: 100.0, 3: 30.0}
#: The PTV's squared deviation to the prescription (matRad's prostate example: 1000).
PTV_DEVIATION_WEIGHT = 1000.0
#: The body's squared overdosing (matRad's prostate example: 100 at 30 Gy of 68 Gy).
BODY_WEIGHT = 100.0


def _volume_percent(cc: float, volume_cc: float) -> float:
    return float(np.clip(100.0 * cc / volume_cc, 0.0, 100.0)) if volume_cc > 0 else 100.0


def objectives_from_goals(goals: list[dict[str, Any]], rx_fx: float, fractions: int,
                          volumes_cc: dict[str, float], body_max_rel: float
                          ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """matRad-style objectives per structure (pyRadPlan objective dicts), and the goals left untranslated.

    - PTV: squared deviation to Rx (weight 1000), always;
    - ``Dx% >= L`` / ``Dx% <= L`` (``Dxcc`` through the structure's volume): min / max DVH at L, volume x;
    - ``VxGy% <= L`` / ``>= L`` (``VxGycc`` likewise): max / min DVH at x Gy, volume L;
    - ``Dmean <= L``: mean dose, reference 0, linear (i.e. minimise the mean: matRad's mean-dose
      objective is two-sided around its reference, so a reference at L would pull a lower mean up);
    - ``Dmax <= L``: squared overdosing above L;
    - HI, CI, ``Dmean >= L``, ``Dmax >= L``: no matRad objective; left to the PTV's deviation term;
    - body (when ``body_max_rel`` > 0, not a goal): squared overdosing above ``body_max_rel`` x Rx.

    Weights: target DVH terms 1000 / 300 / 100 and OAR terms 300 / 100 / 30 for priority 1 / 2 / 3.
    Doses are per fraction.
    """
    out: dict[str, list[dict[str, Any]]] = {"ptv": [{"name": "Squared Deviation", "d_ref": rx_fx,
                                                     "priority": PTV_DEVIATION_WEIGHT}]}
    skipped: list[str] = []
    for g in goals:
        role, metric, cmp, limit = g["structure"], g["metric"], g["comparison"], float(g["limit"])
        if role not in volumes_cc:
            skipped.append(f"{role} {metric}: no such structure")
            continue
        weights = TARGET_WEIGHTS if role == "ptv" else OAR_WEIGHTS
        w = weights.get(int(g["priority"]), weights[3])
        at_most = cmp == "<="
        obj: dict[str, Any] | None = None
        if metric.startswith("D") and metric.endswith(("%", "cc")) and metric not in ("Dmean", "Dmax"):
            cc = metric.endswith("cc")
            x = float(metric[1:-2] if cc else metric[1:-1])
            vol = _volume_percent(x, volumes_cc[role]) if cc else x
            obj = ({"name": "Max DVH", "d": limit / fractions, "v_max": vol} if at_most
                   else {"name": "Min DVH", "d": limit / fractions, "v_min": vol})
        elif metric.startswith("V") and "Gy" in metric:
            dose = float(metric[1:metric.index("Gy")])
            vol = _volume_percent(limit, volumes_cc[role]) if metric.endswith("cc") else limit
            obj = ({"name": "Max DVH", "d": dose / fractions, "v_max": vol} if at_most
                   else {"name": "Min DVH", "d": dose / fractions, "v_min": vol})
        elif metric == "Dmean" and at_most:
            obj = {"name": "Mean Dose", "d_ref": 0.0, "f_diff": "linear"}
        elif metric == "Dmax" and at_most:
            obj = {"name": "Squared Overdosing", "d_max": limit / fractions}
        if obj is None:
            skipped.append(f"{role} {metric} {cmp} {limit:g}: no matRad objective")
            continue
        obj["priority"] = w
        out.setdefault(role, []).append(obj)
    if body_max_rel > 0 and "body" in volumes_cc:
        out.setdefault("body", []).append({"name": "Squared Overdosing", "d_max": body_max_rel * rx_fx,
                                           "priority": BODY_WEIGHT})
    return out, skipped


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: _plan_pyradplan.py IN.npz OUT.npz", file=sys.stderr)
        return 2
    import SimpleITK
    from _xcheck_pyradplan import ct_from_density  # same folder: the density -> CT of the cross-check
    from pyRadPlan import PhotonPlan, calc_dose_forward, calc_dose_influence, fluence_optimization, generate_stf
    from pyRadPlan.cst import create_cst, create_voi

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    data = np.load(argv[1])
    cfg = json.loads(str(data["config"]))
    density = np.asarray(data["density"], dtype=np.float64)
    origin = [float(v) for v in data["origin_mm"]]
    spacing = [float(v) for v in data["spacing_mm"]]
    iso = np.asarray(data["iso_mm"], dtype=np.float64)
    rx_fx, fractions = float(cfg["rx_fx_gy"]), int(cfg["fractions"])
    masks = {k[len("mask_"):]: np.asarray(data[k], dtype=np.uint8) for k in data.files if k.startswith("mask_")}
    voxel_cc = spacing[0] * spacing[1] * spacing[2] / 1000.0

    ct = ct_from_density(density, origin, spacing)

    objectives, skipped = objectives_from_goals(
        cfg["goals"], rx_fx, fractions, {r: float(m.sum()) * voxel_cc for r, m in masks.items() if m.any()},
        float(cfg.get("body_max_rel", 0.0)))
    vois = []
    for role, mask in masks.items():
        if not mask.any():
            continue
        voi_type = "TARGET" if role == "ptv" else ("EXTERNAL" if role == "body" else "OAR")
        vois.append(create_voi(name=role, voi_type=voi_type, mask=mask, ct_image=ct,
                               objectives=objectives.get(role, [])))
    cst = create_cst(vois, ct)

    pln = PhotonPlan(machine="Generic", num_of_fractions=fractions)
    gantry = [float(a) for a in cfg["gantry_deg"]]
    pln.prop_stf = {"generator": "photonIMRT", "gantry_angles": gantry, "couch_angles": [0.0] * len(gantry),
                    "bixel_width": float(cfg["bixel_mm"]), "iso_center": np.tile(iso, (len(gantry), 1))}
    pln.prop_dose_calc = {"engine": "SVDPB", "dose_grid": ct.grid}
    pln.prop_opt = {"problem": "nonlin_fluence", "solver": str(cfg["solver"]), "max_iter": int(cfg["max_iter"]),
                    "display": False}

    t = time.perf_counter()
    stf = generate_stf(ct, cst, pln)
    seconds["stf"] = time.perf_counter() - t
    bixels = [int(b.total_number_of_bixels) for b in stf.beams]
    t = time.perf_counter()
    dij = calc_dose_influence(ct, cst, stf, pln)
    seconds["dij"] = time.perf_counter() - t
    nnz = int(dij.physical_dose.flat[0].nnz)
    print(f"pyRadPlan: {sum(bixels)} bixels, dij {nnz / 1e6:.1f} M entries in {seconds['dij']:.0f} s", flush=True)

    t = time.perf_counter()
    opt_info: dict[str, Any] = {}
    w = np.asarray(fluence_optimization(ct, cst, stf, dij, pln, opt_info=opt_info), dtype=np.float64)  # type: ignore[arg-type]
    seconds["optimise"] = time.perf_counter() - t
    dose = np.asarray(dij.physical_dose.flat[0] @ w, dtype=np.float64).reshape(density.shape)
    result_info = opt_info.get("result_info", {})
    status = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
              for k, v in (result_info.items() if isinstance(result_info, dict) else [])
              if k in ("status", "message", "success", "num_iter", "nit", "nfev")}
    history = opt_info.get("obj_history", [])
    print(f"pyRadPlan: {cfg['solver']} {opt_info.get('num_iter', '?')} iterations in {seconds['optimise']:.0f} s, "
          f"objective {history[0] if history else float('nan'):.4g} -> {history[-1] if history else float('nan'):.4g}",
          flush=True)

    out: dict[str, Any] = {"dose": dose.astype(np.float32), "weights": w}
    cutoff = float(cfg.get("forward_cutoff_mm", 0.0))
    if cutoff > 0:
        fwd = PhotonPlan(machine="Generic", num_of_fractions=fractions)
        fwd.prop_stf = pln.prop_stf
        fwd.prop_dose_calc = {"engine": "SVDPB", "dose_grid": ct.grid, "geometric_lateral_cutoff": cutoff,
                              "dosimetric_lateral_cutoff": 1.0, "enable_dij_sampling": False}
        t = time.perf_counter()
        result = calc_dose_forward(ct, cst, stf, fwd, w)
        seconds["forward"] = time.perf_counter() - t
        img_f = result["physical_dose"]
        dose_f = SimpleITK.GetArrayFromImage(img_f) if isinstance(img_f, SimpleITK.Image) else np.asarray(img_f)
        out["dose_forward"] = dose_f.astype(np.float32).reshape(density.shape)
    seconds["total"] = time.perf_counter() - t_all
    info = {
        "objectives": objectives, "goals_not_translated": skipped, "bixels_per_beam": bixels, "dij_nnz": nnz,
        "solver": str(cfg["solver"]), "iterations": opt_info.get("num_iter"), "solver_status": status,
        "objective_first_last": [history[0], history[-1]] if history else [],
        "objective_history": [float(history[i]) for i in np.linspace(0, len(history) - 1, 21).astype(int)]
        if history else [], "seconds": seconds,
        "versions": {p: _version(p) for p in ("pyRadPlan", "numpy", "scipy", "SimpleITK", "ipyopt")},
        "python": sys.version.split()[0],
    }
    np.savez_compressed(Path(argv[2]), info=json.dumps(info), **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
