"""Peak memory and time of Criteo preprocessing on a worst-case input: every categorical value distinct.

    python bench/preprocess_memory.py --rows 2000000 [--directory DIR]

Writes a Kaggle-format ``train.txt`` of random rows (each of the 26 categorical columns holds fresh random 32-bit
hashes, so the vocabularies grow with the rows), preprocesses it with ``data_utils.prepare`` in a child process,
and samples the proportional set size (PSS: shared pages divided among the processes sharing them) of the child
and its worker processes every 50 ms. Prints the peak of their sum, the wall time and the distinct values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PREPARE = """
import argparse, sys
sys.path.insert(0, {root!r})
import data_utils
flags = dict(data_set="kaggle", raw_data_file={raw!r}, processed_data_file="", max_ind_range=-1,
             data_sub_sample_rate=0.0, data_randomize="none", memory_map=True, mlperf_bin_loader=False,
             numpy_rand_seed=123, skip_bad_lines=False)
print(sum(data_utils.prepare(argparse.Namespace(**flags)).counts))
"""


def write_distinct_rows(path: Path, rows: int, seed: int = 0) -> None:
    generator = np.random.default_rng(seed)
    with open(path, "w") as out:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            labels = generator.integers(0, 2, n)
            dense = generator.integers(0, 1000, (n, 13))
            hashes = generator.integers(0, 2**32, (n, 26), dtype=np.uint64)
            out.writelines(
                "\t".join([str(label), *map(str, numbers), *(f"{h:08x}" for h in categorical)]) + "\n"
                for label, numbers, categorical in zip(labels, dense, hashes, strict=True)
            )


def tree_pss_bytes(pid: int) -> int:
    """PSS of the process and its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
            with open(f"/proc/{current}/task/{current}/children") as f:
                pending += [int(child) for child in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
    return total


def measure(raw: Path) -> dict:
    began = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", PREPARE.format(root=str(ROOT), raw=str(raw))], stdout=subprocess.PIPE, text=True
    )
    peak = 0
    while child.poll() is None:
        peak = max(peak, tree_pss_bytes(child.pid))
        time.sleep(0.05)
    if child.returncode:
        raise SystemExit(f"preprocessing failed with exit code {child.returncode}")
    distinct = int(child.stdout.read().split()[-1])
    return dict(wall_s=round(time.perf_counter() - began, 1), peak_pss_mb=round(peak / 2**20), distinct=distinct)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    kept = "where the data goes, kept for the next measurement of as many rows (default: a temporary directory)"
    parser.add_argument("--directory", type=Path, help=kept)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        directory = args.directory or Path(temporary)
        directory.mkdir(parents=True, exist_ok=True)
        raw = directory / f"distinct_rows_{args.rows}.txt"  # not a user's train.txt, whose processed files stay
        if not raw.exists():
            write_distinct_rows(raw, args.rows)
        for made in directory.glob(f"{raw.stem}_*"):  # what an earlier measurement made from it
            made.unlink()
        result = dict(rows=args.rows, **measure(raw))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
