"""Shared helpers: run the training script as a user would, and read the lines it prints."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FINISHED = re.compile(
    r"^Finished (training|inference) it (\d+)/(\d+) of epoch (\d+), (-?[\d.]+) ms/it, "
    r"loss ([\d.]+), accuracy ([\d.]+) %$"
)


def run_script(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent, process group) of each process not yet ended (a zombie, ended but not reaped, is left out)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:  # it ended meanwhile
            continue
        if state != "Z":
            found[int(stat.parent.name)] = (int(parent), int(group))
    return found


def live_processes_in_group(group: int) -> list[int]:
    return [pid for pid, (_, process_group) in live_processes().items() if process_group == group]


def finished_lines(stdout: str) -> list[dict]:
    """Every `Finished ... it` line, parsed."""
    rows = []
    for line in stdout.splitlines():
        match = FINISHED.match(line)
        if match:
            phase, it, nbatches, epoch, ms, loss, accuracy = match.groups()
            rows.append(
                dict(phase=phase, it=int(it), nbatches=int(nbatches), epoch=int(epoch), ms=float(ms),
                     loss=float(loss), accuracy=float(accuracy))
            )  # fmt: skip
    return rows


WEIGHT = re.compile(r"^updated (.+?):\n(tensor\(.*?\))$", re.M | re.S)
NUMBER = re.compile(r"-?\d+\.\d*(?:e[+-]?\d+)?")


def printed_weights(stdout: str) -> dict:
    """The ``--debug-mode`` dump of the trained weights: name -> values (a flat tensor)."""
    import torch

    return {name: torch.tensor([float(x) for x in NUMBER.findall(text)]) for name, text in WEIGHT.findall(stdout)}
