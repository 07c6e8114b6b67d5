"""Protocol profiles: a prescription, the clinical goal list ([[profiles]], [[profiles.goals]]) and
which studies a profile plans; the two shipped profiles and the rules profiles must keep together."""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from typing import Annotated, Self

from pydantic import AfterValidator, model_validator

from appliance.config_types import (
    AeTitle,
    AeTitleOrEmpty,
    Bool,
    Count,
    Float,
    Int,
    Positive,
    matching,
    section,
    setting,
)
from core.case import Prescription, Role
from pipeline.dvh import METRIC_RE
from pipeline.goals import GoalSpec, Normalisation


class Comparison(enum.StrEnum):
    """How a clinical goal's value is compared with its limit."""

    AT_LEAST = ">="
    AT_MOST = "<="


def _role(value: str) -> str:
    allowed = sorted(r.value for r in Role)
    if value not in allowed:
        raise ValueError(f"allowed {allowed}")
    return value


@section
class Goal:
    """One clinical goal evaluated pass/fail on every plan."""

    structure: Annotated[str, AfterValidator(_role)] = setting(
        "Role the goal applies to (ptv, bladder, rectum, body, femur_head_l, femur_head_r)")
    metric: Annotated[str, matching(METRIC_RE.pattern, "allowed Dx%, Dxcc, VxGy%, VxGycc, Dmean, Dmax, HI, CI "
                                                       "(e.g. D98%, D2cc, V36Gy%, Dmean)")] = setting(
        "Dx% | Dxcc (Gy), VxGy% | VxGycc (% or cm3), Dmean, Dmax (Gy), HI, CI")
    comparison: Comparison = setting("'>=' or '<='")
    limit: Float = setting("Limit in the metric's unit (Gy, %, cm3 or ratio)")
    priority: Int = setting("1 = must, 2 = should, 3 = nice to have", "rank", default=2, ge=1, le=3)

    def spec(self) -> GoalSpec:
        """The goal as the planner takes it."""
        return GoalSpec(self.structure, self.metric, self.comparison.value, self.limit, self.priority)


PTV_NAME_DOSE_RE = re.compile(r"(\d+(?:[.,]\d+)?)\s*(c?gy)?", re.IGNORECASE)


def ptv_name_dose_gy(name: str) -> float | None:
    """The dose a PTV's name carries, Gy, or None: ``PTV_6000`` -> 60 (a number >= 100 is cGy),
    ``PTV 60Gy`` / ``PTV_60`` -> 60, ``PTV_36.25`` -> 36.25, ``PTV_7800cGy`` -> 78; ``PTV`` and
    ``PTV_prostate`` carry none. The last number in the name is the one read."""
    found = PTV_NAME_DOSE_RE.findall(name)
    if not found:
        return None
    value_text, unit = found[-1]
    value = float(value_text.replace(",", "."))
    if unit.lower() == "cgy" or (not unit and value >= 100):
        value /= 100.0
    return value if 10.0 <= value <= 100.0 else None


@section
class Profile:
    """A protocol profile: a prescription, the clinical goal list of the protocol it comes from,
    and which studies it plans (by the called AE title, the calling AE title or the PTV's name)."""

    name: Annotated[str, matching(r"[A-Za-z0-9_]{1,64}", "use 1-64 letters, digits and '_'")] = setting(
        "Name of the profile (letters, digits, '_'), shown in the job and the RT Plan")
    protocol: str = setting("Where the prescription and the goal list come from (citation)")
    dose_gy: Positive = setting("Total prescribed dose to the PTV", "Gy")
    fractions: Count = setting("Number of fractions", "count")
    normalisation: Normalisation = setting("MU normalisation: ptv_dx, ptv_mean or none", default=Normalisation.PTV_DX)
    normalisation_volume_percent: Float = setting(
        "With ptv_dx: the PTV volume that receives the prescribed dose", "%", default=95.0, gt=0, lt=100)
    called_ae_title: AeTitleOrEmpty = setting(
        "The node also answers as this AE title; studies sent to it are planned with this profile (empty: none)",
        default="")
    calling_ae_titles: tuple[AeTitle, ...] = setting(
        "Studies sent by these calling AE titles are planned with this profile", default=())
    match_ptv_name: Bool = setting(
        "Plan a study with this profile when no AE title chose one and its PTV's name carries this dose "
        "(PTV_6000 -> 60 Gy)", default=False)
    goals: tuple[Goal, ...] = setting("The clinical goal list ([[profiles.goals]] tables)", default=())

    @model_validator(mode="after")
    def _has_goals(self) -> Self:
        if not self.goals:
            raise ValueError(f"goals is empty: every plan is judged against its goal list; add [[profiles.goals]] "
                             f"tables to profile {self.name!r}")
        return self

    def to_prescription(self) -> Prescription:
        """The pipeline's Prescription."""
        return Prescription(dose_gy=self.dose_gy, fractions=self.fractions)

    def goal_specs(self) -> tuple[GoalSpec, ...]:
        """The goal list as the planner takes it."""
        return tuple(g.spec() for g in self.goals)


def check_profiles(profiles: Sequence[Profile], default_profile: str, node_ae_title: str) -> None:
    """Profiles together: unique names, the default exists, no AE title or PTV dose selects two profiles.

    Raises
    ------
    ValueError
        Naming the keys at fault (``planning.profile``, ``profiles' called_ae_title``, ...).
    """
    names = [p.name for p in profiles]
    if not names:
        raise ValueError("no [[profiles]]: at least one profile (prescription and goal list) is needed")
    if len(set(names)) != len(names):
        raise ValueError(f"profiles have duplicate names: {names}")
    if default_profile not in names:
        raise ValueError(f"planning.profile {default_profile!r} is not a profile; known: {names}")
    called = [p.called_ae_title.strip() for p in profiles if p.called_ae_title]
    if node_ae_title.strip() in called or len(set(called)) != len(called):
        raise ValueError(f"profiles' called_ae_title must differ from each other and from node.ae_title "
                         f"{node_ae_title!r}; got {called}")
    calling = [a.strip() for p in profiles for a in p.calling_ae_titles]
    if len(set(calling)) != len(calling):
        raise ValueError(f"a calling AE title is listed by two profiles: {calling}")
    doses = [p.dose_gy for p in profiles if p.match_ptv_name]
    if len(set(doses)) != len(doses):
        raise ValueError(f"two profiles with match_ptv_name = true have the same dose: {doses} Gy")


PACE_B = ("PACE-B (Brand et al., Lancet Oncol 2019;20:1531-43; protocol ICR-CTSU): organ-at-risk limits of "
          "the SBRT arm, mandatory = P1, optimal = P2. The PTV is prescribed 40 Gy as in the AIRT paper's "
          "schedule (PACE: CTV 40 Gy, PTV 36.25 Gy); PTV D98 >= 95 % and D2 <= 107.5 % of Rx (ICRU 83 near-"
          "minimum/maximum) and the mean-dose goals (P3) are this project's, not the protocol's")
CHHIP = ("CHHiP (Dearnaley et al., Lancet Oncol 2012;13:43-54 and 2016;17:1047-60), 60 Gy in 20 fractions arm: "
         "rectum, bladder and femoral-head dose-volume limits (as published; not verified against the "
         "protocol text by this project: confirm before use); high-dose limits (rectum V56.7Gy, V60Gy; "
         "bladder V60Gy) P1, the others P2. The PTV goals (one PTV at 60 Gy) are this project's, as in "
         "prostate_40gy_5fx: D98 >= 95 % and D2 <= 107.5 % of Rx (ICRU 83 near-minimum/maximum)")


def default_profiles() -> tuple[Profile, ...]:
    """The shipped profiles: PACE-B 40 Gy in 5 fractions and CHHiP 60 Gy in 20 fractions."""
    ge, le = Comparison.AT_LEAST, Comparison.AT_MOST
    return (
        Profile(
            name="prostate_40gy_5fx", protocol=PACE_B, dose_gy=40.0, fractions=5, match_ptv_name=True,
            goals=(
                Goal("ptv", "D98%", ge, 38.0, 1),
                Goal("ptv", "D2%", le, 43.0, 1),
                Goal("ptv", "HI", le, 0.12, 2),
                Goal("rectum", "V36Gycc", le, 2.0, 1),
                Goal("rectum", "V36Gycc", le, 1.0, 2),
                Goal("rectum", "V29Gy%", le, 20.0, 2),
                Goal("rectum", "V18.1Gy%", le, 50.0, 2),
                Goal("bladder", "V37Gycc", le, 10.0, 1),
                Goal("bladder", "V37Gycc", le, 5.0, 2),
                Goal("bladder", "V18.1Gy%", le, 40.0, 2),
                Goal("femur_head_l", "V14.5Gy%", le, 5.0, 2),
                Goal("femur_head_r", "V14.5Gy%", le, 5.0, 2),
                Goal("rectum", "Dmean", le, 12.0, 3),
                Goal("bladder", "Dmean", le, 14.0, 3),
            ),
        ),
        Profile(
            name="prostate_60gy_20fx", protocol=CHHIP, dose_gy=60.0, fractions=20, match_ptv_name=True,
            goals=(
                Goal("ptv", "D98%", ge, 57.0, 1),
                Goal("ptv", "D2%", le, 64.5, 1),
                Goal("rectum", "V60Gy%", le, 3.0, 1),
                Goal("rectum", "V56.7Gy%", le, 15.0, 1),
                Goal("rectum", "V52.7Gy%", le, 30.0, 2),
                Goal("rectum", "V48.6Gy%", le, 50.0, 2),
                Goal("rectum", "V40.5Gy%", le, 60.0, 2),
                Goal("rectum", "V32.4Gy%", le, 70.0, 2),
                Goal("rectum", "V24.3Gy%", le, 80.0, 2),
                Goal("bladder", "V60Gy%", le, 5.0, 1),
                Goal("bladder", "V56.8Gy%", le, 25.0, 2),
                Goal("bladder", "V48.6Gy%", le, 50.0, 2),
                Goal("femur_head_l", "V40.5Gy%", le, 50.0, 2),
                Goal("femur_head_r", "V40.5Gy%", le, 50.0, 2),
            ),
        ),
    )
