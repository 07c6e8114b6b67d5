"""Configuration: one TOML file parsed into frozen, typed settings.

Every setting is a dataclass field whose metadata gives its meaning and unit; the reference
file ``config/airt.toml`` documents every option and a test checks it covers them all.
Unknown keys and bad values raise :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from core.case import DEFAULT_HU_TO_DENSITY, Prescription, Role
from core.errors import ConfigError
from core.machine import ArcSpec, ArcStart, MachineModel, RotationDirection
from pipeline.dvh import METRIC_RE
from pipeline.goals import GoalSpec, GoalStages, Normalisation

T = TypeVar("T")

AE_TITLE_RE = re.compile(r"^[ -\[\]-~]{1,16}$")  # printable ASCII without backslash, 1-16 chars


def doc(text: str, unit: str = "") -> dict[str, str]:
    """Field metadata: the meaning of a setting and its unit."""
    return {"doc": text, "unit": unit}


class PlanningMethod(enum.StrEnum):
    """How plans are made: ``ai`` (the AIRT networks), ``optimize`` (gradient optimisation),
    ``auto`` (``ai`` when the installed model is qualified for unattended use, else ``optimize``)."""

    AUTO = "auto"
    AI = "ai"
    OPTIMIZE = "optimize"


class P1Policy(enum.StrEnum):
    """What happens to a plan that fails a priority-1 clinical goal: ``send`` it labelled with its
    verdict, ``hold`` its deliveries until ``airt jobs release ID``, or ``fail`` the job (its files kept)."""

    SEND = "send"
    HOLD = "hold"
    FAIL = "fail"


class Comparison(enum.StrEnum):
    """How a clinical goal's value is compared with its limit."""

    AT_LEAST = ">="
    AT_MOST = "<="


@dataclass(frozen=True)
class Peer:
    """A DICOM peer allowed to call the node."""

    ae_title: str = field(metadata=doc("Calling AE title of the peer (1-16 characters)"))
    host: str = field(
        default="", metadata=doc("IP address the peer must connect from; empty accepts any address")
    )

    def __post_init__(self) -> None:
        _check_ae("peers.ae_title", self.ae_title)


@dataclass(frozen=True)
class Destination:
    """A DICOM peer the node sends RT Plans and RT Doses to."""

    name: str = field(metadata=doc("Short name used in logs and in the deliveries table"))
    ae_title: str = field(metadata=doc("Called AE title of the destination"))
    host: str = field(metadata=doc("Host name or IP address of the destination"))
    port: int = field(metadata=doc("TCP port of the destination", "port"))
    tls: bool = field(default=False, metadata=doc("Use TLS for this destination ([tls] must be set)"))

    def __post_init__(self) -> None:
        _check_ae("destinations.ae_title", self.ae_title)
        _check_port("destinations.port", self.port)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", self.name):
            raise ConfigError(f"destinations.name {self.name!r}: use 1-64 letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class NodeSettings:
    """The Storage SCP."""

    ae_title: str = field(default="AIRT", metadata=doc("AE title of this node (1-16 characters)"))
    bind_address: str = field(
        default="127.0.0.1", metadata=doc("Address the SCP listens on; 0.0.0.0 for all interfaces")
    )
    port: int = field(default=11112, metadata=doc("TCP port of the SCP", "port"))
    allow_any_calling_aet: bool = field(
        default=False,
        metadata=doc("Accept associations from any calling AE title (insecure; the allow-list is [[peers]])"),
    )
    check_peer_host: bool = field(
        default=False, metadata=doc("Also require the connecting address to match the peer's host")
    )
    max_associations: int = field(default=8, metadata=doc("Most concurrent associations accepted", "count"))
    max_pdu_bytes: int = field(default=262144, metadata=doc("Largest PDU the node receives", "bytes"))
    max_dataset_bytes: int = field(
        default=536870912, metadata=doc("Largest dataset accepted in one C-STORE", "bytes")
    )
    acse_timeout_s: float = field(default=30.0, metadata=doc("Association negotiation timeout", "s"))
    dimse_timeout_s: float = field(default=60.0, metadata=doc("Timeout waiting for a DIMSE message", "s"))
    network_timeout_s: float = field(default=60.0, metadata=doc("Idle network timeout", "s"))

    def __post_init__(self) -> None:
        _check_ae("node.ae_title", self.ae_title)
        _check_port("node.port", self.port, allow_zero=True)
        _check_positive("node.max_associations", self.max_associations)
        if self.max_pdu_bytes < 4096:
            raise ConfigError(f"node.max_pdu_bytes must be >= 4096, got {self.max_pdu_bytes}")
        _check_positive("node.max_dataset_bytes", self.max_dataset_bytes)
        for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            _check_positive(f"node.{name}", getattr(self, name))


@dataclass(frozen=True)
class TlsSettings:
    """TLS for the SCP and for destinations with ``tls = true``. Paths are PEM files."""

    enabled: bool = field(default=False, metadata=doc("Serve the SCP over TLS"))
    cert_file: str = field(default="", metadata=doc("This node's certificate (PEM)", "path"))
    key_file: str = field(default="", metadata=doc("This node's private key (PEM), readable by the service only", "path"))
    ca_file: str = field(default="", metadata=doc("CA bundle that peers' certificates must chain to (PEM)", "path"))
    require_client_cert: bool = field(default=True, metadata=doc("Require peers to present a certificate"))

    def __post_init__(self) -> None:
        if self.enabled and not (self.cert_file and self.key_file and self.ca_file):
            raise ConfigError("tls.enabled = true needs tls.cert_file, tls.key_file and tls.ca_file")


@dataclass(frozen=True)
class StorageSettings:
    """Where received instances, job outputs and the database live."""

    data_dir: str = field(default="/var/lib/airt", metadata=doc("Data directory (instances, jobs, database)", "path"))
    database_url: str = field(
        default="",
        metadata=doc("SQLAlchemy URL of the queue; empty uses sqlite:///DATA_DIR/airt.sqlite3 (postgresql+psycopg://... for scale-out)"),
    )
    min_free_disk_mb: int = field(
        default=1024, metadata=doc("Refuse C-STOREs (Out of Resources) below this free space", "MiB")
    )

    def __post_init__(self) -> None:
        if not self.data_dir:
            raise ConfigError("storage.data_dir must not be empty")
        if self.min_free_disk_mb < 0:
            raise ConfigError("storage.min_free_disk_mb must be >= 0")


@dataclass(frozen=True)
class SchedulerSettings:
    """When a received study becomes a job."""

    stable_age_s: float = field(
        default=60.0, metadata=doc("A study with no new instance for this long is complete", "s")
    )
    poll_interval_s: float = field(default=5.0, metadata=doc("How often studies and deliveries are checked", "s"))

    def __post_init__(self) -> None:
        _check_positive("scheduler.stable_age_s", self.stable_age_s, allow_zero=True)
        _check_positive("scheduler.poll_interval_s", self.poll_interval_s)


@dataclass(frozen=True)
class WorkerSettings:
    """The planning worker."""

    enabled: bool = field(default=True, metadata=doc("Run a planning worker in this process (false: receive only)"))
    plan_timeout_s: float = field(default=1800.0, metadata=doc("A plan running longer than this fails", "s"))
    max_attempts: int = field(
        default=2, metadata=doc("Times a job is started before it fails for good (crashes count)", "count")
    )

    def __post_init__(self) -> None:
        _check_positive("worker.plan_timeout_s", self.plan_timeout_s)
        _check_positive("worker.max_attempts", self.max_attempts)


@dataclass(frozen=True)
class DeliverySettings:
    """Retries of sending results to destinations (exponential backoff)."""

    retry_initial_s: float = field(default=30.0, metadata=doc("Wait before the first retry", "s"))
    retry_max_s: float = field(default=3600.0, metadata=doc("Longest wait between retries", "s"))
    retry_factor: float = field(default=2.0, metadata=doc("Backoff multiplier per failed attempt", "ratio"))
    give_up_after_s: float = field(
        default=604800.0,
        metadata=doc("A delivery still failing this long after the job finished is marked failed (retry by hand)", "s"),
    )

    def __post_init__(self) -> None:
        _check_positive("delivery.retry_initial_s", self.retry_initial_s)
        _check_positive("delivery.retry_max_s", self.retry_max_s)
        if self.retry_factor < 1.0:
            raise ConfigError(f"delivery.retry_factor must be >= 1.0, got {self.retry_factor}")
        _check_positive("delivery.give_up_after_s", self.give_up_after_s)


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP endpoint: /healthz, /readyz, /metrics (Prometheus) and the read-only job pages.
    It has no authentication: keep it on loopback, or put a reverse proxy with TLS and
    authentication in front of it to reach it from elsewhere."""

    enabled: bool = field(
        default=True, metadata=doc("Serve /healthz, /readyz, /metrics and the job pages over HTTP")
    )
    bind_address: str = field(
        default="127.0.0.1",
        metadata=doc("Address the HTTP server listens on; no authentication, so expose it only behind a reverse proxy with TLS and authentication"),
    )
    port: int = field(default=8080, metadata=doc("TCP port of the HTTP server (0: any free port)", "port"))

    def __post_init__(self) -> None:
        if not self.bind_address.strip():
            raise ConfigError("http.bind_address must not be empty; use 127.0.0.1 (loopback) or an interface address")
        _check_port("http.port", self.port, allow_zero=True)


def _default_structure_patterns() -> dict[str, tuple[str, ...]]:
    # Case-insensitive regular expressions matched against the whole ROI name (after trimming).
    return {
        Role.PTV.value: (r"ptv([ _-]?(prostate|prost|p|high|hr|1|4000|40(\.0)?|40gy|36\.25)?)?",
                         r"ptv[ _-]?\d+(\.\d+)?([ _-]?gy)?"),
        Role.BLADDER.value: (r"bladder([ _-]?(o|wall|pri))?", r"blase", r"vessie", r"vejiga"),
        Role.RECTUM.value: (r"rectum([ _-]?(o|wall|pri))?", r"rektum", r"rectum_?anal", r"recto"),
        Role.BODY.value: (r"body", r"external", r"outline", r"skin", r"body[ _-]?contour", r"external[ _-]?\d*"),
        Role.FEMUR_HEAD_L.value: (r"femur[ _-]?head[ _-]?l", r"femoral[ _-]?head[ _-]?(l|left)",
                                  r"fem(ur)?[ _-]?l", r"femur_l", r"left[ _-]?femoral[ _-]?head"),
        Role.FEMUR_HEAD_R.value: (r"femur[ _-]?head[ _-]?r", r"femoral[ _-]?head[ _-]?(r|right)",
                                  r"fem(ur)?[ _-]?r", r"femur_r", r"right[ _-]?femoral[ _-]?head"),
    }


@dataclass(frozen=True)
class StructureSettings:
    """How ROI names map to planning roles: case-insensitive regular expressions matched against
    the whole (trimmed) name; the first role whose pattern matches wins; several matches for
    the PTV role are resolved by taking the structure with the largest volume."""

    patterns: dict[str, tuple[str, ...]] = field(
        default_factory=_default_structure_patterns,
        metadata=doc("Role -> list of regular expressions (roles: ptv, bladder, rectum, body, femur_head_l, femur_head_r)"),
    )

    def __post_init__(self) -> None:
        allowed = {r.value for r in Role}
        for role, pats in self.patterns.items():
            if role not in allowed:
                raise ConfigError(f"structures.patterns has unknown role {role!r}; allowed: {sorted(allowed)}")
            for p in pats:
                try:
                    re.compile(p)
                except re.error as exc:
                    raise ConfigError(f"structures.patterns.{role}: bad regular expression {p!r}: {exc}") from exc
        if Role.PTV.value not in self.patterns:
            raise ConfigError("structures.patterns must define the ptv role")

    def role_of(self, name: str) -> Role | None:
        """The role of an ROI name, or None when no pattern matches."""
        trimmed = name.strip()
        for role in Role:
            for p in self.patterns.get(role.value, ()):
                if re.fullmatch(p, trimmed, flags=re.IGNORECASE):
                    return role
        return None


@dataclass(frozen=True)
class MachineSettings:
    """The treatment machine (defaults: TrueBeam-like 6 MV, Millennium 120)."""

    name: str = field(default="TrueBeam", metadata=doc("TreatmentMachineName in the RT Plan (must match the TPS)"))
    energy_mv: float = field(default=6.0, metadata=doc("Nominal photon energy", "MV"))
    dose_rate_mu_min: float = field(default=600.0, metadata=doc("Maximum dose rate", "MU/min"))
    max_leaf_speed_mm_s: float = field(default=25.0, metadata=doc("Maximum leaf speed at isocenter", "mm/s"))
    max_gantry_speed_deg_s: float = field(default=6.0, metadata=doc("Maximum gantry speed", "deg/s"))
    min_leaf_gap_mm: float = field(default=0.5, metadata=doc("Minimum dynamic leaf gap", "mm"))
    dosimetric_leaf_gap_mm: float = field(default=1.3, metadata=doc("Dosimetric leaf gap", "mm"))
    source_mlc_distance_mm: float = field(default=509.0, metadata=doc("Source to MLC distance", "mm"))
    jaw_margin_mm: float = field(default=5.0, metadata=doc("Jaw margin around the MLC aperture", "mm"))
    max_mu_per_deg: float = field(default=20.0, metadata=doc("Most MU per degree of gantry travel", "MU/deg"))
    arc_start_deg: float = field(default=181.0, metadata=doc("Gantry angle of the first control point", "deg"))
    arc_stop_deg: float = field(default=179.0, metadata=doc("Gantry angle of the last control point", "deg"))
    arc_direction: RotationDirection = field(default=RotationDirection.CW, metadata=doc("Gantry rotation: CW or CC"))
    collimator_deg: float = field(default=30.0, metadata=doc("Collimator angle", "deg"))

    def model(self) -> MachineModel:
        """The sequencing MachineModel these settings describe."""
        return MachineModel(
            name=self.name,
            energy_mv=self.energy_mv,
            max_dose_rate_mu_min=self.dose_rate_mu_min,
            max_leaf_speed_mm_s=self.max_leaf_speed_mm_s,
            max_gantry_speed_deg_s=self.max_gantry_speed_deg_s,
            min_leaf_gap_mm=self.min_leaf_gap_mm,
            dosimetric_leaf_gap_mm=self.dosimetric_leaf_gap_mm,
            source_mlc_distance_mm=self.source_mlc_distance_mm,
            jaw_margin_mm=self.jaw_margin_mm,
            max_mu_per_deg=self.max_mu_per_deg,
        )

    def arc(self) -> ArcSpec:
        """The arc these settings describe (180 sectors)."""
        return ArcSpec(
            start_deg=self.arc_start_deg,
            stop_deg=self.arc_stop_deg,
            direction=self.arc_direction,
            collimator_deg=self.collimator_deg,
        )

    def __post_init__(self) -> None:
        if not 1 <= len(self.name) <= 16:
            raise ConfigError("machine.name must be 1-16 characters (DICOM SH)")
        try:
            self.model()
            self.arc()
        except ConfigError as exc:
            raise ConfigError(f"[machine] {exc}") from exc


def check_sparing_pair(pair: Any, source: str) -> tuple[float, float]:
    """A candidate plan's (bladder s_o, rectum s_o), each in [0, 0.5]; ConfigError naming ``source`` otherwise."""
    try:
        b, r = (float(v) for v in pair)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: each candidate is [bladder s_o, rectum s_o], got {pair!r}") from None
    if not (0.0 <= b <= 0.5 and 0.0 <= r <= 0.5):
        raise ConfigError(f"{source}: suppression factors s_o must be in [0, 0.5], got {[b, r]}")
    return b, r


@dataclass(frozen=True)
class PlanningSettings:
    """The planning pipeline."""

    profile: str = field(
        default="prostate_40gy_5fx",
        metadata=doc("The profile ([[profiles]]) of a study that no AE title or PTV name routes to another"),
    )
    when_p1_fails: P1Policy = field(
        default=P1Policy.SEND,
        metadata=doc("A plan failing a priority-1 goal: send (labelled with its verdict), hold (sent after airt jobs release ID) or fail (the job fails, files kept)"),
    )
    method: PlanningMethod = field(default=PlanningMethod.AUTO, metadata=doc("auto (ai when the installed model is qualified for unattended use, else optimize), ai or optimize"))
    device: str = field(default="auto", metadata=doc("auto (CUDA when present), cpu, cuda or cuda:N"))
    model_dir: str = field(default="", metadata=doc("Trained model folder; empty uses the shipped model", "path"))
    dose_grid_mm: float = field(default=4.0, metadata=doc("Dose grid spacing", "mm"))
    optimizer_iterations: int = field(default=50, metadata=doc("Iterations of the fluence optimizer (one dose forward + backward each)", "count"))
    aperture_threshold: float = field(
        default=0.02,
        metadata=doc("Leaf sequencer: a pixel belongs to a row's aperture at this fraction of the map maximum (PTV HI after sequencing 0.07 at 0.02, 0.28 at 0.15 on a synthetic case)", "fraction 0-1"),
    )
    ai_aperture_thresholds: tuple[float, ...] = field(
        default=(0.4, 0.3, 0.2, 0.1, 0.05, 0.02),
        metadata=doc("Leaf sequencer thresholds tried for AI fluence, in order: the first whose plan meets ai_min_ptv_d98_percent and ai_max_ptv_hi (reference dose, D95 = Rx) is used, else the one with the highest D98", "fractions 0-1"),
    )
    ai_min_ptv_d98_percent: float = field(default=97.0, metadata=doc("PTV D98 an AI plan's threshold must reach", "% of Rx"))
    ai_max_ptv_hi: float = field(default=0.10, metadata=doc("Largest PTV homogeneity index (D2 - D98) / D50 an AI plan's threshold may give", "ratio"))
    ai_refine_iterations: int = field(
        default=20,
        metadata=doc("Optimizer evaluations refining the AI fluence near the target before sequencing (the PTV, an 8 mm shell and bladder/rectum within 15 mm; not in the paper: the small CPU networks leave the OAR walls next to the PTV hotter than the optimizer does); 0 = the networks' fluence as it is", "count 0-200"),
    )
    arc_optimizer_iterations: int = field(
        default=150,
        metadata=doc("Machine-parameter optimisation of the sequenced arc: evaluations optimising the leaf positions and MU of every control point through the dose (machine limits kept at every step); 0 = the sequencer's arc as it is", "count 0-500"),
    )
    oar_mean_weight: float = field(
        default=10.0,
        metadata=doc("Weight of the bladder's and rectum's mean dose (outside the PTV, in units of Rx) in the fluence optimizer, the AI refinement and the arc optimisation: higher spares the low-dose bath at some cost in PTV homogeneity (the optimizer's own default is 0.5)", "0-50"),
    )
    arc_start: ArcStart = field(
        default=ArcStart.SWEEP,
        metadata=doc("Start of the machine-parameter optimisation: sweep (the fluence of every 10 adjacent sectors delivered by one leaf sweep, which keeps its modulation) or rule (the AIRT paper's one aperture per sector; for an AI fluence at the threshold search's choice)"),
    )
    arc_max_mu_per_cgy: float = field(
        default=3.0,
        metadata=doc("Soft maximum of the arc's modulation factor (MU per cGy of the fraction dose) in the machine-parameter optimisation: MU above it cost arc_mu_weight per MU/cGy (less modulation, shorter delivery)", "MU/cGy 1-20"),
    )
    arc_mu_weight: float = field(
        default=4.0,
        metadata=doc("Weight of each MU per cGy above arc_max_mu_per_cgy in the machine-parameter optimisation; 0 = MU not penalised", "0-50"),
    )
    goal_stages: GoalStages = field(
        default=GoalStages.ARC,
        metadata=doc("Planning stages whose objective holds every clinical goal ([[goals]]) as a term weighted by its priority: arc (the arc optimisation and the rescue), all (also the fluence optimizer and the AI refinement) or off (goals evaluated only)"),
    )
    rescue_rounds: int = field(
        default=2,
        metadata=doc("When a priority-1 goal fails, optimise the arc again up to this many times with the failing goals' weights raised, keeping the plan that best meets the goals in priority order; 0 = no rescue", "count 0-10"),
    )
    sparing_bladder: float = field(default=0.0, metadata=doc("Bladder suppression factor s_o of the AI pipeline (0 = baseline)", "fraction 0-0.5"))
    sparing_rectum: float = field(default=0.0, metadata=doc("Rectum suppression factor s_o of the AI pipeline (0 = baseline)", "fraction 0-0.5"))
    candidate_sparings: tuple[tuple[float, float], ...] = field(
        default=(),
        metadata=doc("Extra AI plans, one per (bladder s_o, rectum s_o) pair, each sequenced, dosed and sent as its own RT Plan + RT Dose beside the main plan, e.g. [[0.0, 0.4], [0.4, 0.0]]"),
    )
    hu_to_density: tuple[tuple[float, float], ...] = field(
        default=DEFAULT_HU_TO_DENSITY,
        metadata=doc("CT calibration curve: (HU, relative electron density) pairs, HU increasing"),
    )

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"planning.device {self.device!r}: allowed auto, cpu, cuda, cuda:N")
        if not 1.0 <= self.dose_grid_mm <= 10.0:
            raise ConfigError(f"planning.dose_grid_mm must be in [1, 10] mm, got {self.dose_grid_mm}")
        _check_positive("planning.optimizer_iterations", self.optimizer_iterations)
        if not 0.0 < self.aperture_threshold < 1.0:
            raise ConfigError(f"planning.aperture_threshold must be in (0, 1), got {self.aperture_threshold}")
        if not self.ai_aperture_thresholds or not all(0.0 < t < 1.0 for t in self.ai_aperture_thresholds):
            raise ConfigError(f"planning.ai_aperture_thresholds must list thresholds in (0, 1), got {list(self.ai_aperture_thresholds)}")
        if not 50.0 <= self.ai_min_ptv_d98_percent <= 100.0 or not 0.0 < self.ai_max_ptv_hi <= 1.0:
            raise ConfigError("planning.ai_min_ptv_d98_percent must be in [50, 100] and planning.ai_max_ptv_hi in (0, 1]")
        if not 0 <= self.ai_refine_iterations <= 200:
            raise ConfigError(f"planning.ai_refine_iterations must be in [0, 200], got {self.ai_refine_iterations}")
        if not 0 <= self.rescue_rounds <= 10:
            raise ConfigError(f"planning.rescue_rounds must be in [0, 10], got {self.rescue_rounds}")
        if not 0 <= self.arc_optimizer_iterations <= 500:
            raise ConfigError(f"planning.arc_optimizer_iterations must be in [0, 500], got {self.arc_optimizer_iterations}")
        if not 0.0 <= self.oar_mean_weight <= 50.0:
            raise ConfigError(f"planning.oar_mean_weight must be in [0, 50], got {self.oar_mean_weight}")
        if not 1.0 <= self.arc_max_mu_per_cgy <= 20.0:
            raise ConfigError(f"planning.arc_max_mu_per_cgy must be in [1, 20], got {self.arc_max_mu_per_cgy}")
        if not 0.0 <= self.arc_mu_weight <= 50.0:
            raise ConfigError(f"planning.arc_mu_weight must be in [0, 50], got {self.arc_mu_weight}")
        for name in ("sparing_bladder", "sparing_rectum"):
            v = getattr(self, name)
            if not 0.0 <= v <= 0.5:
                raise ConfigError(f"planning.{name} must be in [0, 0.5], got {v}")
        if len(self.candidate_sparings) > 8:
            raise ConfigError(f"planning.candidate_sparings: at most 8 candidate plans, got {len(self.candidate_sparings)}")
        for pair in self.candidate_sparings:
            check_sparing_pair(pair, "planning.candidate_sparings")
        hus = [p[0] for p in self.hu_to_density]
        if len(hus) < 2 or any(b <= a for a, b in itertools.pairwise(hus)):
            raise ConfigError("planning.hu_to_density needs >= 2 pairs with strictly increasing HU")
        if any(p[1] < 0 for p in self.hu_to_density):
            raise ConfigError("planning.hu_to_density densities must be >= 0")


@dataclass(frozen=True)
class Goal:
    """One clinical goal evaluated pass/fail on every plan."""

    structure: str = field(metadata=doc("Role the goal applies to (ptv, bladder, rectum, body, femur_head_l, femur_head_r)"))
    metric: str = field(metadata=doc("Dx% | Dxcc (Gy), VxGy% | VxGycc (% or cm3), Dmean, Dmax (Gy), HI, CI"))
    comparison: Comparison = field(metadata=doc("'>=' or '<='"))
    limit: float = field(metadata=doc("Limit in the metric's unit (Gy, %, cm3 or ratio)"))
    priority: int = field(default=2, metadata=doc("1 = must, 2 = should, 3 = nice to have", "rank"))

    def __post_init__(self) -> None:
        allowed = {r.value for r in Role}
        if self.structure not in allowed:
            raise ConfigError(f"goals.structure {self.structure!r}: allowed {sorted(allowed)}")
        if not METRIC_RE.fullmatch(self.metric):
            raise ConfigError(
                f"goals.metric {self.metric!r}: allowed Dx%, Dxcc, VxGy%, VxGycc, Dmean, Dmax, HI, CI "
                "(e.g. D98%, D2cc, V36Gy%, Dmean)"
            )
        if self.priority not in (1, 2, 3):
            raise ConfigError(f"goals.priority must be 1, 2 or 3, got {self.priority}")

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


@dataclass(frozen=True)
class Profile:
    """A protocol profile: a prescription, the clinical goal list of the protocol it comes from,
    and which studies it plans (by the called AE title, the calling AE title or the PTV's name)."""

    name: str = field(metadata=doc("Name of the profile (letters, digits, '_'), shown in the job and the RT Plan"))
    protocol: str = field(metadata=doc("Where the prescription and the goal list come from (citation)"))
    dose_gy: float = field(metadata=doc("Total prescribed dose to the PTV", "Gy"))
    fractions: int = field(metadata=doc("Number of fractions", "count"))
    normalisation: Normalisation = field(
        default=Normalisation.PTV_DX, metadata=doc("MU normalisation: ptv_dx, ptv_mean or none")
    )
    normalisation_volume_percent: float = field(
        default=95.0, metadata=doc("With ptv_dx: the PTV volume that receives the prescribed dose", "%")
    )
    called_ae_title: str = field(
        default="",
        metadata=doc("The node also answers as this AE title; studies sent to it are planned with this profile (empty: none)"),
    )
    calling_ae_titles: tuple[str, ...] = field(
        default=(), metadata=doc("Studies sent by these calling AE titles are planned with this profile")
    )
    match_ptv_name: bool = field(
        default=False,
        metadata=doc("Plan a study with this profile when no AE title chose one and its PTV's name carries this dose (PTV_6000 -> 60 Gy)"),
    )
    goals: tuple[Goal, ...] = field(default=(), metadata=doc("The clinical goal list ([[profiles.goals]] tables)"))

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", self.name):
            raise ConfigError(f"profiles.name {self.name!r}: use 1-64 letters, digits and '_'")
        _check_positive(f"profiles[{self.name}].dose_gy", self.dose_gy)
        _check_positive(f"profiles[{self.name}].fractions", self.fractions)
        if not 0 < self.normalisation_volume_percent < 100:
            raise ConfigError(f"profiles[{self.name}].normalisation_volume_percent must be in (0, 100)")
        if self.called_ae_title:
            _check_ae(f"profiles[{self.name}].called_ae_title", self.called_ae_title)
        for aet in self.calling_ae_titles:
            _check_ae(f"profiles[{self.name}].calling_ae_titles", aet)
        if not self.goals:
            raise ConfigError(f"profiles[{self.name}] has no goals: every plan is judged against its goal list")

    def to_prescription(self) -> Prescription:
        """The pipeline's Prescription."""
        return Prescription(dose_gy=self.dose_gy, fractions=self.fractions)

    def goal_specs(self) -> tuple[GoalSpec, ...]:
        """The goal list as the planner takes it."""
        return tuple(g.spec() for g in self.goals)


PACE_B = ("PACE-B (Brand et al., Lancet Oncol 2019;20:1531-43; protocol ICR-CTSU): organ-at-risk limits of "
          "the SBRT arm, mandatory = P1, optimal = P2. The PTV is prescribed 40 Gy as in the AIRT paper's "
          "schedule (PACE: CTV 40 Gy, PTV 36.25 Gy); PTV D98 >= 95 % and D2 <= 107.5 % of Rx (ICRU 83 near-"
          "minimum/maximum) and the mean-dose goals (P3) are this project's, not the protocol's")
CHHIP = ("CHHiP (Dearnaley et al., Lancet Oncol 2012;13:43-54 and 2016;17:1047-60), 60 Gy in 20 fractions arm: "
         "rectum, bladder and femoral-head dose-volume limits (as published; not verified against the "
         "protocol text by this project: confirm before use); high-dose limits (rectum V56.7Gy, V60Gy; "
         "bladder V60Gy) P1, the others P2. The PTV goals (one PTV at 60 Gy) are this project's, as in "
         "prostate_40gy_5fx: D98 >= 95 % and D2 <= 107.5 % of Rx (ICRU 83 near-minimum/maximum)")


def _default_profiles() -> tuple[Profile, ...]:
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


@dataclass(frozen=True)
class Settings:
    """All settings of the appliance."""

    node: NodeSettings = field(default_factory=NodeSettings, metadata=doc("The Storage SCP"))
    tls: TlsSettings = field(default_factory=TlsSettings, metadata=doc("TLS"))
    peers: tuple[Peer, ...] = field(default=(), metadata=doc("Calling peers allowed to connect (the allow-list)"))
    destinations: tuple[Destination, ...] = field(default=(), metadata=doc("Where results are sent"))
    storage: StorageSettings = field(default_factory=StorageSettings, metadata=doc("Storage"))
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings, metadata=doc("Scheduler"))
    worker: WorkerSettings = field(default_factory=WorkerSettings, metadata=doc("Worker"))
    delivery: DeliverySettings = field(default_factory=DeliverySettings, metadata=doc("Delivery"))
    http: HttpSettings = field(default_factory=HttpSettings, metadata=doc("HTTP endpoint (health, metrics, job pages)"))
    structures: StructureSettings = field(default_factory=StructureSettings, metadata=doc("Structure names"))
    machine: MachineSettings = field(default_factory=MachineSettings, metadata=doc("Machine"))
    planning: PlanningSettings = field(default_factory=PlanningSettings, metadata=doc("Planning"))
    profiles: tuple[Profile, ...] = field(default_factory=_default_profiles, metadata=doc("Protocol profiles"))

    def __post_init__(self) -> None:
        names = [d.name for d in self.destinations]
        if len(set(names)) != len(names):
            raise ConfigError(f"destinations have duplicate names: {names}")
        if any(d.tls for d in self.destinations) and not self.tls.ca_file:
            raise ConfigError("a destination has tls = true but [tls] ca_file is empty")
        _check_profiles(self)

    def profile(self, name: str | None = None) -> Profile:
        """The profile called ``name`` (default: ``planning.profile``); ConfigError naming the known ones."""
        wanted = name or self.planning.profile
        for p in self.profiles:
            if p.name == wanted:
                return p
        raise ConfigError(f"no profile named {wanted!r}; known: {[p.name for p in self.profiles]}")

    @property
    def called_ae_titles(self) -> tuple[str, ...]:
        """Every AE title the node answers as: its own, then one per profile that has one."""
        return (self.node.ae_title, *(p.called_ae_title for p in self.profiles if p.called_ae_title))

    @property
    def data_dir(self) -> Path:
        """The data directory as a Path."""
        return Path(self.storage.data_dir)

    @property
    def database_url(self) -> str:
        """The effective SQLAlchemy database URL."""
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'airt.sqlite3'}"


def _check_profiles(settings: Settings) -> None:
    """Profiles: unique names, the default exists, no AE title or PTV dose selects two profiles."""
    names = [p.name for p in settings.profiles]
    if not names:
        raise ConfigError("no [[profiles]]: at least one profile (prescription and goal list) is needed")
    if len(set(names)) != len(names):
        raise ConfigError(f"profiles have duplicate names: {names}")
    if settings.planning.profile not in names:
        raise ConfigError(f"planning.profile {settings.planning.profile!r} is not a profile; known: {names}")
    called = [p.called_ae_title.strip() for p in settings.profiles if p.called_ae_title]
    if settings.node.ae_title.strip() in called or len(set(called)) != len(called):
        raise ConfigError(f"profiles' called_ae_title must differ from each other and from node.ae_title "
                          f"{settings.node.ae_title!r}; got {called}")
    calling = [a.strip() for p in settings.profiles for a in p.calling_ae_titles]
    if len(set(calling)) != len(calling):
        raise ConfigError(f"a calling AE title is listed by two profiles: {calling}")
    doses = [p.dose_gy for p in settings.profiles if p.match_ptv_name]
    if len(set(doses)) != len(doses):
        raise ConfigError(f"two profiles with match_ptv_name = true have the same dose: {doses} Gy")


# ---------------------------------------------------------------------------------------------
# Generic TOML -> frozen dataclass conversion


def _check_ae(key: str, value: str) -> None:
    if not isinstance(value, str) or not AE_TITLE_RE.fullmatch(value) or not value.strip():
        raise ConfigError(f"{key} {value!r}: an AE title is 1-16 printable ASCII characters, no backslash")


def _check_port(key: str, value: int, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if not lo <= value <= 65535:
        raise ConfigError(f"{key} must be a TCP port in [{lo}, 65535], got {value}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return _build(tp, value, key)  # type: ignore[arg-type]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table, got {type(value).__name__}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: unsupported union type")  # not used by Settings
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        allowed = [m.value for m in tp]
        if value not in allowed:
            raise ConfigError(f"{key} = {value!r} is not allowed; allowed values: {allowed}")
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):  # TOML allows nan and inf; no setting means either
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {tp!r}")  # pragma: no cover


def _build(cls: type[T], table: dict[str, Any], prefix: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown setting(s) {unknown} in {where}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in table.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(hints[name], value, key)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"[{prefix}] is missing required setting(s) {missing}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{prefix}] {exc}") from exc


def settings_from_dict(table: dict[str, Any]) -> Settings:
    """Settings from an already-parsed TOML table (validated)."""
    moved = [k for k in ("prescription", "goals") if k in table]
    if moved:
        raise ConfigError(f"{moved}: the prescription and the goal list now belong to a protocol profile; "
                          "write them in a [[profiles]] table (dose_gy, fractions, normalisation, "
                          "[[profiles.goals]]) and name it in planning.profile; see config/airt.toml")
    return _build(Settings, table, "")


def load_settings(path: str | Path | None = None, *, overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate a TOML configuration file (``None``: built-in defaults).

    ``overrides`` is merged one level deep over the file's tables (used by ``airt demo``).
    """
    table: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            with p.open("rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {p} does not exist; pass --config PATH") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {p} is not valid TOML: {exc}") from exc
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(table.get(k), dict):
            table[k] = {**table[k], **v}
        else:
            table[k] = v
    return settings_from_dict(table)


def iter_settings(cls: Any = Settings, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field[Any]]]:
    """Every leaf setting as (dotted key, field); lists of tables use ``name[]`` keys."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            yield from iter_settings(tp, key)  # type: ignore[arg-type]
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            yield from iter_settings(args[0], key + "[]")
        else:
            yield key, f


def render_settings(settings: Settings) -> str:
    """The effective settings as TOML-like text (``airt config check``)."""
    lines: list[str] = []

    def fmt(v: Any) -> str:
        if isinstance(v, enum.Enum):
            return repr(v.value).replace("'", '"')
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, tuple | list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + " }"
        return repr(v)

    def table(obj: Any, name: str, array: bool = False) -> None:
        lines.append(f"[[{name}]]" if array else f"[{name}]")
        nested = []
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
                nested.append((f.name, v))
            else:
                lines.append(f"{f.name} = {fmt(v)}")
        lines.append("")
        for sub_name, items in nested:
            for item in items:
                table(item, f"{name}.{sub_name}", array=True)

    for f in dataclasses.fields(settings):
        v = getattr(settings, f.name)
        if dataclasses.is_dataclass(v):
            table(v, f.name)
        else:
            for item in v:
                table(item, f.name, array=True)
            if not v:
                lines.append(f"{f.name} = []")
                lines.append("")
    return "\n".join(lines)
