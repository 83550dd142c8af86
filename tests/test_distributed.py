"""Hybrid-parallel training (SPEC §7) with gloo on this machine: 2 ranks against 1, the launchers, failures."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, finished_lines, printed_weights, run_here, run_script
from criteo_files import write_kaggle

import distributed_utils
import dlrm_s_pytorch
from distributed_utils import Shard, plan_tables

TINY = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=5-8-4", "--mini-batch-size=16", "--num-batches=6"]
TINY += ["--num-indices-per-lookup=6", "--print-freq=1", "--learning-rate=0.05", "--print-precision=9"]
TESTING = re.compile(r"^Testing at - .*, loss ([\d.]+), accuracy ([\d.]+) %.*\nTesting AUC .*: ([\d.]+), best", re.M)
CASES = {
    "tables-dot-sgd": ["--arch-embedding-size=40-7-200-25", "--arch-mlp-top=14-6-1", "--arch-interaction-op=dot"],
    "tables-cat-adagrad": ["--arch-embedding-size=40-7-200-25", "--arch-mlp-top=20-6-1", "--optimizer=adagrad"],
    "one-table-split-adagrad": ["--arch-embedding-size=200", "--arch-mlp-top=8-6-1", "--optimizer=adagrad"],
}


def run_ranks(argv: list[str], world_size: int = 2, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """The ranks as torchrun starts them (RANK, WORLD_SIZE, MASTER_*), each with its own output."""
    port = distributed_utils.free_port()
    processes = []
    for rank in range(world_size):
        env = distributed_utils.rank_environment(rank, world_size, port)
        command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *argv]
        processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in processes:
        stdout, stderr = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout.decode(), stderr.decode()))
    return results


def kill_processes_naming(path: Path) -> None:
    """Kill every process whose command line names ``path``."""
    for process in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if str(path) in (process / "cmdline").read_text():
                os.kill(int(process.name), signal.SIGKILL)


def whole_tables(parts: dict[str, torch.Tensor], dim: int) -> dict[int, torch.Tensor]:
    """Tables put back together from their row ranges ("table 3 rows 0-99")."""
    pieces: dict[int, list] = {}
    for name, values in parts.items():
        match = re.fullmatch(r"table (\d+) rows (\d+)-(\d+)", name)
        if match:
            pieces.setdefault(int(match[1]), []).append((int(match[2]), values.view(-1, dim)))
    return {t: torch.cat([v for _, v in sorted(rows, key=lambda p: p[0])]) for t, rows in pieces.items()}


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_rank(name: str) -> None:
    argv = [*TINY, *CASES[name], "--debug-mode", "--round-targets"]
    alone = run_script(*argv)
    ranks = run_ranks([*argv, "--print-all-ranks"], world_size=2)
    assert alone.returncode == 0 and all(r.returncode == 0 for r in ranks), [r.stderr[-2000:] for r in ranks]
    expected = finished_lines(alone.stdout)
    for rank in ranks:  # every rank prints the global batch's loss and accuracy
        printed = finished_lines(rank.stdout)
        assert [p["loss"] for p in printed] == pytest.approx([e["loss"] for e in expected], abs=1e-5, rel=0)
        assert [p["accuracy"] for p in printed] == [e["accuracy"] for e in expected]
    if name == "one-table-split-adagrad":
        assert "rank 0: table 0 rows 0-99\n  rank 1: table 0 rows 100-199" in ranks[0].stdout

    reference = printed_weights(alone.stdout)
    split = printed_weights(ranks[0].stdout) | printed_weights(ranks[1].stdout)
    tables = whole_tables(split, dim=4)
    assert sorted(tables) == sorted(whole_tables(reference, dim=4))
    for t, table in whole_tables(reference, dim=4).items():
        torch.testing.assert_close(tables[t], table, atol=1e-5, rtol=0)  # float32 summation order: 1.2e-7 observed
    for rank in ranks:  # the MLPs, kept equal by DDP
        mlp = {k: v for k, v in printed_weights(rank.stdout).items() if "mlp" in k}
        assert mlp.keys() == {k for k in reference if "mlp" in k}
        for key, values in mlp.items():
            torch.testing.assert_close(values, reference[key], atol=1e-5, rtol=0)


def test_two_ranks_save_per_rank_checkpoints_and_resume_exactly(tmp_path: Path) -> None:
    argv = [*TINY[:-1], *CASES["one-table-split-adagrad"], "--round-targets", "--print-all-ranks"]
    whole = run_ranks([*argv, "--num-batches=8"])
    first = run_ranks([*argv, "--num-batches=4", "--save-model", str(tmp_path / "m.pt")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.rank1"]
    resumed = run_ranks([*argv, "--num-batches=8", "--load-model", str(tmp_path / "m.pt")])
    for rank in range(2):
        assert whole[rank].returncode == first[rank].returncode == resumed[rank].returncode == 0, resumed[rank].stderr
        assert finished_lines(resumed[rank].stdout) == finished_lines(whole[rank].stdout)[4:]

    (tmp_path / "m.pt.rank1").write_bytes(b"")  # rank 1 fails while setting up; rank 0 then stops with one line too
    failed = run_ranks([*argv, "--num-batches=8", "--load-model", str(tmp_path / "m.pt")], timeout=60)
    assert [rank.returncode for rank in failed] == [1, 2]
    assert "m.pt.rank1: not a readable checkpoint" in failed[1].stderr and failed[1].stderr.count("\n") == 1
    assert failed[0].stderr.startswith("dlrm_s_pytorch.py: error: rank 0 stopped: ")
    assert failed[0].stderr.count("\n") == 1, failed[0].stderr


def test_a_rank_holding_no_rows_of_a_table_saves_and_resumes(tmp_path: Path) -> None:
    argv = [*TINY[:-1], "--arch-embedding-size=1", "--arch-mlp-top=8-6-1", "--optimizer=adagrad"]
    whole = run_ranks([*argv, "--num-batches=8"])
    first = run_ranks([*argv, "--num-batches=4", "--save-model", str(tmp_path / "m.pt")])
    assert "rank 0: table 0 rows none" in first[0].stdout
    assert [rank.returncode for rank in first] == [0, 0], [rank.stderr for rank in first]
    resumed = run_ranks([*argv, "--num-batches=8", "--load-model", str(tmp_path / "m.pt")])
    assert [rank.returncode for rank in resumed] == [0, 0], [rank.stderr for rank in resumed]
    assert finished_lines(resumed[0].stdout) == finished_lines(whole[0].stdout)[4:]


def test_two_ranks_test_criteo_data_as_one_rank(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 640)
    argv = ["--data-generation=dataset", f"--raw-data-file={raw}", "--arch-sparse-feature-size=4"]
    argv += ["--arch-mlp-bot=13-8-4", "--arch-mlp-top=16-1", "--mini-batch-size=64", "--optimizer=adagrad"]
    argv += ["--learning-rate=0.05", "--print-freq=10", "--num-batches=20", "--test-freq=10"]
    alone = run_script(*argv)
    ranks = run_ranks([*argv, "--test-mini-batch-size=32"])
    assert alone.returncode == 0 and ranks[0].returncode == 0, alone.stderr + ranks[0].stderr
    expected, printed = TESTING.findall(alone.stdout), TESTING.findall(ranks[0].stdout)
    assert len(printed) == len(expected) == 2
    for (loss, accuracy, auc), (expected_loss, expected_accuracy, expected_auc) in zip(printed, expected, strict=True):
        assert float(loss) == pytest.approx(float(expected_loss), abs=1e-5)
        assert float(auc) == pytest.approx(float(expected_auc), abs=1e-5)
        assert accuracy == expected_accuracy


@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_a_stopped_world_size_launcher_has_every_rank_save(stop: str, tmp_path: Path) -> None:
    """SIGTERM the launcher passes on to its ranks; killed outright, it leaves them orphaned, and they stop too."""
    argv = [*TINY[:-1], *CASES["tables-cat-adagrad"], "--num-batches=100000", "--print-freq=20"]
    command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *argv, "--world_size=2"]
    launcher = subprocess.Popen([*command, "--save-model", str(tmp_path / "m.pt")], stdout=subprocess.PIPE, text=True)
    for line in launcher.stdout:
        if line.startswith("Finished training it 20/"):
            break
    launcher.send_signal(signal.SIGTERM if stop == "SIGTERM" else signal.SIGKILL)
    try:
        out, _ = launcher.communicate(timeout=60)  # to the output's end: the ranks hold the pipe until they stop
    finally:
        kill_processes_naming(tmp_path)  # ranks still running: the check failed
    assert launcher.returncode == (128 + signal.SIGTERM if stop == "SIGTERM" else -signal.SIGKILL)
    stopped = re.search(r"^Stopped by SIGTERM after it (\d+)/", out, re.M)
    assert stopped, out
    positions = [torch.load(tmp_path / name, weights_only=True)["position"] for name in ("m.pt", "m.pt.rank1")]
    assert positions[0] == positions[1] and positions[0]["iteration"] == int(stopped[1])


def test_bf16_and_lazy_mode_run_distributed(capsys) -> None:
    argv = [*TINY, *CASES["tables-cat-adagrad"], "-d", "bf16", "--mode=lazy"]
    ranks = run_ranks(argv, world_size=2)
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-2000:]
    printed, expected = finished_lines(ranks[0].stdout), finished_lines(run_here(argv, capsys))
    assert [p["loss"] for p in printed] == pytest.approx([e["loss"] for e in expected], abs=2e-3)
    assert ranks[1].stdout == ""  # only rank 0 prints without --print-all-ranks


def test_print_dist_loss_prints_the_global_loss_each_iteration() -> None:
    ranks = run_ranks([*TINY, *CASES["tables-dot-sgd"], "--print-dist-loss"])
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-2000:]
    losses = [float(x) for x in re.findall(r"^ Distributed Loss :: ([\d.]+)$", ranks[0].stdout, re.M)]
    assert losses == pytest.approx([line["loss"] for line in finished_lines(ranks[0].stdout)], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------

SMALL = ["--config", str(ROOT / "hb_configs" / "small.yaml"), "--num-batches=4", "--print-freq=2"]


def test_world_size_flag_starts_the_ranks_itself() -> None:
    result = run_script(*SMALL, "-w", "2")
    assert result.returncode == 0, result.stderr
    assert len(finished_lines(result.stdout)) == 2 and "Table plan:" in result.stdout


def test_two_ranks_print_the_configs_environment_once(tmp_path: Path) -> None:
    config = tmp_path / "env.yaml"
    config.write_text("model: dlrm\nenv_variables: {OMP_NUM_THREADS: 1}\n")
    result = run_script("--config", str(config), *TINY, "--num-batches=1", "-w", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Environment from --config: OMP_NUM_THREADS=1\nUsing CPU...\n"), result.stdout
    assert result.stdout.count("Environment from --config") == 1, result.stdout


def test_torchrun_runs_the_small_configuration() -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    port = str(distributed_utils.free_port())
    command = [str(torchrun), "--nproc_per_node=2", f"--master_port={port}", str(ROOT / "dlrm_s_pytorch.py"), *SMALL]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(finished_lines(result.stdout)) == 2


@pytest.fixture(scope="session")
def mpirun() -> Path:
    """Open MPI and mpi4py from requirements-mpi.txt, installed into the environment running the tests."""
    binary = Path(sys.executable).parent / "mpirun"
    if not binary.exists():
        install = [sys.executable, "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements-mpi.txt")]
        if subprocess.run(install, capture_output=True, timeout=600).returncode != 0:
            pytest.skip("could not install requirements-mpi.txt (no package index?)")
    return binary


def test_mpirun_runs_the_small_configuration(mpirun: Path) -> None:
    command = [str(mpirun), "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable]
    command += [str(ROOT / "dlrm_s_pytorch.py"), *SMALL]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(finished_lines(result.stdout)) == 2 and "rank 1: " in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Failures and bad input
# ---------------------------------------------------------------------------------------------------------


def test_a_killed_rank_stops_the_other_within_60_s() -> None:
    port = distributed_utils.free_port()
    processes = []
    for rank in range(2):
        env = distributed_utils.rank_environment(rank, 2, port)
        command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *SMALL[:2], "--num-batches=100000"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    survivor, victim = processes
    while not survivor.stdout.readline().startswith("Finished training it"):
        assert survivor.poll() is None, survivor.stderr.read()
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = survivor.communicate(timeout=60)
    assert time.monotonic() - killed < 60
    assert survivor.returncode != 0
    assert stderr.count("\n") == 1 and "error: rank 0 stopped: " in stderr, stderr


def test_a_diverged_run_on_two_ranks_says_so_in_one_line() -> None:
    """Every rank finds the scores not finite at once (the check is all-reduced); each said so, the same line."""
    result = run_script(*TINY, *CASES["tables-cat-adagrad"], "--learning-rate=1e30", "-w", "2", timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("dlrm_s_pytorch.py: error: it 2 of epoch 0: the scores are not finite ")


def test_a_ctrl_c_that_reaches_a_rank_twice_stops_it_without_a_traceback(tmp_path: Path) -> None:
    """Ctrl-C reaches each rank of ``--world_size N`` twice, from the terminal and passed on by the launcher; outside
    the loop (loading torch, setting up) the second came while the first stopped the rank: tracebacks after
    ``Interrupted.``. Here the first comes while torch loads, the second at exit."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "import atexit, os, signal, time\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))  # the launcher's\n"
        "os.kill(os.getpid(), signal.SIGINT)  # the terminal's\n"
        "time.sleep(10)\n"
    )
    env = distributed_utils.rank_environment(0, 2, distributed_utils.free_port())
    env["PYTHONPATH"] = str(tmp_path)  # before site-packages: this torch is imported
    command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY]
    interrupted = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert interrupted.returncode == 128 + signal.SIGINT and interrupted.stderr == "Interrupted.\n", interrupted.stderr


def test_a_rank_waits_for_a_missing_rank_at_most_timeout_s() -> None:
    """The group's timeout is ``TIMEOUT_S`` (set to 2 s here; torch's default is 30 minutes)."""
    code = "import distributed_utils as d\nd.TIMEOUT_S = 2\nd.init_process_group(d.Ranks(0, 2, 0, 2), 'gloo')"
    env = distributed_utils.rank_environment(0, 2, distributed_utils.free_port())
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "DistStoreError" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - start < 20


def test_a_failed_self_started_rank_stops_the_others_at_once() -> None:
    code = "import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(60)"
    start = time.monotonic()
    assert distributed_utils.spawn_ranks([sys.executable, "-c", code], world_size=3) == 3
    assert time.monotonic() - start < 20


def test_a_hung_self_started_rank_is_killed_after_the_grace(monkeypatch) -> None:
    monkeypatch.setattr(distributed_utils, "STOP_GRACE_S", 2)
    code = "import os, signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # rank 0 hangs, deaf
    code += "if os.environ['RANK'] == '1':\n    time.sleep(1)\n    sys.exit(3)\ntime.sleep(60)"
    start = time.monotonic()
    assert distributed_utils.spawn_ranks([sys.executable, "-c", code], world_size=2) == 3
    assert time.monotonic() - start < 20


@pytest.mark.parametrize(
    "env, argv, message",
    [
        (dict(RANK="0", WORLD_SIZE="3"), ["--mini-batch-size=16"], "is not divisible by 3 ranks"),
        (dict(RANK="0", WORLD_SIZE="4"), ["-w", "2"], "--world_size 2: the launcher started 4 ranks"),
        (dict(RANK="0", WORLD_SIZE="1"), ["-w", "2"], "--world_size 2: the launcher started 1 rank\n"),
        (dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="localhost", MASTER_PORT="-1"), [], "error: 1 rank: gloo cannot"),
        (dict(RANK="5", WORLD_SIZE="2"), [], "RANK=5 does not fit WORLD_SIZE=2"),
        (
            dict(RANK="0", WORLD_SIZE="2"),
            ["--save-model=m.pt", "--metrics-file=m.pt.rank1"],
            "--metrics-file m.pt.rank1: would overwrite the --save-model file",
        ),
        (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="zero"), [], "LOCAL_RANK='zero': not a whole number"),
        (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="-1"), [], "LOCAL_RANK=-1 does not fit LOCAL_WORLD_SIZE=2"),
        (dict(RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="0"), [], "LOCAL_RANK=0 does not fit LOCAL_WORLD_SIZE=0"),
        (
            dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="no-such-host.invalid", MASTER_PORT="29500"),
            [],
            "MASTER_ADDR='no-such-host.invalid': ",
        ),
        (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="abc"), [], "MASTER_PORT='abc': not"),
        (dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="-1"), [], "MASTER_PORT=-1: not a port"),
        (
            {},
            ["-w", "2", "--data-generation=synthetic", "--data-trace-file=/nonexistent/t.log"],
            "--data-trace-file: trace file /nonexistent/t.log: cannot be read",  # by the launcher, once
        ),
        ({}, ["-w", "2", "--device=cuda"], "--device cuda" if not torch.cuda.is_available() else "GPU per rank"),
    ],
)
def test_bad_distributed_input_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, env, argv, message) -> None:
    monkeypatch.chdir(tmp_path)  # a check that failed would train, and write its relative outputs here
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                 "MASTER_ADDR", "MASTER_PORT"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if argv[-1:] == ["--device=cuda"] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs for two ranks")
    assert dlrm_s_pytorch.main(["--mini-batch-size=16", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("env, argv", [({}, ["-w", "2"]), (dict(RANK="0", WORLD_SIZE="2"), [])])
def test_a_ranks_checkpoint_that_cannot_be_written_stops_before_training(monkeypatch, capsys, tmp_path, env, argv):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "m.pt.rank1").mkdir()
    assert dlrm_s_pytorch.main(["--mini-batch-size=16", "--save-model=m.pt", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "dlrm_s_pytorch.py: error: --save-model m.pt.rank1: not a regular file\n"


@pytest.fixture
def lone_rank(monkeypatch, tmp_path) -> Iterator[Callable[[list[str]], int]]:
    """Run the script in this process as the only rank of a gloo group, in ``tmp_path``: its exit code."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(distributed_utils.free_port()))

    def leave(code: int) -> None:
        raise SystemExit(code)

    def run(flags: list[str]) -> int:
        with pytest.raises(SystemExit) as stopped:
            dlrm_s_pytorch.main([*TINY, "--arch-embedding-size=40-7", "--arch-mlp-top=12-6-1", "--distributed", *flags])
        return stopped.value.code

    monkeypatch.setattr(dlrm_s_pytorch, "leave_group", leave)  # it would end pytest
    try:
        yield run
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_gone_at_the_last_barrier_is_one_line_and_exit_1(monkeypatch, capsys, lone_rank) -> None:
    def gone() -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(torch.distributed, "barrier", gone)  # as when another rank failed at its end
    assert lone_rank([]) == 1
    err = capsys.readouterr().err
    assert err == "dlrm_s_pytorch.py: error: rank 0 stopped: Connection closed by peer\n"


def test_a_rank_gone_after_a_signal_stops_with_the_signals_exit_code(monkeypatch, capsys, tmp_path, lone_rank) -> None:
    """A job's signal can reach one rank in the loop and another still setting up, which it ends there: the first
    then finds it gone when the ranks agree to stop."""

    def signalled_and_gone(*_: object, **__: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler takes it
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(torch.distributed, "all_reduce", signalled_and_gone)
    code = lone_rank(["--save-model=m.pt"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM, err
    assert (
        err == "dlrm_s_pytorch.py: error: rank 0 stopped by SIGTERM without saving: another rank had left "
        "(Connection closed by peer)\n"
    )
    assert not (tmp_path / "m.pt").exists()


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------


def test_plan_places_largest_first_and_splits_what_is_too_big() -> None:
    plan = plan_tables([10, 500, 40, 30, 20], world_size=2)  # share 300: the 500-row table is split
    assert [s for s in plan if s.table == 1] == [Shard(1, 0, 250, 0), Shard(1, 250, 500, 1)]
    whole = {s.table: s.rank for s in plan if s.table != 1}
    assert whole == {2: 0, 3: 1, 4: 1, 0: 0}  # 40 -> rank 0, 30 -> rank 1, 20 -> rank 1, 10 -> rank 0
    assert plan_tables([5, 3], world_size=4) == [
        Shard(t, rows * r // 4, rows * (r + 1) // 4, r) for r in range(4) for t, rows in enumerate([5, 3])
    ]  # fewer tables than ranks: every table split
    assert [str(s) for s in plan_tables([3], world_size=4) if s.rank < 2] == ["table 0 rows none", "table 0 rows 0-0"]


def test_exchange_bytes_for_the_medium_configuration() -> None:
    for world_size, expected in [(2, 256 * 64 * 4), (8, 7 * 64 * 64 * 4)]:
        plan = plan_tables([3_000_000], world_size)
        assert distributed_utils.exchange_bytes(plan, 0, world_size, 512, 64) == expected
