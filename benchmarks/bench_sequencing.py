"""Leaf sequencer benchmark: speed (after JIT warm-up, 2 Numba threads) and fidelity.

Run: ``.venv/bin/python -m benchmarks.bench_sequencing [--repeats N]``. Prints two markdown
tables: the median wall time of ``sequence_arc`` (180 sectors), ``fluence_from_sequence``
(8 substeps) and ``check_deliverable``; and, per kind of fluence, the relative L1 error of
the fluence the sequence delivers against the input, the total MU and the delivery time.
Targets (paper Table S4): ``sequence_arc`` <= 30 ms, goal <= 10 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numba
import numpy as np
from numpy.typing import NDArray

from core.machine import ArcSpec, MachineModel
from sequencing.deliverability import check_deliverable, delivery_time_s
from sequencing.fluence import fluence_from_sequence, synthetic_arc_fluence
from sequencing.sequencer import sequence_arc


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _moving_two_level(arc: ArcSpec, machine: MachineModel) -> NDArray[np.float64]:
    """Two-level maps whose row apertures drift and change width smoothly over the arc."""
    bev = machine.bev
    k = np.arange(arc.n_sectors)[:, None]
    lo = -bev.half_width_mm + 60 + 20 * np.sin(k / 30.0) + np.linspace(0, 10, bev.n_rows)
    hi = lo + 40 + 15 * np.cos(k / 25.0)
    xe = machine.bev.col_edges_mm()
    ox = np.clip(np.minimum(hi[..., None], xe[1:]) - np.maximum(lo[..., None], xe[:-1]), 0, None)
    F = ox / bev.pixel_mm * (8.0 + 2.0 * np.sin(k / 20.0))[..., None]
    F[:, :6] = F[:, 36:] = 0.0
    return np.asarray(F, dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement (median)")
    args = parser.parse_args(argv)
    numba.set_num_threads(2)
    arc, machine = ArcSpec(), MachineModel()

    cases: dict[str, NDArray[np.float64]] = {}
    constant = synthetic_arc_fluence(arc, machine, seed=0)[:1]
    cases["constant aperture (1 map x 180)"] = np.repeat(constant, arc.n_sectors, axis=0)
    cases["moving two-level aperture"] = _moving_two_level(arc, machine)
    for seed in range(5):
        cases[f"synthetic prostate arc, seed {seed}"] = synthetic_arc_fluence(arc, machine, seed=seed)
    cases["synthetic prostate arc + 10 % noise"] = synthetic_arc_fluence(arc, machine, seed=7, noise=0.1)
    cases["uniform random maps"] = np.random.default_rng(0).uniform(0, 1, (arc.n_sectors, 40, 40))

    realistic = cases["synthetic prostate arc, seed 0"]
    random_maps = cases["uniform random maps"]
    t0 = time.perf_counter()
    seq = sequence_arc(realistic, arc, machine)
    fluence_from_sequence(seq, machine)
    check_deliverable(seq, machine)
    sequence_arc(random_maps, arc, machine)
    warmup_s = time.perf_counter() - t0
    seq_random = sequence_arc(random_maps, arc, machine)

    rows = [
        (
            "sequence_arc, synthetic prostate arc",
            _median_ms(lambda: sequence_arc(realistic, arc, machine), args.repeats),
        ),
        (
            "sequence_arc, uniform random maps",
            _median_ms(lambda: sequence_arc(random_maps, arc, machine), args.repeats),
        ),
        (
            "sequence_arc, float32 input",
            _median_ms(lambda: sequence_arc(realistic.astype(np.float32), arc, machine), args.repeats),
        ),
        ("fluence_from_sequence (8 substeps)", _median_ms(lambda: fluence_from_sequence(seq, machine), args.repeats)),
        (
            "fluence_from_sequence, random-map sequence",
            _median_ms(lambda: fluence_from_sequence(seq_random, machine), args.repeats),
        ),
        ("check_deliverable", _median_ms(lambda: check_deliverable(seq, machine), args.repeats)),
    ]
    print(
        f"## Leaf sequencer speed (180 sectors, 40 x 40 maps, numba threads = {numba.get_num_threads()}, "
        f"median of {args.repeats}; JIT warm-up / cache load {warmup_s:.2f} s)\n"
    )
    print("| step | median (ms) | vs 30 ms target |")
    print("|---|---:|---:|")
    for name, ms in rows:
        ratio = f"{ms / 30.0:.2f}" if name.startswith("sequence_arc") else ""
        print(f"| {name} | {ms:.2f} | {ratio} |")

    print("\n## Sequencing fidelity (fluence_from_sequence(sequence_arc(F)) vs F)\n")
    print("| fluence | rel. L1 error | max abs error / max F | total MU | delivery time (s) | deliverable |")
    print("|---|---:|---:|---:|---:|---|")
    for name, F in cases.items():
        s = sequence_arc(F, arc, machine)
        rec = fluence_from_sequence(s, machine)
        rel = float(np.abs(rec - F).sum() / F.sum())
        mx = float(np.abs(rec - F).max() / F.max())
        ok = "yes" if not check_deliverable(s, machine) else "NO"
        print(f"| {name} | {rel:.4f} | {mx:.3f} | {s.total_mu:.1f} | {delivery_time_s(s, machine):.1f} | {ok} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
