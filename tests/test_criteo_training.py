"""Criteo data through the training script: preprocessing, training, testing (loss, accuracy, AUC), bad input."""

import gzip
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, finished_lines, run_script
from criteo_files import write_kaggle, write_terabyte, write_upstream_processed

import dlrm_s_pytorch
from distributed_utils import Ranks
from habana_dlrm_ops import select_backend

SMALL = ["--config", str(ROOT / "hb_configs" / "small.yaml"), "--data-generation=dataset"]
TINY = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=13-8-4", "--arch-mlp-top=16-1", "--mini-batch-size=64"]
TINY += ["--learning-rate=0.05", "--optimizer=adagrad", "--print-freq=10", "--data-generation=dataset"]
TESTING = re.compile(
    r"^Testing at - (\d+)/(\d+) of epoch (\d+), loss ([\d.]+), accuracy ([\d.]+) %, best ([\d.]+) %\n"
    r"Testing AUC at - \1/\2 of epoch \3: ([\d.]+), best ([\d.]+)$",
    re.M,
)


def printed_tests(stdout: str) -> list[dict]:
    keys = ("it", "nbatches", "epoch", "loss", "accuracy", "best", "auc", "best_auc")
    return [dict(zip(keys, map(float, match), strict=True)) for match in TESTING.findall(stdout)]


def test_kaggle_raw_data_preprocesses_trains_and_reaches_auc_075(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 4300)  # 6 training days hold the small configuration's 100 batches
    metrics = tmp_path / "metrics.jsonl"
    result = run_script(*SMALL, f"--raw-data-file={raw}", "--test-freq=50", "--metrics-file", str(metrics))
    assert result.returncode == 0, result.stderr
    assert "--arch-mlp-bot 13-128-64-16: from the data" in result.stdout
    assert [line["it"] for line in finished_lines(result.stdout)] == [20, 40, 60, 80, 100]
    tests = printed_tests(result.stdout)
    assert [(t["it"], t["nbatches"]) for t in tests] == [(50, 100), (100, 100)]
    assert tests[-1]["auc"] >= 0.75, tests
    assert tests[-1]["best_auc"] == max(t["auc"] for t in tests)
    # the test split is the first half of the last day: 2150 samples, 8 whole batches of 256 (the rest dropped)
    assert "was partial" not in result.stdout
    assert (tmp_path / "kaggleAdDisplayChallenge_processed.npz").exists()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    test_records = [r for r in records if r["phase"] == "test"]
    assert [round(r["auc"], 6) for r in test_records] == [t["auc"] for t in tests]


def test_terabyte_day_files_train_with_memory_map_and_mlperf_lines(tmp_path: Path) -> None:
    prefix = write_terabyte(tmp_path, days=3, rows_per_day=1280)
    argv = [*TINY, "--data-set=terabyte", f"--raw-data-file={prefix}", "--memory-map", "--test-freq=10"]
    result = run_script(*argv, "--mlperf-logging", "--mlperf-auc-threshold=0.99")
    assert result.returncode == 0, result.stderr
    assert [line["it"] for line in finished_lines(result.stdout)] == [10, 20, 30, 40]  # days 0 and 1
    mlperf = re.findall(
        r"^Testing at - (\d+)/40 of epoch 0, loss [\d.]+, recall [\d.]+, precision [\d.]+, f1 [\d.]+, ap [\d.]+, "
        r"auc ([\d.]+), best auc [\d.]+, accuracy [\d.]+ %, best accuracy [\d.]+ %$",
        result.stdout,
        re.M,
    )
    assert [int(it) for it, _ in mlperf] == [10, 20, 30, 40]
    installed = importlib.util.find_spec("mlperf_logging")  # an extra, from requirements-extras.txt
    compliance_log = '"key": "eval_accuracy"' if installed else "no compliance log is written"
    assert compliance_log in result.stdout


# AUC passes 0.5 at the first test (it 5); accuracy, 78.6 % there (all predicted 0), passes 80 % a few tests later
@pytest.mark.parametrize("metric, threshold", [("auc", 0.5), ("accuracy", 0.8)])
def test_a_threshold_stops_training_at_the_first_test_that_reaches_it(
    tmp_path: Path, metric: str, threshold: float
) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 1280)
    flag = f"--mlperf-{metric[:3]}-threshold={threshold}"
    result = run_script(*TINY, f"--raw-data-file={raw}", "--test-freq=5", flag)
    assert result.returncode == 0, result.stderr
    assert f"MLPerf testing {metric} threshold {threshold} reached, stop training" in result.stdout
    values = [t["auc"] if metric == "auc" else t["accuracy"] / 100 for t in printed_tests(result.stdout)]
    assert [value >= threshold for value in values] == [False] * (len(values) - 1) + [True], values
    if metric == "auc":
        assert finished_lines(result.stdout) == []  # stopped at it 5


def test_a_partial_last_batch_is_dropped_as_the_originals_criteo_loaders_did(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 100)  # 600 training rows: 9 batches of 64, then 24 samples
    argv = [*TINY, f"--raw-data-file={raw}", "--print-freq=4", "--test-freq=4", "--test-mini-batch-size=20"]
    result = run_script(*argv, "--nepochs=2")
    assert result.returncode == 0, result.stderr
    assert "was partial" not in result.stdout  # nor the test split's 50 rows: 2 batches of 20, then 10
    assert [(line["epoch"], line["it"], line["nbatches"]) for line in finished_lines(result.stdout)] == [
        (epoch, it, 9) for epoch in (0, 1) for it in (4, 8, 9)
    ]
    assert [t["it"] for t in printed_tests(result.stdout)] == [4, 8, 9, 4, 8, 9]


def test_the_test_counts_correct_predictions_exactly_past_2_24(monkeypatch) -> None:
    """The test's correct predictions add up exactly: a float32 running sum rounds them past 2**24 (Terabyte's test
    split holds 89 M samples); the original counted them in integers."""
    args, sizes, _ = dlrm_s_pytorch.parse_command_line(["--num-batches=2", "--round-targets"])
    backend, ranks = select_backend("cpu", lazy=False), Ranks(0, 1, 0, 1)
    trainer = dlrm_s_pytorch.build(args, sizes, backend, ranks)
    trainer.test_loader = dlrm_s_pytorch.make_loader(
        args, trainer.train_loader.dataset, sizes, backend, trainer.model.shards, ranks, test=True
    )
    counts, forward = iter([2.0**24, 1.0]), trainer.forward

    def forward_with_counts(batch):  # the two batches count 2**24 and 1 correct predictions
        scores, loss, stats = forward(batch)
        return scores, loss, torch.stack([stats[0], torch.tensor(next(counts)), stats[2]])

    monkeypatch.setattr(trainer, "forward", forward_with_counts)
    result = trainer.evaluate()
    assert result.accuracy * result.scores.size == 2**24 + 1


def test_a_split_without_a_whole_batch_stops_before_training(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 100)  # 600 training rows, 50 test rows
    too_large_for_the_test_split = ["--test-freq=4", "--test-mini-batch-size=64"]
    for flags, message in [
        (too_large_for_the_test_split, "--test-mini-batch-size: the test split holds no whole batch of 64 samples"),
        (
            ["--mini-batch-size=601"],
            "--mini-batch-size: the training split holds no whole batch of 601 samples (600 rows)",
        ),
    ]:
        result = run_script(*TINY, f"--raw-data-file={raw}", *flags)
        assert result.returncode == 2, result.stderr
        last_line = result.stderr.splitlines()[-1]  # after preprocessing's progress lines
        assert last_line.endswith(message) and "Traceback" not in result.stderr
        assert finished_lines(result.stdout) == []


def test_files_in_the_upstream_processed_layout_load_and_train(tmp_path: Path) -> None:
    processed = tmp_path / "kaggleAdDisplayChallenge_processed.npz"
    arrays = write_upstream_processed(processed, rows=7 * 640)
    result = run_script(*TINY, f"--processed-data-file={processed}", "--test-freq=20", "--num-workers=2")
    assert result.returncode == 0, result.stderr
    tables = "-".join(str(int(c)) for c in arrays["counts"])
    assert f"--arch-embedding-size {tables}: from the data" in result.stdout
    assert [line["it"] for line in finished_lines(result.stdout)] == [10, 20, 30, 40, 50, 60]
    assert [t["it"] for t in printed_tests(result.stdout)] == [20, 40, 60]


def test_inference_only_evaluates_a_checkpoint_on_the_test_split(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 640)
    argv = [*TINY, f"--raw-data-file={raw}"]
    trained_metrics, evaluated_metrics = tmp_path / "trained.jsonl", tmp_path / "evaluated.jsonl"
    trained = run_script(*argv, "--test-freq=60", "--save-model", str(tmp_path / "m.pt"),
                         "--metrics-file", str(trained_metrics))  # fmt: skip
    evaluated = run_script(*argv, "--inference-only", "--load-model", str(tmp_path / "m.pt"),
                           "--metrics-file", str(evaluated_metrics))  # fmt: skip
    assert trained.returncode == 0 and evaluated.returncode == 0, trained.stderr + evaluated.stderr
    assert finished_lines(evaluated.stdout) == []
    last_test, evaluation = printed_tests(trained.stdout)[-1], printed_tests(evaluated.stdout)
    assert len(evaluation) == 1
    assert (evaluation[0]["loss"], evaluation[0]["auc"]) == (last_test["loss"], last_test["auc"])
    last_logged = [json.loads(line) for line in trained_metrics.read_text().splitlines()][-1]
    assert last_logged["phase"] == "test"
    assert [json.loads(line) for line in evaluated_metrics.read_text().splitlines()] == [last_logged]


def test_a_malformed_line_stops_with_file_and_line_unless_skipped(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, rows=7 * 300)
    lines = raw.read_text().splitlines(keepends=True)
    lines[1000] = "\t".join(["2", *["1"] * 13, *["0a"] * 26]) + "\n"  # a label other than 0 or 1
    raw.write_text("".join(lines))
    stopped = run_script(*TINY, f"--raw-data-file={raw}")
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1, stopped.stderr
    assert f"{raw}:1001" in stopped.stderr and "label" in stopped.stderr
    skipped = run_script(*TINY, f"--raw-data-file={raw}", "--skip-bad-lines")
    assert skipped.returncode == 0, skipped.stderr
    assert re.search(r"\b1 bad line", skipped.stdout), skipped.stdout


def test_gzip_compressed_raw_data_stops_with_one_line(tmp_path: Path) -> None:
    raw = tmp_path / "train.txt.gz"
    raw.write_bytes(gzip.compress(write_kaggle(tmp_path / "plain.txt", rows=7 * 10).read_bytes()))
    result = run_script(*TINY, f"--raw-data-file={raw}", cwd=tmp_path)
    advice = f"gunzip -k {raw}, and name {tmp_path}/train.txt"
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"dlrm_s_pytorch.py: error: {raw}: is gzip-compressed; decompress it first ({advice})\n"


def test_a_data_folder_whose_name_is_not_utf8_trains_on_two_ranks_with_a_strict_stdout(tmp_path: Path) -> None:
    """The lines naming the files print the folder's undecodable byte escaped, as stderr does: in a UTF-8 locale
    (PYTHONIOENCODING stands for it) rank 0's stdout, and in every locale the other ranks' /dev/null, refused it."""
    folder = tmp_path / os.fsdecode(b"criteo-\xff")
    folder.mkdir()
    raw = write_kaggle(folder, rows=7 * 128)
    environment = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    result = run_script(*TINY, f"--raw-data-file={raw}", "--world_size=2", env=environment)
    assert result.returncode == 0, result.stderr
    assert f"Reading {tmp_path}/criteo-\\udcff/kaggleAdDisplayChallenge_processed.npz" in result.stdout


@pytest.mark.parametrize("workers", [0, 1])
def test_an_index_out_of_its_table_stops_with_the_table_index_and_range(tmp_path: Path, workers: int) -> None:
    processed = tmp_path / "processed.npz"
    arrays = write_upstream_processed(processed, rows=7 * 640)
    arrays["X_cat"] = arrays["X_cat"].copy()
    arrays["X_cat"][5, 3] = arrays["counts"][3] + 7  # ids beyond the counts the file declares
    np.savez_compressed(processed, **arrays)
    argv = [*TINY, f"--processed-data-file={processed}", "--data-randomize=none", f"--num-workers={workers}"]
    result = run_script(*argv)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    bad, rows = int(arrays["counts"][3]) + 7, int(arrays["counts"][3])
    assert f"table 3: index {bad} is out of its range [0, {rows})" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_lazy_tests_between_graph_replays(tmp_path: Path) -> None:
    """Lazy mode on CUDA replays the recorded iteration with each new batch and evaluates between replays, on the
    weights the replays updated: the same training and test lines as eager on the CPU."""
    raw = write_kaggle(tmp_path, rows=7 * 300)
    argv = [*TINY, f"--raw-data-file={raw}", "--num-batches=8", "--print-freq=1", "--test-freq=4"]
    cpu = run_script(*argv, "--device=cpu", cwd=tmp_path)
    gpu = run_script(*argv, "--device=cuda", "--mode=lazy", cwd=tmp_path)
    assert cpu.returncode == gpu.returncode == 0, gpu.stderr
    cpu_losses, gpu_losses = ([line["loss"] for line in finished_lines(r.stdout)] for r in (cpu, gpu))
    assert len(gpu_losses) == 8 and gpu_losses == pytest.approx(cpu_losses, abs=1e-5, rel=0)
    cpu_tests, gpu_tests = printed_tests(cpu.stdout), printed_tests(gpu.stdout)
    assert [t["it"] for t in gpu_tests] == [4, 8]
    for mine, theirs in zip(gpu_tests, cpu_tests, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5) and mine["auc"] == pytest.approx(
            theirs["auc"], abs=1e-4
        )
