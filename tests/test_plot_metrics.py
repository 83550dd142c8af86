"""bench/plot_metrics.py: a metrics file becomes a PNG; a bad input is one error line and exit status 2."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "plot_metrics.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_plot(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env)


def metrics_line(phase: str, step: int, loss: float, accuracy: float, auc: float | None = None) -> str:
    record = dict(phase=phase, epoch=0, iteration=step, step=step, loss=loss, accuracy=accuracy, auc=auc)
    record.update(ms_per_it=1.5 if phase == "train" else None, samples_per_s=1000.0 if phase == "train" else None)
    return json.dumps(record)


def write_run(path: Path) -> Path:
    lines = [metrics_line("train", step, 0.7 - step / 100, 0.5 + step / 100) for step in (2, 4, 6, 8)]
    lines.insert(3, metrics_line("test", 6, 0.66, 0.55, auc=0.61))
    lines.append(metrics_line("test", 8, 0.64, 0.57, auc=0.63))
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_error_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("plot_metrics.py: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_writes_a_png_next_to_the_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = write_run(tmp_path / "run.jsonl")
    result = run_plot(str(metrics))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_resumed_runs_later_lines_replace_the_steps_it_trained_again() -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    from plot_metrics import latest_per_step

    killed = [json.loads(metrics_line("train", step, 0.9, 0.5)) for step in (2, 4, 6)]
    resumed = [json.loads(metrics_line("train", step, 0.1, 0.5)) for step in (4, 6, 8)]
    test = json.loads(metrics_line("test", 4, 0.2, 0.6, auc=0.7))
    assert latest_per_step([*killed, test, *resumed]) == [killed[0], resumed[0], test, *resumed[1:]]


def test_an_inference_runs_reports_are_drawn(tmp_path):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "evaluated.jsonl"
    metrics.write_text("\n".join(metrics_line("inference", step, 0.6, 0.7) for step in (2, 4)) + "\n")
    result = run_plot(str(metrics))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "evaluated.png").read_bytes().startswith(PNG_SIGNATURE)


def test_out_names_the_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "picture"  # still a PNG, whatever the suffix
    result = run_plot(str(write_run(tmp_path / "run.jsonl")), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out) and out.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("name, out", [("run.png", []), ("run.jsonl", ["--out", "./run.jsonl"])])
def test_the_picture_never_replaces_the_metrics(tmp_path, name, out):
    metrics = write_run(tmp_path / name)
    kept = metrics.read_bytes()
    result = subprocess.run([sys.executable, str(SCRIPT), name, *out], capture_output=True, text=True, cwd=tmp_path)
    assert_one_error_line(result, "run.", ": is the metrics file")
    assert metrics.read_bytes() == kept


@pytest.mark.parametrize("content", [None, "", "\n\n"], ids=["missing", "empty", "blank"])
def test_missing_or_empty_metrics_file(tmp_path, content):
    metrics = tmp_path / "run.jsonl"
    if content is not None:
        metrics.write_text(content)
    complaint = "cannot be read (No such file or directory)" if content is None else "has no metrics"
    assert_one_error_line(run_plot(str(metrics)), str(metrics), complaint)


def test_a_metrics_file_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "run.jsonl")  # reading it waits for a writer, forever
    assert_one_error_line(run_plot(str(tmp_path / "run.jsonl")), f"{tmp_path / 'run.jsonl'}: not a regular file")


@pytest.mark.parametrize(
    "bad_line, complaint",
    [
        ('{"phase": "train", "step": 1, "loss": 0.5,', "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"phase": "valid", "step": 1, "loss": 0.5, "accuracy": 0.5}', "phase must be 'train', 'inference' or 'test'"),
        ('{"phase": "train", "step": 1.5, "loss": 0.5, "accuracy": 0.5}', "step must be an integer"),
        ('{"phase": "train", "step": 1' + "0" * 400 + ', "loss": 0.5, "accuracy": 0.5}', "step must be an integer"),
        ('{"phase": "train", "step": 1, "loss": 1' + "0" * 400 + ', "accuracy": 0.5}', "loss must be a number"),
        ("[" * 100_000, "not a metrics record (nested too deeply"),
        ('{"phase": "train", "step": 1' + "0" * 5000 + "}", "not a metrics record (nested too deeply, or a number"),
        ('{"phase": "train", "step": 1, "accuracy": 0.5}', "loss must be a number, got None"),
        ('{"phase": "train", "step": 1, "loss": 0.5, "accuracy": "high"}', "accuracy must be a number"),
        ('{"phase": "test", "step": 1, "loss": 0.5, "accuracy": 0.5, "auc": true}', "auc must be a number or null"),
    ],
)
def test_bad_line_is_named_by_its_number(tmp_path, bad_line, complaint):
    metrics = tmp_path / "run.jsonl"
    metrics.write_text(metrics_line("train", 1, 0.7, 0.5) + "\n" + bad_line + "\n")
    assert_one_error_line(run_plot(str(metrics)), f"{metrics}: line 2: {complaint}")
    assert not (tmp_path / "run.png").exists()


def test_bad_command_line_is_one_line():
    assert_one_error_line(run_plot(), "the following arguments are required: metrics")


def test_without_matplotlib(tmp_path):
    hidden = tmp_path / "no_matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('matplotlib is hidden by this test')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(hidden.parent)}
    result = run_plot(str(write_run(tmp_path / "run.jsonl")), env=env)
    assert_one_error_line(result, "matplotlib is not installed")


def test_unwritable_out_is_one_line(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "absent" / "run.png"
    result = run_plot(str(write_run(tmp_path / "run.jsonl")), "--out", str(out))
    assert_one_error_line(result, f"{out}: cannot be written (No such file or directory)")


def test_a_failed_write_leaves_the_previous_picture(tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    metrics = write_run(tmp_path / "run.jsonl")
    previous = PNG_SIGNATURE + b" the previous picture"
    (tmp_path / "run.png").write_bytes(previous)

    def full_disk(self, path, **kwargs) -> None:
        Path(path).write_bytes(PNG_SIGNATURE)  # the picture's start, then no more room
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(figure.Figure, "savefig", full_disk)
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import plot_metrics

    assert plot_metrics.main([str(metrics)]) == 2
    assert (tmp_path / "run.png").read_bytes() == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.jsonl", "run.png"]
