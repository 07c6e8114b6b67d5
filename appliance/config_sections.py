"""The sections of the configuration file about the node itself: [node], [tls], [[peers]],
[[destinations]], [storage], [scheduler], [worker], [delivery], [http], [structures] and [machine].

Each is a frozen pydantic dataclass (:func:`appliance.config_types.section`); ranges are in the fields.
"""

from __future__ import annotations

import re
from typing import Annotated, Self

from pydantic import AfterValidator, field_validator, model_validator

from appliance.config_types import (
    AeTitle,
    Angle,
    Bool,
    Count,
    Float,
    Int,
    NonNegative,
    NonNegativeSeconds,
    Port,
    PortOrAny,
    Positive,
    PositiveSeconds,
    RegularExpression,
    matching,
    section,
    setting,
)
from core.case import Role
from core.errors import ConfigError
from core.machine import ArcSpec, MachineModel, RotationDirection


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty; use 127.0.0.1 (loopback) or an interface address")
    return value


@section
class Peer:
    """A DICOM peer allowed to call the node."""

    ae_title: AeTitle = setting("Calling AE title of the peer (1-16 characters)")
    host: str = setting("IP address the peer must connect from; empty accepts any address", default="")


@section
class Destination:
    """A DICOM peer the node sends RT Plans and RT Doses to."""

    name: Annotated[str, matching(r"[A-Za-z0-9_.-]{1,64}", "use 1-64 letters, digits, '_', '.', '-'")] = setting(
        "Short name used in logs and in the deliveries table")
    ae_title: AeTitle = setting("Called AE title of the destination")
    host: str = setting("Host name or IP address of the destination")
    port: Port = setting("TCP port of the destination", "port")
    tls: Bool = setting("Use TLS for this destination ([tls] must be set)", default=False)


@section
class NodeSettings:
    """The Storage SCP."""

    ae_title: AeTitle = setting("AE title of this node (1-16 characters)", default="AIRT")
    bind_address: str = setting("Address the SCP listens on; 0.0.0.0 for all interfaces", default="127.0.0.1")
    port: PortOrAny = setting("TCP port of the SCP", "port", default=11112)
    allow_any_calling_aet: Bool = setting(
        "Accept associations from any calling AE title (insecure; the allow-list is [[peers]])", default=False)
    check_peer_host: Bool = setting("Also require the connecting address to match the peer's host", default=False)
    max_associations: Count = setting("Most concurrent associations accepted", "count", default=8)
    max_pdu_bytes: Int = setting("Largest PDU the node receives", "bytes", default=262144, ge=4096)
    max_dataset_bytes: Count = setting("Largest dataset accepted in one C-STORE", "bytes", default=536870912)
    acse_timeout_s: PositiveSeconds = setting("Association negotiation timeout", "s", default=30.0)
    dimse_timeout_s: PositiveSeconds = setting("Timeout waiting for a DIMSE message", "s", default=60.0)
    network_timeout_s: PositiveSeconds = setting("Idle network timeout", "s", default=60.0)


@section
class TlsSettings:
    """TLS for the SCP and for destinations with ``tls = true``. Paths are PEM files."""

    enabled: Bool = setting("Serve the SCP over TLS", default=False)
    cert_file: str = setting("This node's certificate (PEM)", "path", default="")
    key_file: str = setting("This node's private key (PEM), readable by the service only", "path", default="")
    ca_file: str = setting("CA bundle that peers' certificates must chain to (PEM)", "path", default="")
    require_client_cert: Bool = setting("Require peers to present a certificate", default=True)

    @model_validator(mode="after")
    def _files_when_enabled(self) -> Self:
        if self.enabled and not (self.cert_file and self.key_file and self.ca_file):
            raise ValueError("enabled = true needs tls.cert_file, tls.key_file and tls.ca_file")
        return self


@section
class StorageSettings:
    """Where received instances, job outputs and the database live."""

    data_dir: str = setting("Data directory (instances, jobs, database)", "path", default="/var/lib/airt", min_length=1)
    database_url: str = setting(
        "SQLAlchemy URL of the queue; empty uses sqlite:///DATA_DIR/airt.sqlite3 (postgresql+psycopg://... for scale-out)",
        default="")
    min_free_disk_mb: Int = setting("Refuse C-STOREs (Out of Resources) below this free space", "MiB", default=1024, ge=0)


@section
class SchedulerSettings:
    """When a received study becomes a job."""

    stable_age_s: NonNegativeSeconds = setting("A study with no new instance for this long is complete", "s", default=60.0)
    poll_interval_s: PositiveSeconds = setting("How often studies and deliveries are checked", "s", default=5.0)


@section
class WorkerSettings:
    """The planning worker."""

    enabled: Bool = setting("Run a planning worker in this process (false: receive only)", default=True)
    plan_timeout_s: PositiveSeconds = setting("A plan running longer than this fails", "s", default=1800.0)
    max_attempts: Count = setting("Times a job is started before it fails for good (crashes count)", "count", default=2)
    warm_up: Bool = setting(
        "Plan a small synthetic case when a new planning process has had no job for 3 s (first-call costs paid "
        "early: about 2-3 s of a first job, for a warm-up of 10-15 s that a job arriving meanwhile waits for)",
        default=False)
    planner_jobs: Count = setting(
        "Jobs a planning process plans before a fresh one replaces it (1: a new process per job)", "count",
        default=25)
    planner_max_rss_mb: Positive = setting(
        "A planning process whose peak memory passed this is replaced after its job", "MiB", default=8192.0)
    planner_reserve_mb: NonNegative = setting(
        "Memory a new planning process writes once and keeps for its jobs while it waits for the first (the "
        "first job's engine buffers then fault in no fresh pages: about 2 s less engine set-up; 0: none)",
        "MiB", default=1536.0)


@section
class DeliverySettings:
    """Retries of sending results to destinations (exponential backoff)."""

    retry_initial_s: PositiveSeconds = setting("Wait before the first retry", "s", default=30.0)
    retry_max_s: PositiveSeconds = setting("Longest wait between retries", "s", default=3600.0)
    retry_factor: Float = setting("Backoff multiplier per failed attempt", "ratio", default=2.0, ge=1.0)
    give_up_after_s: PositiveSeconds = setting(
        "A delivery still failing this long after the job finished is marked failed (retry by hand)", "s",
        default=604800.0)


@section
class HttpSettings:
    """The HTTP endpoint: /healthz, /readyz, /metrics (Prometheus) and the read-only job pages.
    It has no authentication: keep it on loopback, or put a reverse proxy with TLS and
    authentication in front of it to reach it from elsewhere."""

    enabled: Bool = setting("Serve /healthz, /readyz, /metrics and the job pages over HTTP", default=True)
    bind_address: Annotated[str, AfterValidator(_not_blank)] = setting(
        "Address the HTTP server listens on; no authentication, so expose it only behind a reverse proxy with TLS "
        "and authentication", default="127.0.0.1")
    port: PortOrAny = setting("TCP port of the HTTP server (0: any free port)", "port", default=8080)


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


@section
class StructureSettings:
    """How ROI names map to planning roles: case-insensitive regular expressions matched against
    the whole (trimmed) name; the first role whose pattern matches wins; several matches for
    the PTV role are resolved by taking the structure with the largest volume."""

    patterns: dict[str, tuple[RegularExpression, ...]] = setting(
        "Role -> list of regular expressions (roles: ptv, bladder, rectum, body, femur_head_l, femur_head_r)",
        default_factory=_default_structure_patterns)

    @field_validator("patterns")
    @classmethod
    def _known_roles(cls, patterns: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        allowed = sorted(r.value for r in Role)
        unknown = [role for role in patterns if role not in allowed]
        if unknown:
            raise ValueError(f"unknown role {unknown[0]!r}; allowed: {allowed}")
        if Role.PTV.value not in patterns:
            raise ValueError("must define the ptv role")
        return patterns

    def role_of(self, name: str) -> Role | None:
        """The role of an ROI name, or None when no pattern matches."""
        trimmed = name.strip()
        for role in Role:
            for p in self.patterns.get(role.value, ()):
                if re.fullmatch(p, trimmed, flags=re.IGNORECASE):
                    return role
        return None


@section
class MachineSettings:
    """The treatment machine (defaults: TrueBeam-like 6 MV, Millennium 120)."""

    name: str = setting("TreatmentMachineName in the RT Plan (must match the TPS)", default="TrueBeam",
                        min_length=1, max_length=16)
    energy_mv: Positive = setting("Nominal photon energy", "MV", default=6.0)
    dose_rate_mu_min: Positive = setting("Maximum dose rate", "MU/min", default=600.0)
    max_leaf_speed_mm_s: Positive = setting("Maximum leaf speed at isocenter", "mm/s", default=25.0)
    max_gantry_speed_deg_s: Positive = setting("Maximum gantry speed", "deg/s", default=6.0)
    min_leaf_gap_mm: NonNegative = setting("Minimum dynamic leaf gap", "mm", default=0.5)
    dosimetric_leaf_gap_mm: NonNegative = setting("Dosimetric leaf gap", "mm", default=1.3)
    source_mlc_distance_mm: Positive = setting("Source to MLC distance", "mm", default=509.0)
    jaw_margin_mm: NonNegative = setting("Jaw margin around the MLC aperture", "mm", default=5.0)
    max_mu_per_deg: Positive = setting("Most MU per degree of gantry travel", "MU/deg", default=20.0)
    arc_start_deg: Angle = setting("Gantry angle of the first control point", "deg", default=181.0)
    arc_stop_deg: Angle = setting("Gantry angle of the last control point", "deg", default=179.0)
    arc_direction: RotationDirection = setting("Gantry rotation: CW or CC", default=RotationDirection.CW)
    collimator_deg: Angle = setting("Collimator angle", "deg", default=30.0)

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

    @model_validator(mode="after")
    def _machine_and_arc(self) -> Self:
        if self.arc_start_deg == self.arc_stop_deg:
            raise ValueError(f"arc_start_deg and arc_stop_deg must differ, both are {self.arc_start_deg}")
        try:  # the machine model's and the arc's own checks (the ranges above are the same ones)
            self.model()
            self.arc()
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

