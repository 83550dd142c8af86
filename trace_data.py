"""Trace-driven synthetic data (``--data-generation synthetic``), generated the way the original DLRM did.

A trace file describes how one table's rows were reused: the rows a trace touched and how far back in an LRU
stack each access reached (its stack distance). Batches replay that: each access draws a stack distance from the
file's distribution and takes the row at that depth of an LRU stack (distance 0: a row not used yet).

The file format is the original's, three lines of comma-separated values:

1. the unique accesses: the rows, in the order the trace first touched them;
2. the stack distances that occur, ascending: 0 for a first access, d for the row that was the d-th most
   recently used (1: the same row again);
3. their cumulative probabilities, the last one 1.

``--data-trace-file`` names one file per table: every "j" in the file name (not in the folders) is replaced by
the table's number, so ``./input/dist_emb_j.log`` is ``./input/dist_emb_0.log`` for table 0.

``SeededBatches`` draws a batch's dense features and targets and reseeds numpy for every batch, as the original
did; the random data (``dlrm_s_pytorch.RandomDataset``) and the trace data differ only in their bags.
"""

from __future__ import annotations

import argparse
import math
import os
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

FIRST_BATCH_SEED = 987  # the original reseeded numpy with 987 + j before generating batch j
CUMULATIVE_TOLERANCE = 1e-6  # how far from 1 the last cumulative probability of a file may be (float sums)


@dataclass
class TraceDistribution:
    """One table's trace, profiled: which rows it touched and how far back its accesses reached."""

    unique_accesses: list[int]  # rows in the order first touched
    stack_distances: list[int]  # ascending; 0 means a first access
    cumulative: list[float]  # P(distance <= stack_distances[k]), ending at 1


class _Counts:
    """Counts over positions 0..size-1 with point updates and prefix sums, both O(log size) (a Fenwick tree)."""

    def __init__(self, size: int) -> None:
        self.tree = [0] * (size + 1)

    def add(self, position: int, amount: int) -> None:
        position += 1
        while position < len(self.tree):
            self.tree[position] += amount
            position += position & -position

    def total_before(self, position: int) -> int:
        total = 0
        while position > 0:
            total += self.tree[position]
            position -= position & -position
        return total


def access_stack_distances(accesses: Sequence[int]) -> tuple[list[int], list[int]]:
    """(Each access's stack distance, the rows in the order first touched), as the original's trace_profile.

    A repeated access's distance counts the distinct rows touched since that row's previous access, itself
    included, so an immediate repeat is 1; a first access is 0.
    """
    last_use: dict[int, int] = {}
    # a 1 at the time of each row's latest access: the rows touched since time t are the 1s from t on
    latest = _Counts(len(accesses))
    distances, unique = [], []
    for time, row in enumerate(accesses):
        previous = last_use.get(row)
        if previous is None:
            distances.append(0)
            unique.append(row)
        else:
            distances.append(latest.total_before(time) - latest.total_before(previous))
            latest.add(previous, -1)
        latest.add(time, 1)
        last_use[row] = time
    return distances, unique


def profile_trace(accesses: Sequence[int], *, pad_new_references: bool = False) -> TraceDistribution:
    """The distribution of a trace's stack distances, with its unique accesses.

    ``pad_new_references`` is the original's profile padding: ceil(accesses / largest distance) more first
    accesses are counted, so a long trace over few rows still produces new rows at a useful rate.
    """
    if len(accesses) == 0:
        raise ValueError("profile_trace: no accesses to profile")
    distances, unique = access_stack_distances(accesses)
    largest = max(distances)
    if pad_new_references and largest > 0:
        distances += [0] * math.ceil(len(distances) / largest)
    values, counts = np.unique(distances, return_counts=True)
    cumulative = np.cumsum(counts) / len(distances)
    return TraceDistribution(unique, values.tolist(), cumulative.tolist())


def write_trace_distribution(
    path: str | os.PathLike, accesses: Sequence[int], *, pad_new_references: bool = False
) -> None:
    """Profile ``accesses`` (see ``profile_trace``) and write the result as a trace file."""
    distribution = profile_trace(accesses, pad_new_references=pad_new_references)
    lines = [
        ", ".join(map(str, distribution.unique_accesses)),
        ", ".join(map(str, distribution.stack_distances)),
        ", ".join(map(repr, distribution.cumulative)),  # repr: every digit, so reading it back is exact
    ]
    Path(path).write_text("\n".join(lines) + "\n")


def read_trace_distribution(path: str | os.PathLike) -> TraceDistribution:
    """Read a trace file; a missing or malformed one raises ``ValueError`` naming the file, the line and why."""
    try:
        if Path(path).exists() and not Path(path).is_file():  # a pipe waits for a writer, /dev/zero never ends
            raise ValueError(f"trace file {path}: not a regular file")
        text = Path(path).read_text()
    except OSError as error:
        raise ValueError(f"trace file {path}: cannot be read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise ValueError(f"trace file {path}: is not a text file") from None
    lines = text.rstrip("\n").splitlines()
    if len(lines) != 3:
        raise ValueError(
            f"trace file {path}: has {len(lines)} lines, expected 3 "
            "(unique accesses, stack distances, cumulative probabilities)"
        )

    unique = _parse_line(path, 1, lines[0], int, "unique accesses")
    distances = _parse_line(path, 2, lines[1], int, "stack distances")
    cumulative = _parse_line(path, 3, lines[2], float, "cumulative probabilities")

    if distances[0] < 0 or any(b <= a for a, b in pairwise(distances)):
        raise ValueError(f"trace file {path}: line 2: stack distances must be ascending and not negative")
    if distances[-1] > len(unique):
        raise ValueError(
            f"trace file {path}: line 2: stack distance {distances[-1]} is deeper than the "
            f"{len(unique)} unique accesses of line 1"
        )
    if len(cumulative) != len(distances):
        raise ValueError(
            f"trace file {path}: line 3: has {len(cumulative)} probabilities for {len(distances)} stack distances"
        )
    if any(not 0.0 <= p <= 1.0 for p in cumulative) or any(b < a for a, b in pairwise(cumulative)):
        raise ValueError(f"trace file {path}: line 3: cumulative probabilities must rise from 0 to 1")
    if abs(cumulative[-1] - 1.0) > CUMULATIVE_TOLERANCE:
        raise ValueError(f"trace file {path}: line 3: the last cumulative probability is {cumulative[-1]}, not 1")
    return TraceDistribution(unique, distances, cumulative)


def _parse_line(path: str | os.PathLike, number: int, line: str, kind: type, what: str) -> list:
    try:
        return [kind(item) for item in line.split(",")]
    except ValueError:
        shown = line if len(line) <= 40 else line[:40] + "..."
        raise ValueError(
            f"trace file {path}: line {number}: {what} must be comma-separated {kind.__name__}s, got {shown!r}"
        ) from None


def read_table_traces(template: str, tables: int) -> list[TraceDistribution]:
    """Each of the ``tables`` tables' distribution, from its ``table_trace_file``; a file shared is read once."""
    files = [table_trace_file(template, table) for table in range(tables)]
    read = {file: read_trace_distribution(file) for file in dict.fromkeys(files)}
    return [read[file] for file in files]


def table_trace_file(template: str, table: int) -> str:
    """The trace file of ``table``: every "j" in the file name of ``template`` replaced by the table's number.

    The original replaced every "j" in the whole path; the folders are left alone here.
    """
    folder, name = os.path.split(template)
    return os.path.join(folder, name.replace("j", str(table)))


class _LruReplay:
    """The original's trace_generate_lru: rows from sampled stack distances, replayed on an LRU stack."""

    def __init__(self, distribution: TraceDistribution, pad: bool) -> None:
        # Most recently used last. It starts as the unique accesses in order, so first accesses come from
        # the front (and once all have been used, the front is the least recently used row).
        self.stack = deque(distribution.unique_accesses)
        self.distances, self.cumulative = distribution.stack_distances, distribution.cumulative
        self.pad = pad
        self.first_accesses = 0

    def rows(self, uniforms: np.ndarray) -> list[int]:
        """One row per uniform number in [0, 1)."""
        return [self._next_row(u) for u in uniforms.tolist()]

    def _next_row(self, u: float) -> int:
        distance = self._stack_distance(u)
        if distance == 0:
            row = self.stack.popleft()
            self.first_accesses += 1
        else:
            row = self.stack[-distance]
            del self.stack[-distance]
        self.stack.append(row)
        return row

    def _stack_distance(self, u: float) -> int:
        """The original's generate_stack_distance: inverse-CDF sampling, limited while the stack is young."""
        if self.first_accesses < self.distances[-1]:
            # reach no deeper than the rows that have had their first access
            reachable = bisect_right(self.distances, self.first_accesses) - 1
            if reachable >= 0:
                u *= self.cumulative[reachable]
        elif self.pad:
            # --data-trace-enable-padding: leave out the first distance (0, a first access): only reuses now
            u = self.cumulative[0] + (1.0 - self.cumulative[0]) * u
        position = min(bisect_left(self.cumulative, u), len(self.distances) - 1)
        return self.distances[position]


class TableSizes(Protocol):
    """What ``SeededBatches`` reads of the model's sizes (``dlrm_s_pytorch.Sizes`` has both)."""

    dense_features: int
    tables: list[int]  # rows of each table


class SeededBatches(torch.utils.data.Dataset):
    """Item ``index`` is a whole batch: dense features, each table's bags, targets, drawn as the original drew them.

    Batch ``index`` of epoch ``epoch`` depends only on those two and the construction: numpy is reseeded with
    987 + epoch * len(self) + index, so loader processes and resumed runs make the same batches. A subclass draws
    each table's bags (``_bags``); the dense features come before them and the targets after, from the same stream.
    """

    def __init__(self, args: argparse.Namespace, sizes: TableSizes) -> None:
        self.batch_size = args.mini_batch_size
        if args.num_batches > 0:
            self.num_batches, self.data_size = args.num_batches, args.num_batches * self.batch_size
        else:
            self.num_batches, self.data_size = math.ceil(args.data_size / self.batch_size), args.data_size
        self.dense_features, self.tables = sizes.dense_features, list(sizes.tables)
        self.largest_bag, self.fixed_bags = args.num_indices_per_lookup, args.num_indices_per_lookup_fixed
        self.round_targets = args.round_targets
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """Batch ``index`` of the current epoch: (dense, per-table offsets, per-table indices, targets)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} of {self.num_batches}")
        rng = np.random.RandomState(FIRST_BATCH_SEED + self.epoch * self.num_batches + index)
        n = min(self.batch_size, self.data_size - index * self.batch_size)
        dense = torch.from_numpy(rng.rand(n, self.dense_features).astype(np.float32))
        offsets, indices = [], []
        for table in range(len(self.tables)):
            table_offsets, table_indices = self._bags(rng, n, table)
            offsets.append(table_offsets)
            indices.append(table_indices)
        targets = rng.rand(n, 1).astype(np.float32)
        if self.round_targets:
            targets = np.round(targets)
        return dense, offsets, indices, torch.from_numpy(targets)

    def _bags(self, rng: np.random.RandomState, n: int, table: int) -> tuple[Tensor, Tensor]:
        """Table ``table``'s ``n`` bags: (offsets, indices)."""
        raise NotImplementedError


class TraceDataset(SeededBatches):
    """Batches whose rows come from traces; dense features, bag sizes and targets are drawn as by the random data.

    Each table's bags in a batch are one replay of its trace from a fresh LRU stack (the original started afresh
    for every bag), and each bag keeps its distinct rows, sorted, as the original.
    """

    def __init__(self, args: argparse.Namespace, sizes: TableSizes, distributions: list[TraceDistribution]) -> None:
        """``distributions``: each table's, from ``read_table_traces``."""
        super().__init__(args, sizes)
        self.pad = args.data_trace_enable_padding
        self.distributions = distributions
        for table, (distribution, rows) in enumerate(zip(distributions, self.tables, strict=True)):
            file, accesses = table_trace_file(args.data_trace_file, table), distribution.unique_accesses
            if min(accesses) < 0 or max(accesses) >= rows:
                print(
                    f"Warning: trace file {file}: rows {min(accesses)}..{max(accesses)} do not fit table {table} of "
                    f"{rows} rows; using them modulo {rows}, as the original did"
                )

    def _bags(self, rng: np.random.RandomState, n: int, table: int) -> tuple[Tensor, Tensor]:
        """One table's ``n`` bags, drawing as the original: per bag its size (unless fixed), then its rows."""
        rows, replay = self.tables[table], _LruReplay(self.distributions[table], self.pad)
        bags, lengths = [], np.empty(n, np.int64)
        for sample in range(n):
            if self.fixed_bags:
                size = self.largest_bag
            else:
                size = round(max(1.0, rng.random() * min(rows, self.largest_bag)))  # half to even, as numpy's
            bag = np.mod(np.unique(replay.rows(rng.random(size))), rows)  # rows past the table may meet again
            bags.append(bag)
            lengths[sample] = bag.size
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return torch.from_numpy(offsets), torch.from_numpy(np.concatenate(bags).astype(np.int64))
