"""Operator speed, side by side with baselines in one run: MRI (vs bare torch.fft) and CT (vs skimage).

Prints one table per modality and writes ``benchmarks/results/operators.json``.
Run: ``python benchmarks/operators.py [--device cuda]`` (``make bench`` runs it on the CPU).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks import bench_ct, bench_mri  # noqa: E402
from benchmarks.timing import parse_device, print_table, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    args = parse_device(parser)
    results = {}
    for name, module in (("mri", bench_mri), ("ct", bench_ct)):
        rows = module.run(args.device)
        print_table(f"{name.upper()} operators on {args.device} ({torch.get_num_threads()} threads)", rows)
        results[name] = rows
    path = write_json("operators", {"device": args.device, **results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
