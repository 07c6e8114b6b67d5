"""Fit the 6 MV beam-model parameters to generic beam data and write ``pipeline/data/beam_6mv.json``.

Run once (seconds): ``.venv/bin/python -m benchmarks.fit_beam_model [--write]``.

The targets are representative generic 6 MV values (flattened beam, SSD 100 cm, water): central-axis
percentage depth doses for 5 x 5, 10 x 10 and 20 x 20 cm fields, d_max 15 mm, and total output factors
at d_max relative to 10 x 10. They are typical of published generic beam data, not one machine's
commissioning; a clinic would fit its own measured data with the same script. The fit evaluates the
model through :meth:`pipeline.beam_model.BeamModel.central_axis_dose`, the same code path the dose
engine uses on the central axis, so the shipped parameters describe the engine as it computes.
Lateral parameters (source size, electron range, head scatter) are set from physics and checked by
the tests (penumbra, lung slab), not fitted here.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
from scipy.optimize import least_squares

from pipeline.beam_model import DEFAULT_BEAM_PATH, BeamModel

# (field side mm, depth mm, PDD % normalised to d_max)
PDD_TARGETS: tuple[tuple[float, float, float], ...] = (
    (100.0, 50.0, 86.7), (100.0, 100.0, 66.8), (100.0, 150.0, 50.7), (100.0, 200.0, 38.7), (100.0, 250.0, 29.6),
    (50.0, 50.0, 84.2), (50.0, 100.0, 62.9), (50.0, 200.0, 35.2),
    (200.0, 50.0, 88.6), (200.0, 100.0, 70.4), (200.0, 200.0, 43.6),
)
DMAX_TARGET_MM = 15.0
# (field side mm, output factor at d_max relative to 10 x 10)
OF_TARGETS: tuple[tuple[float, float], ...] = ((50.0, 0.947), (200.0, 1.057), (300.0, 1.085))

FITTED = ("mu0_per_mm", "hardening_per_mm", "buildup_mm", "scatter_weights", "scatter_buildup_mm",
          "scatter_sigma_mm")


def _unpack(x: np.ndarray, base: BeamModel) -> BeamModel:
    return replace(base, mu0_per_mm=float(x[0]), hardening_per_mm=float(x[1]), buildup_mm=float(x[2]),
                   scatter_weights=(float(x[3]), float(x[4])), scatter_buildup_mm=(float(x[5]), float(x[6])),
                   scatter_sigma_mm=(float(x[7]), float(x[8])))


def _residuals(x: np.ndarray, base: BeamModel) -> np.ndarray:
    m = _unpack(x, base)
    depths = np.arange(0.0, 301.0, 0.5)
    res = []
    dmax_dose = {}
    for field in sorted({t[0] for t in PDD_TARGETS} | {t[0] for t in OF_TARGETS} | {100.0}):
        d = m.central_axis_dose(field, depths, calibrated=False)
        dmax_dose[field] = d.max()
        for f, depth, pdd in PDD_TARGETS:
            if f == field:
                res.append((100.0 * np.interp(depth, depths, d) / d.max() - pdd) / 0.5)
        if field == 100.0:
            res.append((depths[int(np.argmax(d))] - DMAX_TARGET_MM) / 1.0)
    for f, of in OF_TARGETS:
        res.append((dmax_dose[f] / dmax_dose[100.0] - of) / 0.005)
    return np.asarray(res)


def fit(base: BeamModel) -> tuple[BeamModel, np.ndarray]:
    """Least-squares fit of the depth/scatter parameters; returns the model and the final residuals."""
    x0 = np.array([base.mu0_per_mm, base.hardening_per_mm, base.buildup_mm, *base.scatter_weights,
                   *base.scatter_buildup_mm, *base.scatter_sigma_mm])
    lo = np.array([0.002, 0.0, 1.0, 0.0, 0.0, 2.0, 5.0, 5.0, 20.0])
    hi = np.array([0.01, 0.005, 10.0, 2.0, 3.0, 200.0, 500.0, 40.0, 200.0])
    sol = least_squares(_residuals, np.clip(x0, lo, hi), bounds=(lo, hi), args=(base,), diff_step=1e-3)
    return _unpack(sol.x, base), sol.fun


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the fitted model to the shipped JSON")
    args = ap.parse_args()
    model, res = fit(BeamModel())
    print("| parameter | value |\n|---|---|")
    for name in FITTED:
        print(f"| {name} | {getattr(model, name)} |")
    print(f"\nrms residual (in target tolerance units): {float(np.sqrt(np.mean(res ** 2))):.3f}")
    depths = np.arange(0.0, 301.0, 0.5)
    for field in (50.0, 100.0, 200.0):
        d = model.central_axis_dose(field, depths)
        print(f"{field / 10:.0f}x{field / 10:.0f}: dmax {depths[np.argmax(d)]:.1f} mm, "
              f"PDD10 {100 * np.interp(100.0, depths, d) / d.max():.1f} %, Gy/MU at dmax {d.max():.5f}")
    if args.write:
        out = model.to_dict()
        out["_comment"] = ("Generic 6 MV beam model of the reference dose engine; depth/scatter parameters fitted by "
                           "benchmarks/fit_beam_model.py to representative generic 6 MV data, lateral ones set from "
                           "physics. Lengths in mm (lateral at the isocenter plane).")
        DEFAULT_BEAM_PATH.write_text(json.dumps(out, indent=2) + "\n")
        print(f"written {DEFAULT_BEAM_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
