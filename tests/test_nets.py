"""The AIRT networks: shapes, sizes, physics stage, losses, model folder round trip, end-to-end gradients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from core.case import Grid, PatientPosition
from core.errors import ConfigError, InputError
from core.machine import ArcSpec, MachineModel
from pipeline.geometry import ArcGeometry
from pipeline.model_io import load_model_folder, save_model_folder, update_model_meta
from pipeline.nets.bev2fluence import Bev2Fluence, Bev2FluenceConfig
from pipeline.nets.blocks import count_parameters
from pipeline.nets.discriminator import (
    DiscriminatorConfig,
    FluenceDiscriminator,
    d_hinge_loss,
    g_hinge_loss,
    r1_penalty,
)
from pipeline.nets.dose_proposer import DoseProposer, DoseProposerConfig, proposer_inputs
from pipeline.nets.err import ErrModule
from pipeline.nets.fast_dose import (
    FastDose,
    FastDoseConfig,
    PrimaryGeometry,
    primary_geometry,
    primary_geometry_for_arc,
    real_sph_harm,
)
from pipeline.nets.registry import REGISTRY, build, config_from_dict, config_to_dict

torch.manual_seed(0)

TINY_PROPOSER = DoseProposerConfig(stem_channels=4, channels=(4, 8, 8), decoder_convs=1)
TINY_B2F = Bev2FluenceConfig(channels=(4, 8, 16), blocks=(1, 1, 1, 1, 1), expansion=(2, 2, 2, 2, 2))
TINY_CORR = Bev2FluenceConfig(in_channels=2, channels=(4, 8, 16), blocks=(1, 0, 1, 0, 1), expansion=(2, 2, 2, 2, 2))
TINY_FAST = FastDoseConfig(
    sh_order=1, channels=(4, 8), blocks=(1, 1, 1), expansion=(2, 2, 2), ray_spacing_mm=10.0, ray_step_mm=8.0
)
TINY_DISC = DiscriminatorConfig(image_size=64, base_channels=4, max_channels=16)


def water_box(shape: tuple[int, int, int] = (6, 12, 14), mm: float = 10.0) -> Grid:
    """A grid centred on the origin (the isocenter), ``shape`` = (nz, ny, nx)."""
    nz, ny, nx = shape
    origin = (-(nx - 1) * mm / 2, -(ny - 1) * mm / 2, -(nz - 1) * mm / 2)
    return Grid(origin, (mm, mm, mm), shape)


def tiny_geometry(n_sectors: int = 8, config: FastDoseConfig = TINY_FAST) -> PrimaryGeometry:
    grid = water_box()
    arc = ArcSpec(n_sectors=n_sectors)
    return primary_geometry_for_arc(
        np.ones(grid.shape, np.float32), grid, arc, MachineModel(), (0.0, 0.0, 0.0), PatientPosition.HFS, config
    )


# --------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("spatial", [(8, 16, 16), (9, 13, 11), (5, 7, 3)])
def test_dose_proposer_shapes_odd_sizes_and_non_negative(spatial: tuple[int, int, int]) -> None:
    net = DoseProposer(TINY_PROPOSER)
    x = torch.randn(2, 4, *spatial)
    y = net(x)
    assert y.shape == (2, 1, *spatial)
    assert bool((y >= 0).all())


def test_dose_proposer_rejects_wrong_channels() -> None:
    with pytest.raises(InputError, match="expects"):
        DoseProposer(TINY_PROPOSER)(torch.zeros(1, 3, 8, 8, 8))


@pytest.mark.parametrize("cfg", [TINY_B2F, TINY_CORR])
@pytest.mark.parametrize("spatial", [(12, 8, 8), (13, 10, 10), (7, 5, 9)])
def test_bev2fluence_shapes_and_abs_output(cfg: Bev2FluenceConfig, spatial: tuple[int, int, int]) -> None:
    net = Bev2Fluence(cfg)
    y = net(torch.randn(1, cfg.in_channels, *spatial))
    assert y.shape == (1, 1, *spatial)
    assert bool((y >= 0).all())
    assert float(y.detach().sum()) > 0


def test_discriminator_scores_one_logit_per_map() -> None:
    d = FluenceDiscriminator(TINY_DISC)
    maps = torch.rand(5, 40, 40)
    logits = d(maps)
    assert logits.shape == (5,)
    # The padding is centred and zero: the 40 x 40 map sits at rows/cols 12..51 of 64.
    padded = d.pad(maps)
    assert padded.shape == (5, 1, 64, 64)
    assert torch.equal(padded[:, 0, 12:52, 12:52], maps)
    assert float(padded.abs().sum()) == pytest.approx(float(maps.abs().sum()), rel=1e-6)
    with pytest.raises(InputError, match="do not fit"):
        d(torch.rand(2, 70, 40))


PAPER_COUNTS_M = {"dose_proposer": 17.0, "bev2fluence": 40.8, "fast_dose": 2.8, "discriminator": 22.7}


@pytest.mark.parametrize("name", sorted(PAPER_COUNTS_M))
def test_paper_configs_have_about_the_papers_parameter_counts(name: str) -> None:
    cfg_cls, _ = REGISTRY[name]
    with torch.device("meta"):  # shapes only, no memory
        _, net = build(name, cfg_cls.paper())
    millions = count_parameters(net) / 1e6
    assert millions == pytest.approx(PAPER_COUNTS_M[name], rel=0.15), f"{name}: {millions:.2f} M"


def test_small_configs_are_small_and_run() -> None:
    for name, (cfg_cls, _) in REGISTRY.items():
        _, net = build(name, cfg_cls.small())
        assert count_parameters(net) < 1_000_000, name


# --------------------------------------------------------------------------- preprocessing


def test_proposer_inputs_channels() -> None:
    shape = (2, 3, 4)
    ct = np.full(shape, 0.0, np.float32)
    ct[0, 0, 0], ct[0, 0, 1] = -2000.0, 3000.0
    body = np.ones(shape, bool)
    ptv = np.zeros(shape, bool)
    ptv[1, 1, 1] = True
    bladder = np.zeros(shape, bool)
    rectum = np.zeros(shape, bool)
    bladder[1, 2, :2] = True
    rectum[1, 2, 1:3] = True
    x = proposer_inputs(ct, body, ptv, bladder, rectum)
    assert x.shape == (4, *shape) and x.dtype == torch.float32
    assert float(x[0, 0, 0, 0]) == 0.0 and float(x[0, 0, 0, 1]) == 1.0 and float(x[0, 1, 1, 1]) == 0.5
    assert torch.equal(x[2], torch.from_numpy(ptv.astype(np.float32)))
    assert x[3, 1, 2].tolist() == [1.0, 3.0, 2.0, 0.0]
    assert float(proposer_inputs(ct, body, ptv, None, None)[3].abs().sum()) == 0.0
    with pytest.raises(InputError, match="does not match"):
        proposer_inputs(ct, body[:1], ptv, None, None)


def test_default_hu_to_density_curve() -> None:
    from core.case import DEFAULT_HU_TO_DENSITY
    from pipeline.dose_engine import hu_to_density

    rho = hu_to_density(np.array([-1000.0, 0.0, 100.0, 5000.0]), DEFAULT_HU_TO_DENSITY)
    assert rho[1] == pytest.approx(1.0)
    assert rho[0] == pytest.approx(0.001)
    assert rho[2] == pytest.approx(1.055)
    assert rho[3] == pytest.approx(2.8)


# --------------------------------------------------------------------------- fast dose, stage 1


def fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def test_real_spherical_harmonics_are_orthonormal() -> None:
    y = real_sph_harm(fibonacci_sphere(20000), 4)
    gram = 4 * math.pi * (y.T @ y) / y.shape[0]
    np.testing.assert_allclose(gram, np.eye(25), atol=5e-3)
    # Y_00 is the constant 1 / (2 sqrt(pi)); Y_10 is proportional to z.
    d = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    y2 = real_sph_harm(d, 1)
    assert y2[:, 0] == pytest.approx([0.5 / math.sqrt(math.pi)] * 2)
    assert y2[0, 2] == pytest.approx(math.sqrt(3 / (4 * math.pi))) and y2[1, 2] == pytest.approx(0.0, abs=1e-12)


def test_stage1_is_linear_and_non_negative_in_fluence() -> None:
    geom = tiny_geometry()
    s1 = FastDose(TINY_FAST).stage1
    f1 = torch.rand(8, 40, 40)
    f2 = torch.rand(8, 40, 40)
    a, b = 2.5, 0.7
    both = s1(torch.stack([f1, f2, a * f1 + b * f2]), geom)
    assert both.shape == (3, 4, 6, 12, 14)
    torch.testing.assert_close(both[2], a * both[0] + b * both[1], rtol=1e-4, atol=1e-4)
    assert bool((both[:, 0] >= 0).all())
    assert float(both[0, 0].min()) > 0  # every voxel of this 13 cm box sees some of the 20 cm field
    assert float(s1(torch.zeros(8, 40, 40), geom).abs().max()) == 0.0


def single_beam(gantry_deg: float, grid: Grid, density: np.ndarray, mu: float = 0.005) -> PrimaryGeometry:
    arc = ArcSpec(start_deg=(gantry_deg - 1.0) % 360, stop_deg=(gantry_deg + 1.0) % 360, n_sectors=1,
                  collimator_deg=0.0)
    g = ArcGeometry(arc, (0.0, 0.0, 0.0), PatientPosition.HFS, MachineModel())
    return primary_geometry(
        density, grid, g.sector_rotations(), g.sources_mm(), (0.0, 0.0, 0.0),
        sad_mm=1000.0, bev=MachineModel().bev, sh_order=0, mu_per_mm=mu, ray_spacing_mm=5.0, ray_step_mm=2.0,
    )


def test_stage1_attenuation_and_inverse_square_along_the_central_axis() -> None:
    # HFS gantry 0: the beam enters anteriorly (-y) and travels towards +y.
    grid = water_box((5, 21, 5), 10.0)
    geom = single_beam(0.0, grid, np.ones(grid.shape, np.float32))
    w = geom.weight[0, 0].reshape(grid.shape)[2, :, 2].double()  # central axis, y from -100 to +100 mm
    y = torch.as_tensor(grid.axes_mm()[1])
    for j1, j2 in [(3, 8), (5, 15), (10, 18)]:
        r1, r2 = 1000.0 + y[j1], 1000.0 + y[j2]  # source distance along the axis
        expected = math.exp(-0.005 * float(y[j2] - y[j1])) * float(r1 / r2) ** 2
        assert float(w[j2] / w[j1]) == pytest.approx(expected, rel=5e-3)
    # An air gap (density 0) upstream does not attenuate: same weight ratio as without the slab
    # of water it replaces, minus that slab's attenuation.
    rho = np.ones(grid.shape, np.float32)
    rho[:, 2:8, :] = 0.0
    w_gap = single_beam(0.0, grid, rho).weight[0, 0].reshape(grid.shape)[2, :, 2].double()
    assert float(w_gap[15] / w[15]) == pytest.approx(math.exp(0.005 * 60.0), rel=1e-2)


def test_stage1_places_fluence_in_the_beams_eye_view_convention() -> None:
    # HFS gantry 0, collimator 0: BEV columns run along +x (patient left), rows along +z (superior).
    grid = water_box((11, 5, 11), 10.0)
    geom = single_beam(0.0, grid, np.ones(grid.shape, np.float32), mu=0.0)
    s1 = FastDose(TINY_FAST).stage1
    left = torch.zeros(1, 40, 40)
    left[0, :, 25:] = 1.0  # x_b > 25 mm
    out = s1(left, geom)[0, 0]  # (nz, ny, nx)
    x = grid.axes_mm()[0]
    assert float(out[:, :, x > 35].min()) > 0
    assert float(out[:, :, x < 15].abs().max()) == 0.0
    superior = torch.zeros(1, 40, 40)
    superior[0, 25:, :] = 1.0  # y_b > 25 mm
    out = s1(superior, geom)[0, 0]
    z = grid.axes_mm()[2]
    assert float(out[z > 35].min()) > 0
    assert float(out[z < 15].abs().max()) == 0.0


def test_fast_dose_shapes_and_sh_mismatch() -> None:
    geom = tiny_geometry()
    net = FastDose(TINY_FAST)
    dose = net(torch.rand(2, 8, 40, 40), geom)
    assert dose.shape == (2, 1, 6, 12, 14)
    wrong = FastDose(FastDoseConfig(sh_order=2, channels=(4, 8), blocks=(1, 1, 1), expansion=(2, 2, 2)))
    with pytest.raises(InputError, match="SH channels"):
        wrong(torch.rand(8, 40, 40), geom)
    with pytest.raises(InputError, match="expects fluence"):
        net(torch.rand(7, 40, 40), geom)


# --------------------------------------------------------------------------- losses


def test_hinge_losses_on_simple_inputs() -> None:
    confident = d_hinge_loss(torch.tensor([2.0, 3.0]), torch.tensor([-2.0, -1.5]))
    assert float(confident) == 0.0
    assert float(d_hinge_loss(torch.zeros(4), torch.zeros(4))) == pytest.approx(2.0)
    assert float(d_hinge_loss(torch.tensor([0.5]), torch.tensor([0.25]))) == pytest.approx(0.5 + 1.25)
    assert float(g_hinge_loss(torch.tensor([1.0, 3.0]))) == pytest.approx(-2.0)


class LinearCritic(nn.Module):
    """D(x) = <w, x> + b per map: its input gradient is w everywhere."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.w).flatten(1).sum(1) + 0.3


def test_r1_penalty_matches_the_gradient_norm_and_trains_the_discriminator() -> None:
    w = torch.randn(40, 40)
    critic = LinearCritic(w.clone())
    real = torch.rand(6, 40, 40)
    pen = r1_penalty(critic, real, gamma=0.5)
    assert float(pen.detach()) == pytest.approx(0.25 * float((w**2).sum()), rel=1e-5)
    pen.backward()
    assert critic.w.grad is not None
    torch.testing.assert_close(critic.w.grad, 0.5 * w, rtol=1e-5, atol=1e-6)  # d/dw (g/2 |w|^2)
    d = FluenceDiscriminator(TINY_DISC)
    p = r1_penalty(d, real, gamma=0.0025)
    assert math.isfinite(float(p.detach())) and float(p.detach()) >= 0
    p.backward()
    assert any(q.grad is not None and float(q.grad.abs().sum()) > 0 for q in d.parameters())
    assert not real.requires_grad


def test_err_module_wraps_the_papers_error_map() -> None:
    err = ErrModule(lambda_plus=2.0, lambda_minus=1.0)
    dose = torch.tensor([[[[38.0, 40.0, 43.0, 10.0]]]])
    ptv = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]])
    e = err(dose, {"ptv": ptv}, 40.0)
    assert e.flatten().tolist() == [-2.0, 0.0, 6.0, 0.0]
    rectum = torch.tensor([[[0.0, 0.0, 0.0, 1.0]]])
    e2 = err(dose, {"ptv": ptv, "rectum": rectum}, 40.0, sparing={"rectum": 0.3})
    assert float(e2.flatten()[3]) == pytest.approx(3.0)  # 10 - 0.7 * 10


# --------------------------------------------------------------------------- registry and model folder


def test_config_dicts_are_strict() -> None:
    d = config_to_dict(TINY_B2F)
    assert config_from_dict(Bev2FluenceConfig, json.loads(json.dumps(d))) == TINY_B2F
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict(Bev2FluenceConfig, {**d, "act": "os.system"})
    with pytest.raises(ConfigError, match="list of integers"):
        config_from_dict(Bev2FluenceConfig, {**d, "channels": "64"})
    with pytest.raises(ConfigError, match="integer"):
        config_from_dict(DiscriminatorConfig, {"base_channels": 4.5})
    with pytest.raises(ConfigError, match="blocks"):
        config_from_dict(Bev2FluenceConfig, {**d, "blocks": [1, 1]})
    with pytest.raises(ConfigError, match="unknown network architecture"):
        build("torch.nn.Linear", {})


def tiny_networks() -> dict[str, tuple[str, object, nn.Module]]:
    nets: dict[str, tuple[str, object, nn.Module]] = {}
    for key, arch, cfg in [
        ("dose_proposer", "dose_proposer", TINY_PROPOSER),
        ("bev2fluence", "bev2fluence", TINY_B2F),
        ("correction", "bev2fluence", TINY_CORR),
        ("fast_dose", "fast_dose", TINY_FAST),
        ("discriminator", "discriminator", TINY_DISC),
    ]:
        _, module = build(arch, cfg)
        nets[key] = (arch, cfg, module)
    return nets


def test_model_folder_round_trip_and_tamper_refusal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    nets = tiny_networks()
    meta = {"dose_grid_mm": 8.0, "normalisation": {"dose": "Gy / 40"}, "training": {"cases": 3, "kind": "synthetic"}}
    path = save_model_folder(tmp_path / "model", nets, meta)
    doc = json.loads(path.read_text())
    assert doc["meta"] == meta
    assert set(doc["networks"]) == set(nets)
    assert len(doc["networks"]["correction"]["sha256"]) == 64
    loaded = load_model_folder(tmp_path / "model", "cpu")
    assert loaded.meta == meta and loaded.architectures["correction"] == "bev2fluence"
    assert loaded.configs["correction"] == TINY_CORR
    x = torch.randn(1, 2, 12, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.networks["correction"](x), nets["correction"][2].eval()(x))
    for key, (_, _, module) in nets.items():
        ref = module.state_dict()
        for k, v in loaded.networks[key].state_dict().items():
            assert torch.equal(v, ref[k]), f"{key}.{k}"

    # What is learned after training is merged into meta; the weights' records stay as they were.
    update_model_meta(tmp_path / "model", {"quality_gate": {"passed": False}, "training": {"cases": 4}})
    updated = json.loads(path.read_text())
    assert updated["meta"] == {**meta, "quality_gate": {"passed": False}, "training": {"cases": 4}}
    assert updated["networks"] == doc["networks"]
    assert load_model_folder(tmp_path / "model", "cpu").meta["quality_gate"] == {"passed": False}
    with pytest.raises(ConfigError, match="JSON"):
        update_model_meta(tmp_path / "model", {"bad": object()})
    with pytest.raises(ConfigError, match=r"no readable model\.json"):
        update_model_meta(tmp_path / "none", {"a": 1})

    # One flipped byte in a weights file is refused.
    weights = tmp_path / "model" / "bev2fluence.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="SHA-256"):
        load_model_folder(tmp_path / "model")


def test_model_folder_refuses_foreign_contents(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=r"no model\.json"):
        load_model_folder(tmp_path)
    path = save_model_folder(tmp_path, {"d": ("discriminator", TINY_DISC, FluenceDiscriminator(TINY_DISC))}, {})
    doc = json.loads(path.read_text())
    doc["networks"]["d"]["weights"] = "../d.safetensors"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="inside the folder"):
        load_model_folder(tmp_path)
    doc["networks"]["d"]["weights"] = "d.safetensors"
    doc["networks"]["d"]["architecture"] = "pickle"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="unknown network architecture"):
        load_model_folder(tmp_path)
    # Weights of another size do not load into the declared architecture.
    doc["networks"]["d"]["architecture"] = "discriminator"
    doc["networks"]["d"]["config"]["max_channels"] = 8
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="do not fit"):
        load_model_folder(tmp_path)
    with pytest.raises(ConfigError, match="JSON"):
        save_model_folder(tmp_path, {}, {"bad": object()})


# --------------------------------------------------------------------------- end to end


def bev_like_projection(dose: Tensor, grid: Grid, arc: ArcSpec, n_depth: int = 16) -> Tensor:
    """Mean of ``dose`` (B, 1, nz, ny, nx) along the divergent rays through each BEV pixel: (B, n_cp, 40, 40).

    The pipeline's own projector (:class:`pipeline.bev.BevProjector`), so gradients are checked
    through the module the planner uses.
    """
    from pipeline.bev import BevProjector

    g = ArcGeometry(arc, (0.0, 0.0, 0.0), PatientPosition.HFS, MachineModel())
    return BevProjector(grid, g, depth_samples=n_depth)(dose[:, 0])


def test_gradients_flow_through_the_whole_pipeline() -> None:
    n_cp = 8
    grid = water_box()
    arc = ArcSpec(n_sectors=n_cp)
    geom = tiny_geometry(n_cp)
    proposer, b2f, corr, fast = (
        DoseProposer(TINY_PROPOSER), Bev2Fluence(TINY_B2F), Bev2Fluence(TINY_CORR), FastDose(TINY_FAST)
    )
    err = ErrModule(2.0, 1.0)
    rng = np.random.default_rng(0)
    ct = rng.normal(0.0, 50.0, grid.shape).astype(np.float32)
    body = np.ones(grid.shape, bool)
    ptv = np.zeros(grid.shape, bool)
    ptv[2:4, 4:8, 5:9] = True
    rectum = np.zeros(grid.shape, bool)
    rectum[2:4, 8:10, 5:9] = True
    x = proposer_inputs(ct, body, ptv, None, rectum)[None]
    masks = {"ptv": torch.from_numpy(ptv).float(), "rectum": torch.from_numpy(rectum).float()}

    d_target = proposer(x)  # (1, 1, nz, ny, nx)
    b_target = bev_like_projection(d_target, grid, arc)  # (1, n_cp, 40, 40)
    f0 = b2f(b_target[:, None])  # (1, 1, n_cp, 40, 40)
    d0 = fast(f0[:, 0], geom)
    e0 = err(d0, masks, 1.0, sparing={"rectum": 0.2})
    b_err = bev_like_projection(e0, grid, arc)
    f1 = corr(torch.stack([f0[:, 0], b_err], dim=1))
    d1 = fast(f1[:, 0], geom)
    e1 = err(d1, masks, 1.0, sparing={"rectum": 0.2}, dose0=d0.detach())
    loss = f1.abs().mean() + e1.abs().mean() + (d_target - 1.0).abs().mean()
    loss.backward()
    for name, net in [("proposer", proposer), ("bev2fluence", b2f), ("correction", corr), ("fast dose", fast)]:
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, name
    # The proposer is reached through the fluence path too, not only through its own dose loss.
    proposer.zero_grad()
    e1b = err(fast(corr(torch.stack([b2f(bev_like_projection(proposer(x), grid, arc)[:, None])[:, 0],
                                     b_err.detach()], dim=1))[:, 0], geom), masks, 1.0)
    (e1b.abs().mean() + 1e-3 * e1b.sum()).backward()
    assert sum(float(p.grad.abs().sum()) for p in proposer.parameters() if p.grad is not None) > 0
