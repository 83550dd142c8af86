"""Criteo data: raw text to the original's processed files, and processed files to batches."""

import argparse
import contextlib
import errno
import fcntl
import gzip
import itertools
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, live_processes, live_processes_in_group
from criteo_files import write_kaggle, write_terabyte, write_upstream_days, write_upstream_processed

import data_utils
from data_utils import DataError


def temporary_files(directory: Path) -> list[Path]:
    """Hidden files left behind, except the lock that ranks share while preprocessing."""
    return [p for p in directory.glob(".*") if not p.name.endswith(".lock")]


def make_args(raw: Path | str = "", **overrides) -> argparse.Namespace:
    flags = dict(
        data_set="kaggle",
        raw_data_file=str(raw),
        processed_data_file="",
        max_ind_range=-1,
        data_sub_sample_rate=0.0,
        data_randomize="none",
        memory_map=False,
        mlperf_bin_loader=False,
        mlperf_bin_shuffle=False,
        numpy_rand_seed=123,
        skip_bad_lines=False,
        mini_batch_size=64,
        test_mini_batch_size=-1,
    )
    return argparse.Namespace(**{**flags, **overrides})


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks, vocabulary batches, runs and merge windows far smaller than the data, and lookups mapped only while
    in use (the larger ones 7 queries at a time), so that every boundary is exercised. The other test files look
    ids up in lookups kept mapped."""
    monkeypatch.setattr(data_utils, "CHUNK_BYTES", 20_000)
    monkeypatch.setattr(data_utils, "PENDING_VALUES", 64)
    monkeypatch.setattr(data_utils, "RUN_VALUES", 2_000)
    monkeypatch.setattr(data_utils, "MERGE_VALUES", 3_000)
    monkeypatch.setattr(data_utils, "LOOKUP_RESIDENT_BYTES", 0)
    monkeypatch.setattr(data_utils, "MAPPED_BYTES", 1400)  # lookups of over about 170 values: 7 queries a map
    monkeypatch.setattr(data_utils, "FAULT_AROUND_BYTES", 100)
    monkeypatch.setattr(data_utils, "BLOCK_ROWS", 100)


def read_raw(paths: list[Path]) -> dict[str, np.ndarray]:
    """The expected processed arrays, computed line by line in plain Python, as the original's dicts did."""
    ids = [{} for _ in range(26)]
    labels, dense, categorical = [], [], []
    for path in paths:
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            labels.append(int(fields[0] or 0))
            dense.append([max(int(x or 0), 0) for x in fields[1:14]])
            categorical.append([ids[j].setdefault(int(x or "0", 16), len(ids[j])) for j, x in enumerate(fields[14:])])
    values = [np.array(list(feature), np.int64) for feature in ids]
    return dict(y=np.array(labels), X_int=np.array(dense), X_cat=np.array(categorical), values=values)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def all_rows(dataset: torch.utils.data.Dataset | list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dense, indices [n, 26], targets) of every batch (of a dataset or a list of batches), in order."""
    batches = [dataset[i] for i in range(len(dataset))]
    dense = torch.cat([b[0] for b in batches])
    indices = torch.cat([torch.stack(b[2], dim=1) for b in batches])
    return dense, indices, torch.cat([b[3] for b in batches])


def rows_of(arrays: dict[str, np.ndarray], order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the batches of the given rows must hold: log(x + 1) of the integers, the ids, the labels."""
    dense = torch.log(torch.tensor(arrays["X_int"][order], dtype=torch.float32) + 1)
    indices = torch.tensor(arrays["X_cat"][order]).long()
    return dense, indices, torch.tensor(arrays["y"][order], dtype=torch.float32).view(-1, 1)


def assert_rows_equal(got: tuple, expected: tuple) -> None:
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Raw layouts, ids, splits
# ---------------------------------------------------------------------------------------------------------


def test_kaggle_file_becomes_seven_days_with_first_appearance_ids(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 1000)
    processed = data_utils.prepare(make_args(raw))

    assert processed.rows_per_day == [143] * 6 + [142]  # divmod(1000, 7): the first 6 days get one more line
    expected = read_raw([raw])
    arrays = load(tmp_path / "kaggleAdDisplayChallenge_processed.npz")
    for name in ("y", "X_int", "X_cat"):
        np.testing.assert_array_equal(arrays[name], expected[name])
    assert list(arrays["counts"]) == [len(v) for v in expected["values"]] == processed.counts
    for j, values in enumerate(expected["values"]):  # the original's dictionaries: hashes as int32
        np.testing.assert_array_equal(load(tmp_path / f"train_fea_dict_{j}.npz")["unique"], values.astype(np.int32))
    assert load(tmp_path / "train_day_count.npz")["total_per_file"].tolist() == processed.rows_per_day
    assert load(tmp_path / "train_fea_count.npz")["counts"].tolist() == processed.counts
    for day in range(7):
        assert len(load(tmp_path / f"train_day_{day}_processed.npz")["y"]) == processed.rows_per_day[day]
    assert not list(tmp_path.glob("*_run*")) and not temporary_files(tmp_path)


def test_windows_line_ends_give_the_same_lines_days_and_data(tmp_path: Path) -> None:
    """The line numbers decide the days, the bad line named and each line's sub-sampling draw."""
    unix, windows = tmp_path / "unix", tmp_path / "windows"
    lines = write_kaggle(tmp_path, 1000).read_text().splitlines()
    lines[56] = spoil(lines[56], "label")
    for folder, line_end in ((unix, "\n"), (windows, "\r\n")):
        folder.mkdir()
        (folder / "train.txt").write_bytes(line_end.join(lines).encode() + line_end.encode())
        with pytest.raises(DataError, match=f"^{folder}/train.txt:57: label '2' is not 0 or 1$"):
            data_utils.prepare(make_args(folder / "train.txt"))
    from_unix, from_windows = (
        data_utils.prepare(make_args(folder / "train.txt", skip_bad_lines=True, data_sub_sample_rate=0.5))
        for folder in (unix, windows)
    )
    assert (from_windows.counts, from_windows.rows_per_day) == (from_unix.counts, from_unix.rows_per_day)
    processed = "kaggleAdDisplayChallenge_processed.npz"
    for name, array in load(unix / processed).items():
        np.testing.assert_array_equal(load(windows / processed)[name], array)


def test_terabyte_days_and_the_splits(tmp_path: Path) -> None:
    raw = write_terabyte(tmp_path, days=3, rows_per_day=151)
    args = make_args(raw, data_set="terabyte", mini_batch_size=40)
    processed = data_utils.prepare(args)

    assert processed.rows_per_day == [151] * 3
    arrays = load(tmp_path / "terabyte_processed.npz")
    expected = read_raw([tmp_path / f"day_{day}" for day in range(3)])
    np.testing.assert_array_equal(arrays["X_cat"], expected["X_cat"])
    assert (tmp_path / "day_fea_count.npz").exists() and (tmp_path / "day_2_processed.npz").exists()

    train, test = data_utils.criteo_datasets(args, processed)
    assert (len(train), len(test)) == (math.ceil(302 / 40), math.ceil(76 / 40))
    assert train.counts == processed.counts and train.dense_features == 13
    assert_rows_equal(all_rows(train), rows_of(arrays, np.arange(302)))
    assert_rows_equal(all_rows(test), rows_of(arrays, np.arange(302, 378)))  # the last day's first half (ceil)
    train_rows, test_rows, val_rows = data_utils._split_orders(processed.rows_per_day, "none", np.random.permutation)
    assert (len(train_rows), len(test_rows), len(val_rows)) == (302, 76, 75)


def test_batch_layout(tmp_path: Path) -> None:
    args = make_args(write_kaggle(tmp_path, 300), mini_batch_size=16, test_mini_batch_size=10)
    train, test = data_utils.criteo_datasets(args, data_utils.prepare(args))
    dense, offsets, indices, targets = train[len(train) - 1]
    n = 258 - 16 * (len(train) - 1)  # 6 days of 43 rows; the last batch is partial
    assert dense.dtype == torch.float32 and dense.shape == (n, 13)
    assert len(offsets) == len(indices) == 26
    assert all(torch.equal(o, torch.arange(n)) for o in offsets)
    assert all(i.dtype == torch.int64 and i.shape == (n,) for i in indices)
    assert targets.dtype == torch.float32 and targets.shape == (n, 1)
    assert test[0][0].shape == (10, 13)
    with pytest.raises(IndexError):
        train[len(train)]


# ---------------------------------------------------------------------------------------------------------
# Flags: --data-randomize, --max-ind-range, --data-sub-sample-rate
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("randomize", ["none", "day", "total"])
def test_randomize_draws_from_the_global_generator_as_the_original(tmp_path: Path, randomize: str) -> None:
    args = make_args(write_kaggle(tmp_path, 700), data_randomize=randomize)
    processed = data_utils.prepare(args)
    arrays = load(tmp_path / "kaggleAdDisplayChallenge_processed.npz")

    np.random.seed(7)
    train, test = data_utils.criteo_datasets(args, processed)
    state = np.random.get_state()[1]

    def original_train_order() -> np.ndarray:
        if randomize == "day":
            return np.concatenate([100 * day + np.random.permutation(100) for day in range(6)])
        return np.random.permutation(600) if randomize == "total" else np.arange(600)

    np.random.seed(7)
    order = original_train_order()
    original_train_order()  # the original split the data again for its test set
    assert np.array_equal(np.random.get_state()[1], state)
    assert_rows_equal(all_rows(train), rows_of(arrays, order))
    assert_rows_equal(all_rows(test), rows_of(arrays, np.arange(600, 650)))


def test_max_ind_range_folds_hashes_before_numbering(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 500)
    args = make_args(raw, max_ind_range=5)
    processed = data_utils.prepare(args)

    ids = [{} for _ in range(26)]
    for line in raw.read_text().splitlines():
        for j, x in enumerate(line.split("\t")[14:]):
            ids[j].setdefault(int(x or "0", 16) % 5, len(ids[j]))
    assert processed.counts == [len(feature) for feature in ids]
    train, _ = data_utils.criteo_datasets(args, processed)
    assert train.counts == [min(len(feature), 5) for feature in ids]
    assert all(int(index.max()) < 5 for batch in (train[0], train[1]) for index in batch[2])


def test_sub_sampling_drops_negatives_only_and_repeats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_kaggle(tmp_path, 2000)
    labels = np.array([int(line.split("\t")[0] or 0) for line in raw.read_text().splitlines()])
    data_utils.prepare(make_args(raw, data_sub_sample_rate=0.6))
    kept = load(tmp_path / "kaggleAdDisplayChallenge_processed.npz")["y"]

    assert (kept == 1).sum() == (labels == 1).sum()
    assert 0.3 < (kept == 0).sum() / (labels == 0).sum() < 0.5
    again = tmp_path / "again"
    again.mkdir()
    monkeypatch.setattr(data_utils, "CHUNK_BYTES", 7_000)  # the draws do not depend on how the text is cut
    data_utils.prepare(make_args(shutil.copy(raw, again), data_sub_sample_rate=0.6))
    for name in ("y", "X_int", "X_cat", "counts"):
        np.testing.assert_array_equal(load(again / "kaggleAdDisplayChallenge_processed.npz")[name], load(
            tmp_path / "kaggleAdDisplayChallenge_processed.npz")[name])  # fmt: skip


def test_processed_files_made_with_other_flags_are_not_used(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 600)
    concatenated = tmp_path / "kaggleAdDisplayChallenge_processed.npz"
    cases = [  # (flags the files are made with, then flags that must not use them, the message)
        ({}, dict(data_sub_sample_rate=0.5), f"--data-sub-sample-rate 0.5: {concatenated} was made with "
                                             "--data-sub-sample-rate 0.0 (delete to make again)"),
        (dict(memory_map=True), dict(memory_map=True, max_ind_range=7), "--max-ind-range 7: the processed files "
                                f"beside {raw} (train_*.npz) were made with --max-ind-range -1 (delete to make again)"),
        (dict(mlperf_bin_loader=True), dict(mlperf_bin_loader=True, data_randomize="total"),
         f"--data-randomize total: {tmp_path}/kaggleAdDisplayChallenge_processed_*.bin were made with "
         "--data-randomize none (delete to make again)"),
    ]  # fmt: skip
    for made_with, other, message in cases:
        data_utils.prepare(make_args(raw, **made_with))
        data_utils.prepare(make_args(raw, **made_with, numpy_rand_seed=5))  # the seed shapes nothing here
        with pytest.raises(DataError) as error:
            data_utils.prepare(make_args(raw, **other))
        assert str(error.value) == message
    sub_sampled = make_args(raw, data_sub_sample_rate=0.5, memory_map=True)
    for made in tmp_path.glob("train_*.npz"):
        made.unlink()  # the record stays, with nothing it speaks for
    data_utils.prepare(sub_sampled)
    with pytest.raises(DataError, match="^--numpy-rand-seed 5: .* made with --numpy-rand-seed 123 "):
        data_utils.prepare(make_args(**{**vars(sub_sampled), "numpy_rand_seed": 5}))


def test_a_processed_file_that_would_share_the_day_files_record_is_refused(tmp_path: Path) -> None:
    """``train.npz`` beside ``train.txt`` records its flags in ``train_made_with.json``, the day files' record: making
    it rewrote that, and day files made with -1 were then used for --max-ind-range 7, silently."""
    raw = write_kaggle(tmp_path, 300)
    data_utils.prepare(make_args(raw, memory_map=True))
    record = (tmp_path / "train_made_with.json").read_text()
    shared = f"^--processed-data-file {tmp_path}/train.npz: train.npz would record its flags in train_made_with.json, "
    with pytest.raises(DataError, match=shared):
        data_utils.prepare(make_args(raw, processed_data_file=tmp_path / "train.npz", max_ind_range=7))
    assert (tmp_path / "train_made_with.json").read_text() == record
    assert not (tmp_path / "train.npz").exists()


def test_processed_files_whose_names_differ_after_a_dot_keep_their_own_records(tmp_path: Path) -> None:
    """``c.full.npz`` and ``c.m7.npz`` both recorded their flags in ``c_made_with.json``: making the second rewrote
    the first's record, which then let it pass for made with --max-ind-range 7."""
    raw = write_kaggle(tmp_path, 300)
    full, folded = tmp_path / "c.full.npz", tmp_path / "c.m7.npz"
    data_utils.prepare(make_args(raw, processed_data_file=full))
    for made in [*tmp_path.glob("train_*.npz"), tmp_path / "train_made_with.json"]:
        made.unlink()  # the day files of -1 go, so that those of 7 can be made
    data_utils.prepare(make_args(raw, processed_data_file=folded, max_ind_range=7))
    with pytest.raises(DataError, match=f"^--max-ind-range 7: {full} was made with --max-ind-range -1 "):
        data_utils.prepare(make_args(raw, processed_data_file=full, max_ind_range=7))
    data_utils.prepare(make_args(raw, processed_data_file=full))


# ---------------------------------------------------------------------------------------------------------
# Memory-map mode, the bin loader, the original's files
# ---------------------------------------------------------------------------------------------------------


def test_memory_map_gives_the_same_batches(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 900)
    in_memory = make_args(raw, data_randomize="total", numpy_rand_seed=3)
    mapped = make_args(raw, data_randomize="total", numpy_rand_seed=3, memory_map=True)

    processed = data_utils.prepare(mapped)
    assert processed.concatenated is None and not (tmp_path / "kaggleAdDisplayChallenge_processed.npz").exists()
    np.random.seed(3)
    mapped_sets = data_utils.criteo_datasets(mapped, processed)
    np.random.seed(3)
    in_memory_sets = data_utils.criteo_datasets(in_memory, data_utils.prepare(in_memory))
    for mapped_set, in_memory_set in zip(mapped_sets, in_memory_sets, strict=True):
        assert_rows_equal(all_rows(mapped_set), all_rows(in_memory_set))


def test_batches_are_a_function_of_their_index(tmp_path: Path) -> None:
    args = make_args(write_kaggle(tmp_path, 700), data_randomize="total", memory_map=True, mini_batch_size=32)
    train, _ = data_utils.criteo_datasets(args, data_utils.prepare(args))
    later = train[5]
    first = [train[i] for i in (3, 0, 5)]
    train.epoch = 4
    assert_rows_equal(all_rows([train[5]]), all_rows([later]))
    assert_rows_equal(all_rows([train[3], train[0]]), all_rows(first[:2]))
    loader = torch.utils.data.DataLoader(train, batch_size=None, num_workers=2)
    assert_rows_equal(all_rows(list(loader)), all_rows(train))


def test_mlperf_bin_loader(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 1000)
    bin_args = make_args(raw, data_randomize="total", numpy_rand_seed=9, mlperf_bin_loader=True, mini_batch_size=50)
    processed = data_utils.prepare(bin_args)
    for split, rows in (("train", 858), ("test", 71), ("val", 71)):
        assert processed.bin_files[split] == tmp_path / f"kaggleAdDisplayChallenge_processed_{split}.bin"
        assert processed.bin_files[split].stat().st_size == rows * 40 * 4

    train, test = data_utils.criteo_datasets(bin_args, processed)
    np.random.seed(9)  # the bin file holds the rows in the order the in-memory dataset draws first
    in_memory = make_args(**{**vars(bin_args), "mlperf_bin_loader": False})
    expected_train, expected_test = data_utils.criteo_datasets(in_memory, data_utils.prepare(in_memory))
    assert_rows_equal(all_rows(train), all_rows(expected_train))
    assert_rows_equal(all_rows(test), all_rows(expected_test))


@pytest.mark.parametrize("companion", ["train_day_count.npz", "train_fea_count.npz"])
def test_bin_files_without_their_count_files_say_which_is_missing(tmp_path: Path, companion: str) -> None:
    args = make_args(write_kaggle(tmp_path, 1000), mlperf_bin_loader=True, mini_batch_size=50)
    data_utils.prepare(args)
    kept = (tmp_path / companion).read_bytes()
    (tmp_path / companion).unlink()
    bins = tmp_path / "kaggleAdDisplayChallenge_processed_*.bin"
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / companion}: no such file; {bins} are read with it")):
        data_utils.prepare(args)
    (tmp_path / companion).write_bytes(kept)
    assert data_utils.prepare(args).rows_per_day == [143] * 6 + [142]


def test_mlperf_bin_shuffle_reorders_full_batches_per_epoch(tmp_path: Path) -> None:
    args = make_args(write_kaggle(tmp_path, 1000), mlperf_bin_loader=True, mlperf_bin_shuffle=True, mini_batch_size=50)
    processed = data_utils.prepare(args)
    shuffled, _ = data_utils.criteo_datasets(args, processed)
    plain, _ = data_utils.criteo_datasets(make_args(**{**vars(args), "mlperf_bin_shuffle": False}), processed)
    targets = [plain[i][3] for i in range(len(plain))]

    def batch_order(epoch: int) -> list[int]:
        shuffled.epoch = epoch
        return [next(j for j, t in enumerate(targets) if torch.equal(t, shuffled[i][3])) for i in range(len(shuffled))]

    first, second = batch_order(0), batch_order(1)
    assert first != second and first == batch_order(0)
    assert sorted(first[:-1]) == list(range(17)) and first[-1] == second[-1] == 17  # 858 rows: the partial one last
    again, _ = data_utils.criteo_datasets(args, processed)
    again.epoch = 1
    assert_rows_equal(all_rows(again), all_rows([plain[j] for j in second]))


def test_reads_the_originals_concatenated_file(tmp_path: Path) -> None:
    path = tmp_path / "kaggle_processed.npz"
    arrays = write_upstream_processed(path, 700)
    args = make_args(processed_data_file=path, mini_batch_size=30)
    processed = data_utils.prepare(args)

    assert not list(tmp_path.glob("*made_with*"))  # what flags made it is not known, so nothing says so
    assert processed.counts == arrays["counts"].tolist() and processed.rows_per_day == [100] * 7
    train, test = data_utils.criteo_datasets(args, processed)
    assert_rows_equal(all_rows(train), rows_of(arrays, np.arange(600)))
    assert_rows_equal(all_rows(test), rows_of(arrays, np.arange(600, 650)))


def test_memory_maps_the_originals_day_files(tmp_path: Path) -> None:
    raw = tmp_path / "train.txt"  # never read: the processed files are all there
    arrays = write_upstream_days(raw, [40, 41, 42, 43, 44, 45, 46])
    args = make_args(raw, memory_map=True, mini_batch_size=25)
    processed = data_utils.prepare(args)

    train, test = data_utils.criteo_datasets(args, processed)
    assert_rows_equal(all_rows(train), rows_of(arrays, np.arange(255)))
    assert_rows_equal(all_rows(test), rows_of(arrays, np.arange(255, 278)))
    np.testing.assert_array_equal(load(tmp_path / "train_day_6_processed.npz")["X_cat"], arrays["X_cat"][255:])


@pytest.mark.parametrize("bins", [False, True])
def test_makes_the_concatenated_and_bin_files_from_the_originals_day_files(tmp_path: Path, bins: bool) -> None:
    """The original's day files hold X_cat in Fortran order; the files made from them hold the same rows."""
    raw = tmp_path / "train.txt"  # never read: the day files are all there
    arrays = write_upstream_days(raw, [40, 41, 42, 43, 44, 45, 46])
    args = make_args(raw, mlperf_bin_loader=bins, mini_batch_size=25, processed_data_file=tmp_path / "made.npz")
    train, test = data_utils.criteo_datasets(args, data_utils.prepare(args))
    assert_rows_equal(all_rows(train), rows_of(arrays, np.arange(255)))
    assert_rows_equal(all_rows(test), rows_of(arrays, np.arange(255, 278)))


# ---------------------------------------------------------------------------------------------------------
# Resuming
# ---------------------------------------------------------------------------------------------------------


def test_rerun_writes_only_the_missing_day(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = write_kaggle(tmp_path, 700)
    args = make_args(raw)
    data_utils.prepare(args)
    concatenated = tmp_path / "kaggleAdDisplayChallenge_processed.npz"
    before = load(concatenated)
    others = [p for p in tmp_path.glob("train_*.npz") if p.name != "train_day_3_processed.npz"]
    stamps = {p: p.stat().st_mtime_ns for p in others}
    (tmp_path / "train_day_3_processed.npz").unlink()
    concatenated.unlink()
    capsys.readouterr()

    data_utils.prepare(args)
    progress = capsys.readouterr().err
    assert "Pass 1/2" not in progress and "Pass 2/2, ids: 100/100 lines" in progress
    assert {p: p.stat().st_mtime_ns for p in others} == stamps
    for name, values in before.items():
        np.testing.assert_array_equal(load(concatenated)[name], values)


def test_a_missing_day_is_made_again_from_the_originals_dictionaries(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = write_kaggle(tmp_path, 700)
    data_utils.prepare(make_args(raw))
    concatenated = tmp_path / "kaggleAdDisplayChallenge_processed.npz"
    before = load(concatenated)
    for j in range(26):  # what the original leaves: compressed dictionaries, no lookups
        dictionary = tmp_path / f"train_fea_dict_{j}.npz"
        unique = load(dictionary)["unique"]
        with open(dictionary, "wb") as out:
            np.savez_compressed(out, unique=unique)
        (tmp_path / f"train_fea_lookup_{j}.npz").unlink()
    (tmp_path / "train_day_4_processed.npz").unlink()
    concatenated.unlink()
    capsys.readouterr()

    data_utils.prepare(make_args(raw))
    output = capsys.readouterr()
    assert "Making lookups for 26 dictionaries" in output.out and "Pass 1/2" not in output.err
    for name, values in before.items():
        np.testing.assert_array_equal(load(concatenated)[name], values)
    assert len(list(tmp_path.glob("train_fea_lookup_*.npz"))) == 26 and not temporary_files(tmp_path)


def test_a_value_missing_from_the_lookups_names_the_feature_and_the_file(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 700)
    data_utils.prepare(make_args(raw))
    lines = raw.read_text().splitlines(keepends=True)
    fields = lines[650].split("\t")
    fields[14 + 4] = "fedcba98"  # C5 of a line of the last day: a value the vocabularies never saw
    raw.write_text("".join(lines[:650] + ["\t".join(fields)] + lines[651:]))
    (tmp_path / "train_day_6_processed.npz").unlink()
    (tmp_path / "kaggleAdDisplayChallenge_processed.npz").unlink()

    with pytest.raises(DataError, match=r"a C5 value is not in .*train_fea_lookup_4.npz: the vocabularies were made"):
        data_utils.prepare(make_args(raw))
    assert not (tmp_path / "train_day_6_processed.npz").exists() and not temporary_files(tmp_path)


def test_runs_that_name_other_processed_files_make_the_shared_days_one_at_a_time(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 700)
    args = make_args(raw, processed_data_file=tmp_path / "second.npz")
    made_while_held = []
    with open(tmp_path / ".train_days.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a run making first.npz holds it

        def release() -> None:
            made_while_held.extend(tmp_path.glob("train_*"))
            held.close()

        threading.Timer(1.5, release).start()
        data_utils.prepare(args)
        assert held.closed and not made_while_held  # it waited, and made nothing meanwhile
    assert (tmp_path / "second.npz").exists()


def test_pass_1_files_left_by_an_interrupted_clean_up_are_removed(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 700)
    data_utils.prepare(make_args(raw))
    leftovers = [tmp_path / "train_day_1_runs.npz", tmp_path / "train_day_5_run_0.npz"]
    for path in leftovers:
        path.write_bytes(b"left behind")
    (tmp_path / "train_day_2_processed.npz").unlink()
    (tmp_path / "kaggleAdDisplayChallenge_processed.npz").unlink()

    data_utils.prepare(make_args(raw))
    assert not any(path.exists() for path in leftovers) and (tmp_path / "train_day_2_processed.npz").exists()


class Interrupted(Exception):
    pass


def test_interrupted_second_pass_keeps_the_days_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = make_args(write_kaggle(tmp_path, 700))
    finish = data_utils.DayWriter._finish

    def interrupt_at_day_3(writer: data_utils.DayWriter) -> None:
        if writer.path.name == "train_day_3_processed.npz":
            raise Interrupted
        finish(writer)

    monkeypatch.setattr(data_utils.DayWriter, "_finish", interrupt_at_day_3)
    with pytest.raises(Interrupted):
        data_utils.prepare(args)
    finished = [tmp_path / f"train_day_{day}_processed.npz" for day in range(3)]
    assert sorted(tmp_path.glob("*_processed.npz")) == finished and not temporary_files(tmp_path)
    stamps = [path.stat().st_mtime_ns for path in finished]
    monkeypatch.setattr(data_utils.DayWriter, "_finish", finish)
    capsys.readouterr()

    data_utils.prepare(args)
    progress = capsys.readouterr().err
    assert "Pass 1/2" not in progress and "Pass 2/2, ids: 400/400 lines" in progress
    assert [path.stat().st_mtime_ns for path in finished] == stamps
    expected = read_raw([tmp_path / "train.txt"])
    np.testing.assert_array_equal(load(tmp_path / "kaggleAdDisplayChallenge_processed.npz")["X_cat"], expected["X_cat"])


def test_interrupted_first_pass_resumes_at_the_day_it_stopped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = write_terabyte(tmp_path, days=4, rows_per_day=100)
    good_day = (tmp_path / "day_2").read_text()
    lines = good_day.splitlines(keepends=True)
    (tmp_path / "day_2").write_text("".join(lines[:10] + ["1\t2\n"] + lines[11:]))
    args = make_args(raw, data_set="terabyte")
    with pytest.raises(DataError, match="day_2:11: expected 40"):
        data_utils.prepare(args)
    assert sorted(p.name for p in tmp_path.glob("*_runs.npz")) == ["day_0_runs.npz", "day_1_runs.npz"]
    (tmp_path / "day_2").write_text(good_day)
    capsys.readouterr()

    data_utils.prepare(args)
    assert "Pass 1/2, vocabularies: 200/200 lines" in capsys.readouterr().err
    expected = read_raw([tmp_path / f"day_{day}" for day in range(4)])
    np.testing.assert_array_equal(load(tmp_path / "terabyte_processed.npz")["X_cat"], expected["X_cat"])
    assert not list(tmp_path.glob("*_run*"))


@pytest.mark.parametrize("run_values, merge_values", [(1, 1), (500, 7), (10**9, 10**9)])
def test_ids_do_not_depend_on_how_pass_1_cuts_the_values_into_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, run_values: int, merge_values: int
) -> None:
    monkeypatch.setattr(data_utils, "RUN_VALUES", run_values)
    monkeypatch.setattr(data_utils, "MERGE_VALUES", merge_values)
    raw = write_terabyte(tmp_path, days=3, rows_per_day=200)
    data_utils.prepare(make_args(raw, data_set="terabyte"))

    runs = int(re.search(r"Merging the vocabularies of (\d+) run", capsys.readouterr().out).group(1))
    chunks_per_day = math.ceil((tmp_path / "day_0").stat().st_size / data_utils.CHUNK_BYTES)
    assert runs == {1: 3 * chunks_per_day, 500: runs, 10**9: 3}[run_values] and runs >= 3
    expected = read_raw([tmp_path / f"day_{day}" for day in range(3)])
    np.testing.assert_array_equal(load(tmp_path / "terabyte_processed.npz")["X_cat"], expected["X_cat"])
    for j, values in enumerate(expected["values"]):
        np.testing.assert_array_equal(load(tmp_path / f"day_fea_dict_{j}.npz")["unique"], values.astype(np.int32))
        lookup = load(tmp_path / f"day_fea_lookup_{j}.npz")
        np.testing.assert_array_equal(lookup["values"], np.sort(values))
        np.testing.assert_array_equal(lookup["ids"], np.argsort(values))
    assert not list(tmp_path.glob("*_run*")) and not temporary_files(tmp_path)


def test_aligned_windows_hold_every_copy_of_a_value_together() -> None:
    generator = np.random.default_rng(0)
    runs = [np.unique(generator.integers(0, 500, size)).astype(np.uint32) for size in (0, 1, 40, 300, 700)]
    streams = [iter(np.array_split(run, max(1, run.size // 13))) for run in runs]
    windows = list(data_utils._aligned_windows(streams, 13, np.dtype(np.uint32)))

    for k, run in enumerate(runs):  # every stream's values, in order, exactly once
        np.testing.assert_array_equal(np.concatenate([window[k] for window in windows]), run)
    for earlier, later in itertools.pairwise(windows):  # windows never share a value, and each starts past the last
        assert max(part.max() for part in earlier if part.size) < min(part.min() for part in later if part.size)
    assert all(part.size <= 2 * 13 for window in windows for part in window)


def test_interrupted_merge_resumes_without_reading_the_raw_data_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    raw = write_terabyte(tmp_path, days=3, rows_per_day=100)
    args = make_args(raw, data_set="terabyte")
    status = data_utils._status

    def interrupt_the_merge(message: str) -> None:
        if message.startswith("Merging"):
            raise Interrupted
        status(message)

    monkeypatch.setattr(data_utils, "_status", interrupt_the_merge)
    with pytest.raises(Interrupted):
        data_utils.prepare(args)
    assert len(list(tmp_path.glob("day_*_runs.npz"))) == 3 and not list(tmp_path.glob("*_fea_*"))
    (tmp_path / ".day_merge" / "C1").mkdir(parents=True)  # as a merge killed midway leaves it
    (tmp_path / ".day_merge" / "C1" / "keys_0").write_bytes(b"partial")
    monkeypatch.setattr(data_utils, "_status", status)
    capsys.readouterr()

    data_utils.prepare(args)
    assert "Pass 1/2, vocabularies: 0/0 lines" in capsys.readouterr().err
    expected = read_raw([tmp_path / f"day_{day}" for day in range(3)])
    np.testing.assert_array_equal(load(tmp_path / "terabyte_processed.npz")["X_cat"], expected["X_cat"])
    assert not list(tmp_path.glob("*_run*")) and not temporary_files(tmp_path)


def test_leftovers_of_runs_killed_outright_are_removed_but_not_a_running_ones(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 700)
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftovers = [
        tmp_path / f".train_day_3_processed.npz.{gone.pid}.tmp",  # atomic_write's
        tmp_path / f".train_fea_count.npz.{gone.pid}.tmp",
        tmp_path / f".kaggleAdDisplayChallenge_processed.npz.{gone.pid}.tmp",
        tmp_path / f".train_day_2_processed.npz.{gone.pid}.k2j4x_9a",  # a day's parts (DayWriter's)
    ]
    for path in leftovers[:3]:
        path.write_bytes(b"partial")
    leftovers[3].mkdir()
    (leftovers[3] / "X_cat").write_bytes(b"partial")
    running = tmp_path / f".train_day_4_processed.npz.{os.getppid()}.tmp"
    running.write_bytes(b"being written")

    data_utils.prepare(make_args(raw))
    assert not any(path.exists() for path in leftovers) and running.exists()
    expected = read_raw([raw])
    np.testing.assert_array_equal(load(tmp_path / "kaggleAdDisplayChallenge_processed.npz")["X_cat"], expected["X_cat"])


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------

BAD_LINES = {
    "fields": ("0\t1\t2", "expected 40 tab-separated fields (label, I1-I13, C1-C26), found 3"),
    "hex": (None, "C5 'zz12' is not a hexadecimal number of at most 8 digits"),
    "integer": (None, "I3 '1.5' is not a 32-bit integer"),
    "label": (None, "label '2' is not 0 or 1"),
}


def spoil(line: str, kind: str) -> str:
    fields = line.split("\t")
    if kind == "hex":
        fields[14 + 4] = "zz12"
    elif kind == "integer":
        fields[3] = "1.5"
    elif kind == "label":
        fields[0] = "2"
    return "\t".join(fields)


@pytest.mark.parametrize("kind", BAD_LINES)
def test_a_bad_line_is_named_by_file_and_line(tmp_path: Path, kind: str, capsys: pytest.CaptureFixture) -> None:
    raw = write_kaggle(tmp_path, 300)
    lines = raw.read_text().splitlines()
    replacement, problem = BAD_LINES[kind]
    lines[56] = replacement or spoil(lines[56], kind)
    raw.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as error:
        data_utils.prepare(make_args(raw))
    assert str(error.value) == f"{raw}:57: {problem}"

    processed = data_utils.prepare(make_args(raw, skip_bad_lines=True))
    assert sum(processed.rows_per_day) == 299
    report = f"--skip-bad-lines: skipped 1 bad line(s) of {raw} (first: {raw}:57: {problem})"
    assert report in capsys.readouterr().out.splitlines()


def test_parser_agrees_with_the_line_by_line_rules() -> None:
    rng = np.random.default_rng(0)
    pieces = ["", "0", "1", "-", "-7", "12", "ff", "FFFFFFFF", "123456789", "1234567890", "12345678901", "2147483648",
              "-2147483648", "x", "1.5", " 1", "abcdefab0", "\t"]  # fmt: skip
    lines = []
    for _ in range(3000):
        fields = ["1"] + ["3"] * 13 + ["0a"] * 26
        for position in rng.integers(0, 40, size=rng.integers(0, 3)):
            fields[position] = pieces[rng.integers(len(pieces))]
        lines.append("\t".join(fields).encode())
    rows, bad = data_utils.parse_lines(b"\n".join(lines) + b"\n")

    problems = [data_utils.describe_problem(line) != "malformed line" for line in lines]
    assert np.flatnonzero(problems).tolist() == bad.tolist()
    for row, line_index in enumerate(rows.lines):
        fields = lines[line_index].split(b"\t")
        assert rows.labels[row] == int(fields[0] or 0)
        assert rows.dense[row].tolist() == [max(int(x or 0), 0) for x in fields[1:14]]
        assert rows.categorical[row].tolist() == [int(x or b"0", 16) for x in fields[14:]]


def test_missing_inputs_name_the_flag_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"--raw-data-file {tmp_path}/train.txt: no such file"):
        data_utils.prepare(make_args(tmp_path / "train.txt"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=f"--raw-data-file {tmp_path}/folder: not a regular file"):
        data_utils.prepare(make_args(tmp_path / "folder"))
    with pytest.raises(DataError, match=f"--raw-data-file {tmp_path}/day: no Terabyte day files"):
        data_utils.prepare(make_args(tmp_path / "day", data_set="terabyte"))
    with pytest.raises(DataError, match=f"--processed-data-file {tmp_path}/p.npz: no such file"):
        data_utils.prepare(make_args(processed_data_file=tmp_path / "p.npz"))


@pytest.mark.parametrize("flags", [{}, {"memory_map": True}, {"mlperf_bin_loader": True}])
def test_missing_raw_data_leaves_no_record_of_flags_behind(tmp_path: Path, flags: dict) -> None:
    for data_set, raw in (("kaggle", "train.txt"), ("terabyte", "day")):
        with pytest.raises(DataError, match=f"--raw-data-file {tmp_path}/{raw}: no"):
            data_utils.prepare(make_args(tmp_path / raw, data_set=data_set, **flags))
    assert [path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock")] == []


def test_a_processed_file_that_is_the_raw_data_is_refused(tmp_path: Path) -> None:
    """Read as a processed file, the raw text is 'damaged; delete it to make it again': the advice would lose it."""
    raw = write_kaggle(tmp_path, 100)
    (tmp_path / "link.npz").symlink_to(raw)
    for processed in (raw, tmp_path / "link.npz"):
        with pytest.raises(DataError, match=f"^--processed-data-file {processed}: is the --raw-data-file; name a"):
            data_utils.prepare(make_args(raw, processed_data_file=processed))
    assert not list(tmp_path.glob("*_processed.npz"))


def test_terabyte_days_must_run_without_a_gap_and_be_two_at_least(tmp_path: Path) -> None:
    prefix = write_terabyte(tmp_path, days=5, rows_per_day=20)
    (tmp_path / "day_1").unlink()
    (tmp_path / "day_3").unlink()
    (tmp_path / "day_01").write_text("not a day: day_1 is written without a leading 0")
    args = make_args(prefix, data_set="terabyte")
    with pytest.raises(DataError, match=f"^--raw-data-file {prefix}: day_1, day_3 missing"):
        data_utils.prepare(args)
    for day in (2, 4):
        (tmp_path / f"day_{day}").unlink()
    with pytest.raises(DataError, match=f"^--raw-data-file {prefix}: only day_0; training needs a day more"):
        data_utils.prepare(args)
    assert not list(tmp_path.glob("*.npz"))


def gzip_in_place(path: Path, name: str) -> Path:
    """The file gzip-compressed, under the given name (in its folder); the text file is gone."""
    compressed = path.with_name(name)
    compressed.write_bytes(gzip.compress(path.read_bytes()))
    if compressed != path:
        path.unlink()
    return compressed


def test_gzip_compressed_raw_data_is_refused_before_any_work(tmp_path: Path) -> None:
    kaggle = gzip_in_place(write_kaggle(tmp_path, 100), "train.txt.gz")
    refused = f"{kaggle}: is gzip-compressed; decompress it first (gunzip -k {kaggle}, and name {tmp_path}/train.txt)"
    with pytest.raises(DataError, match=f"^{re.escape(refused)}$"):
        data_utils.prepare(make_args(kaggle))
    prefix = write_terabyte(tmp_path, days=3, rows_per_day=20)
    day_2 = gzip_in_place(tmp_path / "day_2", "day_2")  # compressed, under the name of a text file
    with pytest.raises(DataError, match=f"^{day_2}: is gzip-compressed; decompress it first \\(gunzip -c, or tar"):
        data_utils.prepare(make_args(prefix, data_set="terabyte"))
    raw_files = sorted(path.name for path in tmp_path.iterdir() if not path.name.endswith(".lock"))
    assert raw_files == ["day_0", "day_1", "day_2", "train.txt.gz"]
    for day in range(3):  # as Criteo distributes them
        gzip_in_place(tmp_path / f"day_{day}", f"day_{day}.gz")
    as_distributed = f"({prefix}_0 does not exist; decompress the .gz days first: gunzip -k {prefix}_*.gz)"
    with pytest.raises(DataError, match=f"no Terabyte day files {re.escape(as_distributed)}$"):
        data_utils.prepare(make_args(prefix, data_set="terabyte"))


def test_no_rows_to_train_on(tmp_path: Path) -> None:
    raw = tmp_path / "train.txt"
    raw.write_text("1\t2\n" * 30)
    with pytest.raises(DataError, match=rf"^{raw}: no rows to train on \(.*rows a day: 0, 0, 0, 0, 0, 0, 0\)$"):
        data_utils.prepare(make_args(raw, skip_bad_lines=True))
    prefix = write_terabyte(tmp_path, days=2, rows_per_day=20)
    (tmp_path / "day_0").write_text("")
    with pytest.raises(DataError, match=rf"^{prefix}: no rows to train on \(.*rows a day: 0, 20\)$"):
        data_utils.prepare(make_args(prefix, data_set="terabyte", memory_map=True))


def test_a_feature_counted_empty_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    arrays = write_upstream_processed(path, 70)
    arrays["counts"][4] = 0
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=f"^{path}: no values counted for C5; delete it"):
        data_utils.prepare(make_args(processed_data_file=path))


def test_a_broken_processed_file_names_the_file_and_the_array(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    arrays = write_upstream_processed(path, 70)
    with open(path, "wb") as out:
        np.savez(out, **{name: values for name, values in arrays.items() if name != "counts"})
    with pytest.raises(DataError, match=f"{path}: no array counts"):
        data_utils.prepare(make_args(processed_data_file=path))
    with open(path, "wb") as out:
        np.savez(out, **{**arrays, "X_cat": arrays["X_cat"][:, :25]})
    with pytest.raises(DataError, match=rf"{path}: array X_cat has shape \(70, 25\), expected \(70, 26\)"):
        data_utils.prepare(make_args(processed_data_file=path))
    path.write_text("not a zip file")
    unreadable = rf"^{path}: damaged \(not a readable npz file: .*\); {data_utils.REMAKE}$"
    with pytest.raises(DataError, match=unreadable):
        data_utils.prepare(make_args(processed_data_file=path))


# ---------------------------------------------------------------------------------------------------------
# Failing workers, damaged files
# ---------------------------------------------------------------------------------------------------------

CHUNK_VOCABULARY, CHUNK_ROWS = data_utils._chunk_vocabulary, data_utils._chunk_rows


def killed_at_the_second_chunk(options: data_utils.ParseOptions, chunk: data_utils.Chunk) -> object:
    if chunk.start > 0:
        os.kill(os.getpid(), signal.SIGKILL)  # as the out-of-memory killer does
    return CHUNK_VOCABULARY(options, chunk)


def exits_at_the_second_chunk(options: data_utils.ParseOptions, chunk: data_utils.Chunk) -> object:
    if chunk.start > 0:
        os._exit(1)
    return CHUNK_ROWS(options, chunk)


@pytest.mark.parametrize(
    "task, dying", [("_chunk_vocabulary", killed_at_the_second_chunk), ("_chunk_rows", exits_at_the_second_chunk)]
)
def test_a_worker_that_dies_stops_the_run_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, dying: object
) -> None:
    args = make_args(write_kaggle(tmp_path, 700))
    monkeypatch.setattr(data_utils, task, dying)  # the workers are forked: they run it too
    with pytest.raises(DataError, match=r"^a preprocessing worker process died \(killed, perhaps for lack of memory\)"):
        data_utils.prepare(args)
    assert not list(tmp_path.glob("*_processed.npz")) and not temporary_files(tmp_path)


SLOW_PREPARE = """
import argparse, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a shell's background job ignores it
sys.path.insert(0, {root!r})
import data_utils
chunk_vocabulary = data_utils._chunk_vocabulary

def slow(options, chunk):
    if chunk.start == 0:
        open({started!r}, "w").close()
        time.sleep({first_chunk_s})
    time.sleep(0.5)
    return chunk_vocabulary(options, chunk)

data_utils._chunk_vocabulary = slow
data_utils.CHUNK_BYTES = 20_000
try:
    data_utils.prepare(argparse.Namespace(**{args!r}))
except KeyboardInterrupt:
    sys.exit("Interrupted.")
"""


def start_slow_prepare(tmp_path: Path, first_chunk_s: float) -> subprocess.Popen:
    """Preprocessing in a process group of its own, each chunk slowed; once the first chunk's worker has begun,
    the file ``started`` exists."""
    args = vars(make_args(write_kaggle(tmp_path, 2000)))
    started = str(tmp_path / "started")
    script = SLOW_PREPARE.format(root=str(ROOT), started=started, first_chunk_s=first_chunk_s, args=args)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def test_ctrl_c_stops_preprocessing_at_once_without_a_worker_traceback(tmp_path: Path) -> None:
    run = start_slow_prepare(tmp_path, first_chunk_s=60)  # the first chunk takes a minute, as a long merge might
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # the other worker reads on meanwhile
        os.killpg(run.pid, signal.SIGINT)  # as Ctrl-C at a terminal: every process of the group
        _, stderr = run.communicate(timeout=20)
    finally:
        if live_processes_in_group(run.pid):
            os.killpg(run.pid, signal.SIGKILL)
    assert "Traceback" not in stderr and stderr.endswith("Interrupted.\n"), stderr
    assert run.returncode == 1 and not live_processes_in_group(run.pid)


def test_workers_leave_when_their_run_is_killed_outright(tmp_path: Path) -> None:
    run = start_slow_prepare(tmp_path, first_chunk_s=0)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 30
        while len(workers) < 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
            workers = {pid for pid, (parent, _) in live_processes().items() if parent == run.pid}
        assert len(workers) >= 2, "the workers did not start"
        run.kill()  # as kill -9 or the out-of-memory killer would
        run.wait()
        deadline = time.monotonic() + 5
        while workers & live_processes().keys() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not workers & live_processes().keys()
    finally:
        run.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_damaged_lookup_stops_the_second_pass_with_one_line(tmp_path: Path) -> None:
    raw = write_kaggle(tmp_path, 700)
    data_utils.prepare(make_args(raw))
    (tmp_path / "train_day_6_processed.npz").unlink()
    (tmp_path / "kaggleAdDisplayChallenge_processed.npz").unlink()
    (tmp_path / "train_fea_lookup_3.npz").write_bytes(b"damaged")

    lookup = tmp_path / "train_fea_lookup_3.npz"
    with pytest.raises(DataError, match=rf"could not start: {lookup}: damaged .*; {data_utils.REMAKE}$"):
        data_utils.prepare(make_args(raw))


def test_an_unreadable_raw_file_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = write_kaggle(tmp_path, 700)

    def unreadable(chunk: data_utils.Chunk, _: data_utils.ParseOptions) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", chunk.path)

    monkeypatch.setattr(data_utils, "_read_chunk", unreadable)  # the workers are forked: they have it too
    with pytest.raises(DataError, match=f"^{raw}: Permission denied$"):
        data_utils.prepare(make_args(raw))


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), PermissionError(errno.EACCES, "Permission denied", "f.npz")],
)
def test_a_failing_write_names_the_folder_or_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError
) -> None:
    raw = write_kaggle(tmp_path, 700)

    def fails(*_: object) -> None:
        raise error

    monkeypatch.setattr(data_utils.DayWriter, "append", fails)
    with pytest.raises(DataError, match=f"^{error.filename or tmp_path}: {error.strerror}$"):
        data_utils.prepare(make_args(raw))
    assert not list(tmp_path.glob("*_processed.npz")) and not temporary_files(tmp_path)


@pytest.mark.parametrize(
    ("temporary", "final"),
    [
        (".kaggleAdDisplayChallenge_processed.npz.4321.tmp", "kaggleAdDisplayChallenge_processed.npz"),
        (".train_day_0_processed.npz.4321.k9_x2abc/X_int", "train_day_0_processed.npz"),
    ],
)
def test_a_failing_write_to_a_temporary_file_names_the_file_it_was_to_be(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, temporary: str, final: str
) -> None:
    raw = write_kaggle(tmp_path, 700)

    def fails(*_: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / temporary))

    monkeypatch.setattr(data_utils.DayWriter, "append", fails)
    with pytest.raises(DataError, match=f"^{tmp_path / final}: Permission denied$"):
        data_utils.prepare(make_args(raw))


def test_a_bad_crc_in_the_processed_file_names_it(tmp_path: Path) -> None:
    args = make_args(write_kaggle(tmp_path, 700))
    path = data_utils.prepare(args).concatenated
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("X_cat.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200] ^= 1  # inside the array, past the local header and the .npy header
    path.write_bytes(bytes(data))

    with pytest.raises(DataError, match=rf"^{path}: damaged \(Bad CRC-32 for file 'X_cat.npy'\); delete it to make"):
        data_utils.criteo_datasets(args, data_utils.prepare(args))


@pytest.mark.parametrize("memory_map", [True, False])
def test_an_array_cut_short_is_refused(tmp_path: Path, memory_map: bool) -> None:
    """Mapping reads no CRC; an array that its member does not hold whole would be read from the next member.
    Concatenating the day files reads them a block at a time, and says the same."""
    raw = write_kaggle(tmp_path, 700)
    data_utils.prepare(make_args(raw, memory_map=True))
    args = make_args(raw, memory_map=memory_map)
    path = tmp_path / "train_day_2_processed.npz"
    arrays = load(path)
    with zipfile.ZipFile(path, "w") as archive:
        for name, values in arrays.items():  # X_int's member holds a value less than its header says
            with archive.open(f"{name}.npy", "w") as out:
                np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(values))
                out.write(values.tobytes()[: -4 if name == "X_int" else None])

    with pytest.raises(DataError, match=rf"^{path}: damaged \(array X_int is cut short\); {data_utils.REMAKE}"):
        data_utils.prepare(args)


SPOILT_VALUES = {  # (array, column, value): what the error says
    "label": ("y", None, 2, "label 2 is not 0 or 1"),
    "negative integer": ("X_int", 2, -5, "integer feature -5 is below 0"),  # log(x + 1) of it: not finite
}


@pytest.mark.parametrize("loading", ["in memory", "memory-mapped", "bin"])
@pytest.mark.parametrize("spoil", SPOILT_VALUES)
def test_a_label_or_integer_feature_out_of_range_in_processed_files_is_refused(
    tmp_path: Path, loading: str, spoil: str
) -> None:
    name, column, value, problem = SPOILT_VALUES[spoil]
    at = np.s_[123] if column is None else np.s_[123, column]
    raw = tmp_path / "train.txt"
    if loading == "in memory":
        args = make_args(processed_data_file=tmp_path / "p.npz")
        arrays = write_upstream_processed(args.processed_data_file, 700)
        arrays[name][at] = value
        np.savez(args.processed_data_file, **arrays)
        spoilt = args.processed_data_file
    elif loading == "memory-mapped":
        args = make_args(raw, memory_map=True)
        write_upstream_days(raw, [200] * 7)
        spoilt = tmp_path / "train_day_2_processed.npz"
        arrays = load(spoilt)
        arrays[name][at] = value
        np.savez(spoilt, **arrays)
    else:
        args = make_args(write_kaggle(tmp_path, 700), mlperf_bin_loader=True)
        spoilt = data_utils.prepare(args).bin_files["train"]
        records = np.fromfile(spoilt, np.int32).reshape(-1, 40)
        records[223, 0 if column is None else 1 + column] = value
        records.tofile(spoilt)

    with pytest.raises(DataError, match=f"^{spoilt}: {problem}; {data_utils.REMAKE}$"):
        all_rows(data_utils.criteo_datasets(args, data_utils.prepare(args))[0])  # read at once, or batch by batch


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e39])
def test_an_integer_feature_not_finite_as_float32_is_refused(tmp_path: Path, value: float) -> None:
    """Stored as floats, an integer feature that is NaN or overflows float32 would make log(x + 1) not finite: the run
    stopped at 'scores not finite', blaming --learning-rate (inf), or said 'nan is below 0'."""
    path = tmp_path / "p.npz"
    arrays = write_upstream_processed(path, 700)
    arrays["X_int"] = arrays["X_int"].astype(np.float64)
    arrays["X_int"][123, 2] = value
    np.savez(path, **arrays)
    args = make_args(processed_data_file=path)
    with pytest.raises(DataError, match=re.escape(f"{path}: integer feature {value} is not finite in float32; ")):
        data_utils.criteo_datasets(args, data_utils.prepare(args))


def test_ids_past_int32_in_the_originals_file_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.npz"
    arrays = write_upstream_processed(path, 700)
    arrays["X_cat"][5, 3] = 2**32 + 1  # would wrap around to 1
    np.savez(path, **arrays)
    args = make_args(processed_data_file=path)
    with pytest.raises(DataError, match=rf"^{path}: X_cat holds id 4294967297, outside \[0, 2\*\*31\)"):
        data_utils.criteo_datasets(args, data_utils.prepare(args))


@pytest.mark.parametrize("memory_map", [False, True])
@pytest.mark.parametrize("name", ["X_int", "X_cat", "y"])
def test_a_processed_array_of_text_is_refused(tmp_path: Path, name: str, memory_map: bool) -> None:
    """An array saved as strings (not numbers) stops with one line, not a traceback from numpy's min()."""
    raw = tmp_path / "train.txt"
    if memory_map:
        args = make_args(raw, memory_map=True)
        write_upstream_days(raw, [100] * 7)
        spoilt = tmp_path / "train_day_0_processed.npz"
        arrays = load(spoilt)
    else:
        args = make_args(processed_data_file=tmp_path / "p.npz")
        spoilt = args.processed_data_file
        arrays = write_upstream_processed(spoilt, 700)
    np.savez(spoilt, **{**arrays, name: arrays[name].astype(str)})
    with pytest.raises(DataError, match=rf"^{spoilt}: array {name} holds <U\d+, not numbers; {data_utils.REMAKE}$"):
        all_rows(data_utils.criteo_datasets(args, data_utils.prepare(args))[0])


def test_a_bin_file_cut_short_is_refused(tmp_path: Path) -> None:
    args = make_args(write_kaggle(tmp_path, 700), mlperf_bin_loader=True)
    path = data_utils.prepare(args).bin_files["train"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 160)  # a whole record less
    with pytest.raises(DataError, match=f"^{path}: 95840 bytes, expected 96000 \\(600 rows\\); delete it to make"):
        data_utils.prepare(args)


# ---------------------------------------------------------------------------------------------------------
# The test data itself
# ---------------------------------------------------------------------------------------------------------


def test_the_test_data_carries_a_learnable_signal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Click rates of (C1, C2, I1 > 2) learnt on the training days rank the last day's rows with AUC >= 0.75."""
    monkeypatch.undo()  # the usual chunk sizes: the small ones took 30 s on these 14,000 lines
    args = make_args(write_kaggle(tmp_path, 14_000))
    arrays = load(data_utils.prepare(args).concatenated)
    keys = arrays["X_cat"][:, 0] * 100 + arrays["X_cat"][:, 1] * 2 + (arrays["X_int"][:, 0] > 2)
    train, test = slice(0, 12_000), slice(12_000, None)
    clicks = np.bincount(keys[train], weights=arrays["y"][train], minlength=keys.max() + 1)
    seen = np.bincount(keys[train], minlength=keys.max() + 1)
    scores = ((clicks + 1) / (seen + 2))[keys[test]]
    labels = arrays["y"][test]
    ranks = np.argsort(np.argsort(scores + 1e-9 * np.random.default_rng(0).random(len(scores)))) + 1
    positives = labels.sum()
    auc = (ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * (len(labels) - positives))
    assert auc >= 0.75


def test_atomic_write_removes_its_temporary_file_when_the_rename_fails(tmp_path: Path) -> None:
    target = tmp_path / "m.pt"
    (target / "inside").mkdir(parents=True)  # a folder that is not empty: the rename over it fails
    with pytest.raises(OSError), data_utils.atomic_write(target) as temporary:
        temporary.write_bytes(b"checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
