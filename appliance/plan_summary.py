"""What a finished plan tells the node, as one typed value.

The planner (:func:`appliance.planning.plan_case`) makes a :class:`PlanSummary`, writes it into
``metrics.json`` (key ``"summary"``) once, and returns it; the planning process hands it to the
worker, which reads it by field to fill the job row, decide what happens to a plan that failed a
priority-1 goal and log the outcome. Nothing searches ``metrics.json`` for a key spelling.

Torch-free: the worker imports it without the planning stack.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.errors import PlanningError

#: The files every plan's output folder holds; the worker refuses a "success" without them.
PLAN_FILES = ("rtplan.dcm", "rtdose.dcm", "metrics.json")


@dataclass(frozen=True)
class PlanSummary:
    """The outcome of planning one case.

    Parameters
    ----------
    case_id
        The case's identifier (sanitised StudyInstanceUID unless given).
    method
        ``ai`` or ``optimize``: the method that made the plan.
    profile, profile_reason
        The protocol profile planned to, and why it was chosen.
    dose_gy, fractions
        The prescription of that profile.
    verdict
        The plan's verdict against the profile's clinical goals (e.g. ``"all P1 met; P2 7/8"``).
    p1_met
        Whether every priority-1 goal is met; None when the profile has no goal list.
    ptv_d98_gy, ptv_hi, bladder_dmean_gy, rectum_dmean_gy
        The figures the job list shows (reference dose of the exported arc); None where the
        structure is absent.
    total_mu
        Monitor units of the exported arc.
    rtplan_uid
        SOPInstanceUID of the RT Plan written.
    stages_s
        Wall time of each planning stage (load, setup, plan stages, export, evaluate, ...), s.
    """

    case_id: str
    method: str
    profile: str
    profile_reason: str
    dose_gy: float
    fractions: int
    verdict: str
    p1_met: bool | None
    ptv_d98_gy: float | None
    ptv_hi: float | None
    bladder_dmean_gy: float | None
    rectum_dmean_gy: float | None
    total_mu: float
    rtplan_uid: str
    stages_s: Mapping[str, float] = field(default_factory=dict)

    @property
    def p1_failed(self) -> bool:
        """True when a priority-1 goal failed (False when all are met or there is no goal list)."""
        return self.p1_met is False

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (``metrics.json`` ``"summary"``, the planning process's result)."""
        out = dataclasses.asdict(self)
        out["stages_s"] = dict(self.stages_s)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanSummary:
        """The summary written by :meth:`to_dict`.

        Raises
        ------
        PlanningError
            A field is missing, unknown or of the wrong type (a planner of another version wrote it).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data))
        unknown = sorted(set(data) - names)
        if missing or unknown:
            raise PlanningError(f"the plan summary has missing fields {missing} and unknown fields {unknown}; "
                                "the planner and the node are of different versions: restart the node")
        values = dict(data)
        for key in ("ptv_d98_gy", "ptv_hi", "bladder_dmean_gy", "rectum_dmean_gy"):
            values[key] = _number_or_none(values[key], key)
        values["stages_s"] = {str(k): float(v) for k, v in dict(values["stages_s"]).items()}
        if values["p1_met"] not in (True, False, None):
            raise PlanningError(f"the plan summary's p1_met is {values['p1_met']!r}, not true, false or null")
        return cls(**values)


def _number_or_none(value: object, key: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanningError(f"the plan summary's {key} is {value!r}, not a finite number or null")
    return float(value)
