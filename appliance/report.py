"""The human-readable report of a plan: DVH plot, dose slices (PNG) and a text summary."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from core.case import Case, Grid, Role

log = logging.getLogger(__name__)

COLOURS = {
    Role.PTV: "tab:red", Role.BLADDER: "tab:olive", Role.RECTUM: "tab:brown", Role.BODY: "tab:gray",
    Role.FEMUR_HEAD_L: "tab:cyan", Role.FEMUR_HEAD_R: "tab:blue",
}


def _cumulative_dvh(dose: NDArray[np.float32], rx: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    bins = np.linspace(0.0, max(float(dose.max(initial=0.0)), rx) * 1.05, 400)
    srt = np.sort(dose.ravel())
    frac = 1.0 - np.searchsorted(srt, bins, side="left") / max(srt.size, 1)
    return bins, 100.0 * frac


def write_report(out_dir: Path, *, metrics: dict[str, Any], dose: NDArray[np.float32], grid: Grid, case: Case) -> None:
    """Write report_dvh.png, report_slices.png and report.txt into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.evaluation import ct_structure_doses, dose_at_ct_voxels

    rx = case.prescription.dose_gy
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    doses = ct_structure_doses(dose, grid, case, [r for r in Role if r in case.masks and r is not Role.BODY])
    for role in Role:
        if role not in case.masks or role is Role.BODY:
            continue
        inputs = doses.get(role)
        if inputs is None:
            continue
        x, y = _cumulative_dvh(inputs.dose[inputs.mask], rx)
        ax.plot(x, y, color=COLOURS[role], label=case.structure_names.get(role, role.value))
    ax.axvline(rx, color="k", lw=0.6, ls="--")
    ax.set_xlabel("Dose (Gy)")
    ax.set_ylabel("Volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"DVH ({metrics['method']}), Rx {rx:g} Gy / {case.prescription.fractions} fx - research output")
    fig.tight_layout()
    fig.savefig(out_dir / "report_dvh.png")
    plt.close(fig)

    # Dose slices through the isocenter on the CT grid.
    iso = metrics["plan"]["isocenter_mm"]
    ox, oy, oz = case.grid.origin_mm
    dx, dy, dz = case.grid.spacing_mm
    nz, ny, nx = case.grid.shape
    ki = int(np.clip(round((iso[2] - oz) / dz), 0, nz - 1))
    ji = int(np.clip(round((iso[1] - oy) / dy), 0, ny - 1))
    ii = int(np.clip(round((iso[0] - ox) / dx), 0, nx - 1))
    views = [
        ("axial", (slice(ki, ki + 1), slice(None), slice(None)), (dx, dy)),
        ("coronal", (slice(None), slice(ji, ji + 1), slice(None)), (dx, dz)),
        ("sagittal", (slice(None), slice(None), slice(ii, ii + 1)), (dy, dz)),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5), dpi=110)
    for axis, (name, box, (sx, sy)) in zip(axes, views):
        ct = np.squeeze(case.ct_hu[box])
        d = np.squeeze(dose_at_ct_voxels(dose, grid, case.grid, box))
        ptv = np.squeeze(case.masks[Role.PTV][box])
        if name != "axial":  # z up
            ct, d, ptv = ct[::-1], d[::-1], ptv[::-1]
        extent = (0, ct.shape[1] * sx, 0, ct.shape[0] * sy)
        axis.imshow(ct, cmap="gray", vmin=-300, vmax=400, extent=extent)
        masked = np.ma.masked_less(d, 0.1 * rx)
        im = axis.imshow(masked, cmap="jet", alpha=0.45, vmin=0, vmax=1.1 * rx, extent=extent)
        axis.contour(ptv[::-1], levels=[0.5], colors="w", linewidths=0.8,
                     extent=extent)
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="Dose (Gy)")
    fig.suptitle("Dose of the exported arc (reference engine) - research output, not clinically approved")
    fig.savefig(out_dir / "report_slices.png")
    plt.close(fig)

    (out_dir / "report.txt").write_text(format_summary(metrics))


def _num(v: Any, nd: int = 2) -> str:
    return f"{v:.{nd}f}" if isinstance(v, int | float) else "-"


def format_candidates(candidates: list[Any]) -> str:
    """The candidate plans of metrics.json as a text table, one row each (its folder last)."""
    lines = ["Candidate plans (AI networks, OAR suppression s_o; each sent as its own RT Plan + RT Dose):",
             f"  {'s_bladder':>9} {'s_rectum':>9} {'PTV HI':>8} {'PTV D98':>8} {'bladder Dmean':>14} "
             f"{'rectum Dmean':>13} {'MU':>7}  folder"]
    for c in candidates:
        if not isinstance(c, dict):
            continue
        sp, st = c.get("sparing") or {}, c.get("structures") or {}
        ptv, bl, rec = st.get("ptv") or {}, st.get("bladder") or {}, st.get("rectum") or {}
        lines.append(f"  {_num(sp.get('bladder')):>9} {_num(sp.get('rectum')):>9} {_num(ptv.get('HI'), 3):>8} "
                     f"{_num(ptv.get('D98_Gy')):>8} {_num(bl.get('Dmean_Gy')):>14} {_num(rec.get('Dmean_Gy')):>13} "
                     f"{_num(c.get('total_MU'), 1):>7}  {c.get('folder', '-')}")
    return "\n".join(lines) + "\n"


def format_summary(metrics: dict[str, Any]) -> str:
    """A plain-text summary of metrics.json for a physicist."""
    lines = [metrics.get("disclaimer", ""), ""]
    p = metrics["prescription"]
    lines.append(f"case {metrics['case_id']}  method {metrics['method']}  device {metrics.get('device', '?')}")
    verdict = metrics.get("verdict")
    if isinstance(verdict, dict):
        lines.append(f"VERDICT (clinical goals): {verdict.get('text', '?')}")
    profile = metrics.get("profile")
    if isinstance(profile, dict):
        lines.append(f"profile {profile.get('name', '?')} ({profile.get('reason', '?')})")
    lines.append(f"Rx {p['dose_Gy']:g} Gy in {p['fractions']} fx; normalisation {p['normalisation']} "
                 f"(factor {p['normalisation_factor']:.3f}); total MU/fx {metrics['plan']['total_MU']:.0f}")
    lines.append("")
    lines.append(f"{'structure':<14}{'name':<18}{'cm3':>8}{'Dmean':>8}{'D98':>8}{'D50':>8}{'D2':>8}{'Dmax':>8}")
    for role, m in metrics["structures"].items():
        lines.append(
            f"{role:<14}{str(m.get('name', ''))[:17]:<18}{m.get('volume_cm3', float('nan')):8.1f}"
            f"{m.get('Dmean_Gy', float('nan')):8.2f}{m.get('D98_Gy', float('nan')):8.2f}"
            f"{m.get('D50_Gy', float('nan')):8.2f}{m.get('D2_Gy', float('nan')):8.2f}{m.get('Dmax_Gy', float('nan')):8.2f}"
        )
    ptv = metrics["structures"].get("ptv", {})
    lines.append(f"PTV HI {ptv.get('HI', float('nan')):.3f}  Paddick CI {ptv.get('CI_paddick', float('nan')):.3f}")
    lines.append("")
    lines.append("clinical goals:")
    for g in metrics.get("goals", []):
        status = {True: "PASS", False: "FAIL", None: "n/a "}[g.get("passed")]
        value = g.get("value")
        vs = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"  [{status}] P{g['priority']} {g['structure']} {g['metric']} {g['comparison']} {g['limit']:g}: {vs}")
    lines.append("")
    if metrics.get("candidates"):
        lines.append(format_candidates(metrics["candidates"]))
    lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in metrics["timings_s"].items()))
    return "\n".join(lines) + "\n"
