"""Trace-driven synthetic data: the trace file format, the profile, and the batches replayed from it."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import trace_data
from trace_data import TraceDataset, read_trace_distribution, write_trace_distribution

# by hand: 1 2 1 1 3 2 1 -> first, first, 1 at depth 2 (2 above it), 1 again, first, 2 under {1, 3}, 1 under {3, 2}
KNOWN_TRACE = [1, 2, 1, 1, 3, 2, 1]
KNOWN_DISTANCES = [0, 0, 2, 1, 0, 3, 3]


def trace_file(tmp_path, text: str, name: str = "trace.log") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def dataset(trace: str, tables: list[int], **overrides) -> TraceDataset:
    args = dict(
        mini_batch_size=16,
        num_batches=2,
        data_size=0,
        num_indices_per_lookup=1,
        num_indices_per_lookup_fixed=True,
        round_targets=False,
        data_trace_file=trace,
        data_trace_enable_padding=False,
    )
    args.update(overrides)
    distributions = trace_data.read_table_traces(trace, len(tables))
    return TraceDataset(SimpleNamespace(**args), SimpleNamespace(dense_features=3, tables=tables), distributions)


def same(batch, other) -> bool:
    (dense, offsets, indices, targets), (other_dense, other_offsets, other_indices, other_targets) = batch, other
    tensors = [dense, *offsets, *indices, targets]
    other_tensors = [other_dense, *other_offsets, *other_indices, other_targets]
    return len(tensors) == len(other_tensors) and all(map(torch.equal, tensors, other_tensors))


def bags(offsets: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    ends = [*offsets.tolist()[1:], indices.numel()]
    return [indices[start:end].tolist() for start, end in zip(offsets.tolist(), ends, strict=True)]


# the file format and the profile


def test_stack_distances_of_a_known_trace():
    assert trace_data.access_stack_distances(KNOWN_TRACE) == (KNOWN_DISTANCES, [1, 2, 3])
    profile = trace_data.profile_trace(KNOWN_TRACE)
    assert profile.unique_accesses == [1, 2, 3]
    assert profile.stack_distances == [0, 1, 2, 3]
    assert profile.cumulative == pytest.approx([3 / 7, 4 / 7, 5 / 7, 1.0])


def test_profile_padding_adds_first_accesses():
    # 7 accesses, largest distance 3: ceil(7 / 3) = 3 more first accesses, 6 of 10
    profile = trace_data.profile_trace(KNOWN_TRACE, pad_new_references=True)
    assert profile.cumulative == pytest.approx([0.6, 0.7, 0.8, 1.0])
    assert trace_data.profile_trace([5, 6, 7], pad_new_references=True).cumulative == [1.0]  # nothing to pad


def test_file_round_trip_in_the_original_format(tmp_path):
    path = tmp_path / "dist.log"
    write_trace_distribution(path, KNOWN_TRACE)
    lines = path.read_text().splitlines()
    assert lines[:2] == ["1, 2, 3", "0, 1, 2, 3"]
    assert [float(p) for p in lines[2].split(", ")] == pytest.approx([3 / 7, 4 / 7, 5 / 7, 1.0])
    assert read_trace_distribution(path) == trace_data.profile_trace(KNOWN_TRACE)


def test_reads_a_hand_written_file(tmp_path):
    distribution = read_trace_distribution(trace_file(tmp_path, "5, 7, 9\n0,1\n0.25, 0.9999999999999999\n"))
    assert (distribution.unique_accesses, distribution.stack_distances) == ([5, 7, 9], [0, 1])
    assert distribution.cumulative == [0.25, 0.9999999999999999]


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("", "has 0 lines, expected 3"),
        ("1, 2\n0\n", "has 2 lines, expected 3"),
        ("1, 2\n0\n1.0\n0\n", "has 4 lines, expected 3"),
        ("1, x\n0\n1.0\n", "line 1: unique accesses must be comma-separated ints"),
        ("\n0\n1.0\n", "line 1: unique accesses must be comma-separated ints"),
        ("1, 2\n0, 1.5\n0.5, 1.0\n", "line 2: stack distances must be comma-separated ints"),
        ("1, 2\n1, 0\n0.5, 1.0\n", "line 2: stack distances must be ascending"),
        ("1, 2\n0, 3\n0.5, 1.0\n", "line 2: stack distance 3 is deeper than the 2 unique accesses"),
        ("1, 2\n0, 1\nhalf, 1.0\n", "line 3: cumulative probabilities must be comma-separated floats"),
        ("1, 2\n0, 1\n1.0\n", "line 3: has 1 probabilities for 2 stack distances"),
        ("1, 2\n0, 1\n0.7, 0.5\n", "line 3: cumulative probabilities must rise from 0 to 1"),
        ("1, 2\n0, 1\n0.5, 0.9\n", "line 3: the last cumulative probability is 0.9, not 1"),
    ],
)
def test_malformed_file_names_the_file_and_the_line(tmp_path, text, complaint):
    path = trace_file(tmp_path, text)
    with pytest.raises(ValueError) as error:
        read_trace_distribution(path)
    message = str(error.value)
    assert message.startswith(f"trace file {path}: ") and complaint in message
    assert "\n" not in message


def test_missing_file_is_a_value_error(tmp_path):
    missing = tmp_path / "absent.log"
    with pytest.raises(ValueError, match=r"^trace file .*absent\.log: cannot be read \(No such file or directory\)$"):
        read_trace_distribution(missing)
    trace_file(tmp_path, "1\n0\n1.0\n", "dist_0.log")
    with pytest.raises(ValueError, match=r"dist_1\.log: cannot be read"):  # the dataset reads every table's file
        dataset(str(tmp_path / "dist_j.log"), tables=[10, 10])


def test_every_j_of_the_file_name_is_the_table_number():
    assert trace_data.table_trace_file("./input/dist_emb_j.log", 3) == "./input/dist_emb_3.log"
    assert trace_data.table_trace_file("/data/jobs/j_emb_j.log", 12) == "/data/jobs/12_emb_12.log"
    assert trace_data.table_trace_file("trace.log", 4) == "trace.log"  # no "j": one file for every table


# the batches


def test_batch_shapes_and_types(tmp_path):
    trace = trace_file(tmp_path, ", ".join(map(str, range(50))) + "\n0, 1, 5\n0.4, 0.8, 1.0\n")
    data = dataset(trace, [30, 40, 3], mini_batch_size=16, num_batches=0, data_size=40, num_indices_per_lookup=5)
    assert len(data) == 3  # ceil(40 / 16)
    for index, n in [(0, 16), (2, 8)]:
        dense, offsets, indices, targets = data[index]
        assert dense.dtype == torch.float32 and dense.shape == (n, 3)
        assert targets.dtype == torch.float32 and targets.shape == (n, 1)
        assert len(offsets) == len(indices) == 3
        for table_offsets, table_indices, rows in zip(offsets, indices, [30, 40, 3], strict=True):
            assert table_offsets.dtype == table_indices.dtype == torch.int64
            assert table_offsets.shape == (n,) and table_offsets[0] == 0
            for bag in bags(table_offsets, table_indices):
                assert 1 <= len(bag) <= 5  # rows wrapped onto a smaller table may repeat
                assert all(0 <= row < rows for row in bag)
    with pytest.raises(IndexError):
        data[3]


def test_bags_hold_distinct_rows_sorted_as_the_originals_unique(tmp_path):
    trace = trace_file(tmp_path, ", ".join(map(str, range(50))) + "\n0, 1, 5\n0.4, 0.8, 1.0\n")
    _, offsets, indices, _ = dataset(trace, [50], num_indices_per_lookup=5, num_indices_per_lookup_fixed=False)[0]
    for bag in bags(offsets[0], indices[0]):
        assert bag == sorted(set(bag))


def test_rows_past_the_table_are_wrapped_after_removing_duplicates_as_the_original(tmp_path):
    """The original took np.unique of a bag's rows, then their modulo: 1 and 4 on a table of 3 rows are 1 twice."""
    trace = trace_file(tmp_path, "1, 4\n0\n1.0\n")
    _, offsets, indices, _ = dataset(trace, [3], mini_batch_size=1, num_indices_per_lookup=2)[0]
    assert bags(offsets[0], indices[0]) == [[1, 1]]


def test_fixed_bags_and_rounded_targets(tmp_path):
    trace = trace_file(tmp_path, ", ".join(map(str, range(100))) + "\n0\n1.0\n")
    _, offsets, indices, targets = dataset(trace, [1000], num_indices_per_lookup=4, round_targets=True)[0]
    assert offsets[0].tolist() == list(range(0, 64, 4))  # only first accesses: never a duplicate to remove
    assert set(targets.flatten().tolist()) <= {0.0, 1.0}


def test_only_first_accesses_walk_the_unique_accesses_in_order(tmp_path):
    trace = trace_file(tmp_path, "10, 11, 12, 13\n0\n1.0\n")
    _, offsets, indices, _ = dataset(trace, [100], mini_batch_size=10)[0]
    assert offsets[0].tolist() == list(range(10))
    assert indices[0].tolist() == [10, 11, 12, 13, 10, 11, 12, 13, 10, 11]  # the LRU stack cycles


def test_repeats_come_at_the_rate_of_the_distribution(tmp_path):
    # distance 1 (the previous row again) with probability 0.3, else a row not used yet
    trace = trace_file(tmp_path, ", ".join(map(str, range(1000))) + "\n0, 1\n0.7, 1.0\n")
    _, _, indices, _ = dataset(trace, [1000], mini_batch_size=4000, num_batches=1)[0]
    rows = indices[0]
    repeats = (rows[1:] == rows[:-1]).float().mean().item()
    assert repeats == pytest.approx(0.3, abs=0.025)


def test_each_table_reads_its_own_file(tmp_path):
    trace_file(tmp_path, "100, 101\n0\n1.0\n", "dist_0.log")
    trace_file(tmp_path, "200, 201\n0\n1.0\n", "dist_1.log")
    _, _, indices, _ = dataset(str(tmp_path / "dist_j.log"), [500, 500], mini_batch_size=4)[0]
    assert [table.tolist() for table in indices] == [[100, 101, 100, 101], [200, 201, 200, 201]]


def test_rows_beyond_the_table_wrap_around_with_a_one_line_warning(tmp_path, capsys):
    trace = trace_file(tmp_path, "3, 17, 25, 9\n0\n1.0\n")
    data = dataset(trace, [10], mini_batch_size=4)
    expected = f"Warning: trace file {trace}: rows 3..25 do not fit table 0 of 10 rows; using them modulo 10, as the "
    assert capsys.readouterr() == (expected + "original did\n", "")
    assert data[0][2][0].tolist() == [3, 7, 5, 9]


def test_padding_stops_new_rows_once_the_stack_is_as_deep_as_the_largest_distance(tmp_path):
    trace = trace_file(tmp_path, ", ".join(map(str, range(100))) + "\n0, 1, 2\n0.5, 0.75, 1.0\n")
    rows = {}
    for padding in (False, True):
        _, _, indices, _ = dataset(trace, [100], mini_batch_size=200, data_trace_enable_padding=padding)[0]
        rows[padding] = set(indices[0].tolist())
    assert len(rows[False]) > 50  # about half the accesses are first accesses
    assert rows[True] == {0, 1}  # two first accesses, then only reuses


def test_a_batch_depends_only_on_epoch_and_index(tmp_path):
    trace = trace_file(tmp_path, ", ".join(map(str, range(15))) + "\n0, 1, 4\n0.3, 0.6, 1.0\n")
    options = dict(num_batches=4, num_indices_per_lookup=3, num_indices_per_lookup_fixed=False)
    data = dataset(trace, [15, 25], **options)

    first = data[2]
    _ = data[0], data[3]  # other batches in between change nothing
    assert same(data[2], first)
    assert same(dataset(trace, [15, 25], **options)[2], first)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2)
    assert all(same(batch, data[i]) for i, batch in enumerate(loader))

    data.epoch = 1
    assert not torch.equal(data[2][0], first[0])
    seeded = np.random.RandomState(trace_data.FIRST_BATCH_SEED + 1 * len(data) + 2)
    assert torch.equal(data[2][0], torch.from_numpy(seeded.rand(16, 3).astype(np.float32)))


def test_draws_dense_features_and_targets_as_the_random_data(tmp_path):
    """Per bag the original drew the bag's size, then one number per row, for random and synthetic data alike."""
    import dlrm_s_pytorch as dlrm

    trace = trace_file(tmp_path, ", ".join(map(str, range(15))) + "\n0, 1, 4\n0.3, 0.6, 1.0\n")
    options = dict(num_batches=3, num_indices_per_lookup=6, num_indices_per_lookup_fixed=False, round_targets=False)
    synthetic = dataset(trace, [15, 25], **options)
    args = SimpleNamespace(mini_batch_size=16, data_size=0, **options)
    random = dlrm.RandomDataset(args, SimpleNamespace(dense_features=3, tables=[15, 25]))
    for data in (synthetic, random):
        data.epoch = 2
    dense, _, _, targets = synthetic[1]
    random_dense, _, _, random_targets = random[1]
    assert torch.equal(dense, random_dense) and torch.equal(targets, random_targets)
