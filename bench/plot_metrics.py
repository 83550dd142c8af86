"""Plot a run's metrics: loss, accuracy and AUC against the step, training (or inference) and test as separate lines.

    python bench/plot_metrics.py METRICS [--out FILE.png]

METRICS is the JSON Lines file the training script appends to at every print window and every test, one object
a line: ``phase`` ("train", "inference" for the reports of an ``--inference-only`` run, or "test"), ``epoch``,
``iteration``, ``step`` (iterations since the start of training), ``loss``, ``accuracy`` (0..1), ``auc`` (test
lines; null when not computed), ``ms_per_it`` and ``samples_per_s``. Where a resumed run wrote a step again, its
later line is the one drawn. The picture goes to FILE.png (default: METRICS with the suffix .png), and its path
is printed. Needs matplotlib (requirements-extras.txt); a problem is one line on stderr and exit status 2.
"""

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

PHASES = ("train", "inference", "test")
COLORS = {"train": "tab:blue", "inference": "tab:green", "test": "tab:orange"}  # the same in every panel
# (key, axis label, phases drawn): only tests compute an AUC
PANELS = (("loss", "loss", PHASES), ("accuracy", "accuracy", PHASES), ("auc", "AUC", ("test",)))


class MetricsError(Exception):
    """A problem to report in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage first
        raise MetricsError(message)


def read_metrics(path: Path) -> list[dict]:
    """The file's records, each checked for what the plot uses."""
    if path.exists() and not path.is_file():  # a pipe waits for a writer, /dev/zero never ends
        raise MetricsError(f"{path}: not a regular file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise MetricsError(f"{path}: cannot be read ({getattr(error, 'strerror', None) or error})") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            records.append(_record(path, number, line))
    if not records:
        raise MetricsError(f"{path}: has no metrics")
    return records


def _record(path: Path, number: int, line: str) -> dict:
    where = f"{path}: line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise MetricsError(f"{where}: not JSON ({error.msg})") from None
    except (RecursionError, ValueError):  # nested too deeply, or an integer of thousands of digits
        raise MetricsError(f"{where}: not a metrics record (nested too deeply, or a number too long)") from None
    if not isinstance(record, dict):
        raise MetricsError(f"{where}: not a JSON object")
    if record.get("phase") not in PHASES:
        raise MetricsError(f"{where}: phase must be 'train', 'inference' or 'test', got {record.get('phase')!r}")
    step = record.get("step")
    if not isinstance(step, int) or not _is_number(step):
        raise MetricsError(f"{where}: step must be an integer, got {step!r}")
    for key in ("loss", "accuracy"):
        if not _is_number(record.get(key)):
            raise MetricsError(f"{where}: {key} must be a number, got {record.get(key)!r}")
    if record.get("auc") is not None and not _is_number(record["auc"]):
        raise MetricsError(f"{where}: auc must be a number or null, got {record['auc']!r}")
    return record


def latest_per_step(records: list[dict]) -> list[dict]:
    """A resumed run appends the steps after its checkpoint again: of a phase's records for one step, the last
    written wins. Ordered by step."""
    latest = {(record["phase"], record["step"]): record for record in records}
    return sorted(latest.values(), key=lambda record: record["step"])


def _is_number(value: object) -> bool:
    """A number a plot can draw: JSON's integers may be too large for a float."""
    return isinstance(value, int | float) and not isinstance(value, bool) and not abs(value) > sys.float_info.max


def plot(records: list[dict], out: Path) -> None:
    """Three panels, one above the other, sharing the step axis; written as a PNG (a failed write leaves the
    previous one as it was)."""
    try:
        import matplotlib
    except ImportError:
        raise MetricsError("matplotlib is not installed (pip install -r requirements-extras.txt)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(PANELS), 1, sharex=True, figsize=(8, 9), layout="constrained")
    for axis, (key, label, phases) in zip(axes, PANELS, strict=True):
        for phase in phases:
            points = [(r["step"], r[key]) for r in records if r["phase"] == phase and r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                marker = "o" if phase == "test" else None
                axis.plot(steps, values, color=COLORS[phase], marker=marker, markersize=4, label=phase)
        if axis.has_data():
            axis.legend()
        else:
            axis.text(0.5, 0.5, f"no {label}", transform=axis.transAxes, ha="center", va="center", color="gray")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[-1].set_xlabel("step (iterations since the start of training)")
    partial = out.resolve().with_name(f".{out.name}.partial")  # renamed over the picture once whole
    try:
        figure.savefig(partial, format="png", dpi=100)
        os.replace(partial, out.resolve())
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise MetricsError(f"{out}: cannot be written ({error.strerror or error})") from None
    finally:
        plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="plot_metrics.py", description="Plot loss, accuracy and AUC of a metrics file.")
    parser.add_argument("metrics", type=Path, help="the training script's JSON Lines metrics file")
    parser.add_argument("--out", type=Path, help="the PNG to write (default: METRICS with the suffix .png)")
    try:
        args = parser.parse_args(argv)
        out = args.out or args.metrics.with_suffix(".png")
        if out.resolve() == args.metrics.resolve():  # a metrics file named .png, or --out naming it
            raise MetricsError(f"{out}: is the metrics file, which the picture would replace (give --out another)")
        plot(latest_per_step(read_metrics(args.metrics)), out)
    except MetricsError as error:
        print(f"plot_metrics.py: error: {error}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
