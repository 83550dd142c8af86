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


def run_script(
    *args: str, cwd: Path = ROOT, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def run_here(argv: list[str], capsys) -> str:
    """Run the script in this process, its stdout. Lazy runs compile here rather than in a new process, which
    would spend about 10 s importing and setting up the compiler. The graphs counted show that a lazy run
    compiled its two (the dense path, the optimizer's update) and an eager run none."""
    import torch

    import dlrm_s_pytorch

    torch._dynamo.reset()  # earlier tests' graphs would count towards the recompile limit (an error, fullgraph)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert dlrm_s_pytorch.main(argv) == 0
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert compiled == (2 if "--mode=lazy" in argv or "--run-lazy-mode" in argv else 0)
    return capsys.readouterr().out


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
