"""Synthetic male pelvis anatomy for prostate planning: CT in HU and structure masks from a seed.

The anatomy is defined in continuous patient coordinates (mm, LPS: +x towards the patient's
left, +y posterior, +z superior) by analytic shapes (ellipsoids, capsules, a super-elliptic
body cylinder) in a *reference frame*, pulled back through a random similarity transform
(scaling about the prostate centre, small rotations) and a smooth random displacement field.
Every mask is evaluated at voxel centres, so a seed gives the same anatomy at any resolution.
The target volumes follow the AIRT paper's Table S1::

    CTV = Prostate U ((Prostate + 3 mm) n SeminalVes)
    PTV = CTV + margin

where ``+ m`` is an expansion by Euclidean distance in mm. The distances are computed by a
distance transform on a local 1.25 mm grid anchored to the anatomy (not to the output grid)
and interpolated at the output voxel centres, so the PTV does not depend on the output
spacing either (a 3 mm margin on a 4 mm grid would otherwise vanish).

Random variation
----------------
Natural variation (always, random magnitude): body size and shape, subcutaneous fat thickness,
prostate size, seminal vesicle course, bladder filling (100-300 cm3 before scaling), rectum
calibre and gas pockets, femoral head size and position, a translation of the anatomy by up to
about 10 mm. Augmentation as in the paper (section "Data Augmentation" of its supplement): each
of the following is applied with probability 0.5, otherwise the default in brackets is used:
uniform scaling by 0.8-1.2 [1.0] about the prostate centre, rotations of -5..+5 degrees about
each axis [0], a smooth non-rigid displacement field of 2-6 mm maximum amplitude [none], a PTV
margin of 3-6 mm [3 mm, Table S1], a rectum expansion of 0-5 mm [0 mm]. The margins change
the contours only (as in the paper), not the CT.

No torch and no DICOM here; ``appliance.synth_dicom`` writes the result as DICOM.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from core.case import Case, Grid, PatientPosition, Prescription, Role
from core.errors import InputError

log = logging.getLogger(__name__)

Arr = NDArray[np.float32]
Vec = NDArray[np.float64]

#: Structure names of the generator (TG-263 where TG-263 defines one).
BODY = "Body"
PTV = "PTV"
CTV = "CTV"
PROSTATE = "Prostate"
SEMINAL_VESICLES = "SeminalVes"
BLADDER = "Bladder"
RECTUM = "Rectum"
FEMUR_HEAD_L = "Femur_Head_L"
FEMUR_HEAD_R = "Femur_Head_R"
BONE_PELVIC = "Bone_Pelvic"
FAT = "Fat"
MUSCLE = "Muscle"

#: Structure name of each planning role in synthetic cases.
ROLE_NAMES: dict[Role, str] = {
    Role.PTV: PTV,
    Role.BLADDER: BLADDER,
    Role.RECTUM: RECTUM,
    Role.BODY: BODY,
    Role.FEMUR_HEAD_L: FEMUR_HEAD_L,
    Role.FEMUR_HEAD_R: FEMUR_HEAD_R,
}

# Hounsfield units of the tissues.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MUSCLE = 40.0
HU_URINE = 10.0
HU_ORGAN_WALL = 40.0
HU_PROSTATE = 38.0
HU_SV = 32.0
HU_RECTAL_CONTENT = 20.0
HU_GAS = -800.0
HU_BOWEL = 30.0
HU_CORTICAL = 1000.0
HU_TRABECULAR = 250.0

#: Spacing of the local grid on which target distances are computed, mm.
TARGET_GRID_MM = 1.25
#: Reference-frame position of the prostate centre before the random translation, mm.
PROSTATE_REF_MM = (0.0, -15.0, 0.0)
#: Default field of view of ``synth_case`` (x, y, z extents centred on the reference origin), mm.
DEFAULT_FOV_MM = (496.0, 400.0, 300.0)
CTV_SV_MARGIN_MM = 3.0
CORTEX_MM = 2.5
WALL_MM = 3.0


# --------------------------------------------------------------------------------------------
# Analytic primitives in the reference frame (signed distances in mm, negative inside)
# --------------------------------------------------------------------------------------------

Points = tuple[Arr, Arr, Arr]


@dataclass(frozen=True)
class Ellipsoid:
    """Ellipsoid of centre ``c`` and semi-axes ``r`` (mm), axis-aligned in the reference frame.

    ``sdf`` is the usual first-order approximation of the signed distance (exact zero level set,
    close to the true distance within a few mm of the surface).
    """

    c: tuple[float, float, float]
    r: tuple[float, float, float]

    def bounds(self) -> tuple[Vec, Vec]:
        c, r = np.asarray(self.c), np.asarray(self.r)
        return c - r, c + r

    def sdf(self, q: Points) -> Arr:
        u = [(q[a] - np.float32(self.c[a])) / np.float32(self.r[a]) for a in range(3)]
        k0 = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
        w = [u[a] / np.float32(self.r[a]) for a in range(3)]
        k1 = np.sqrt(w[0] * w[0] + w[1] * w[1] + w[2] * w[2])
        return (k0 * (k0 - 1.0) / np.maximum(k1, np.float32(1e-6))).astype(np.float32)


@dataclass(frozen=True)
class Capsule:
    """Segment from ``a`` to ``b`` thickened by radius ``r`` (mm); exact signed distance."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    r: float

    def bounds(self) -> tuple[Vec, Vec]:
        a, b = np.asarray(self.a), np.asarray(self.b)
        return np.minimum(a, b) - self.r, np.maximum(a, b) + self.r

    def sdf(self, q: Points) -> Arr:
        ab = [self.b[i] - self.a[i] for i in range(3)]
        ab2 = sum(v * v for v in ab) or 1e-9
        pa = [q[i] - np.float32(self.a[i]) for i in range(3)]
        t = np.clip((pa[0] * ab[0] + pa[1] * ab[1] + pa[2] * ab[2]) / np.float32(ab2), 0.0, 1.0)
        d = [pa[i] - t * np.float32(ab[i]) for i in range(3)]
        return (np.sqrt(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) - np.float32(self.r)).astype(np.float32)


@dataclass(frozen=True)
class SuperEllipticCylinder:
    """Body outline: ``(|x/a|^n + |y/b|^n)^(1/n) <= 1`` for every z (mm); approximate sdf."""

    cx: float
    cy: float
    a: float
    b: float
    n: float

    def bounds(self) -> tuple[Vec, Vec]:
        big = 1e6
        return (np.array([self.cx - self.a, self.cy - self.b, -big]),
                np.array([self.cx + self.a, self.cy + self.b, big]))

    def sdf(self, q: Points) -> Arr:
        n = np.float32(self.n)
        f = (np.abs((q[0] - np.float32(self.cx)) / np.float32(self.a)) ** n
             + np.abs((q[1] - np.float32(self.cy)) / np.float32(self.b)) ** n) ** (1.0 / n)
        return ((f - 1.0) * np.float32(min(self.a, self.b))).astype(np.float32)


Primitive = Ellipsoid | Capsule | SuperEllipticCylinder


@dataclass(frozen=True)
class Solid:
    """Union of ``parts`` minus the union of ``holes`` (signed distance by min/max)."""

    parts: tuple[Primitive, ...]
    holes: tuple[Primitive, ...] = ()

    def bounds(self) -> tuple[Vec, Vec]:
        lo = np.min([p.bounds()[0] for p in self.parts], axis=0)
        hi = np.max([p.bounds()[1] for p in self.parts], axis=0)
        return lo, hi


# --------------------------------------------------------------------------------------------
# Random parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthParams:
    """Every random quantity of one synthetic case (all lengths in mm, angles in degrees).

    Drawn by :func:`draw_params` from the seed alone, so they do not depend on the grid.
    """

    seed: int
    shift_mm: tuple[float, float, float]
    body_ab_mm: tuple[float, float]
    body_exponent: float
    fat_mm: float
    prostate_r_mm: tuple[float, float, float]
    sv_tip_mm: tuple[float, float, float]
    sv_radius_mm: float
    bladder_volume_cc: float
    rectum_radius_mm: float
    rectum_top_dx_mm: float
    gas_pockets: tuple[tuple[float, float, float, float], ...]  # (t along rectum 0..1, angle rad, r, depth)
    femur_head_r_mm: float
    femur_head_x_mm: float
    femur_head_z_mm: float
    noise_hu: float
    scale: float
    rotation_deg: tuple[float, float, float]
    deform_amplitude_mm: float
    deform_modes: tuple[tuple[float, ...], ...]  # per mode: (kx, ky, kz, dx, dy, dz, phase, weight)
    ptv_margin_mm: float
    rectum_margin_mm: float
    bowel: tuple[tuple[float, ...], ...]  # per loop: (x0, y0, z0, x1, y1, z1, radius, gas radius)
    augmented: tuple[str, ...] = field(default=())


def draw_params(seed: int) -> SynthParams:
    """Draw the parameters of case ``seed`` (any int >= 0), deterministically."""
    if seed < 0:
        raise InputError(f"synthetic case seed must be >= 0, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(1,)))

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    shift = (u(-8, 8), u(-8, 8), u(-10, 10))
    body_ab = (u(165, 195), u(110, 130))
    prostate_r = (u(20, 26), u(15, 19.5), u(18, 24))
    sv_tip = (u(24, 34), u(8, 14), u(10, 18))
    n_gas = int(rng.integers(1, 5))
    gas = tuple((u(0.1, 0.95), u(0, 2 * math.pi), u(2.5, 8.0), u(0.0, 0.6)) for _ in range(n_gas))
    # Augmentation (each with probability 0.5 as in the paper).
    flags = rng.random(5) < 0.5
    drawn = (u(0.8, 1.2), (u(-5, 5), u(-5, 5), u(-5, 5)), u(2.0, 6.0), u(3.0, 6.0), u(0.0, 5.0))
    scale = drawn[0] if flags[0] else 1.0
    rot = drawn[1] if flags[1] else (0.0, 0.0, 0.0)
    amp = drawn[2] if flags[2] else 0.0
    ptv_m = drawn[3] if flags[3] else 3.0
    rect_m = drawn[4] if flags[4] else 0.0
    names = ("scale", "rotation", "deformation", "ptv_margin", "rectum_margin")
    augmented = [name for f, name in zip(flags, names, strict=True) if f]
    modes = []
    for _ in range(4):
        k = rng.normal(size=3)
        k /= np.linalg.norm(k)
        k *= 1.0 / u(100.0, 250.0)  # wavenumber, cycles per mm
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        modes.append((*k.tolist(), *d.tolist(), u(0, 2 * math.pi), u(0.5, 1.0)))
    bowel = []
    for _ in range(int(rng.integers(4, 9))):
        a = np.array([u(-38, 38), u(-35, 30), u(75, 150)])
        d = rng.normal(size=3)
        b = a + d / np.linalg.norm(d) * u(25, 60)
        bowel.append((*a.tolist(), *b.tolist(), u(8, 13), u(0, 6) if rng.random() < 0.6 else 0.0))
    return SynthParams(
        seed=seed, shift_mm=shift, body_ab_mm=body_ab, body_exponent=u(2.2, 2.9), fat_mm=u(12, 35),
        prostate_r_mm=prostate_r, sv_tip_mm=sv_tip, sv_radius_mm=u(5.0, 7.0),
        bladder_volume_cc=u(100, 300), rectum_radius_mm=u(12, 17), rectum_top_dx_mm=u(-10, 10),
        gas_pockets=gas, femur_head_r_mm=u(22, 26), femur_head_x_mm=u(85, 95), femur_head_z_mm=u(15, 28),
        noise_hu=u(10, 20), scale=scale, rotation_deg=rot, deform_amplitude_mm=amp,
        deform_modes=tuple(modes), ptv_margin_mm=ptv_m, rectum_margin_mm=rect_m, bowel=tuple(bowel),
        augmented=tuple(augmented),
    )


def draw_heldout_params(seed: int) -> SynthParams:
    """Parameters of held-out case ``seed``: anatomy outside every range :func:`draw_params` draws.

    For benchmark case sets that no training or tuning has seen: each case takes, at random, the
    small or the large side of every range below (training ranges in brackets): body semi-axes
    140-160 x 95-108 or 200-225 x 135-150 mm [165-195 x 110-130], body shape exponent 1.9-2.15 or
    2.95-3.3 [2.2-2.9], subcutaneous fat 6-11 or 36-50 mm [12-35], prostate semi-axes 15-19 or
    27-31 mm laterally [20-26], an empty (35-90 cm3) or full (330-550 cm3) bladder [100-300], rectum
    radius 9.5-11.5 or 17.5-19 mm [12-17], 4-6 rectal gas pockets of 8-12 mm [1-4 of 2.5-8 mm],
    femoral heads 76-84 or 96-104 mm off the midline [85-95], and an anatomy shifted by 10-16 mm
    [up to 8-10 mm]. The augmentation draws (scaling, rotation, deformation, margins) are those of
    :func:`draw_params` for the same seed.
    """
    base = draw_params(seed)
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(3,)))

    def side(small: tuple[float, float], large: tuple[float, float]) -> float:
        lo, hi = small if rng.random() < 0.5 else large
        return float(rng.uniform(lo, hi))

    big = rng.random() < 0.5
    body_ab = ((float(rng.uniform(200, 225)), float(rng.uniform(135, 150))) if big
               else (float(rng.uniform(140, 160)), float(rng.uniform(95, 108))))
    lat = side((15.0, 19.0), (27.0, 31.0))
    shift = tuple(float(rng.choice((-1.0, 1.0)) * rng.uniform(10.0, 16.0)) for _ in range(3))
    n_gas = int(rng.integers(4, 7))
    gas = tuple((float(rng.uniform(0.1, 0.95)), float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(8.0, 12.0)),
                 float(rng.uniform(0.0, 0.6))) for _ in range(n_gas))
    return replace(
        base, shift_mm=(shift[0], shift[1], shift[2]), body_ab_mm=body_ab,
        body_exponent=side((1.9, 2.15), (2.95, 3.3)), fat_mm=side((6.0, 11.0), (36.0, 50.0)),
        prostate_r_mm=(lat, lat * 0.75, lat * 0.9), bladder_volume_cc=side((35.0, 90.0), (330.0, 550.0)),
        rectum_radius_mm=side((9.5, 11.5), (17.5, 19.0)), gas_pockets=gas,
        femur_head_x_mm=side((76.0, 84.0), (96.0, 104.0)),
    )


def draw_variety_params(seed: int) -> SynthParams:
    """Parameters of a teacher case of wide anatomy variety: :func:`draw_params`'s anatomy and
    augmentation, with each of the following redrawn, with probability 0.5 each, over the union of the
    training and the held-out ranges (:func:`draw_heldout_params`): body semi-axes 140-225 x 95-150
    mm (shape exponent 1.9-3.3, subcutaneous fat 6-50 mm), bladder filling 35-550 cm3, rectum radius
    9.5-19 mm, 1-6 rectal gas pockets of 2.5-12 mm, femoral heads 76-104 mm off the midline. The
    anatomy of the held-out benchmark set is then no longer outside the training ranges; its seeds
    and CT geometries are (``pipeline.training.data``).
    """
    base = draw_params(seed)
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(5,)))
    flags = rng.random(6) < 0.5

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    body = ((u(140, 225), u(95, 150)), u(1.9, 3.3), u(6.0, 50.0))
    bladder = u(35.0, 550.0)
    rectum = u(9.5, 19.0)
    n_gas = int(rng.integers(1, 7))
    gas = tuple((u(0.1, 0.95), u(0, 2 * math.pi), u(2.5, 12.0), u(0.0, 0.6)) for _ in range(n_gas))
    femur_x = u(76.0, 104.0)
    names = ("body", "bladder", "rectum", "gas", "femoral_heads")
    return replace(
        base,
        body_ab_mm=body[0] if flags[0] else base.body_ab_mm,
        body_exponent=body[1] if flags[0] else base.body_exponent,
        fat_mm=body[2] if flags[0] else base.fat_mm,
        bladder_volume_cc=bladder if flags[1] else base.bladder_volume_cc,
        rectum_radius_mm=rectum if flags[2] else base.rectum_radius_mm,
        gas_pockets=gas if flags[3] else base.gas_pockets,
        femur_head_x_mm=femur_x if flags[4] else base.femur_head_x_mm,
        augmented=base.augmented + tuple(f"wide_{n}" for f, n in zip(flags[:5], names, strict=True) if f),
    )


# --------------------------------------------------------------------------------------------
# The reference anatomy
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Anatomy:
    """Solids of the reference anatomy, built from the parameters."""

    body: Solid
    inner: Solid  # body minus subcutaneous fat
    cavity_fat: Solid
    femur_l: Solid
    femur_r: Solid
    head_l: Solid
    head_r: Solid
    pelvis: Solid
    bladder: Solid
    bladder_lumen: Solid
    prostate: Solid
    sv: Solid
    rectum: Solid
    rectum_lumen: Solid
    rectum_expanded: Solid
    gas: Solid
    bowel: Solid
    bowel_gas: Solid


def _mirror(p: tuple[float, float, float], side: float) -> tuple[float, float, float]:
    return (side * p[0], p[1], p[2])


def _build_anatomy(p: SynthParams) -> _Anatomy:
    px, py, pz = PROSTATE_REF_MM
    rx, ry, rz = p.prostate_r_mm
    a, b = p.body_ab_mm
    body = Solid((SuperEllipticCylinder(0.0, 0.0, a, b, p.body_exponent),))
    inner = Solid((SuperEllipticCylinder(0.0, 2.0, a - p.fat_mm, b - p.fat_mm * 0.9, p.body_exponent),))
    cavity_fat = Solid((
        Capsule((0.0, 5.0, -55.0), (0.0, 10.0, 160.0), 52.0),
        Ellipsoid((35.0, 42.0, -48.0), (22.0, 28.0, 32.0)),
        Ellipsoid((-35.0, 42.0, -48.0), (22.0, 28.0, 32.0)),
    ))
    # Femora: head, neck, greater trochanter, shaft.
    hr, hx, hz = p.femur_head_r_mm, p.femur_head_x_mm, p.femur_head_z_mm
    hy = -8.0
    femurs: list[Solid] = []
    heads: list[Solid] = []
    pelvis_parts: list[Primitive] = []
    gaps: list[Primitive] = []
    for side in (1.0, -1.0):
        c = (side * hx, hy, hz)
        head = Ellipsoid(c, (hr, hr, hr))
        neck = Capsule(c, (side * (hx + 28.0), hy + 8.0, hz - 30.0), 0.62 * hr)
        troch = Ellipsoid((side * (hx + 34.0), hy + 12.0, hz - 34.0), (14.0, 20.0, 22.0))
        shaft = Capsule((side * (hx + 28.0), hy + 12.0, hz - 40.0), (side * (hx + 18.0), hy + 22.0, hz - 280.0), 14.0)
        femurs.append(Solid((head, neck, troch, shaft)))
        heads.append(Solid((head, neck)))
        gaps.append(Ellipsoid(c, (hr + 2.5, hr + 2.5, hr + 2.5)))
        m = side
        pelvis_parts += [
            Ellipsoid((m * (hx - 12.0), hy, hz + 8.0), (hr + 8.0, hr + 6.0, hr + 8.0)),  # acetabulum
            Capsule((m * (hx - 12.0), hy - 15.0, hz - 8.0), (m * 12.0, -62.0, -2.0), 10.0),  # sup. pubic ramus
            Ellipsoid((m * 10.5, -62.0, -10.0), (8.5, 12.0, 22.0)),  # symphysis body
            Capsule((m * 12.0, -58.0, -27.0), (m * 52.0, 12.0, -48.0), 8.0),  # inf. pubic ramus
            Capsule((m * (hx - 10.0), hy + 12.0, hz - 10.0), (m * 58.0, 15.0, -45.0), 13.0),  # ischium
            Ellipsoid((m * 55.0, 17.0, -50.0), (14.0, 18.0, 16.0)),  # ischial tuberosity
            Capsule((m * (hx - 8.0), hy + 5.0, hz + 20.0), (m * 100.0, 35.0, 110.0), 16.0),  # ilium body
            Ellipsoid((m * 104.0, 25.0, 118.0), (10.0, 45.0, 35.0)),  # iliac wing
            Ellipsoid((m * 120.0, 15.0, 152.0), (10.0, 50.0, 30.0)),
            Capsule((m * 38.0, 85.0, 125.0), (m * 95.0, 45.0, 118.0), 14.0),  # sacro-iliac
        ]
    pelvis_parts += [
        Ellipsoid((0.0, 88.0, 125.0), (46.0, 22.0, 55.0)),  # sacrum
        Capsule((0.0, 92.0, 70.0), (0.0, 78.0, 32.0), 8.0),  # coccyx
    ]
    pelvis = Solid(tuple(pelvis_parts), holes=tuple(gaps))
    prostate = Solid((Ellipsoid((px, py, pz), (rx, ry, rz)),))
    tx, ty, tz = p.sv_tip_mm
    sv = Solid(tuple(
        Capsule((side * 6.0, py + 0.75 * ry, pz + 0.6 * rz), (side * tx, py + ry + ty, pz + rz + tz), p.sv_radius_mm)
        for side in (1.0, -1.0)
    ))
    # Bladder: ellipsoid of the drawn volume sitting on the prostate base, slightly anterior.
    rb = (p.bladder_volume_cc * 1000.0 / (4.0 / 3.0 * math.pi * 1.25 * 1.0 * 0.85)) ** (1.0 / 3.0)
    brad = (1.25 * rb, 1.0 * rb, 0.85 * rb)
    bc = (px, py - 8.0, pz + rz + brad[2] + 1.0)
    bladder = Solid((Ellipsoid(bc, brad),))
    bladder_lumen = Solid((Ellipsoid(bc, tuple(v - WALL_MM for v in brad)),))  # type: ignore[arg-type]
    # Rectum: a tube behind the prostate from the anorectal junction to the rectosigmoid.
    rr = p.rectum_radius_mm
    yr = py + ry + rr + 3.0
    pts = [(0.0, yr, pz - rz - 28.0), (0.0, yr, pz), (0.0, yr + 8.0, pz + 40.0),
           (p.rectum_top_dx_mm, yr + 26.0, pz + 80.0)]
    segs = list(itertools.pairwise(pts))
    rectum = Solid(tuple(Capsule(s0, s1, rr) for s0, s1 in segs))
    rectum_lumen = Solid(tuple(Capsule(s0, s1, rr - WALL_MM) for s0, s1 in segs))
    rectum_expanded = Solid(tuple(Capsule(s0, s1, rr + p.rectum_margin_mm / p.scale) for s0, s1 in segs))
    gas_parts: list[Primitive] = []
    for t, ang, r, depth in p.gas_pockets:
        pos = t * (len(pts) - 1)
        i0 = min(int(pos), len(pts) - 2)
        f = pos - i0
        gc = [pts[i0][k] + f * (pts[i0 + 1][k] - pts[i0][k]) for k in range(3)]
        off = depth * (rr - WALL_MM - r) if rr - WALL_MM > r else 0.0
        gc[0] += off * math.cos(ang)
        gc[1] += off * math.sin(ang)
        gas_parts.append(Ellipsoid((gc[0], gc[1], gc[2]), (r, r, 1.4 * r)))
    return _Anatomy(
        body=body, inner=inner, cavity_fat=cavity_fat, femur_l=femurs[0], femur_r=femurs[1],
        head_l=heads[0], head_r=heads[1], pelvis=pelvis, bladder=bladder, bladder_lumen=bladder_lumen,
        prostate=prostate, sv=sv, rectum=rectum, rectum_lumen=rectum_lumen,
        rectum_expanded=rectum_expanded, gas=Solid(tuple(gas_parts)),
        bowel=Solid(tuple(Capsule((b[0], b[1], b[2]), (b[3], b[4], b[5]), b[6]) for b in p.bowel)),
        bowel_gas=Solid(tuple(Ellipsoid(((b[0] + b[3]) / 2, (b[1] + b[4]) / 2 - 0.4 * b[7], (b[2] + b[5]) / 2),
                                        (b[7], 0.6 * b[7], 1.5 * b[7])) for b in p.bowel if b[7] > 0)),
    )


# --------------------------------------------------------------------------------------------
# The transform: patient point p -> reference point q
# --------------------------------------------------------------------------------------------


def _rotation(deg: tuple[float, float, float]) -> NDArray[np.float64]:
    ax, ay, az = (math.radians(v) for v in deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class _Transform:
    """``q = P0 + R^T (p + u(p) - c) / s`` with ``c = P0 + shift`` (pull-back, mm)."""

    params: SynthParams

    @property
    def centre(self) -> Vec:
        return np.asarray(PROSTATE_REF_MM) + np.asarray(self.params.shift_mm)

    @property
    def rot(self) -> NDArray[np.float64]:
        return _rotation(self.params.rotation_deg)

    def pull_back(self, x: Arr, y: Arr, z: Arr) -> Points:
        p = self.params
        px, py, pz = x, y, z
        amp = p.deform_amplitude_mm
        if amp > 0:
            total = sum(m[7] for m in p.deform_modes)
            ux = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32)
            uy, uz = ux.copy(), ux.copy()
            for kx, ky, kz, dx, dy, dz, ph, w in p.deform_modes:
                s = np.sin(np.float32(2 * math.pi) * (np.float32(kx) * x + np.float32(ky) * y
                                                        + np.float32(kz) * z) + np.float32(ph))
                s *= np.float32(amp * w / total)
                ux += np.float32(dx) * s
                uy += np.float32(dy) * s
                uz += np.float32(dz) * s
            px, py, pz = x + ux, y + uy, z + uz
        c = self.centre
        rt = self.rot.T / p.scale
        d = (px - np.float32(c[0]), py - np.float32(c[1]), pz - np.float32(c[2]))
        q0, q1, q2 = PROSTATE_REF_MM
        out = tuple(
            (np.float32(rt[i, 0]) * d[0] + np.float32(rt[i, 1]) * d[1] + np.float32(rt[i, 2]) * d[2]
             + np.float32((q0, q1, q2)[i])).astype(np.float32)
            for i in range(3)
        )
        return out  # type: ignore[return-value]

    def world_bounds(self, lo: Vec, hi: Vec) -> tuple[Vec, Vec]:
        """Axis-aligned patient-space box that contains the reference box ``lo..hi``."""
        lo = np.maximum(lo, -1e5)
        hi = np.minimum(hi, 1e5)
        corners = np.array([[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]]
                            for i in (0, 1) for j in (0, 1) for k in (0, 1)])
        w = self.centre + self.params.scale * (corners - np.asarray(PROSTATE_REF_MM)) @ self.rot.T
        pad = self.params.deform_amplitude_mm + 1.0
        return w.min(axis=0) - pad, w.max(axis=0) + pad


# --------------------------------------------------------------------------------------------
# Evaluation on a grid (by z-chunks, each primitive on its bounding box only)
# --------------------------------------------------------------------------------------------


class _Chunk:
    """World coordinates of a block of slices and their pull-back into the reference frame."""

    def __init__(self, xs: Arr, ys: Arr, zs: Arr, tf: _Transform) -> None:
        self.xs, self.ys, self.zs, self.tf = xs, ys, zs, tf
        shape = (len(zs), len(ys), len(xs))
        X = np.broadcast_to(xs[None, None, :], shape)
        Y = np.broadcast_to(ys[None, :, None], shape)
        Z = np.broadcast_to(zs[:, None, None], shape)
        self.q = tf.pull_back(X, Y, Z)
        self.shape = shape

    def _slices(self, prim: Primitive) -> tuple[slice, slice, slice] | None:
        lo, hi = self.tf.world_bounds(*prim.bounds())
        out = []
        for axis_vals, a in ((self.zs, 2), (self.ys, 1), (self.xs, 0)):
            i0 = int(np.searchsorted(axis_vals, lo[a], side="left"))
            i1 = int(np.searchsorted(axis_vals, hi[a], side="right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return out[0], out[1], out[2]

    def sdf(self, solid: Solid) -> Arr:
        """Signed distance of ``solid`` (reference-frame mm); +1e3 far outside its parts."""
        out = np.full(self.shape, 1e3, np.float32)
        for prim in solid.parts:
            sl = self._slices(prim)
            if sl is None:
                continue
            sub = (self.q[0][sl], self.q[1][sl], self.q[2][sl])
            np.minimum(out[sl], prim.sdf(sub), out=out[sl])
        for hole in solid.holes:
            sl = self._slices(hole)
            if sl is None:
                continue
            sub = (self.q[0][sl], self.q[1][sl], self.q[2][sl])
            np.maximum(out[sl], -hole.sdf(sub), out=out[sl])
        return out

    def inside(self, solid: Solid) -> NDArray[np.bool_]:
        return self.sdf(solid) <= 0.0


@dataclass(frozen=True)
class _TargetDistances:
    """Signed distances (mm) to the prostate and to the CTV on a local grid fixed in patient space."""

    origin: Vec  # (x, y, z) of the local voxel [0, 0, 0]
    d_prostate: Arr  # [z, y, x]
    d_ctv: Arr

    def sample(self, field_: Arr, xs: Arr, ys: Arr, zs: Arr) -> Arr:
        """Trilinear interpolation of ``field_`` at the voxel centres of the axis-aligned block
        ``xs x ys x zs`` (patient mm); +1e3 mm outside the local grid. Returns [z, y, x]."""
        h = TARGET_GRID_MM
        out = np.full((len(zs), len(ys), len(xs)), 1e3, np.float32)
        idx = []
        for vals, a in ((zs, 2), (ys, 1), (xs, 0)):
            f = (vals.astype(np.float64) - self.origin[a]) / h
            inside = np.nonzero((f >= 0) & (f <= field_.shape[2 - a] - 1))[0]
            if len(inside) == 0:
                return out
            idx.append((slice(int(inside[0]), int(inside[-1]) + 1), f[inside[0] : inside[-1] + 1]))
        (sz, fz), (sy, fy), (sx, fx) = idx
        coords = np.stack(np.meshgrid(fz, fy, fx, indexing="ij")).reshape(3, -1)
        vals = ndimage.map_coordinates(field_, coords, order=1, mode="nearest")
        out[sz, sy, sx] = vals.reshape(len(fz), len(fy), len(fx))
        return out


def _signed_distance(mask: NDArray[np.bool_], h: float) -> Arr:
    """Distance outside ``mask`` to its boundary (mm), half-voxel corrected; ``-h/2`` inside.

    Only expansions (thresholds >= 0) are taken from it, so the depth inside does not matter:
    ``-h/2`` is the exact corrected value on the inner boundary voxels, where interpolation
    towards the outside happens.
    """
    outside = ndimage.distance_transform_edt(~mask, sampling=h)
    return np.where(mask, -0.5 * h, outside - 0.5 * h).astype(np.float32)


def _target_distances(anat: _Anatomy, tf: _Transform, p: SynthParams) -> _TargetDistances:
    h = TARGET_GRID_MM
    pad = max(p.ptv_margin_mm, CTV_SV_MARGIN_MM) + 4.0 * h + 2.0
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for solid in (anat.prostate, anat.sv):
        wlo, whi = tf.world_bounds(*solid.bounds())
        lo, hi = np.minimum(lo, wlo), np.maximum(hi, whi)
    # Anchor the local grid to the anatomy centre so that it does not depend on any output grid.
    c = tf.centre
    i0 = np.floor((lo - pad - c) / h)
    i1 = np.ceil((hi + pad - c) / h)
    origin = c + i0 * h
    n = (i1 - i0 + 1).astype(int)
    xs = (origin[0] + h * np.arange(n[0])).astype(np.float32)
    ys = (origin[1] + h * np.arange(n[1])).astype(np.float32)
    zs = (origin[2] + h * np.arange(n[2])).astype(np.float32)
    ch = _Chunk(xs, ys, zs, tf)
    prostate = ch.inside(anat.prostate)
    d_p = _signed_distance(prostate, h)
    ctv = prostate | ((d_p <= CTV_SV_MARGIN_MM) & ch.inside(anat.sv))
    return _TargetDistances(origin=origin, d_prostate=d_p, d_ctv=_signed_distance(ctv, h))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SynthAnatomy:
    """A synthetic pelvis on a grid.

    Parameters
    ----------
    seed
        The seed it was generated from (>= 0).
    grid
        Geometry of ``ct_hu`` and of every mask (Case convention, [z, y, x], LPS).
    ct_hu
        CT in Hounsfield units, float32, -1024..3071.
    masks
        Boolean masks by structure name (``Body``, ``Fat``, ``Muscle``, ``Bone_Pelvic``,
        ``Femur_Head_L``, ``Femur_Head_R``, ``Bladder``, ``Rectum``, ``Prostate``, ``SeminalVes``,
        ``CTV``, ``PTV``). ``Rectum`` includes the rectum expansion, ``PTV`` the drawn margin.
    params
        The random parameters (margins, augmentation flags...).
    """

    seed: int
    grid: Grid
    ct_hu: NDArray[np.float32]
    masks: dict[str, NDArray[np.bool_]]
    params: SynthParams

    def role_masks(self) -> dict[Role, NDArray[np.bool_]]:
        """The planning roles' masks (PTV, bladder, rectum, body, femoral heads)."""
        return {role: self.masks[name] for role, name in ROLE_NAMES.items()}

    def volume_cc(self, name: str) -> float:
        """Volume of structure ``name`` in cm3 (voxel count times voxel volume)."""
        return float(self.masks[name].sum()) * self.grid.voxel_volume_cc


def synth_anatomy(seed: int, grid: Grid, *, noise: bool = True, blur_mm: float = 0.6,
                  chunk_voxels: int = 4_000_000, heldout: bool = False,
                  params: SynthParams | None = None) -> SynthAnatomy:
    """Generate the synthetic pelvis of ``seed`` on ``grid``.

    Parameters
    ----------
    seed
        Case seed (>= 0); the same seed gives the same anatomy on any grid.
    grid
        Output grid (Case convention); a 500 x 400 x 300 mm field of view centred on the origin
        holds the whole anatomy. Parts of the anatomy outside the grid are cut off.
    noise
        Add correlated Gaussian CT noise (sigma drawn in 10-20 HU; correlation length about
        0.6 voxel in-plane). Noise is the only grid-dependent part besides sampling.
    blur_mm
        Gaussian blur of the noiseless CT (sigma, mm) imitating the scanner's point spread;
        axes where it is under 0.2 voxel are not blurred. 0 disables it.
    chunk_voxels
        Number of voxels evaluated at once (memory: about 40 bytes per voxel).
    heldout
        Draw the anatomy with :func:`draw_heldout_params` (ranges no training case has) instead of
        :func:`draw_params`.
    params
        The parameters to build (e.g. :func:`draw_variety_params`); drawn as ``heldout`` says when None.

    Returns
    -------
    SynthAnatomy
        CT in HU and the masks.
    """
    if params is not None and params.seed != seed:
        raise InputError(f"synthetic parameters of seed {params.seed} given for seed {seed}")
    p = params if params is not None else draw_heldout_params(seed) if heldout else draw_params(seed)
    anat = _build_anatomy(p)
    tf = _Transform(p)
    td = _target_distances(anat, tf, p)
    xs_, ys_, zs_ = grid.axes_mm()
    xs, ys, zs = xs_.astype(np.float32), ys_.astype(np.float32), zs_.astype(np.float32)
    nz, ny, nx = grid.shape
    ct = np.empty(grid.shape, np.float32)
    names = (BODY, FAT, MUSCLE, BONE_PELVIC, FEMUR_HEAD_L, FEMUR_HEAD_R, BLADDER, RECTUM, PROSTATE,
             SEMINAL_VESICLES, CTV, PTV)
    masks = {n: np.zeros(grid.shape, np.bool_) for n in names}
    step = max(1, chunk_voxels // (ny * nx))
    for k0 in range(0, nz, step):
        k1 = min(nz, k0 + step)
        ch = _Chunk(xs, ys, zs[k0:k1], tf)
        _paint_chunk(ch, anat, td, p, ct[k0:k1], {n: m[k0:k1] for n, m in masks.items()})
    if blur_mm > 0:
        sig = [blur_mm / s for s in (grid.spacing_mm[2], grid.spacing_mm[1], grid.spacing_mm[0])]
        sig = [s if s >= 0.2 else 0.0 for s in sig]
        if any(sig):
            ct = ndimage.gaussian_filter(ct, sigma=sig, mode="nearest").astype(np.float32)
    if noise:
        ct += _noise(seed, grid.shape, p.noise_hu)
    np.clip(ct, -1024.0, 3071.0, out=ct)
    log.info("synthetic case %d on grid %s: PTV %.1f cm3, augmentation %s", seed, grid.shape,
             masks[PTV].sum() * grid.voxel_volume_cc, ",".join(p.augmented) or "none")
    return SynthAnatomy(seed=seed, grid=grid, ct_hu=ct, masks=masks, params=p)


def _noise(seed: int, shape: tuple[int, int, int], sigma_hu: float) -> Arr:
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(2,)))
    n = rng.standard_normal(shape, dtype=np.float32)
    n = ndimage.gaussian_filter(n, sigma=(0.0, 0.6, 0.6), mode="wrap")
    std = float(n.std()) or 1.0
    return (n * np.float32(sigma_hu / std)).astype(np.float32)


def _paint_chunk(ch: _Chunk, anat: _Anatomy, td: _TargetDistances, p: SynthParams, ct: Arr,
                 masks: dict[str, NDArray[np.bool_]]) -> None:
    """Fill one chunk of the CT and of the masks (painted from the outside in)."""
    body = ch.inside(anat.body)
    inner = ch.inside(anat.inner) & body
    ct[...] = HU_AIR
    ct[body] = HU_FAT
    ct[inner] = HU_MUSCLE
    cavity = ch.inside(anat.cavity_fat) & inner
    ct[cavity] = HU_FAT
    bowel = ch.inside(anat.bowel) & cavity
    ct[bowel] = HU_BOWEL
    ct[ch.inside(anat.bowel_gas) & bowel] = HU_GAS
    bone_masks = []
    for solid in (anat.pelvis, anat.femur_l, anat.femur_r):
        sd = ch.sdf(solid)
        bone = (sd <= 0.0) & body
        ct[bone] = HU_CORTICAL
        ct[(sd <= -CORTEX_MM) & body] = HU_TRABECULAR
        bone_masks.append(bone)
    bladder = ch.inside(anat.bladder) & body
    ct[bladder] = HU_ORGAN_WALL
    ct[ch.inside(anat.bladder_lumen) & bladder] = HU_URINE
    prostate = ch.inside(anat.prostate) & body
    sv = ch.inside(anat.sv) & body & ~prostate & ~bladder
    ct[sv] = HU_SV
    ct[prostate] = HU_PROSTATE
    rectum = ch.inside(anat.rectum) & body & ~prostate
    ct[rectum] = HU_ORGAN_WALL
    lumen = ch.inside(anat.rectum_lumen) & rectum
    ct[lumen] = HU_RECTAL_CONTENT
    ct[ch.inside(anat.gas) & lumen] = HU_GAS
    # Target volumes by Table S1 on the anatomy-fixed local grid.
    near = td.sample(td.d_ctv, ch.xs, ch.ys, ch.zs)
    ctv = prostate | ((td.sample(td.d_prostate, ch.xs, ch.ys, ch.zs) <= CTV_SV_MARGIN_MM) & sv)
    ptv = (near <= p.ptv_margin_mm) & body
    ptv |= ctv
    masks[BODY][...] = body
    masks[FAT][...] = body & (~inner | cavity) & (ct < -50)
    masks[MUSCLE][...] = inner & ~cavity & ~bone_masks[0] & ~bone_masks[1] & ~bone_masks[2]
    masks[BONE_PELVIC][...] = bone_masks[0]
    masks[FEMUR_HEAD_L][...] = ch.inside(anat.head_l) & bone_masks[1]
    masks[FEMUR_HEAD_R][...] = ch.inside(anat.head_r) & bone_masks[2]
    masks[BLADDER][...] = bladder & ~prostate
    masks[RECTUM][...] = ch.inside(anat.rectum_expanded) & body
    masks[PROSTATE][...] = prostate
    masks[SEMINAL_VESICLES][...] = sv
    masks[CTV][...] = ctv
    masks[PTV][...] = ptv


def ct_grid(n_slices: int, pixel_mm: float, slice_mm: float, matrix: int = 512) -> Grid:
    """A CT grid (Case convention) centred on the origin (the reference prostate level).

    Parameters
    ----------
    n_slices
        Number of axial slices (>= 2).
    pixel_mm
        In-plane pixel size, mm (> 0).
    slice_mm
        Slice spacing and thickness, mm (> 0).
    matrix
        Rows and columns of every slice (>= 16).
    """
    if n_slices < 2:
        raise InputError(f"a synthetic CT needs at least 2 slices, got {n_slices}")
    if matrix < 16:
        raise InputError(f"a synthetic CT needs at least 16 x 16 pixels, got {matrix}")
    if not (pixel_mm > 0 and slice_mm > 0):
        raise InputError(f"pixel and slice sizes must be > 0 mm, got {pixel_mm} and {slice_mm}")
    o_xy = -(matrix - 1) / 2.0 * pixel_mm
    o_z = -(n_slices - 1) / 2.0 * slice_mm
    return Grid(origin_mm=(o_xy, o_xy, o_z), spacing_mm=(pixel_mm, pixel_mm, slice_mm),
                shape=(n_slices, matrix, matrix))


def default_grid(spacing_mm: Sequence[float] = (4.0, 4.0, 4.0),
                 fov_mm: Sequence[float] = DEFAULT_FOV_MM) -> Grid:
    """A grid of the given spacing (dx, dy, dz, mm) covering ``fov_mm`` centred on the origin."""
    if len(spacing_mm) != 3 or any(s <= 0 for s in spacing_mm):
        raise InputError(f"spacing_mm must be three positive values in mm, got {tuple(spacing_mm)}")
    n = [max(1, round(f / s)) for f, s in zip(fov_mm, spacing_mm)]
    origin = tuple(-(ni - 1) / 2.0 * s for ni, s in zip(n, spacing_mm))
    return Grid(origin_mm=(origin[0], origin[1], origin[2]),
                spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
                shape=(n[2], n[1], n[0]))


def synth_case(seed: int, *, spacing_mm: tuple[float, float, float] = (4.0, 4.0, 4.0),
               prescription: Prescription = Prescription(),  # noqa: B008
               grid: Grid | None = None, patient_position: PatientPosition = PatientPosition.HFS,
               params: SynthParams | None = None) -> Case:
    """A synthetic planning case built directly (no DICOM), for training data and tests.

    Parameters
    ----------
    seed
        Case seed (>= 0); the anatomy is the one ``synth_anatomy(seed, grid)`` gives on any grid.
    spacing_mm
        (dx, dy, dz) of the case grid, mm; the field of view is :data:`DEFAULT_FOV_MM`.
    prescription
        Dose to the PTV.
    grid
        The case grid instead (e.g. :func:`ct_grid`, a CT's geometry); ``spacing_mm`` is then unused.
    patient_position
        The patient's position on the couch (the anatomy is in patient coordinates either way; the
        position turns the arc's gantry angles relative to it, as for a loaded CT).
    params
        The anatomy's parameters (:func:`synth_anatomy`); :func:`draw_params` when None.

    Returns
    -------
    Case
        ``case_id`` is ``synth<seed>``, masks by role with TG-263 structure names.
    """
    grid = grid if grid is not None else default_grid(spacing_mm)
    anat = synth_anatomy(seed, grid, params=params)
    return Case(
        case_id=f"synth{seed}", ct_hu=anat.ct_hu, grid=grid, masks=anat.role_masks(),
        structure_names=dict(ROLE_NAMES), patient_position=patient_position,
        prescription=prescription, dicom=None,
    )
