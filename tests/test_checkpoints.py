"""Checkpoints (``--save-model``, ``--load-model``): exact resume, atomic writes, signals, and bad files."""

import os
import re
import resource
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, finished_lines, live_processes, live_processes_in_group, run_script
from criteo_files import write_kaggle, write_upstream_processed

import dlrm_s_pytorch
import habana_dlrm_ops
from distributed_utils import Ranks

TINY = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=5-8-4", "--mini-batch-size=16", "--print-freq=1"]
TINY += ["--num-indices-per-lookup=6", "--learning-rate=0.05", "--arch-embedding-size=40-7-200-25"]
CASES = {
    "dot-sgd": ["--arch-interaction-op=dot", "--arch-mlp-top=14-6-1", "--optimizer=sgd"],
    "cat-adagrad": ["--arch-mlp-top=20-6-1", "--optimizer=adagrad"],
    "dot-adagrad-bf16": ["--arch-interaction-op=dot", "--arch-mlp-top=14-6-1", "--optimizer=adagrad", "-d", "bf16"],
}


def saved(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Weights and optimizer state bit for bit."""
    assert a["weights"].keys() == b["weights"].keys()
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
    for name in a["sparse_state"]:
        assert torch.equal(a["sparse_state"][name], b["sparse_state"][name]), name
    assert a["dense_state"].keys() == b["dense_state"].keys()
    for name in a["dense_state"]:
        assert torch.equal(a["dense_state"][name], b["dense_state"][name]), name


@pytest.mark.parametrize("name", CASES)
def test_a_resumed_run_equals_the_run_that_never_stopped(name: str, tmp_path: Path) -> None:
    argv = [*TINY, *CASES[name]]
    whole = run_script(*argv, "--num-batches=12", "--save-model", str(tmp_path / "whole.pt"))
    first = run_script(*argv, "--num-batches=6", "--save-model", str(tmp_path / "half.pt"))
    resumed = run_script(
        *argv, "--num-batches=12", "--load-model", str(tmp_path / "half.pt"), "--save-model", str(tmp_path / "end.pt")
    )
    for result in (whole, first, resumed):
        assert result.returncode == 0, result.stderr
    assert "Loaded" in resumed.stdout and "saved after it 6 of epoch 0" in resumed.stdout
    later = finished_lines(resumed.stdout)
    assert [line["it"] for line in later] == list(range(7, 13))
    assert later == finished_lines(whole.stdout)[6:]  # losses and accuracies printed identically
    assert_same_training_state(saved(tmp_path / "whole.pt"), saved(tmp_path / "end.pt"))


def test_a_run_resumed_with_more_batches_prints_the_window_it_had_printed_early(tmp_path: Path, capsys) -> None:
    argv, path = [*TINY, *CASES["cat-adagrad"], "--print-freq=4"], str(tmp_path / "model.pt")
    runs = [["--num-batches=12"], ["--num-batches=6", "--save-model", path], ["--num-batches=12", "--load-model", path]]
    whole, first, resumed = [(dlrm_s_pytorch.main([*argv, *flags]), capsys.readouterr().out)[1] for flags in runs]
    assert [line["it"] for line in finished_lines(first)] == [4, 6]  # the epoch's last line, 5 and 6
    assert finished_lines(resumed) == finished_lines(whole)[1:]  # it 8's line is of 5 to 8 again


def test_resuming_into_the_next_epoch_with_loader_workers(tmp_path: Path) -> None:
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=4", "--print-freq=2"]
    whole = run_script(*argv, "--nepochs=2", "--save-model", str(tmp_path / "whole.pt"))
    first = run_script(*argv, "--nepochs=1", "--save-model", str(tmp_path / "epoch0.pt"))
    resumed = run_script(*argv, "--nepochs=2", "--num-workers=2", "--load-model", str(tmp_path / "epoch0.pt"),
                         "--save-model", str(tmp_path / "end.pt"))  # fmt: skip
    for result in (whole, first, resumed):
        assert result.returncode == 0, result.stderr
    later = finished_lines(resumed.stdout)
    assert [(line["epoch"], line["it"]) for line in later] == [(1, 2), (1, 4)]
    assert later == finished_lines(whole.stdout)[2:]
    assert_same_training_state(saved(tmp_path / "whole.pt"), saved(tmp_path / "end.pt"))


def test_a_checkpoint_at_the_last_whole_batch_before_a_partial_one_resumes_exactly(tmp_path: Path) -> None:
    # 90 samples: 5 batches of 16, then 10; --save-freq saves after it 5, before the partial batch is met
    argv = [*TINY, *CASES["cat-adagrad"], "--data-size=90", "--print-freq=2"]
    whole = run_script(*argv, "--nepochs=2", "--save-model", str(tmp_path / "whole.pt"))
    first = run_script(*argv, "--save-freq=5", "--save-model", str(tmp_path / "it5.pt"))
    resumed = run_script(*argv, "--nepochs=2", "--load-model", str(tmp_path / "it5.pt"),
                         "--save-model", str(tmp_path / "end.pt"))  # fmt: skip
    for result in (whole, first, resumed):
        assert result.returncode == 0, result.stderr
    assert re.findall(r"^Saved .* at it (\d+) of epoch 0$", first.stdout, re.M) == ["5"]
    lines = finished_lines(whole.stdout)
    assert [(line["epoch"], line["it"]) for line in lines] == [(0, 2), (0, 4), (0, 5), (1, 2), (1, 4), (1, 5)]
    assert finished_lines(resumed.stdout) == lines[3:]
    assert_same_training_state(saved(tmp_path / "whole.pt"), saved(tmp_path / "end.pt"))


def test_save_freq_saves_every_n_iterations_and_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    result = run_script(*TINY, *CASES["dot-sgd"], "--num-batches=10", "--save-freq=4", "--save-model", str(path))
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^Saved .* at it (\d+) of epoch 0$", result.stdout, re.M) == ["4", "8", "10"]
    assert saved(path)["position"] == dict(epoch=0, batch=10, iteration=10)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_save_freq_at_the_last_iteration_saves_it_once(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    result = run_script(*TINY, *CASES["dot-sgd"], "--num-batches=8", "--save-freq=4", "--save-model", str(path))
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^Saved .* at it (\d+) of epoch 0$", result.stdout, re.M) == ["4", "8"]
    assert saved(path)["position"] == dict(epoch=0, batch=8, iteration=8)


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    """The run in a process group of its own (its id is the run's), as a job under a batch scheduler."""
    command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *argv]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[str, str]:
    """(stdout, stderr) once the run ends; one still going after ``timeout`` s is killed with its group, and fails."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"the run did not end within {timeout} s") from None


def wait_for_line(process: subprocess.Popen, pattern: str) -> str:
    for line in process.stdout:
        if re.search(pattern, line):
            return line
    raise AssertionError(f"the run ended without printing {pattern!r}: {process.stderr.read()}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_exits_cleanly_and_the_run_resumes_exactly(signum: int, tmp_path: Path) -> None:
    argv = [*TINY, *CASES["cat-adagrad"], "--print-freq=5"]
    path = tmp_path / "model.pt"
    process = start([*argv, "--num-batches=100000", "--save-model", str(path)], tmp_path)
    wait_for_line(process, r"^Finished training it 10/")
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert err == ""
    stopped = re.search(rf"^Stopped by {signal.Signals(signum).name} after it (\d+)/100000 of epoch 0$", out, re.M)
    assert stopped, out
    k = int(stopped[1])
    assert saved(path)["position"]["iteration"] == k

    end = (k // 5 + 2) * 5  # two more print windows
    resumed = run_script(*argv, f"--num-batches={end}", "--load-model", str(path))
    whole = run_script(*argv, f"--num-batches={end}")
    assert resumed.returncode == 0 and whole.returncode == 0, resumed.stderr + whole.stderr
    # the window in progress at the signal was saved too, so even the line that spans the stop is equal
    assert finished_lines(resumed.stdout) == [line for line in finished_lines(whole.stdout) if line["it"] > k]


def test_a_run_a_signal_stops_saves_but_does_not_export(tmp_path: Path) -> None:
    """The network of a stopped run is not the trained one; the run that resumes and finishes exports it."""
    pytest.importorskip("onnx")
    checkpoint, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=100000", "--save-model", str(checkpoint)]
    process = start([*argv, "--save-onnx", str(onnx_file)], tmp_path)
    wait_for_line(process, r"^Finished training it 1/")
    process.send_signal(signal.SIGTERM)
    out, err = finish(process)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Not exported (--save-onnx): stopped by SIGTERM" in out, out  # the flags given, not every one
    assert checkpoint.exists() and not onnx_file.exists()


def test_a_signal_while_the_last_checkpoint_is_saved_is_named_as_why_nothing_is_exported(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Training had ended: "the run stopped before its end", as it said, was not so."""
    pytest.importorskip("onnx")
    checkpoint, onnx_file = tmp_path / "model.pt", tmp_path / "model.onnx"
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=2", "--save-model", str(checkpoint)]
    save = dlrm_s_pytorch.Trainer.save

    def save_with_a_sigterm(trainer):
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler only records it
        save(trainer)

    monkeypatch.setattr(dlrm_s_pytorch.Trainer, "save", save_with_a_sigterm)
    assert dlrm_s_pytorch.main([*argv, "--save-onnx", str(onnx_file)]) == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    assert "Finished training it 2/2" in out and saved(checkpoint)["position"]["iteration"] == 2
    assert out.endswith("Not exported (--save-onnx): stopped by SIGTERM\n")
    assert not onnx_file.exists()


def test_a_run_whose_output_reader_leaves_saves_and_stops_as_by_sigpipe(tmp_path: Path) -> None:
    """``… | head``: the writes after head has left fail; the run stops at the iteration's end and saves."""
    path = tmp_path / "model.pt"
    process = start([*TINY, *CASES["cat-adagrad"], "--num-batches=100000", "--save-model", str(path)], tmp_path)
    wait_for_line(process, r"^Finished training it 1/")
    process.stdout.close()
    try:
        err = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signal.SIGPIPE and err == "", err
    assert 0 < saved(path)["position"]["iteration"] < 100000


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file that is always full")
def test_output_on_a_full_disk_is_one_line_and_the_run_still_saves(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=3", "--save-model", str(path)]
    with open("/dev/full", "w") as full:
        process = subprocess.run([sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *argv], cwd=tmp_path,
                                 stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert process.stderr == "stdout: cannot write it (No space left on device); the run goes on, its output " \
                             "from here on is lost\n"  # fmt: skip
    assert saved(path)["position"]["iteration"] == 3


def test_a_second_ctrl_c_stops_a_long_iteration_at_once(tmp_path: Path, monkeypatch) -> None:
    """Lazy mode's first iteration compiles for seconds (minutes on the medium model): the first Ctrl-C would
    wait for it to end; the second stops the run there, leaving the last checkpoint as it was (none yet)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # nothing compiled yet: a long iteration
    path = tmp_path / "model.pt"
    argv = [*TINY, *CASES["cat-adagrad"], "--mode=lazy", "--num-batches=100", "--save-model", str(path)]
    process = start(argv, tmp_path)
    wait_for_line(process, r"^time/loss/accuracy")  # the loop has begun: the first iteration compiles
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    out, err = finish(process)
    assert process.returncode == 128 + signal.SIGINT and err == "Interrupted.\n", out + err
    assert "Finished training" not in out and not path.exists()


def test_a_second_ctrl_c_while_the_loader_processes_end_stops_at_once(tmp_path: Path, capsys, monkeypatch) -> None:
    """After the first Ctrl-C the loop ends its loader processes, then saves: a second one there stops the run, as
    anywhere else, rather than being printed with a traceback as an exception ignored while they end."""
    path = tmp_path / "model.pt"
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=100", "--num-workers=2", "--save-model", str(path)]
    forward, iterations = dlrm_s_pytorch.Trainer.forward, []
    multiprocess_batches = torch.utils.data.dataloader._MultiProcessingDataLoaderIter
    shutdown = multiprocess_batches._shutdown_workers

    def forward_with_a_ctrl_c_at_the_third_iteration(trainer, batch):
        iterations.append(batch)
        if len(iterations) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return forward(trainer, batch)

    def shutdown_with_a_second_ctrl_c(batches):
        try:
            if len(iterations) == 3:
                iterations.append(None)
                os.kill(os.getpid(), signal.SIGINT)  # Python raises its KeyboardInterrupt right here
        finally:
            shutdown(batches)

    monkeypatch.setattr(dlrm_s_pytorch.Trainer, "forward", forward_with_a_ctrl_c_at_the_third_iteration)
    monkeypatch.setattr(multiprocess_batches, "_shutdown_workers", shutdown_with_a_second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        dlrm_s_pytorch.main(argv)
    assert "Stopped by SIGINT after it 3/100 of epoch 0" in capsys.readouterr().out
    assert not path.exists()  # the last checkpoint stays as it was: none
    assert [pid for pid, (parent, _) in live_processes().items() if parent == os.getpid()] == []


def test_a_ctrl_c_while_the_export_ends_its_loader_processes_stops_it(tmp_path: Path, capsys, monkeypatch) -> None:
    """The export reads one batch after training, when Ctrl-C is Python's own KeyboardInterrupt again."""
    pytest.importorskip("onnx")
    onnx_file = tmp_path / "model.onnx"
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=2", "--num-workers=2", "--save-onnx", str(onnx_file)]
    multiprocess_batches = torch.utils.data.dataloader._MultiProcessingDataLoaderIter
    shutdown, signalled = multiprocess_batches._shutdown_workers, []

    def shutdown_with_a_ctrl_c_in_the_export(batches):
        try:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler and not signalled:  # the run is over
                signalled.append(True)
                os.kill(os.getpid(), signal.SIGINT)
        finally:
            shutdown(batches)

    monkeypatch.setattr(multiprocess_batches, "_shutdown_workers", shutdown_with_a_ctrl_c_in_the_export)
    with pytest.raises(KeyboardInterrupt):
        dlrm_s_pytorch.main(argv)
    assert "Finished training it 2/2" in capsys.readouterr().out and signalled and not onnx_file.exists()


def test_ctrl_c_while_torch_loads_stops_without_a_traceback(tmp_path: Path) -> None:
    """Python raises KeyboardInterrupt where the main thread is when SIGINT comes; loading torch takes seconds."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise KeyboardInterrupt  # Ctrl-C while torch loads\n")
    interrupted = subprocess.run(
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},  # before site-packages: this torch is imported
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert interrupted.returncode == 128 + signal.SIGINT and interrupted.stderr == "Interrupted.\n", interrupted.stderr


def test_sigterm_to_the_whole_job_with_loader_processes_saves_and_leaves_no_process(tmp_path: Path) -> None:
    argv = [*TINY, *CASES["cat-adagrad"], "--num-workers=2"]
    path = tmp_path / "model.pt"
    process = start([*argv, "--num-batches=100000", "--save-model", str(path)], tmp_path)
    wait_for_line(process, r"^Finished training it 10/")
    assert len(live_processes_in_group(process.pid)) == 3  # the run and its two loader processes
    os.killpg(process.pid, signal.SIGTERM)  # as kill -TERM -<pgid>, timeout and batch schedulers do
    out, err = finish(process)
    assert process.returncode == 128 + signal.SIGTERM and err == "", err
    stopped = re.search(r"^Stopped by SIGTERM after it (\d+)/100000 of epoch 0$", out, re.M)
    assert stopped, out
    assert live_processes_in_group(process.pid) == []
    k = int(stopped[1])
    assert saved(path)["position"]["iteration"] == k
    resumed = run_script(*argv, f"--num-batches={k + 2}", "--load-model", str(path), cwd=tmp_path, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert [line["it"] for line in finished_lines(resumed.stdout)] == [k + 1, k + 2]


EXITS = {  # how a run with loader processes ends: (extra flags, a signal and whom it goes to, exit code)
    "at its end": (["--num-batches=20"], None, 0),
    "diverged": (["--learning-rate=1e30"], None, 1),
    "SIGTERM to the run": ([], (signal.SIGTERM, "run"), 128 + signal.SIGTERM),
    "SIGINT to the run": ([], (signal.SIGINT, "run"), 128 + signal.SIGINT),
    "SIGINT to the job": ([], (signal.SIGINT, "job"), 128 + signal.SIGINT),  # Ctrl-C
}


@pytest.mark.parametrize("how", EXITS)
def test_every_way_out_with_loader_processes_ends_them(how: str, tmp_path: Path) -> None:
    flags, signalled, code = EXITS[how]
    process = start([*TINY, *CASES["cat-adagrad"], "--num-batches=100000", "--num-workers=2", *flags], tmp_path)
    if signalled:
        signum, whom = signalled
        wait_for_line(process, r"^Finished training it 10/")
        if whom == "job":
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    out, err = finish(process)
    assert process.returncode == code, out + err
    assert err.count("\n") == (code == 1) and "Traceback" not in err, err  # an error is one line
    assert live_processes_in_group(process.pid) == []


def test_an_error_in_a_loader_process_ends_the_run_and_its_loader_processes(tmp_path: Path) -> None:
    """At exit multiprocessing stops the loader processes still alive with SIGTERM and waits for them: they must
    obey it there, though they leave a SIGTERM to the whole job to the loop."""
    processed = tmp_path / "processed.npz"
    arrays = write_upstream_processed(processed, rows=7 * 640)
    arrays["X_cat"] = arrays["X_cat"].copy()
    arrays["X_cat"][5, 3] = arrays["counts"][3] + 7  # past the rows of table 3
    np.savez_compressed(processed, **arrays)
    criteo = ["--data-generation=dataset", f"--processed-data-file={processed}", "--data-randomize=none"]
    model = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=13-8-4", "--arch-mlp-top=16-1", "--mini-batch-size=64"]
    process = start([*criteo, *model, "--num-workers=2"], tmp_path)
    out, err = finish(process)
    assert process.returncode == 2, out + err
    assert err.count("\n") == 1 and "table 3: index" in err, err
    assert live_processes_in_group(process.pid) == []


class BlockedSignals(torch.utils.data.Dataset):
    """One item: the signals its loader process blocks."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> set[signal.Signals]:
        return signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_loader_processes_start_with_the_stop_signals_held_back() -> None:
    """A signal to the whole job must not end a loader process before it sets up its handling of them."""
    loader = torch.utils.data.DataLoader(BlockedSignals(), batch_size=None, num_workers=1)
    stop = dlrm_s_pytorch.STOP_SIGNALS
    assert not stop & next(iter(loader))  # a loader process started by torch alone
    assert stop <= next(dlrm_s_pytorch.start_batches(loader))
    assert not stop & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # let through here again


def test_a_checkpoint_through_a_link_is_written_where_the_link_points(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    link = tmp_path / "latest.pt"
    link.symlink_to(tmp_path / "store" / "model.pt")
    result = run_script(*TINY, *CASES["dot-sgd"], "--num-batches=2", "--save-model", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and saved(tmp_path / "store" / "model.pt")["position"]["iteration"] == 2


def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    big = ["--arch-embedding-size=2000000-1000", "--arch-mlp-top=12-4-1", "--optimizer=adagrad"]
    argv = [*TINY[:-1], *big, "--num-batches=1000", "--save-freq=1", "--save-model", str(path)]
    process = start(argv, tmp_path)
    wait_for_line(process, r"^Saved ")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".model.pt.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    process.kill()  # in the middle of writing the next checkpoint
    process.communicate()
    assert list(tmp_path.glob(".model.pt.*.tmp")), "the kill did not land during a save"
    checkpoint = saved(path)
    assert checkpoint["position"]["iteration"] >= 1
    resumed = run_script(*TINY[:-1], *big, "--num-batches=3", "--nepochs=2", "--load-model", str(path), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr


def test_what_runs_killed_while_saving_left_is_removed_but_not_a_running_ones(tmp_path: Path, monkeypatch) -> None:
    """A save killed outright leaves its temporary file, as big as the checkpoint: the next run removes it."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftovers = [tmp_path / f".model.pt.{gone.pid}.tmp", tmp_path / f".dlrm_s_pytorch.json.{gone.pid}.tmp"]
    kept = [tmp_path / f".model.pt.{os.getppid()}.tmp", tmp_path / f".other.pt.{gone.pid}.tmp"]  # running; not ours
    for path in leftovers + kept:
        path.write_bytes(b"partial")
    monkeypatch.chdir(tmp_path)  # the profile's folder
    argv = [*TINY, *CASES["dot-sgd"], "--num-batches=2", "--save-model", "model.pt", "--enable-profiling"]
    assert dlrm_s_pytorch.main(argv) == 0
    assert not any(path.exists() for path in leftovers) and all(path.exists() for path in kept)
    assert saved(tmp_path / "model.pt")["position"]["iteration"] == 2


def test_a_failed_write_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    argv = [*TINY[:-1], "--arch-embedding-size=200000-7", "--arch-mlp-top=12-4-1", "--num-batches=2"]
    assert run_script(*argv, "--save-model", str(path)).returncode == 0
    previous = path.read_bytes()
    assert len(previous) > 2**21
    full_disk = subprocess.run(  # files over 1 MB cannot be written: torch.save fails part-way, as on a full disk
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *argv, "--save-model", str(path)],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full_disk.returncode == 2
    assert full_disk.stderr.count("\n") == 1 and "Traceback" not in full_disk.stderr, full_disk.stderr
    assert f"--save-model {path}: cannot write it" in full_disk.stderr
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_model_that_diverged_between_printed_lines_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    argv = [*TINY, *CASES["dot-sgd"]]
    assert run_script(*argv, "--num-batches=2", "--save-model", str(path)).returncode == 0
    previous = path.read_bytes()
    # it 3's update makes the weights huge, it 4's scores and update are not finite; the next printed line is it 8
    diverging = ["--learning-rate=1e30", "--num-batches=8", "--print-freq=8", "--save-freq=2"]
    result = run_script(*argv, *diverging, "--load-model", str(path), "--save-model", str(path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"it 4 of epoch 0: the weights are not finite (--learning-rate?); {path} is left as it was" in result.stderr
    assert path.read_bytes() == previous


def test_inference_only_evaluates_a_loaded_model(tmp_path: Path) -> None:
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=6", "--round-targets"]
    path = tmp_path / "model.pt"
    assert run_script(*argv, "--learning-rate=0.5", "--save-model", str(path)).returncode == 0
    trained = run_script(*argv, "--inference-only", "--load-model", str(path))
    untrained = run_script(*argv, "--inference-only")
    assert trained.returncode == 0 and untrained.returncode == 0, trained.stderr + untrained.stderr
    lines, baseline = finished_lines(trained.stdout), finished_lines(untrained.stdout)
    assert [line["phase"] for line in lines] == ["inference"] * 6
    assert [line["loss"] for line in lines] != [line["loss"] for line in baseline]


def write_bad_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, list[str], str]]:
    data = good.read_bytes()
    truncated, corrupt, other = tmp_path / "truncated.pt", tmp_path / "corrupt.pt", tmp_path / "other.pt"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt.write_bytes(bytes(b ^ 0x5A for b in data))
    torch.save({"weights": {}}, other)
    state = saved(good)
    del state["rng"]
    torch.save(state, edited := tmp_path / "edited.pt")
    state = saved(good)
    state["position"]["epoch"] = "0"
    torch.save(state, text_position := tmp_path / "text_position.pt")
    state = saved(good)
    state["window"] = torch.zeros(2, 5)
    torch.save(state, wide_window := tmp_path / "wide_window.pt")
    state = saved(good)  # rank 0's file of two: half of the table split by rows
    state["world_size"] = 2
    state["weights"]["table 2 rows 0-99"] = state["weights"].pop("table 2 rows 0-199")[:100]
    torch.save(state, two_ranks := tmp_path / "two_ranks.pt")
    return {
        "truncated": (truncated, [], "truncated or corrupt"),
        "corrupt": (corrupt, [], "truncated or corrupt"),
        "not ours": (other, [], "not a checkpoint written by this script's --save-model"),
        "missing": (tmp_path / "absent.pt", [], "no such file"),
        "a field missing": (edited, [], "a field is missing or malformed (KeyError: 'rng')"),
        "a position in text": (text_position, [], "position {'epoch': '0', 'batch': 2, 'iteration': 2} is not whole"),
        "a window of 5 columns": (wide_window, [], "window has shape [2, 5], expected [iterations, 3]"),
        "fewer batches": (good, ["--num-batches=1"], "saved after batch 2 of an epoch, this run's epochs have 1"),
        "other rows": (good, ["--arch-embedding-size=40-7-201-25"], "'table 2 rows 0-199' has shape [200, 4], "
                                                                      "this model's is [201, 4]"),
        "other layer": (good, ["--arch-mlp-bot=5-9-4"], "'bottom_mlp.0.weight' has shape [8, 5], "
                                                        "this model's is [9, 5]"),
        "saved by two ranks": (two_ranks, [], "saved by 2 ranks, this run has 1"),
        "evaluated from two ranks": (two_ranks, ["--inference-only"], "saved by 2 ranks, this run has 1"),
        "other optimizer": (good, ["--optimizer=sgd"], "saved with --optimizer adagrad, this run has sgd"),
        "other batch size": (good, ["--mini-batch-size=8"], "saved with --mini-batch-size 16, this run has 8"),
        "other bag sizes": (good, ["--num-indices-per-lookup=5"], "--num-indices-per-lookup 6, this run has 5"),
        "rounded targets": (good, ["--round-targets"], "saved with --round-targets False, this run has True"),
    }  # fmt: skip


def test_a_one_rank_checkpoint_loaded_by_two_ranks_says_rank_in_the_singular() -> None:
    trainer = SimpleNamespace(ranks=Ranks(0, 2, 0, 2), loaded_from="m.pt")
    with pytest.raises(dlrm_s_pytorch.CheckpointError, match=r"^--load-model m.pt: saved by 1 rank, this run has 2$"):
        dlrm_s_pytorch.Trainer.check_saved_model(trainer, {"world_size": 1})


def test_bad_checkpoints_stop_with_one_line_naming_what_does_not_fit(tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.pt"
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=2"]
    assert run_script(*argv, "--save-model", str(good)).returncode == 0
    bad_files = write_bad_files(tmp_path, good)
    path, _, message = bad_files["truncated"]  # as a process, whose whole stderr is seen
    result = run_script(*argv, "--load-model", str(path))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    for name, (path, flags, message) in bad_files.items():  # in this process: no interpreter to start each time
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning would have been a second line on stderr
            assert dlrm_s_pytorch.main([*argv, *flags, "--load-model", str(path)]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--load-model {path}" in err and message in err, (name, err)


def test_a_model_of_another_interaction_is_refused_where_its_weights_fit(tmp_path: Path, capsys) -> None:
    argv = ["--arch-embedding-size=20-30-7", "--arch-sparse-feature-size=2", "--arch-mlp-bot=5-2", "--num-batches=1"]
    argv += ["--arch-mlp-top=8-1"]  # 4 features of 2: cat makes 8 inputs, dot 6 products and 2
    path = tmp_path / "dot.pt"
    assert dlrm_s_pytorch.main([*argv, "--arch-interaction-op=dot", "--save-model", str(path)]) == 0
    assert dlrm_s_pytorch.main([*argv, "--inference-only", "--load-model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "saved with --arch-interaction-op dot, this run has cat" in err, err
    earlier_version = torch.load(path, weights_only=True)
    del earlier_version["model"]  # checkpoints written before the interaction was recorded load as they did
    torch.save(earlier_version, path)
    assert dlrm_s_pytorch.main([*argv, "--arch-interaction-op=dot", "--inference-only", "--load-model", str(path)]) == 0


@pytest.mark.parametrize("inference_only", [False, True])
def test_a_deeper_model_whose_first_layers_fit_is_refused(tmp_path: Path, capsys, inference_only: bool) -> None:
    argv = [*TINY, *CASES["cat-adagrad"], "--num-batches=2"]
    path = tmp_path / "deep.pt"
    assert dlrm_s_pytorch.main([*argv, "--arch-mlp-bot=5-4-4", "--save-model", str(path)]) == 0
    flags = ["--inference-only"] if inference_only else ["--num-batches=3"]
    assert dlrm_s_pytorch.main([*argv, *flags, "--arch-mlp-bot=5-4", "--load-model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has tensor 'bottom_mlp.2.weight', which this model has not" in err, err


@pytest.mark.parametrize("checkpoint", ["typo.pt", "truncated.pt"])
def test_a_bad_checkpoint_stops_the_run_before_the_data_is_prepared(tmp_path: Path, capsys, checkpoint: str) -> None:
    raw = write_kaggle(tmp_path, rows=700)
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04")
    argv = ["--data-generation=dataset", f"--raw-data-file={raw}", "--arch-mlp-bot=13-8-2", "--arch-mlp-top=4-1"]
    assert dlrm_s_pytorch.main([*argv, "--load-model", str(tmp_path / checkpoint)]) == 2
    assert f"--load-model {tmp_path / checkpoint}: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.txt", "truncated.pt"]  # nothing preprocessed


@pytest.mark.parametrize("inference_only", [False, True])
def test_a_signal_during_a_test_stops_it_within_a_few_batches(tmp_path: Path, capsys, inference_only: bool) -> None:
    """A test pass can outlast a batch scheduler's grace before it kills: a signal leaves the test out and saves."""
    path = tmp_path / "model.pt"
    argv = [*TINY, *CASES["dot-sgd"], "--num-batches=40"]
    argv += ["--inference-only"] if inference_only else ["--save-model", str(path)]
    args, sizes, _ = dlrm_s_pytorch.parse_command_line(argv)
    args.test_freq = 20  # a Criteo flag: random data has no test split, its 40 batches stand in for one
    backend, ranks = habana_dlrm_ops.Backend(lazy=False), Ranks(0, 1, 0, 1)
    model = dlrm_s_pytorch.DLRM(args, sizes, backend.kernels)
    data = dlrm_s_pytorch.RandomDataset(args, sizes)
    loaders = [dlrm_s_pytorch.make_loader(args, data, sizes, backend, model.shards, ranks, test=t) for t in (0, 1)]
    trainer = dlrm_s_pytorch.Trainer(args, model, backend, loaders, ranks)
    forward, test_batches = trainer.forward, []

    def forward_signalling_at_the_third_test_batch(batch):
        if not torch.is_grad_enabled():
            test_batches.append(batch)
            if len(test_batches) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(batch)

    trainer.forward = forward_signalling_at_the_third_test_batch
    assert trainer.run() == 128 + signal.SIGTERM
    out = capsys.readouterr().out
    it = 40 if inference_only else 20
    assert f"Stopped by SIGTERM during the test after it {it}/40 of epoch 0 (the test is left out)" in out
    assert "Testing at" not in out and len(test_batches) == dlrm_s_pytorch.TEST_BATCHES_BETWEEN_STOP_CHECKS
    if not inference_only:
        assert len(finished_lines(out)) == 20 and saved(path)["position"]["iteration"] == 20


TINY_CRITEO = ["--data-generation=dataset", "--arch-mlp-bot=13-8-2", "--arch-mlp-top=3-1"]
TINY_CRITEO += ["--arch-sparse-feature-size=2", "--mini-batch-size=64"]


def test_the_test_a_signal_cut_short_comes_first_in_the_resumed_run(tmp_path: Path, capsys, monkeypatch) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 640)  # a test split of 320 samples: 40 test batches of 8
    argv = [*TINY_CRITEO, f"--raw-data-file={raw}", "--test-mini-batch-size=8", "--num-batches=8", "--test-freq=4"]
    argv += ["--print-freq=2", "--save-model", str(tmp_path / "model.pt")]
    assert dlrm_s_pytorch.main(argv) == 0
    whole = capsys.readouterr().out
    forward, test_batches = dlrm_s_pytorch.Trainer.forward, []

    def forward_signalling_in_the_second_test(trainer, batch):
        if not torch.is_grad_enabled():
            test_batches.append(batch)
            if len(test_batches) == 40 + 20:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(trainer, batch)

    monkeypatch.setattr(dlrm_s_pytorch.Trainer, "forward", forward_signalling_in_the_second_test)
    assert dlrm_s_pytorch.main(argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    stopped = capsys.readouterr().out
    assert "Stopped by SIGTERM during the test after it 8/8 of epoch 0 (the test is left out)" in stopped
    assert dlrm_s_pytorch.main([*argv, "--load-model", str(tmp_path / "model.pt")]) == 0
    resumed = capsys.readouterr().out
    printed = re.compile(r"^(?:Finished|Testing) .*", re.M)
    assert printed.findall(stopped) + printed.findall(resumed) == printed.findall(whole)


def test_a_run_resumed_where_it_had_reached_a_threshold_trains_no_further(tmp_path: Path, capsys) -> None:
    raw, path = write_kaggle(tmp_path, rows=7 * 640), tmp_path / "model.pt"
    argv = [*TINY_CRITEO, f"--raw-data-file={raw}", "--num-batches=8", "--test-freq=2"]
    argv += ["--mlperf-auc-threshold=0.5", "--save-model", str(path)]
    assert dlrm_s_pytorch.main(argv) == 0
    assert "MLPerf testing auc threshold 0.5 reached, stop training" in capsys.readouterr().out
    stopped_at = saved(path)["position"]
    assert stopped_at["batch"] < 8
    assert dlrm_s_pytorch.main([*argv, "--load-model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MLPerf testing auc threshold 0.5 reached, stop training" in out and "Finished" not in out, out
    assert saved(path)["position"] == stopped_at


def test_a_checkpoint_of_fewer_ranks_is_refused_in_one_line_before_the_ranks_start(tmp_path: Path, capsys) -> None:
    path = tmp_path / "one.pt"
    argv = [*TINY, "--num-batches=1"]
    assert dlrm_s_pytorch.main([*argv, "--save-model", str(path)]) == 0
    capsys.readouterr()
    assert dlrm_s_pytorch.main([*argv, "--world_size=2", "--load-model", str(path)]) == 2
    message = f"--load-model {path}: {path}.rank1 is missing (saved by fewer than 2 ranks?)"
    assert capsys.readouterr().err == f"dlrm_s_pytorch.py: error: {message}\n"


def test_a_resumed_run_with_nothing_left_to_train_says_so(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.pt"
    argv = [*TINY, *CASES["dot-sgd"], "--num-batches=2", "--load-model", str(path)]
    assert dlrm_s_pytorch.main([*argv[:-2], "--nepochs=2", "--save-model", str(path)]) == 0
    capsys.readouterr()
    for nepochs, why in [
        (2, "saved at the end of this run (it 2 of epoch 1)"),
        (1, "saved in epoch 1, and --nepochs 1 ends before it"),
    ]:
        assert dlrm_s_pytorch.main([*argv, f"--nepochs={nepochs}"]) == 0
        out = capsys.readouterr().out
        assert f"\nNothing to train: {path} was {why}\n" in out and "Finished" not in out
    assert dlrm_s_pytorch.main([*argv, "--nepochs=3"]) == 0
    out = capsys.readouterr().out
    assert "Finished training it 2/2 of epoch 2" in out and "Nothing" not in out


def test_a_run_of_no_epochs_says_so_and_a_partial_last_batch_is_not_nothing(tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.pt"
    argv = [*TINY, *CASES["dot-sgd"], "--num-batches=0", "--data-size=40", "--save-model", str(path)]
    assert dlrm_s_pytorch.main([*argv, "--nepochs=0"]) == 0
    assert "\nNothing to train: --nepochs 0\n" in capsys.readouterr().out
    assert dlrm_s_pytorch.main(argv) == 0  # 2 whole batches of 16, then 8 samples
    capsys.readouterr()
    assert dlrm_s_pytorch.main([*argv, "--load-model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Breaking out of the epoch as  batch was partial. Number of samples: 8" in out and "Nothing" not in out


def test_a_criteo_resume_may_change_the_flags_criteo_data_does_not_use(tmp_path: Path, capsys) -> None:
    raw, path = write_kaggle(tmp_path, rows=7 * 640), tmp_path / "model.pt"
    argv = [*TINY_CRITEO, f"--raw-data-file={raw}", "--print-freq=2", "--num-batches=8"]
    assert dlrm_s_pytorch.main(argv) == 0
    whole = capsys.readouterr().out
    assert dlrm_s_pytorch.main([*argv[:-1], "--num-batches=4", "--save-model", str(path)]) == 0
    capsys.readouterr()
    unused = ["--num-indices-per-lookup=3", "--round-targets"]  # each Criteo bag holds one index, targets are 0 or 1
    assert dlrm_s_pytorch.main([*argv, *unused, "--load-model", str(path)]) == 0
    resumed = capsys.readouterr().out
    assert finished_lines(resumed) == finished_lines(whole)[2:]
