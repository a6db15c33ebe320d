"""MRI operator speed against a bare, uncentred ``torch.fft.fft2`` measured side by side.

Rows: for a batch ``(32, 256, 256)`` complex64, the bare FFT (the baseline), the usual
``fftshift``-centred FFT, ``fftc``, and ``CartesianMRI`` forward / adjoint / normal; then
8-coil SENSE on one ``(256, 256)`` slice (k-space ``(8, 256, 256)``), against a bare FFT of
the same ``(8, 256, 256)``. ``speed_vs_bare_fft = t_bare / t`` (1.0: as fast as one bare FFT;
a normal operator does two FFTs). Everything runs without autograd, as in reconstruction.

The cases are timed in interleaved rounds (``median_time`` per case per round, median over
rounds), so slow drifts of a shared machine hit every row alike.

Findings on the 2-core CPU VM (torch 2.13, MKL FFT), quiet machine: forward and adjoint run at
about 0.6-0.7 of a bare ``fft2`` with 2 threads and about 0.7-0.9 with 1 thread; the
``fftshift`` version at 0.15-0.5. The 0.8 bar is not met with 2 threads. torch.profiler shows
the blocked FFT calls cost what one bare ``fft2`` costs; the rest is the two elementwise
passes (input chequerboard, then mask·chequerboard), each ~15-20% of an FFT here. The mask
pass alone (uncentred ``fft2(x).mul_(mask)``) already runs at about 0.85. Fusing the shift into
the mask pass (quadrant-swapped strided writes) was slower than two contiguous passes, and
unblocked ``x * D`` (two fresh full-size buffers) adds page faults. On a busy machine
(other processes on both cores) the blocked loop's many small parallel regions suffer more
than one bare call; with 1 thread per process (Ray's default) that does not arise.

Also tried (scratch variants, same data, 2 threads, ratio to bare ``fft2``), none kept:

* centring as a roll of the output folded into the mask pass (no input modulation), by four
  quadrant-strided multiplies per block: 0.67-0.69; strided quadrant multiplies cost 2.5x a
  contiguous one in TensorIterator;
* exploiting the 1D mask: row FFT, gather of the sampled columns, column FFT of those only,
  scatter: 0.35-0.57; the column gather (``index_select`` / advanced indexing) costs as much
  as a whole row FFT;
* the chequerboard as a sign-bit XOR on an int64 view instead of a multiply: pass 0.36 ms
  instead of 0.53 ms with 2 threads, no gain with 1 thread;
* a fused in-place quadrant-swap-and-weigh kernel in numba after a bare ``fft2``: 0.73-0.78,
  not worth a JIT dependency;
* block sizes from 64 K to 1 M elements, or no blocking: 0.61-0.68 throughout.

Run: ``python benchmarks/bench_mri.py [--device cuda] [--threads N] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.timing import median_time, parse_device, print_table, write_json  # noqa: E402
from operators.fft import fftc  # noqa: E402
from operators.masks import random_1d  # noqa: E402
from operators.mri import CartesianMRI, birdcage_maps, sense  # noqa: E402

__all__ = ["run"]

BATCH, SIZE, COILS = 32, 256, 8


def _shifted_fft2(x: torch.Tensor) -> torch.Tensor:
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=dims), norm="ortho"), dim=dims)


def _time_rounds(
    cases: dict[str, Callable[[], Any]], rounds: int, sync: Callable[[], None] | None
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(median_time(fn, repeats=5, warmup=1, sync=sync))
    return {name: statistics.median(ts) for name, ts in times.items()}


def _rows(times: dict[str, float], bare: float, shape: str, notes: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {
            "case": name,
            "shape": shape,
            "median_s": sec,
            "speed_vs_bare_fft": bare / sec,
            "note": notes.get(name, ""),
        }
        for name, sec in times.items()
    ]


@torch.no_grad()
def run(device: str = "cpu", rounds: int = 5) -> list[dict[str, Any]]:
    """Time the MRI operators on ``device``; one dict per row (see the module docstring)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, SIZE, SIZE, generator=g, dtype=torch.complex64).to(device)  # (B, H, W)
    mask = random_1d((SIZE, SIZE), 4, 0.08, seed=0).to(device)  # (H, W)
    A = CartesianMRI(mask)
    y = A.forward(x)  # (B, H, W)

    single = {
        "fft2 (bare, uncentred)": lambda: torch.fft.fft2(x, norm="ortho"),
        "fft2 + fftshift/ifftshift": lambda: _shifted_fft2(x),
        "fftc (chequerboard)": lambda: fftc(x, 2),
        "CartesianMRI forward": lambda: A.forward(x),
        "CartesianMRI adjoint": lambda: A.adjoint(y),
        "CartesianMRI normal": lambda: A.normal(x),
    }
    t = _time_rounds(single, rounds, sync)
    bare = t["fft2 (bare, uncentred)"]
    notes = {
        "fft2 + fftshift/ifftshift": "torch.roll on input and output",
        "CartesianMRI forward": "D ⊙ x, fft2, (M·s·D) ⊙ k, in cache-sized blocks",
        "CartesianMRI adjoint": "(M·s·D) ⊙ y, ifft2, D ⊙ z, in cache-sized blocks",
        "CartesianMRI normal": "two FFTs, no modulation: ifft2(ifftshift(M²) ⊙ fft2(x)), blocked",
    }
    shape = f"({BATCH}, {SIZE}, {SIZE}) complex64"
    rows = _rows(t, bare, shape, notes)

    maps = birdcage_maps((SIZE, SIZE), COILS).to(device)  # (C, H, W)
    E = sense(mask, maps)
    xs = x[0]  # (H, W)
    ys = E.forward(xs)  # (C, H, W)
    coils = {
        "fft2 (bare) on (C, H, W)": lambda: torch.fft.fft2(ys, norm="ortho"),
        "SENSE forward": lambda: E.forward(xs),
        "SENSE adjoint": lambda: E.adjoint(ys),
        "SENSE normal": lambda: E.normal(xs),
    }
    t = _time_rounds(coils, rounds, sync)
    bare = t["fft2 (bare) on (C, H, W)"]
    notes = {
        "SENSE forward": "fused: D x, then S_c ⊙, fft2, W ⊙ per block of coils",
        "SENSE adjoint": "fused: W ⊙ y, ifft2, conj(S_c) ⊙ per block of coils; coil sum; D ⊙",
        "SENSE normal": "fused, two FFTs per coil, a few coils at a time",
    }
    shape = f"image ({SIZE}, {SIZE}), k-space ({COILS}, {SIZE}, {SIZE})"
    rows += _rows(t, bare, shape, notes)
    return rows


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parse_device(parser)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = run(args.device, args.rounds)
    print_table(f"MRI operators on {args.device} ({torch.get_num_threads()} threads)", rows)
    print(f"wrote {write_json('bench_mri', {'device': args.device, 'rows': rows})}")


if __name__ == "__main__":
    main()
