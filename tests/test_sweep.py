"""Sliding-window arc sequencing (``sequencing.sweep``): modulation kept, machine limits kept."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from core.errors import SequencingError
from core.machine import ArcSpec, MachineModel
from sequencing.deliverability import check_deliverable
from sequencing.fluence import fluence_from_sequence
from sequencing.sequencer import sequence_arc
from sequencing.sweep import _row_sweep, sweep_sequence_arc

ARC = ArcSpec()
MACHINE = MachineModel()
N, R, C = ARC.n_sectors, MACHINE.bev.n_rows, MACHINE.bev.n_cols
FIRST = MACHINE.first_bev_leaf_pair


def _group_sums(f: NDArray[np.float64], group: int) -> NDArray[np.float64]:
    return np.stack([f[s:s + group].sum(axis=0) for s in range(0, f.shape[0], group)])


def _modulated(seed: int = 0) -> NDArray[np.float64]:
    """Maps with a dip (a spared organ behind the target) and raised edges, changing slowly over the arc."""
    rng = np.random.default_rng(seed)
    f = np.zeros((N, R, C))
    x = np.arange(C)
    for k in range(N):
        c = 20 + 2.0 * np.sin(2 * np.pi * k / N)
        for r in range(12, 28):
            half = 7 + 2 * np.cos(np.pi * (r - 20) / 16)
            inside = np.abs(x - c) <= half
            row = np.where(inside, 4.0, 0.0)
            row = np.where(inside & (np.abs(x - c) <= 2) & (r > 17), 1.5, row)  # the dip
            row = np.where(inside & (np.abs(np.abs(x - c) - half) < 1), 6.0, row)  # raised edges
            f[k, r] = row * (1.0 + 0.05 * rng.standard_normal())
    return np.clip(f, 0.0, None)


def test_row_sweep_exposes_each_pixel_for_its_fluence() -> None:
    """Spirou-Chui: pixel i is uncovered by the leading leaf and covered by the trailing leaf f_i MU apart."""
    f = np.array([0.0, 2.0, 5.0, 1.0, 3.0, 0.0])
    times = np.linspace(0.0, 7.0, 701)  # the sweep's MU is the sum of the rises: 2 + 3 + 2 = 7
    ia, ib = _row_sweep(f, times)
    for i in range(f.size):  # pixel i spans edges i .. i + 1: exposed while ib > i and ia <= i
        exposed = (ib > i) & (ia <= i)
        assert exposed.sum() * (times[1] - times[0]) == pytest.approx(f[i], abs=0.02)
    assert np.all(np.diff(ia) >= 0) and np.all(np.diff(ib) >= 0)  # unidirectional
    assert np.all(ia <= ib)


def test_sweep_keeps_the_modulation_the_rule_sequencer_loses() -> None:
    """Summed over each sweep's sectors, the swept arc delivers the maps' modulation (the dip and the
    raised edges) better than one aperture per sector does; the wider the window, the better."""
    f = _modulated()
    rule = fluence_from_sequence(sequence_arc(f, ARC, MACHINE, threshold=0.02), MACHINE)

    def error(got: NDArray[np.float64], group: int) -> float:
        want = _group_sums(f, group)
        return float(np.abs(_group_sums(got, group) - want).sum() / want.sum())

    errors = {g: error(fluence_from_sequence(sweep_sequence_arc(f, ARC, MACHINE, group=g), MACHINE), g)
              for g in (10, 20)}
    assert errors[10] < error(rule, 10)
    assert errors[20] < 0.6 * errors[10]
    assert errors[20] < 0.5 * error(rule, 20)
    wide = _group_sums(fluence_from_sequence(sweep_sequence_arc(f, ARC, MACHINE, group=20), MACHINE), 20)
    dip = wide[:, 22, 20].mean() / wide[:, 22, 16].mean()  # the maps hold 1.5 / 4 there
    assert 0.3 < dip < 0.8


def test_sweep_is_within_every_machine_limit_and_alternates() -> None:
    f = _modulated(1)
    seq = sweep_sequence_arc(f, ARC, MACHINE, group=10, mu_headroom=0.02)
    assert check_deliverable(seq, MACHINE) == []
    assert seq.leaves_mm.shape == (N + 1, MACHINE.n_leaf_pairs, 2)
    row = FIRST + 20
    x2 = seq.leaves_mm[:, row, 1]
    assert np.all(np.diff(x2[1:10]) >= -1e-9)  # group 0 sweeps towards +x
    assert np.all(np.diff(x2[11:20]) <= 1e-9)  # group 1 sweeps back
    # the MU of a group is the largest row's sum of rises, shared by its sectors
    assert np.allclose(seq.segment_mu()[0:10], seq.segment_mu()[0])


def test_sweep_of_a_flat_aperture_delivers_it() -> None:
    f = np.zeros((N, R, C))
    f[:, 15:25, 12:28] = 5.0
    got = _group_sums(fluence_from_sequence(sweep_sequence_arc(f, ARC, MACHINE, group=10), MACHINE), 10)
    want = _group_sums(f, 10)
    inner = (slice(None), slice(16, 24), slice(14, 26))
    assert np.allclose(got[inner], want[inner], rtol=0.05)
    assert got[:, 15:25, :10].max() < 0.05 * want.max()  # nothing far outside the aperture


@pytest.mark.parametrize(("make", "needle"), [
    (lambda f: f[:10], "fluence has shape"),
    (lambda f: f * -1.0, "negative MU"),
    (lambda f: f * np.nan, "NaN/inf values"),
    (lambda f: f * 0.0, "every fluence map is zero"),
    (lambda f: f.astype(np.int64), "float32 or float64"),
])
def test_bad_fluence_is_refused(make, needle: str) -> None:  # type: ignore[no-untyped-def]
    """The sweep refuses what the rule-based sequencer refuses, with the same messages."""
    with pytest.raises(SequencingError, match=needle):
        sweep_sequence_arc(make(_modulated()), ARC, MACHINE)


def test_bad_group_is_refused() -> None:
    with pytest.raises(SequencingError, match="group"):
        sweep_sequence_arc(_modulated(), ARC, MACHINE, group=0)
