"""Criteo Kaggle / Terabyte data for DLRM: raw text to processed files, processed files to batches.

Raw data is one sample per line, tab-separated: a label, 13 integer features (I1..I13) and 26 categorical
features (C1..C26, hexadecimal hashes); any field may be empty, which reads as 0. Kaggle is one ``train.txt``
cut into 7 days by line count; Terabyte is ``day_0``, ``day_1``, ... as many as exist.

``prepare`` makes the processed files the flags need, in the original script's layout (per-day
``<prefix>_<i>_processed.npz``, ``<stem>_fea_count.npz``, ``<stem>_fea_dict_<j>.npz``, ``<stem>_day_count.npz``
and the concatenated ``--processed-data-file``), so that files made by either implementation serve both. A
category's id is its position in order of first appearance (days in order, lines in order). The raw text is
streamed twice through a pool of processes, a chunk at a time: pass 1 learns each feature's vocabulary, pass 2
writes each day's ids; memory stays bounded however many distinct values the data holds (vocabularies go to disk
in runs, merged there). Both passes save each day atomically, so an interrupted run resumes at the first day it
had not finished. ``criteo_datasets`` then serves whole batches: item ``i`` is batch ``i``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import glob
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

DENSE_FEATURES = 13
SPARSE_FEATURES = 26
FIELDS = 1 + DENSE_FEATURES + SPARSE_FEATURES
FIELD_NAMES = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
BIN_RECORD_BYTES = 4 * FIELDS  # a row of a .bin file: one int32 a field
KAGGLE_DAYS = 7
TERABYTE_DAYS = 24
CHUNK_BYTES = 8 << 20  # raw text handed to a worker at a time
BLOCK_ROWS = 1 << 18  # rows copied at a time between processed files
PENDING_VALUES = 1 << 22  # a vocabulary numbers its pending values once it holds at least this many
RUN_VALUES = 1 << 23  # distinct values (all features together) pass 1 holds in memory before it saves a run
MERGE_VALUES = 1 << 22  # values a merge of runs holds in memory at a time
PROCESSES = 8  # at most this many worker processes preprocess (one per core up to that): memory grows with them
MERGE_PROCESSES = 2  # processes that merge runs at the same time (each holds up to a run of one feature)
LOOKUP_RESIDENT_BYTES = 1 << 29  # pass 2 keeps lookups up to this size mapped; larger ones only while in use
MAPPED_BYTES = 1 << 27  # what a lookup that is not kept mapped may map at a time
FAULT_AROUND_BYTES = 64 << 10  # the kernel maps up to this much around each page of a file read through a map
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of every gzip file
TEMPORARY_NAME = r"\.(?P<final>{final})\.(?P<pid>[0-9]+)\.[^.]+"  # what a process writes before the final file
# The most bytes a temporary name adds to its file's: a pid of 7 digits (Linux's limit is 2**22) and tempfile's
# 8 random characters, as the ONNX export's folder has them.
TEMPORARY_NAME_EXTRA = len("..4194304.") + 8

Batch = tuple[Tensor, list[Tensor], list[Tensor], Tensor]


class DataError(Exception):
    """Bad input data or files; the message is one line naming the file (and line) and what is wrong."""


REMAKE = "delete it to make it again from the raw data"  # the advice for a processed file that cannot be used
RAW_DATA_CHANGED = "the raw data changed since; delete the processed files to start over"


# ---------------------------------------------------------------------------------------------------------
# Where the files are
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriteoFiles:
    """The original script's file names for a raw data set and its processed forms."""

    data_set: str
    raw: Path | None  # Kaggle: the train.txt file; Terabyte: the prefix of day_0, day_1, ...
    processed: Path  # the concatenated processed file

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CriteoFiles:
        if args.data_set not in ("kaggle", "terabyte"):
            raise DataError(f"--data-set {args.data_set}: must be kaggle or terabyte")
        raw = Path(args.raw_data_file) if args.raw_data_file else None
        if args.processed_data_file:
            processed = Path(args.processed_data_file)
        elif raw is not None:
            default = "kaggleAdDisplayChallenge_processed" if args.data_set == "kaggle" else "terabyte_processed"
            processed = raw.parent / f"{default}.npz"
        else:
            raise DataError("--raw-data-file or --processed-data-file: one of them must name the data")
        if raw is not None and processed.resolve() == raw.resolve():  # its 'damaged, delete it' would be the raw data
            raise DataError(f"--processed-data-file {processed}: is the --raw-data-file; name a file of its own")
        files = cls(args.data_set, raw, processed)
        if raw is not None:
            files._check_records_apart()
        return files

    def _check_records_apart(self) -> None:
        """The day files' record of flags must be theirs alone (``train.npz`` beside ``train.txt`` would share it):
        making the other files rewrites it, and day files made with other flags would pass for made with these."""
        days = self.record(self.stem).resolve()
        for made in (self.processed, self.bin_file("train")):
            if self.record(made).resolve() == days:
                raise DataError(
                    f"--processed-data-file {self.processed}: {made.name} would record its flags in {days.name}, "
                    "where the day files beside the raw data keep theirs; give it another name"
                )

    @property
    def stem(self) -> Path:
        """Prefix of the counts and dictionaries: ``<dir>/train`` for Kaggle, ``<dir>/day`` for Terabyte."""
        raw = self.require_raw("the processed files")
        return raw.parent / raw.name.split(".")[0] if self.data_set == "kaggle" else raw

    def day_file(self, day: int) -> Path:
        prefix = f"{self.stem}_day" if self.data_set == "kaggle" else str(self.stem)
        return Path(f"{prefix}_{day}_processed.npz")

    def day_progress_file(self, day: int) -> Path:
        """Pass 1's record of a finished day: its rows and how many runs it saved."""
        return Path(str(self.day_file(day)).replace("_processed.npz", "_runs.npz"))

    def run_file(self, day: int, run: int) -> Path:
        """A run of pass 1: the distinct values of a stretch of the day's lines."""
        return Path(str(self.day_file(day)).replace("_processed.npz", f"_run_{run}.npz"))

    def pass_1_files(self, day: int) -> list[Path]:
        """The day's progress file and runs, however many there are (all removed once pass 1 is done)."""
        return list(self.day_file(day).parent.glob(self.day_file(day).name.replace("_processed.npz", "_run*.npz")))

    @property
    def days_lock(self) -> Path:
        """Held while the day files, counts and dictionaries beside the raw data are made or checked."""
        return self.stem.parent / f".{self.stem.name}_days.lock"

    @property
    def merge_directory(self) -> Path:
        """Where the merges of pass 1 work (removed before and after)."""
        return self.stem.parent / f".{self.stem.name}_merge"

    @property
    def counts_file(self) -> Path:
        return Path(f"{self.stem}_fea_count.npz")

    @property
    def day_count_file(self) -> Path:
        return Path(f"{self.stem}_day_count.npz")

    def dictionary_file(self, feature: int) -> Path:
        return Path(f"{self.stem}_fea_dict_{feature}.npz")

    def lookup_file(self, feature: int) -> Path:
        """Ours only: the feature's values sorted, with their ids, for pass 2."""
        return Path(f"{self.stem}_fea_lookup_{feature}.npz")

    def bin_file(self, split: str) -> Path:
        return self.processed.with_name(f"{self.processed.name.split('.')[0]}_{split}.bin")

    def bin_files(self) -> dict[str, Path]:
        """The ``--mlperf-bin-loader`` files, by split."""
        return {split: self.bin_file(split) for split in ("train", "test", "val")}

    def day_outputs(self) -> list[Path]:
        """What preprocessing has left beside the raw data so far: counts, dictionaries, days, pass 1's runs."""
        return sorted(self.stem.parent.glob(f"{glob.escape(self.stem.name)}_*.npz"))

    @staticmethod
    def record(made: Path) -> Path:
        """Ours only: beside a processed file (for the day files: beside the stem), the flags it was made with. Named
        after all of the name but its suffix: ``c.full.npz`` and ``c.m100.npz`` must not share one."""
        return made.with_name(f"{Path(made.name).stem}_made_with.json")

    def kept_files(self) -> list[Path]:
        """The files of the data set that an output must not replace: the raw text, the processed files and the
        records beside them (for Terabyte, the days whose raw files exist)."""
        bins = self.bin_files()
        files = [self.processed, self.record(self.processed), *bins.values(), self.record(bins["train"])]
        if self.raw is None:
            return files
        if self.data_set == "terabyte":
            raw_days = [Path(f"{self.raw}_{day}") for day in sorted(_terabyte_day_numbers(self.raw))]
        else:
            raw_days = [self.raw] * KAGGLE_DAYS
        per_day = [[raw, self.day_file(day), self.day_progress_file(day)] for day, raw in enumerate(raw_days)]
        per_feature = [[self.dictionary_file(j), self.lookup_file(j)] for j in range(SPARSE_FEATURES)]
        shared = [self.counts_file, self.day_count_file, self.record(self.stem)]
        return [*files, *itertools.chain(*per_day, *per_feature), *shared]

    def require_raw(self, purpose: str) -> Path:
        if self.raw is None:
            raise DataError(f"--raw-data-file: needed to find {purpose} (they sit beside the raw data)")
        return self.raw

    def raw_days(self) -> list[Path]:
        """The raw text files: Kaggle's one file, or Terabyte's day files."""
        raw = self.require_raw("the raw data")
        if self.data_set == "terabyte":
            raw_days = _terabyte_days(raw)
        elif raw.is_file():
            raw_days = [raw]
        else:
            raise DataError(f"--raw-data-file {raw}: {'not a regular file' if raw.exists() else 'no such file'}")
        for path in raw_days:
            _refuse_compressed(path)
        return raw_days


def _refuse_compressed(path: Path) -> None:
    """Gzip-compressed text (Criteo Terabyte comes as day_N.gz) is refused before any work: parsed, it is bad lines."""
    with open(path, "rb") as f:
        if f.read(len(GZIP_MAGIC)) == GZIP_MAGIC:
            raise DataError(f"{path}: is gzip-compressed; decompress it first ({_decompress_command(path)})")


def _decompress_command(path: Path) -> str:
    """How to decompress ``path``: gunzip takes only names ending in .gz, and Kaggle's dac.tar.gz is an archive."""
    if path.suffix == ".gz" and path.suffixes[-2:] != [".tar", ".gz"]:
        return f"gunzip -k {path}, and name {path.with_suffix('')}"
    return "gunzip -c, or tar -xzf for an archive such as Kaggle's dac.tar.gz"


def _terabyte_day_numbers(prefix: Path) -> set[int]:
    """The numbers of the raw day files ``<prefix>_0``, ``<prefix>_1``, ... that exist."""
    day_name = re.compile(rf"{re.escape(prefix.name)}_(0|[1-9][0-9]*)")
    candidates = prefix.parent.glob(f"{glob.escape(prefix.name)}_*")
    return {int(match[1]) for path in candidates if (match := day_name.fullmatch(path.name)) and path.is_file()}


def _terabyte_days(prefix: Path) -> list[Path]:
    """``day_0`` .. ``day_{k-1}``: none missing, and at least two (the last one is the test day)."""
    found = _terabyte_day_numbers(prefix)
    if not found:
        hint = f"; decompress the .gz days first: gunzip -k {prefix}_*.gz" if Path(f"{prefix}_0.gz").is_file() else ""
        raise DataError(f"--raw-data-file {prefix}: no Terabyte day files ({prefix}_0 does not exist{hint})")
    missing = ", ".join(f"{prefix.name}_{day}" for day in range(max(found)) if day not in found)
    if missing:
        raise DataError(
            f"--raw-data-file {prefix}: {missing} missing (the days run from {prefix.name}_0 without a gap)"
        )
    if len(found) < 2:
        raise DataError(
            f"--raw-data-file {prefix}: only {prefix.name}_0; training needs a day more (the last one tests)"
        )
    return [Path(f"{prefix}_{day}") for day in range(len(found))]


@dataclass(frozen=True)
class Processed:
    """What ``prepare`` made: the datasets read the concatenated file, the day files, or the bin files."""

    counts: list[int]  # distinct values of each categorical feature (before --max-ind-range caps them)
    rows_per_day: list[int]
    concatenated: Path | None = None
    day_files: list[Path] = field(default_factory=list)
    bin_files: dict[str, Path] = field(default_factory=dict)  # train, test, val


# ---------------------------------------------------------------------------------------------------------
# prepare: make whatever processed files the flags need
# ---------------------------------------------------------------------------------------------------------


def shaping_flags(args: argparse.Namespace, bins: bool = False) -> dict[str, object]:
    """The flags that decide what processed files hold, as the command line spells them (bins: also their order)."""
    flags: dict[str, object] = {
        "--max-ind-range": args.max_ind_range,
        "--data-sub-sample-rate": args.data_sub_sample_rate,
    }
    if bins:
        flags["--data-randomize"] = args.data_randomize
    if args.data_sub_sample_rate > 0 or (bins and args.data_randomize != "none"):
        flags["--numpy-rand-seed"] = args.numpy_rand_seed
    return flags


def _made_with(record: Path, flags: dict[str, object], made: list[Path], what: str) -> None:
    """Stop if the processed files in ``made`` that exist were made with other ``flags`` than this run's (as far
    as their record says: files from the original script, or from before records, have none). With none made
    yet, record ``flags`` for the files about to be made."""
    if not any(path.exists() for path in made):
        record.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(record) as temp:
            temp.write_text(json.dumps(flags) + "\n")
        return
    if not record.exists():
        return
    try:
        saved = json.loads(record.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise DataError(f"{record}: not a record of flags; delete it to use the processed files as they are")
    for flag in {**saved, **flags}:
        if saved.get(flag) != flags.get(flag):
            asked = f"{flag} {flags[flag]}" if flag in flags else f"no {flag}"
            raise DataError(f"{asked}: {what} made with {flag} {saved.get(flag)} (delete to make again)")


def prepare(args: argparse.Namespace) -> Processed:
    """Make sure processed data exists for the flags (preprocess the raw data when needed), return its description.

    Without --memory-map the concatenated ``--processed-data-file`` is read into memory; with it, the per-day
    files are memory-mapped; --mlperf-bin-loader reads int32 ``.bin`` files made from the day files.
    """
    files = CriteoFiles.from_args(args)
    try:
        with _one_process_at_a_time(files.processed.with_name(f".{files.processed.name}.lock")):
            _remove_leftovers(files.processed.parent, files.processed.name.split(".")[0])
            if args.mlperf_bin_loader:
                processed = _prepare_bins(args, files)
            elif args.memory_map:
                processed = _prepare_days(args, files, mappable=True)
            else:
                processed = _prepare_concatenated(args, files)
    except OSError as error:  # a read-only folder, an unreadable file, a full disk
        where = _final_name(error.filename, files) if error.filename else (files.raw or files.processed).parent
        raise DataError(f"{where}: {error.strerror or error}") from None
    _check_trainable(processed, files)
    return processed


def _check_trainable(processed: Processed, files: CriteoFiles) -> None:
    """Rows to train on (every day but the last), and values in every feature (a table of no rows divides by 0)."""
    if not sum(processed.rows_per_day[:-1]):
        days = ", ".join(map(str, processed.rows_per_day))
        raise DataError(
            f"{files.raw or files.processed}: no rows to train on (every day but the last; rows a day: {days})"
        )
    empty = [f"C{j + 1}" for j, count in enumerate(processed.counts) if count <= 0]
    if empty:
        counted_in = files.processed if processed.concatenated else files.counts_file
        raise DataError(f"{counted_in}: no values counted for {', '.join(empty)}; {REMAKE}")


@contextlib.contextmanager
def _one_process_at_a_time(lock: Path) -> Iterator[None]:
    """Ranks started by torchrun or mpirun all call ``prepare``: the first preprocesses, the others then read. Runs
    that name other processed files of the same raw data share its day files: they make those one at a time too."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a")  # noqa: SIM115 (held for the block)
    except OSError:  # read-only data: nothing will be written there either
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _prepare_concatenated(args: argparse.Namespace, files: CriteoFiles) -> Processed:
    if not files.processed.exists() and files.raw is None:
        raise DataError(f"--processed-data-file {files.processed}: no such file, and no --raw-data-file")
    # the day files first: the raw data may be missing, which is better found before a record of flags is written
    days = None if files.processed.exists() else _prepare_days(args, files, mappable=False)
    _made_with(files.record(files.processed), shaping_flags(args), [files.processed], f"{files.processed} was")
    if days is not None:
        _status(f"Writing {files.processed}")
        _concatenate(days.day_files, days.rows_per_day, days.counts, files.processed)
    total = _check_concatenated(files.processed)
    counts = _load_integers(files.processed, "counts", (SPARSE_FEATURES,))
    return Processed(counts, _rows_per_day(files, total), concatenated=files.processed)


def _rows_per_day(files: CriteoFiles, total: int) -> list[int]:
    """Rows of each day in the concatenated file: the day count file beside the raw data, else an even split."""
    if files.raw is not None and files.day_count_file.exists():
        rows_per_day = _load_day_counts(files)
        if sum(rows_per_day) != total:
            raise DataError(f"{files.day_count_file}: counts {sum(rows_per_day)} rows, {files.processed} holds {total}")
        return rows_per_day
    days = KAGGLE_DAYS if files.data_set == "kaggle" else TERABYTE_DAYS
    _status(f"No day counts beside the raw data: {files.processed}'s {total} rows are split evenly into {days} days")
    return _even_split(total, days)


def _even_split(total: int, days: int) -> list[int]:
    """How the original cut Kaggle's lines into days: equal parts, the first ``total % days`` one longer."""
    base, extra = divmod(total, days)
    return [base + (day < extra) for day in range(days)]


def _prepare_days(args: argparse.Namespace, files: CriteoFiles, mappable: bool) -> Processed:
    with _one_process_at_a_time(files.days_lock):
        return _make_days(args, files, mappable)


def _make_days(args: argparse.Namespace, files: CriteoFiles, mappable: bool) -> Processed:
    _remove_leftovers(files.stem.parent, files.stem.name)
    complete = _days_complete(files)
    if not complete:
        files.raw_days()  # missing raw data is reported before a record of flags is written beside it
    what = f"the processed files beside {files.raw} ({files.stem.name}_*.npz) were"
    _made_with(files.record(files.stem), shaping_flags(args), files.day_outputs(), what)
    if not complete:
        _preprocess(args, files)
    rows_per_day = _load_day_counts(files)
    day_files = [files.day_file(day) for day in range(len(rows_per_day))]
    for path, rows in zip(day_files, rows_per_day, strict=True):
        _check_day(path, rows)
        if mappable or any(fortran for _, _, fortran in _array_headers(path).values()):  # the original's X_cat
            _store_uncompressed(path)
            for name in ("X_int", "X_cat", "y"):
                _array_location(path, name)  # mapping checks no CRC: at least each array must lie whole in its member
    return Processed(_load_counts(files), rows_per_day, day_files=day_files)


def _days_complete(files: CriteoFiles) -> bool:
    if not (files.counts_file.exists() and files.day_count_file.exists()):
        return False
    return all(files.day_file(day).exists() for day in range(len(_load_day_counts(files))))


def _load_day_counts(files: CriteoFiles) -> list[int]:
    return _load_integers(files.day_count_file, "total_per_file", (None,))


def _load_counts(files: CriteoFiles) -> list[int]:
    return _load_integers(files.counts_file, "counts", (SPARSE_FEATURES,))


def _load_integers(path: Path, name: str, shape: tuple[int | None]) -> list[int]:
    """A 1-d array of an npz file, checked to have the shape (None: any length), as Python integers."""
    _check_arrays(path, {name: shape})
    with _reading(path), np.load(path) as data:
        return [int(value) for value in data[name]]


def _prepare_bins(args: argparse.Namespace, files: CriteoFiles) -> Processed:
    bins = files.bin_files()
    # the day files first: the raw data may be missing, which is better found before a record of flags is written
    days = None if all(path.exists() for path in bins.values()) else _prepare_days(args, files, mappable=True)
    what = f"{files.bin_file('*')} were"
    _made_with(files.record(bins["train"]), shaping_flags(args, bins=True), list(bins.values()), what)
    if days is not None:
        # Rows in the order --data-randomize gives from a freshly seeded generator, as the datasets would draw it.
        permutation = np.random.RandomState(args.numpy_rand_seed).permutation
        orders = _split_orders(days.rows_per_day, args.data_randomize, permutation)
        rows = DayRows(days.day_files, days.rows_per_day)
        for path, order in zip(bins.values(), orders, strict=True):
            if not path.exists():
                _status(f"Writing {path}")
                _write_bin(path, rows, order)
    for path in (files.day_count_file, files.counts_file):
        if not path.exists():  # copied bin files without them: they hold the rows per day and the table sizes
            raise DataError(f"{path}: no such file; {files.bin_file('*')} are read with it: put it back, or delete "
                            "them to make them again from the raw data")  # fmt: skip
    rows_per_day = _load_day_counts(files)
    for path, order in zip(bins.values(), _split_orders(rows_per_day, "none", np.arange), strict=True):
        _check_bin(path, len(order))
    return Processed(_load_counts(files), rows_per_day, bin_files=bins)


def _check_bin(path: Path, rows: int) -> None:
    """A bin file cut short (a copy that stopped) must not pass for whole: it would train on fewer rows."""
    size, expected = path.stat().st_size, rows * BIN_RECORD_BYTES
    if size != expected:
        raise DataError(f"{path}: {size} bytes, expected {expected} ({rows} rows); {REMAKE}")


def _write_bin(path: Path, rows: DayRows, order: np.ndarray | range) -> None:
    """Rows as int32 records [label, I1..I13, C1..C26], the original's bin layout."""
    with atomic_write(path) as temp, open(temp, "wb") as out:
        for start in range(0, len(order), BLOCK_ROWS):
            dense, categorical, labels = rows.take(np.asarray(order[start : start + BLOCK_ROWS]))
            out.write(np.column_stack((labels, dense, categorical)).astype(np.int32).tobytes())


def _final_name(filename: str | bytes, files: CriteoFiles) -> Path:
    """The file a user knows for a file an error names: a temporary file in a data folder, or a file in such a
    temporary folder, becomes the file it was to be."""
    path = Path(os.fsdecode(filename))
    made_by = re.compile(TEMPORARY_NAME.format(final=".+"))
    data_folders = {files.processed.parent} | ({files.raw.parent} if files.raw else set())
    for part in (path, path.parent):
        match = made_by.fullmatch(part.name)
        if match and part.parent in data_folders:
            return part.parent / match["final"]
    return path


def _remove_leftovers(folder: Path, prefix: str, final: str | None = None) -> None:
    """Remove the temporary files and folders (``.<prefix>....<pid>.<suffix>``, or of the file named ``final``) that
    runs killed outright left: a day's parts can take gigabytes. Their names never pass for finished files; a running
    process's are kept."""
    made_by = re.compile(TEMPORARY_NAME.format(final=re.escape(final) if final else rf"{re.escape(prefix)}[._].*"))
    for path in folder.glob(f".{glob.escape(prefix)}*"):
        match = made_by.fullmatch(path.name)
        if match and not _running(int(match["pid"])):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def remove_leftovers_of(path: Path) -> None:
    """Remove what runs killed outright while writing ``path`` left beside it: a checkpoint's can take gigabytes."""
    _remove_leftovers(path.parent, path.name, final=path.name)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether it exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _status(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing: raw text -> per-day processed files, counts and dictionaries
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """A stretch of whole lines of one raw file, all in one day."""

    path: str
    start: int  # byte offsets
    stop: int
    first_line: int  # line number of its first line in the file, from 1
    lines: int
    day: int


@dataclass(frozen=True)
class ParseOptions:
    """The flags that decide which lines become rows, and the values they hold."""

    max_ind_range: int
    sub_sample_rate: float
    seed: int
    skip_bad_lines: bool


@dataclass
class BadLines:
    """Lines skipped under --skip-bad-lines: how many in each day, and the first one's problem."""

    per_day: dict[int, int] = field(default_factory=dict)
    first: str = ""

    def record(self, day: int, count: int, problem: str) -> None:
        """A day's count; both passes see the same lines, so a second record of a day replaces the first."""
        self.per_day[day] = count
        if count and not self.first:
            self.first = problem

    def report(self, raw: Path) -> None:
        total = sum(self.per_day.values())
        if total:
            _status(f"--skip-bad-lines: skipped {total} bad line(s) of {raw} (first: {self.first})")


def _preprocess(args: argparse.Namespace, files: CriteoFiles) -> None:
    options = ParseOptions(args.max_ind_range, args.data_sub_sample_rate, args.numpy_rand_seed, args.skip_bad_lines)
    days = _day_chunks(files)
    bad_lines = BadLines()
    workers = min(usable_cores(), PROCESSES)
    if not all(path.exists() for path in _vocabulary_files(files)):
        _learn_vocabularies(files, days, options, workers, bad_lines)
    for path in (path for day in range(len(days)) for path in files.pass_1_files(day)):
        path.unlink()
    rows_per_day = _load_day_counts(files)
    if len(rows_per_day) != len(days):
        raise DataError(
            f"{files.day_count_file}: counts {len(rows_per_day)} days, the raw data has {len(days)}: {RAW_DATA_CHANGED}"
        )
    missing = {day: chunks for day, chunks in enumerate(days) if not files.day_file(day).exists()}
    if missing:
        _make_missing_lookups(files, workers)
        _write_days(files, missing, rows_per_day, options, workers, bad_lines)
    bad_lines.report(files.require_raw("the raw data"))


def usable_cores() -> int:
    """The cores this process may run on: a container or ``taskset`` may allow fewer than the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _vocabulary_files(files: CriteoFiles) -> list[Path]:
    """What pass 1 leaves that the original's preprocessing left too (ours also leaves the lookups)."""
    dictionaries = [files.dictionary_file(j) for j in range(SPARSE_FEATURES)]
    return [files.day_count_file, *dictionaries, files.counts_file]


def _day_chunks(files: CriteoFiles) -> list[list[Chunk]]:
    """Every raw line, as chunks grouped by day."""
    raw_days = files.raw_days()
    if files.data_set == "terabyte":
        return [_file_chunks(path, day) for day, path in enumerate(raw_days)]
    chunks = _file_chunks(raw_days[0], 0)
    total = sum(chunk.lines for chunk in chunks)
    if total == 0:
        raise DataError(f"{raw_days[0]}: no lines")
    day_starts = np.cumsum([0] + _even_split(total, KAGGLE_DAYS))
    days: list[list[Chunk]] = [[] for _ in range(KAGGLE_DAYS)]
    for piece in (piece for chunk in chunks for piece in _cut_at_lines(chunk, day_starts[1:-1])):
        day = int(np.searchsorted(day_starts, piece.first_line - 1, side="right")) - 1
        days[day].append(dataclasses.replace(piece, day=day))
    return days


def _file_chunks(path: Path, day: int) -> list[Chunk]:
    """The file cut into chunks of about CHUNK_BYTES, each ending at a line end."""
    chunks, start, line_number = [], 0, 1
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            block += f.readline()
            lines = block.count(b"\n") + (not block.endswith(b"\n"))
            chunks.append(Chunk(str(path), start, start + len(block), line_number, lines, day))
            start, line_number = start + len(block), line_number + lines
    return chunks


def _cut_at_lines(chunk: Chunk, cuts: Iterable[int]) -> list[Chunk]:
    """The chunk cut before each of the given lines (counted from 0 in the file) that falls inside it."""
    first, end = chunk.first_line - 1, chunk.first_line - 1 + chunk.lines
    inside = [int(cut) for cut in cuts if first < cut < end]
    if not inside:
        return [chunk]
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        line_ends = np.flatnonzero(np.frombuffer(f.read(chunk.stop - chunk.start), np.uint8) == ord("\n"))
    pieces, start = [], chunk.start
    for cut in inside:
        stop = chunk.start + int(line_ends[cut - chunk.first_line]) + 1
        pieces.append(Chunk(chunk.path, start, stop, first + 1, cut - first, chunk.day))
        start, first = stop, cut
    pieces.append(Chunk(chunk.path, start, chunk.stop, first + 1, end - first, chunk.day))
    return pieces


class Progress:
    """Lines done and the rate on stderr: one line rewritten in place on a terminal; elsewhere (a log, a pipe) a
    line every LOG_SECONDS and one at the end."""

    LOG_SECONDS = 30

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.done = label, total, 0
        self.began = self.shown = time.perf_counter()
        self.terminal = sys.stderr.isatty()

    def add(self, lines: int) -> None:
        self.done += lines
        if self.terminal or time.perf_counter() - self.shown >= self.LOG_SECONDS:
            self._show()

    def close(self) -> None:
        self._show()
        if self.terminal:
            print(file=sys.stderr, flush=True)

    def _show(self) -> None:
        self.shown = time.perf_counter()
        rate = self.done / max(self.shown - self.began, 1e-9)
        line = f"{self.label}: {self.done:,}/{self.total:,} lines, {rate:,.0f} lines/s"
        print(f"\r{line}" if self.terminal else line, end="" if self.terminal else "\n", file=sys.stderr, flush=True)


WORKER_DIED = "a preprocessing worker process died (killed, perhaps for lack of memory); run again to resume"
_worker_failure = ""  # in a worker: why its initializer failed, raised by each task it is given


@contextlib.contextmanager
def _worker_pool(workers: int, initializer: Callable | None = None, args: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """Worker processes for ``_in_order``. Unlike ``multiprocessing.Pool``, the executor notices a worker that dies
    (the out-of-memory killer) instead of waiting for its task forever: that stops the run with one line."""
    # fork: the workers start at once, without importing this module again
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("fork"), _start_worker, (initializer, args))
    try:
        yield pool
    except BrokenProcessPool:
        raise DataError(WORKER_DIED) from None
    except BaseException:  # an error, Ctrl-C: stop the running tasks too (a merge can take minutes)
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    # Python 3.14's pool.kill_workers(); before it, the executor holds its processes in _processes.
    for process in list(pool._processes.values()):
        process.kill()


def _start_worker(initializer: Callable | None, args: tuple) -> None:
    global _worker_failure
    # Ctrl-C reaches every process of the terminal's group: the main process alone reports it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    try:
        if initializer is not None:
            initializer(*args)
    except Exception as error:  # its tasks report it: raised here, it would print a traceback and break the pool
        _worker_failure = f"a preprocessing worker process could not start: {first_line(error)}"


def _exit_with(parent: int) -> None:
    """A worker whose main process is killed outright (kill -9) would wait for tasks forever: it leaves too."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _run_task(function: Callable, task: object) -> object:
    if _worker_failure:
        raise DataError(_worker_failure)
    return function(task)


def first_line(error: BaseException) -> str:
    """An error's message in one line, for the one-line errors of this module and the script."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:  # raised in a DataLoader worker
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return (text.splitlines() or [type(error).__name__])[0]


def _in_order(pool: ProcessPoolExecutor, function: Callable, tasks: Iterable, ahead: int) -> Iterator:
    """``function(task)`` for each task, in order; the pool runs at most ``ahead`` tasks ahead of the caller, so
    that results never pile up in memory (``pool.map`` would run through all of them)."""
    running: collections.deque[Future] = collections.deque()
    for task in tasks:
        running.append(pool.submit(_run_task, function, task))
        if len(running) > ahead:
            yield running.popleft().result()
    while running:
        yield running.popleft().result()


# Pass 1: vocabularies ------------------------------------------------------------------------------------
#
# A value's id is its rank in order of first appearance. Pass 1 holds at most about RUN_VALUES distinct values in
# memory: it saves each day's values as runs (a run: the distinct values of consecutive lines, in order of
# appearance), then merges each feature's runs on disk into its dictionary (the values in id order) and its lookup
# (the values sorted, with their ids) for pass 2. So memory stays bounded however many distinct values there are.


class Vocabulary:
    """One categorical feature's distinct values in a run, in order of first appearance."""

    def __init__(self) -> None:
        self.sorted_values = np.empty(0, np.uint32)  # every value taken in, for membership tests
        self.in_order: list[np.ndarray] = []  # the values taken in, in order, one array per intake
        self.pending: list[np.ndarray] = []  # values seen since the last intake, each in order of appearance
        self.pending_size = 0

    def __len__(self) -> int:
        """Values held, counting pending ones (which may repeat)."""
        return self.sorted_values.size + self.pending_size

    def add(self, values: np.ndarray) -> None:
        """Values in order of first appearance, all seen after everything added before."""
        self.pending.append(values)
        self.pending_size += values.size
        if self.pending_size >= max(self.sorted_values.size, PENDING_VALUES):
            self.take_pending()

    def take_pending(self) -> None:
        """Take in the pending values not seen before."""
        distinct, first = np.unique(np.concatenate([np.empty(0, np.uint32), *self.pending]), return_index=True)
        unseen = ~_find(self.sorted_values, distinct)[1]
        new, first = distinct[unseen], first[unseen]
        self.in_order.append(new[np.argsort(first)])
        self.sorted_values = np.insert(self.sorted_values, np.searchsorted(self.sorted_values, new), new)
        self.pending, self.pending_size = [], 0

    def values_in_order(self) -> np.ndarray:
        self.take_pending()
        return np.concatenate([np.empty(0, np.uint32), *self.in_order])


def _first_appearances(values: np.ndarray) -> np.ndarray:
    """The distinct values, in order of first appearance."""
    distinct, first = np.unique(values, return_index=True)
    return distinct[np.argsort(first)]


def _find(sorted_values: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each value's position in ``sorted_values``, and whether it is there (where not, the position is meaningless).
    Fastest with the values sorted too."""
    if not sorted_values.size:
        return np.zeros(values.shape, np.int64), np.zeros(values.shape, bool)
    at = np.minimum(np.searchsorted(sorted_values, values), sorted_values.size - 1)
    return at, sorted_values[at] == values


@dataclass
class ChunkVocabulary:
    """Pass 1's result for a chunk: each feature's values in order of first appearance."""

    values: list[np.ndarray]
    rows: int
    lines: int
    bad_lines: int
    problem: str


def _chunk_vocabulary(options: ParseOptions, chunk: Chunk) -> ChunkVocabulary:
    rows, bad_lines, problem = _read_chunk(chunk, options)
    values = [_first_appearances(column) for column in rows.categorical.T]
    return ChunkVocabulary(values, len(rows.labels), chunk.lines, bad_lines, problem)


def _learn_vocabularies(
    files: CriteoFiles, days: list[list[Chunk]], options: ParseOptions, workers: int, bad_lines: BadLines
) -> None:
    """Pass 1: save each day's runs, then merge them into every feature's dictionary and lookup."""
    rows_per_day, runs = [], []
    resume_at = next((day for day in range(len(days)) if not files.day_progress_file(day).exists()), len(days))
    for day in range(resume_at):
        rows, day_runs = _load_day_progress(files, day, bad_lines)
        rows_per_day.append(rows)
        runs += day_runs
    chunks = [chunk for day_chunks in days[resume_at:] for chunk in day_chunks]
    progress = Progress("Pass 1/2, vocabularies", sum(chunk.lines for chunk in chunks))
    with _worker_pool(workers) as pool:
        results = _in_order(pool, partial(_chunk_vocabulary, options), chunks, ahead=2 * workers)
        for day in range(resume_at, len(days)):
            day_results = itertools.islice(results, len(days[day]))
            rows, day_runs = _save_day_runs(files, day, day_results, progress, bad_lines)
            rows_per_day.append(rows)
            runs += day_runs
        progress.close()
    _status(f"Merging the vocabularies of {len(runs)} run(s)")
    with _merge_directory(files), _worker_pool(min(workers, MERGE_PROCESSES)) as pool:
        counts = list(_in_order(pool, partial(_merge_runs, files, runs), range(SPARSE_FEATURES), SPARSE_FEATURES))
    _write_npz(files.day_count_file, {"total_per_file": np.array(rows_per_day, np.int64)})
    _write_npz(files.counts_file, {"counts": np.array(counts, np.int32)})  # the last vocabulary file


def _save_day_runs(
    files: CriteoFiles, day: int, results: Iterable[ChunkVocabulary], progress: Progress, bad_lines: BadLines
) -> tuple[int, list[Path]]:
    """Save the day's runs from its chunks' vocabularies, then its progress file; return its rows and runs."""
    rows, bad, problem = 0, 0, ""
    run, day_runs = [Vocabulary() for _ in range(SPARSE_FEATURES)], []
    for result in results:
        for vocabulary, values in zip(run, result.values, strict=True):
            vocabulary.add(values)
        rows, bad, problem = rows + result.rows, bad + result.bad_lines, problem or result.problem
        progress.add(result.lines)
        if sum(len(vocabulary) for vocabulary in run) >= RUN_VALUES:
            day_runs.append(_save_run(files.run_file(day, len(day_runs)), run))
            run = [Vocabulary() for _ in range(SPARSE_FEATURES)]
    if any(len(vocabulary) for vocabulary in run):
        day_runs.append(_save_run(files.run_file(day, len(day_runs)), run))
    _save_day_progress(files.day_progress_file(day), len(day_runs), rows, bad, problem)
    bad_lines.record(day, bad, problem)
    return rows, day_runs


def _save_run(path: Path, run: list[Vocabulary]) -> Path:
    """Each feature's values, in order of appearance (``C<j>``) and sorted (``S<j>``)."""
    members = {}
    for j, vocabulary in enumerate(run, start=1):
        members[f"C{j}"] = vocabulary.values_in_order()
        members[f"S{j}"] = vocabulary.sorted_values
    _write_npz(path, members)
    return path


def _save_day_progress(path: Path, runs: int, rows: int, bad: int, problem: str) -> None:
    members = {"runs": np.array(runs), "rows": np.array(rows), "bad_lines": np.array(bad), "problem": np.array(problem)}
    _write_npz(path, members)


def _load_day_progress(files: CriteoFiles, day: int, bad_lines: BadLines) -> tuple[int, list[Path]]:
    """The day's rows and runs, as pass 1 saved them."""
    path = files.day_progress_file(day)
    _check_arrays(path, {"runs": (), "rows": (), "bad_lines": (), "problem": ()})
    with _reading(path), np.load(path) as data:
        runs = [files.run_file(day, k) for k in range(int(data["runs"]))]
        bad_lines.record(day, int(data["bad_lines"]), str(data["problem"]))
        rows = int(data["rows"])
    for run in runs:
        _check_arrays(run, {"C1": (None,), "S1": (None,)})
    return rows, runs


@contextlib.contextmanager
def _merge_directory(files: CriteoFiles) -> Iterator[None]:
    """The merges' working directory, emptied before (of what a killed run left) and removed after."""
    shutil.rmtree(files.merge_directory, ignore_errors=True)
    files.merge_directory.mkdir()
    try:
        yield
    finally:
        shutil.rmtree(files.merge_directory, ignore_errors=True)


def _merge_runs(files: CriteoFiles, runs: list[Path], feature: int) -> int:
    """Write a feature's dictionary and lookup from its runs; return its number of distinct values."""
    work = files.merge_directory / f"C{feature + 1}"
    work.mkdir()
    new_files = [work / f"new_{k}" for k in range(len(runs))]
    key_files = [work / f"keys_{k}" for k in range(len(runs))]
    _mark_new_values(runs, f"S{feature + 1}", new_files, _merge_block(len(runs)))
    dictionary = work / "dictionary"
    count = _number_new_values(runs, f"C{feature + 1}", new_files, key_files, dictionary)
    _write_npz(files.dictionary_file(feature), {"unique": ((count,), np.dtype(np.int32), _file_blocks(dictionary))})
    _write_lookup(files, feature, key_files, count, work)
    return count


def _merge_block(streams: int) -> int:
    """Values read from each of a merge's streams at a time."""
    return max(1, MERGE_VALUES // max(1, streams))


def _mark_new_values(runs: list[Path], sorted_column: str, new_files: list[Path], block: int) -> None:
    """For each run, in its sorted order, whether each value is new there: held by no earlier run."""
    outputs = [_Appender(path, block) for path in new_files]
    streams = [_stored_blocks(run, sorted_column, block) for run in runs]
    for window in _aligned_windows(streams, block, np.dtype(np.uint32)):
        values = np.concatenate(window)
        order = np.argsort(values, kind="stable")  # a value's copies in run order: the earliest run first
        ordered = values[order]
        new = np.empty(values.size, bool)
        new[order] = np.concatenate(([True], ordered[1:] != ordered[:-1]))
        for output, part in zip(outputs, np.split(new, np.cumsum([w.size for w in window])[:-1]), strict=True):
            output.write(part)
    for output in outputs:
        output.flush()


class _Appender:
    """A file written in blocks, open only while one is appended, so that a merge of many runs holds no files
    open."""

    def __init__(self, path: Path, block: int) -> None:
        self.path, self.block, self.pending = path, block, bytearray()
        path.write_bytes(b"")

    def write(self, values: np.ndarray) -> None:
        self.pending += values.tobytes()
        if len(self.pending) >= self.block * values.itemsize:
            self.flush()

    def flush(self) -> None:
        with open(self.path, "ab") as f:
            f.write(self.pending)
        self.pending = bytearray()


def _number_new_values(
    runs: list[Path], column: str, new_files: list[Path], key_files: list[Path], dictionary: Path
) -> int:
    """Give each run's new values, in order of appearance, the next ids: append them to the dictionary (as the
    original's int32) and write them sorted with their ids, as (value << 32 | id) keys. Return the values numbered."""
    count = 0
    with open(dictionary, "wb") as out:
        for run, new_file, key_file in zip(runs, new_files, key_files, strict=True):
            with _reading(run), np.load(run) as data:
                in_order = data[column]
            by_value = np.argsort(in_order)  # by_value[i]: where the i-th smallest value stands in the run
            is_new_by_value = np.fromfile(new_file, bool)  # whether the i-th smallest value is new
            is_new = np.empty_like(is_new_by_value)  # the same, by where the values stand
            is_new[by_value] = is_new_by_value
            ids = count - 1 + np.cumsum(is_new, dtype=np.int64)  # each new value's id, by where it stands
            out.write(in_order[is_new].view(np.int32).tobytes())
            new_by_value = by_value[is_new_by_value]  # where the new values stand, smallest first
            keys = (in_order[new_by_value].astype(np.uint64) << np.uint64(32)) | ids[new_by_value].astype(np.uint64)
            keys.tofile(key_file)
            count += new_by_value.size
    return count


def _write_lookup(files: CriteoFiles, feature: int, key_files: list[Path], count: int, work: Path) -> None:
    """The feature's lookup file, ``values`` sorted and their ``ids``, from files of (value << 32 | id) keys,
    each sorted, no value in two of them."""
    parts = {"values": work / "values", "ids": work / "ids"}
    key, block = np.dtype(np.uint64), _merge_block(len(key_files))
    with open(parts["values"], "wb") as values, open(parts["ids"], "wb") as ids:
        streams = [_file_values(path, key, 0, path.stat().st_size // key.itemsize, block) for path in key_files]
        for window in _aligned_windows(streams, block, key):
            keys = np.sort(np.concatenate(window))
            values.write((keys >> np.uint64(32)).astype(np.uint32).tobytes())
            ids.write((keys & np.uint64(0xFFFFFFFF)).astype(np.int32).tobytes())
    members = {
        "values": ((count,), np.dtype(np.uint32), _file_blocks(parts["values"])),
        "ids": ((count,), np.dtype(np.int32), _file_blocks(parts["ids"])),
    }
    _write_npz(files.lookup_file(feature), members)


def _make_missing_lookups(files: CriteoFiles, workers: int) -> None:
    """Lookups for dictionaries that came without them (the original's preprocessing wrote none)."""
    features = [j for j in range(SPARSE_FEATURES) if not files.lookup_file(j).exists()]
    if features:
        _status(f"Making lookups for {len(features)} dictionaries")
        with _merge_directory(files), _worker_pool(min(workers, MERGE_PROCESSES)) as pool:
            list(_in_order(pool, partial(_lookup_from_dictionary, files), features, len(features)))


def _lookup_from_dictionary(files: CriteoFiles, feature: int) -> None:
    """Sort the dictionary a piece at a time into key files, then merge them into the lookup."""
    path = files.dictionary_file(feature)
    _check_arrays(path, {"unique": (None,)})
    work = files.merge_directory / f"C{feature + 1}"
    work.mkdir()
    key_files, count = [], 0
    for values in _member_blocks(path, "unique", np.uint32, RUN_VALUES):  # int32 wraps back to the 32-bit hash
        ids = np.arange(count, count + values.size, dtype=np.uint64)
        key_files.append(work / f"keys_{len(key_files)}")
        np.sort((values.astype(np.uint64) << np.uint64(32)) | ids).tofile(key_files[-1])
        count += values.size
    _write_lookup(files, feature, key_files, count, work)


def _aligned_windows(streams: list[Iterator[np.ndarray]], block: int, dtype: np.dtype) -> Iterator[list[np.ndarray]]:
    """Strictly increasing streams (each given as blocks) cut at common bounds: each window holds every stream's
    next values up to one bound, so all copies of a value arrive in the same window. A stream holds at most two
    blocks in memory at a time."""
    buffers = [np.empty(0, dtype) for _ in streams]
    ended = [False] * len(streams)
    while True:
        for k, stream in enumerate(streams):
            while not ended[k] and buffers[k].size < block:
                more = next(stream, None)
                if more is None:
                    ended[k] = True
                else:
                    buffers[k] = np.concatenate((buffers[k], more))
        if all(ended) and not any(buffer.size for buffer in buffers):
            return
        unread_beyond = [buffer[-1] for buffer, done in zip(buffers, ended, strict=True) if not done]
        bound = min(unread_beyond) if unread_beyond else None
        cuts = [buffer.size if bound is None else int(np.searchsorted(buffer, bound, "right")) for buffer in buffers]
        yield [buffer[:cut] for buffer, cut in zip(buffers, cuts, strict=True)]
        buffers = [buffer[cut:] for buffer, cut in zip(buffers, cuts, strict=True)]


# Pass 2: ids ---------------------------------------------------------------------------------------------


class IdLookup:
    """Value -> id for one feature, from its lookup file, memory-mapped.

    Mapped pages count as the process's resident memory, and the kernel maps up to FAULT_AROUND_BYTES around each
    page read. So a lookup that is not ``kept`` is mapped only while in use, and one larger than MAPPED_BYTES is
    mapped afresh for each ``query_block`` queries, which map at most that much.
    """

    def __init__(self, path: Path, kept: bool) -> None:
        self.arrays = [(path, *_array_location(path, name)) for name in ("values", "ids")]
        self.kept = self._map() if kept else None
        large = not kept and path.stat().st_size > MAPPED_BYTES
        self.query_block = max(1, MAPPED_BYTES // (2 * FAULT_AROUND_BYTES)) if large else None

    def _map(self) -> list[np.ndarray]:
        return [_mapped(*array) for array in self.arrays]

    def __call__(self, values: np.ndarray) -> np.ndarray | None:
        """The values' ids, or None when a value is not in the vocabulary."""
        order = np.argsort(values)  # searching in sorted order reads the lookup in order: faster
        queries, ids = values[order], np.empty(values.shape, np.int32)
        block = max(1, self.query_block or queries.size)
        for start in range(0, queries.size, block):
            sorted_values, value_ids = self.kept or self._map()
            at, found = _find(sorted_values, queries[start : start + block])
            if not found.all():
                return None
            ids[order[start : start + block]] = value_ids[at]
        return ids


_worker_lookups: list[IdLookup] = []


def _set_worker_lookups(paths: list[Path]) -> None:
    """Keep the lookups mapped when they are small enough in all (LOOKUP_RESIDENT_BYTES)."""
    global _worker_lookups
    kept = sum(path.stat().st_size for path in paths) <= LOOKUP_RESIDENT_BYTES
    _worker_lookups = [IdLookup(path, kept) for path in paths]


@dataclass
class ChunkRows:
    """Pass 2's result for a chunk: its rows with ids (or the first feature with a value missing from its ids)."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray
    lines: int
    bad_lines: int
    problem: str
    unknown_feature: int | None = None


def _chunk_rows(options: ParseOptions, chunk: Chunk) -> ChunkRows:
    rows, bad_lines, problem = _read_chunk(chunk, options)
    ids = np.empty(rows.categorical.shape, np.int32)
    for j in range(SPARSE_FEATURES):
        column_ids = _worker_lookups[j](rows.categorical[:, j])
        if column_ids is None:
            return ChunkRows(rows.labels, rows.dense, ids, chunk.lines, bad_lines, problem, unknown_feature=j)
        ids[:, j] = column_ids
    return ChunkRows(rows.labels, rows.dense, ids, chunk.lines, bad_lines, problem)


def _write_days(
    files: CriteoFiles,
    days: dict[int, list[Chunk]],
    rows_per_day: list[int],
    options: ParseOptions,
    workers: int,
    bad_lines: BadLines,
) -> None:
    """Pass 2: map the given days' values to ids and write their processed files."""
    chunks = [chunk for day_chunks in days.values() for chunk in day_chunks]
    progress = Progress("Pass 2/2, ids", sum(chunk.lines for chunk in chunks))
    lookups = [files.lookup_file(j) for j in range(SPARSE_FEATURES)]
    with _worker_pool(workers, _set_worker_lookups, (lookups,)) as pool:
        results = _in_order(pool, partial(_chunk_rows, options), chunks, ahead=2 * workers)
        for day, day_chunks in days.items():
            day_results = zip(day_chunks, itertools.islice(results, len(day_chunks)), strict=True)
            _write_day(files, day, rows_per_day[day], day_results, progress, bad_lines)
    progress.close()


def _write_day(
    files: CriteoFiles,
    day: int,
    rows: int,
    results: Iterable[tuple[Chunk, ChunkRows]],
    progress: Progress,
    bad_lines: BadLines,
) -> None:
    """Write the day's processed file from its chunks' rows."""
    bad, problem = 0, ""
    with DayWriter(files.day_file(day), rows, files.day_count_file) as writer:
        for chunk, result in results:
            if result.unknown_feature is not None:
                raise DataError(
                    f"{chunk.path}: a C{result.unknown_feature + 1} value is not in "
                    f"{files.lookup_file(result.unknown_feature)}: the vocabularies were made from other "
                    "data or flags (--max-ind-range, --data-sub-sample-rate); delete them to start over"
                )
            writer.append(result)
            bad, problem = bad + result.bad_lines, problem or result.problem
            progress.add(result.lines)
    bad_lines.record(day, bad, problem)


class DayWriter:
    """A day's processed file, written as its rows arrive: arrays in temporary files, then one npz, atomically."""

    WIDTHS = {"X_int": DENSE_FEATURES, "X_cat": SPARSE_FEATURES, "y": None}

    def __init__(self, path: Path, rows: int, day_count_file: Path) -> None:
        self.path, self.expected_rows, self.day_count_file, self.rows = path, rows, day_count_file, 0

    def __enter__(self) -> DayWriter:
        self.directory = tempfile.TemporaryDirectory(dir=self.path.parent, prefix=f".{self.path.name}.{os.getpid()}.")
        self.parts = {name: open(Path(self.directory.name) / name, "wb") for name in self.WIDTHS}
        return self

    def append(self, rows: ChunkRows) -> None:
        for name, values in (("X_int", rows.dense), ("X_cat", rows.ids), ("y", rows.labels)):
            self.parts[name].write(values.astype(np.int32).tobytes())
        self.rows += len(rows.labels)

    def __exit__(self, error_type: type | None, *_: object) -> None:
        for part in self.parts.values():
            part.close()
        try:
            if error_type is None:
                self._finish()
        finally:
            self.directory.cleanup()

    def _finish(self) -> None:
        if self.rows != self.expected_rows:
            raise DataError(
                f"{self.path}: the raw data gives {self.rows} rows, {self.day_count_file} says {self.expected_rows}: "
                f"{RAW_DATA_CHANGED}"
            )
        members = {}
        for name, width in self.WIDTHS.items():
            shape = (self.rows,) if width is None else (self.rows, width)
            members[name] = (shape, np.dtype(np.int32), _file_blocks(Path(self.directory.name) / name))
        _write_npz(self.path, members)


def _file_blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            yield block


# Parsing -------------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """Parsed samples: labels, integer features (negatives as 0) and categorical values."""

    labels: np.ndarray  # int32 [n]
    dense: np.ndarray  # int32 [n, 13]
    categorical: np.ndarray  # uint32 [n, 26]
    lines: np.ndarray  # each row's line, counted from 0 in the text it came from

    def select(self, keep: np.ndarray) -> Rows:
        return Rows(self.labels[keep], self.dense[keep], self.categorical[keep], self.lines[keep])


_NEWLINE, _TAB, _MINUS = ord("\n"), ord("\t"), ord("-")
_DIGIT = np.full(256, -1, np.int64)
_DIGIT[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX_DIGIT = _DIGIT.copy()
_HEX_DIGIT[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX_DIGIT[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
_INTEGER_FIELD = re.compile(rb"-?[0-9]{1,10}|")
_HEX_FIELD = re.compile(rb"[0-9a-fA-F]{0,8}")
_INT32 = np.iinfo(np.int32)
_FLOAT32_MAX = np.finfo(np.float32).max


def parse_lines(text: bytes) -> tuple[Rows, np.ndarray]:
    """Parse lines (each ending with a newline): the well-formed rows, and the indices of the malformed lines.

    The label is 0 or 1, integers fit in int32 (``-?digits``), categorical values have at most 8 hex digits, an
    empty field is 0. Vectorized over the whole text; ``describe_problem`` says what is wrong with a line.
    """
    buffer = np.frombuffer(text, np.uint8)
    is_line_end = buffer == _NEWLINE
    field_ends = np.flatnonzero(is_line_end | (buffer == _TAB))
    ends_line = is_line_end[field_ends]
    line_of_field = np.cumsum(ends_line) - ends_line
    whole = np.bincount(line_of_field, minlength=int(ends_line.sum())) == FIELDS
    in_whole_line = whole[line_of_field]
    starts = np.concatenate(([0], field_ends[:-1] + 1))[in_whole_line].reshape(-1, FIELDS)
    lengths = field_ends[in_whole_line].reshape(-1, FIELDS) - starts
    numeric = 1 + DENSE_FEATURES
    integers, integers_ok = _integer_fields(buffer, starts[:, :numeric], lengths[:, :numeric])
    hashes, hashes_ok = _digits(buffer, starts[:, numeric:], lengths[:, numeric:], _HEX_DIGIT, 16, 8)
    labels, dense = integers[:, 0], integers[:, 1:]
    good = (
        integers_ok.all(axis=1)
        & hashes_ok.all(axis=1)
        & ((labels == 0) | (labels == 1))
        & ((dense >= _INT32.min) & (dense <= _INT32.max)).all(axis=1)
    )
    lines = np.flatnonzero(whole)
    rows = Rows(labels.astype(np.int32), np.maximum(dense, 0).astype(np.int32), hashes.astype(np.uint32), lines)
    return rows.select(good), np.union1d(np.flatnonzero(~whole), lines[~good])


def _integer_fields(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    negative = (lengths > 0) & (buffer[starts] == _MINUS)
    values, valid = _digits(buffer, starts + negative, lengths - negative, _DIGIT, 10, 10)
    return np.where(negative, -values, values), valid & ~(negative & (lengths == 1))


def _digits(
    buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray, digit_value: np.ndarray, base: int, max_digits: int
) -> tuple[np.ndarray, np.ndarray]:
    """The numbers written in the fields, and whether each field is valid: digits only, ``max_digits`` at most."""
    values = np.zeros(starts.shape, np.int64)
    valid = lengths <= max_digits
    for k in range(max_digits):
        inside = k < lengths
        digit = digit_value[buffer[np.where(inside, starts + k, 0)]]
        valid &= ~inside | (digit >= 0)
        values = np.where(inside, values * base + digit, values)
    return values, valid


def describe_problem(line: bytes) -> str:
    """What is wrong with a line ``parse_lines`` rejected."""
    fields = line.split(b"\t")
    if len(fields) != FIELDS:
        return f"expected {FIELDS} tab-separated fields (label, I1-I13, C1-C26), found {len(fields)}"
    for name, text in zip(FIELD_NAMES, fields, strict=True):
        shown = repr(text.decode(errors="replace")[:24])
        if name.startswith("C"):
            if not _HEX_FIELD.fullmatch(text):
                return f"{name} {shown} is not a hexadecimal number of at most 8 digits"
        elif not _INTEGER_FIELD.fullmatch(text) or not _INT32.min <= int(text or 0) <= _INT32.max:
            return f"{name} {shown} is not a 32-bit integer"
        elif name == "label" and int(text or 0) not in (0, 1):
            return f"label {shown} is not 0 or 1"
    return "malformed line"


def _read_chunk(chunk: Chunk, options: ParseOptions) -> tuple[Rows, int, str]:
    """The chunk's rows after --data-sub-sample-rate and --max-ind-range; its bad lines and the first one's problem."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.start)
        text = f.read(chunk.stop - chunk.start)
    if not text.endswith(b"\n"):
        text += b"\n"
    if b"\r" in text:  # Windows line ends: the same lines, so line numbers and days stay those of the file
        text = text.replace(b"\r\n", b"\n")
    rows, bad = parse_lines(text)
    problem = ""
    if bad.size:
        line = text.split(b"\n")[bad[0]]
        problem = f"{chunk.path}:{chunk.first_line + int(bad[0])}: {describe_problem(line)}"
        if not options.skip_bad_lines:
            raise DataError(problem)
    if options.sub_sample_rate > 0:
        draws = _uniform_per_line(options.seed, chunk.day, chunk.first_line + rows.lines)
        rows = rows.select((rows.labels != 0) | (draws >= options.sub_sample_rate))
    if options.max_ind_range > 0:
        rows.categorical = (rows.categorical.astype(np.uint64) % np.uint64(options.max_ind_range)).astype(np.uint32)
    return rows, int(bad.size), problem


def _uniform_per_line(seed: int, day: int, lines: np.ndarray) -> np.ndarray:
    """A draw in [0, 1) for each line, fixed by (seed, day, line): the same however the text is cut into chunks."""
    x = lines.astype(np.uint64) + np.uint64(day << 40) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):  # splitmix64's finalizer
        x = (x ^ (x >> np.uint64(shift))) * np.uint64(multiplier)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


# ---------------------------------------------------------------------------------------------------------
# npz files: streamed writing, checking, memory-mapping
# ---------------------------------------------------------------------------------------------------------


class atomic_write:
    """``with atomic_write(path) as temp``: write temp; on success it replaces path, on failure it is removed."""

    def __init__(self, path: Path) -> None:
        self.path, self.temp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")

    def __enter__(self) -> Path:
        return self.temp

    def __exit__(self, error_type: type | None, *_: object) -> None:
        try:
            if error_type is None:
                os.replace(self.temp, self.path)
        finally:
            self.temp.unlink(missing_ok=True)  # after a rename, gone already


Member = np.ndarray | tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray | bytes]]


def _write_npz(path: Path, members: dict[str, Member]) -> None:
    """An uncompressed npz (so that it can be memory-mapped), each array given whole or as (shape, dtype, blocks)."""
    with atomic_write(path) as temp, zipfile.ZipFile(temp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, member in members.items():
            shape, dtype, blocks = (member.shape, member.dtype, [member]) if isinstance(member, np.ndarray) else member
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": tuple(int(length) for length in shape),
            }
            with archive.open(f"{name}.npy", "w", force_zip64=True) as out:
                np.lib.format.write_array_header_1_0(out, header)
                for block in blocks:
                    out.write(block if isinstance(block, bytes) else np.ascontiguousarray(block, dtype).tobytes())


def _npy_header(stream: IO[bytes], path: Path, name: str) -> tuple[tuple[int, ...], np.dtype, bool]:
    """Shape, dtype and whether the array is stored column after column (Fortran order, as the original's X_cat),
    from a .npy header; the stream is left at the data."""
    version = np.lib.format.read_magic(stream)
    if version not in ((1, 0), (2, 0)):
        raise DataError(f"{path}: array {name} has .npy format version {version}, expected 1.0 or 2.0")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    return shape, dtype, fortran_order and len(shape) > 1


def _array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, bool]]:
    try:
        with zipfile.ZipFile(path) as archive:
            headers = {}
            for info in archive.infolist():
                name = info.filename.removesuffix(".npy")
                with archive.open(info) as stream:
                    headers[name] = _npy_header(stream, path, name)
            return headers
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise _damaged(path, f"not a readable npz file: {first_line(error)}") from None


def _check_arrays(
    path: Path, expected: dict[str, tuple[int | None, ...]], numeric: bool = False
) -> dict[str, tuple[int, ...]]:
    """Check the file holds the expected arrays (None in a shape: any length), of numbers when ``numeric``; return
    every array's shape."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    headers = _array_headers(path)
    for name, shape in expected.items():
        if name not in headers:
            raise DataError(f"{path}: no array {name} (expected {', '.join(expected)})")
        found, dtype, _ = headers[name]
        if len(found) != len(shape) or any(want not in (None, got) for want, got in zip(shape, found, strict=False)):
            wanted = str(tuple("n" if want is None else want for want in shape)).replace("'", "")
            raise DataError(f"{path}: array {name} has shape {found}, expected {wanted}")
        if numeric and dtype.kind not in "biuf":  # text, say: the checks of its values would fail with a traceback
            raise DataError(f"{path}: array {name} holds {dtype}, not numbers; {REMAKE}")
    return {name: shape for name, (shape, _, _) in headers.items()}


def _check_concatenated(path: Path) -> int:
    """Check a concatenated processed file (ours or the original's); return its number of rows."""
    rows = _check_arrays(path, {"y": (None,)})["y"][0]
    expected = {"X_int": (rows, DENSE_FEATURES), "X_cat": (rows, SPARSE_FEATURES), "counts": (SPARSE_FEATURES,)}
    _check_arrays(path, {"y": (rows,), **expected}, numeric=True)
    return rows


def _check_day(path: Path, rows: int) -> None:
    expected = {"y": (rows,), "X_int": (rows, DENSE_FEATURES), "X_cat": (rows, SPARSE_FEATURES)}
    _check_arrays(path, expected, numeric=True)


def _member_blocks(path: Path, name: str, dtype: type, block_rows: int) -> Iterator[np.ndarray]:
    """An array of an npz file (compressed or not; in Fortran order, uncompressed), ``block_rows`` rows at a time,
    as ``dtype``."""
    with _reading(path), zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as stream:
        shape, stored, fortran = _npy_header(stream, path, name)
        if fortran:  # a block of rows lies in pieces, one in each column: read through a map
            mapped = _map_array(path, name)
            yield from (mapped[start : start + block_rows].astype(dtype) for start in range(0, shape[0], block_rows))
            return
        row_bytes = stored.itemsize * math.prod(shape[1:])
        for start in range(0, shape[0], block_rows):
            rows = min(block_rows, shape[0] - start)
            data = stream.read(rows * row_bytes)
            if len(data) != rows * row_bytes:
                raise _damaged(path, f"array {name} is cut short")
            yield np.frombuffer(data, stored).reshape(rows, *shape[1:]).astype(dtype)


def _concatenate(day_files: list[Path], rows_per_day: list[int], counts: list[int], path: Path) -> None:
    """The original's concatenated processed file (X_int, X_cat, y, counts), streamed from the day files."""
    total = sum(rows_per_day)

    def blocks(name: str) -> Iterator[np.ndarray]:
        for day_file in day_files:
            yield from _member_blocks(day_file, name, np.int32, BLOCK_ROWS)

    int32 = np.dtype(np.int32)
    members = {
        "X_int": ((total, DENSE_FEATURES), int32, blocks("X_int")),
        "X_cat": ((total, SPARSE_FEATURES), int32, blocks("X_cat")),
        "y": ((total,), int32, blocks("y")),
        "counts": np.array(counts, np.int32),
    }
    _write_npz(path, members)


def _store_uncompressed(path: Path) -> None:
    """Rewrite a compressed npz (as the original wrote them) uncompressed, so that it can be memory-mapped."""
    with _reading(path), zipfile.ZipFile(path) as archive:
        if all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist()):
            return
    _status(f"Rewriting {path} uncompressed, so that it can be memory-mapped")
    with (
        _reading(path),
        zipfile.ZipFile(path) as source,
        atomic_write(path) as temp,
        zipfile.ZipFile(temp, "w", allowZip64=True) as out,
    ):
        for info in source.infolist():
            with source.open(info) as data, out.open(info.filename, "w", force_zip64=True) as copy:
                while block := data.read(CHUNK_BYTES):
                    copy.write(block)


def _map_array(path: Path, name: str) -> np.ndarray:
    """An array of an uncompressed npz, memory-mapped read-only."""
    return _mapped(path, *_array_location(path, name))


def _mapped(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype, fortran: bool = False) -> np.ndarray:
    if math.prod(shape) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype, "r", offset, shape, order="F" if fortran else "C")


def _array_location(path: Path, name: str) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """Where an array of an uncompressed npz starts in the file; its shape, dtype and whether it is in Fortran order.
    Mapping reads no CRC, so the array must at least lie whole inside its member."""
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{name}.npy")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            name_length, extra_length = struct.unpack("<26xHH", f.read(30))  # the zip local file header
            member_start = info.header_offset + 30 + name_length + extra_length
            f.seek(member_start)
            shape, dtype, fortran = _npy_header(f, path, name)
            offset = f.tell()
    except (zipfile.BadZipFile, KeyError, ValueError, EOFError, struct.error) as error:
        raise _damaged(path, first_line(error)) from None
    member_end = member_start + info.file_size
    if offset + math.prod(shape) * dtype.itemsize > min(member_end, path.stat().st_size):
        raise _damaged(path, f"array {name} is cut short")
    return offset, shape, dtype, fortran


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Damage found while an npz file is read (a bad CRC, a cut-off member) stops the run with one line."""
    try:
        yield
    except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as error:
        raise _damaged(path, first_line(error)) from None


def _damaged(path: Path, why: str) -> DataError:
    return DataError(f"{path}: damaged ({why}); {REMAKE}")


def _stored_blocks(path: Path, name: str, block: int) -> Iterator[np.ndarray]:
    """A 1-d array of an uncompressed npz, ``block`` values at a time."""
    offset, (length,), dtype, _ = _array_location(path, name)
    yield from _file_values(path, dtype, offset, length, block)


def _file_values(path: Path, dtype: np.dtype, offset: int, length: int, block: int) -> Iterator[np.ndarray]:
    """``length`` values stored from ``offset``, ``block`` at a time. The file is open only while a block is read,
    so that a merge of many runs holds no files open."""
    for start in range(0, length, block):
        yield np.fromfile(path, dtype, min(block, length - start), offset=offset + start * dtype.itemsize)


# ---------------------------------------------------------------------------------------------------------
# Datasets: item i is batch i
# ---------------------------------------------------------------------------------------------------------


def criteo_datasets(
    args: argparse.Namespace, processed: Processed
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train, test) for the training script: batches of --mini-batch-size and --test-mini-batch-size rows."""
    train_batch = args.mini_batch_size
    test_batch = args.test_mini_batch_size if args.test_mini_batch_size > 0 else train_batch
    counts = [min(count, args.max_ind_range) if args.max_ind_range > 0 else count for count in processed.counts]
    if processed.bin_files:
        shuffle_seed = args.numpy_rand_seed if args.mlperf_bin_shuffle else None
        train = BinBatches(processed.bin_files["train"], train_batch, counts, args.max_ind_range, shuffle_seed)
        return train, BinBatches(processed.bin_files["test"], test_batch, counts, args.max_ind_range)
    if processed.concatenated is not None:
        rows = _load_concatenated(processed.concatenated)
    else:
        rows = DayRows(processed.day_files, processed.rows_per_day)
    train_order, test_order, _ = _split_orders(processed.rows_per_day, args.data_randomize, np.random.permutation)
    # The original built the split twice (for its train and its test set), drawing twice from the global
    # generator: draw again, so that the model drawn next starts from the same state as the original's.
    _split_orders(processed.rows_per_day, args.data_randomize, np.random.permutation)
    train = CriteoBatches(rows, train_order, train_batch, counts, args.max_ind_range)
    return train, CriteoBatches(rows, test_order, test_batch, counts, args.max_ind_range)


def _split_orders(
    rows_per_day: list[int], randomize: str, permutation: Callable[[int], np.ndarray]
) -> tuple[np.ndarray | range, range, range]:
    """Row orders of (train, test, val): train is every day but the last, in the --data-randomize order; the last
    day's first half (the larger) is test, its second half val."""
    starts = np.concatenate(([0], np.cumsum(rows_per_day, dtype=np.int64)))
    train_rows, total = int(starts[-2]), int(starts[-1])
    if randomize == "day":
        days = [start + permutation(rows) for start, rows in zip(starts[:-2], rows_per_day[:-1], strict=True)]
        train = np.concatenate([np.empty(0, np.int64), *days])
    elif randomize == "total":
        train = permutation(train_rows)
    else:
        train = range(train_rows)
    test_end = train_rows + math.ceil((total - train_rows) / 2)
    return train, range(train_rows, test_end), range(test_end, total)


def _load_concatenated(path: Path) -> ArrayRows:
    _status(f"Reading {path}")
    with _reading(path), np.load(path) as data:
        dense, categorical, labels = data["X_int"], data["X_cat"], data["y"]
    _check_rows(dense, labels, path)
    if categorical.dtype != np.int32:  # the original stored ids as float64
        _check_ids(categorical, path)
        categorical = categorical.astype(np.int32)
    return ArrayRows(dense, categorical, labels)


def _check_rows(dense: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Labels 0 or 1, integer features 0 or more (the original's preprocessing made negatives 0) and finite in
    float32: the batches hold log(x + 1) of them, and a negative or infinite one stopped training at 'scores not
    finite', blaming --learning-rate."""
    wrong = labels[(labels != 0) & (labels != 1)]
    if wrong.size:
        raise DataError(f"{path}: label {wrong[0]} is not 0 or 1; {REMAKE}")
    if not dense.size:
        return
    if dense.min() < 0:
        raise DataError(f"{path}: integer feature {dense.min()} is below 0; {REMAKE}")
    # only features stored as floats can be NaN or past float32; the check runs for every batch of a mapped file
    if dense.dtype.kind == "f" and not dense.max() <= _FLOAT32_MAX:
        raise DataError(f"{path}: integer feature {dense.max()} is not finite in float32; {REMAKE}")


def _check_ids(ids: np.ndarray, path: Path) -> None:
    """Ids stored wider than int32 (the original's float64) must fit it: they would wrap around silently."""
    if ids.size and not 0 <= ids.min() <= ids.max() <= _INT32.max:
        wrong = ids.min() if ids.min() < 0 else ids.max()
        raise DataError(f"{path}: X_cat holds id {wrong:.0f}, outside [0, 2**31); {REMAKE}")


class ArrayRows:
    """Rows held in memory."""

    def __init__(self, dense: np.ndarray, categorical: np.ndarray, labels: np.ndarray) -> None:
        self.dense, self.categorical, self.labels = dense, categorical, labels

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.dense[rows], self.categorical[rows], self.labels[rows]


class DayRows:
    """Rows of the per-day files, memory-mapped; row numbers run through the days in order."""

    def __init__(self, day_files: list[Path], rows_per_day: list[int]) -> None:
        self.day_files = day_files
        self.starts = np.concatenate(([0], np.cumsum(rows_per_day, dtype=np.int64)))
        self._days: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict:  # a process that receives it maps the files itself
        return {**self.__dict__, "_days": None}

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._days is None:
            self._days = [tuple(_map_array(path, name) for name in ("X_int", "X_cat", "y")) for path in self.day_files]
        day_of_row = np.searchsorted(self.starts, rows, side="right") - 1
        first_dense, first_categorical, first_labels = self._days[0]
        dense = np.empty((rows.size, DENSE_FEATURES), first_dense.dtype)
        categorical = np.empty((rows.size, SPARSE_FEATURES), first_categorical.dtype)
        labels = np.empty(rows.size, first_labels.dtype)
        for day in np.unique(day_of_row):
            here = day_of_row == day
            local = rows[here] - self.starts[day]
            day_dense, day_categorical, day_labels = self._days[day]
            dense[here], categorical[here], labels[here] = day_dense[local], day_categorical[local], day_labels[local]
            _check_rows(dense[here], labels[here], self.day_files[day])
            if categorical.dtype != np.int32:
                _check_ids(categorical[here], self.day_files[day])
        return dense, categorical, labels


def _batch(dense: np.ndarray, categorical: np.ndarray, labels: np.ndarray, max_ind_range: int) -> Batch:
    """The training script's raw batch: log(x + 1) of the integers, one index per bag, targets as a column."""
    n = len(labels)
    indices = categorical.astype(np.int64)
    if max_ind_range > 0:
        indices %= max_ind_range
    dense_tensor = torch.log(torch.from_numpy(np.asarray(dense, np.float32)) + 1)
    offsets = [torch.arange(n) for _ in range(SPARSE_FEATURES)]
    targets = torch.from_numpy(np.asarray(labels, np.float32).reshape(n, 1))
    return dense_tensor, offsets, list(torch.from_numpy(np.ascontiguousarray(indices.T)).unbind(0)), targets


class CriteoBatches(torch.utils.data.Dataset):
    """Batch ``i``: rows ``order[i * batch_size : (i + 1) * batch_size]``; the last batch may be partial."""

    dense_features = DENSE_FEATURES

    def __init__(
        self,
        rows: ArrayRows | DayRows,
        order: np.ndarray | range,
        batch_size: int,
        counts: list[int],
        max_ind_range: int,
    ) -> None:
        self.rows, self.order, self.batch_size = rows, order, batch_size
        self.counts, self.max_ind_range = counts, max_ind_range
        self.epoch = 0  # set by the training script; the order does not depend on it

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        rows = np.asarray(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        return _batch(*self.rows.take(rows), self.max_ind_range)


class BinBatches(torch.utils.data.Dataset):
    """Batches of a .bin file of int32 records [label, I1..I13, C1..C26] (the original's --mlperf-bin-loader).

    With a shuffle seed the full batches come in an order drawn from (seed, epoch); the partial one stays last.
    """

    dense_features = DENSE_FEATURES

    def __init__(
        self, path: Path, batch_size: int, counts: list[int], max_ind_range: int, shuffle_seed: int | None = None
    ) -> None:
        size = path.stat().st_size
        if size % BIN_RECORD_BYTES:
            raise DataError(f"{path}: {size} bytes is not a whole number of {BIN_RECORD_BYTES}-byte records")
        self.path, self.rows, self.batch_size = path, size // BIN_RECORD_BYTES, batch_size
        self.counts, self.max_ind_range, self.shuffle_seed = counts, max_ind_range, shuffle_seed
        self.epoch = 0
        self._records: np.ndarray | None = None
        self._shuffled: tuple[int, np.ndarray] | None = None  # (epoch, batch order)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        if self._records is None:
            self._records = np.memmap(self.path, np.int32, "r", shape=(self.rows, FIELDS))
        start = self._batch_position(index) * self.batch_size
        records = self._records[start : start + self.batch_size]
        dense, categorical = records[:, 1 : 1 + DENSE_FEATURES], records[:, 1 + DENSE_FEATURES :]
        _check_rows(dense, records[:, 0], self.path)
        return _batch(dense, categorical, records[:, 0], self.max_ind_range)

    def _batch_position(self, index: int) -> int:
        full_batches = self.rows // self.batch_size
        if self.shuffle_seed is None or index >= full_batches:
            return index
        if self._shuffled is None or self._shuffled[0] != self.epoch:
            order = np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(full_batches)
            self._shuffled = (self.epoch, order)
        return int(self._shuffled[1][index])
