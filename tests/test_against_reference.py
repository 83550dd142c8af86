"""The command line beside a plain-PyTorch DLRM written from SPEC §3: the same losses, iteration by iteration."""

import numpy as np
import pytest
import torch
from conftest import finished_lines, run_script
from reference_dlrm import ReferenceDLRM, random_batch, reference_losses

import dlrm_s_pytorch
from distributed_utils import Shard

BASE = dict(
    seed=123, tables=[40, 7, 300], dim=4, bottom=[5, 8, 4], top=[6, 1], op="dot", itself=False, threshold=0.0,
    optimizer="sgd", lr=0.1, batch=16, data_size=96, epochs=1, nipl=5, fixed=False, round_targets=False,
    loss="bce", loss_weights=[1.0, 1.0], train=True, print_freq=1,
)  # fmt: skip

CASES = {
    "dot-sgd-random-bags": {},
    "cat-adagrad-fixed-bags": dict(op="cat", optimizer="adagrad", fixed=True, lr=0.05),
    "dot-itself-adagrad": dict(itself=True, optimizer="adagrad", lr=0.02, tables=[1000, 2, 50, 9]),
    "cat-sgd-mse-rounded": dict(op="cat", loss="mse", round_targets=True, seed=7, top=[9, 3, 1]),
    "wbce-clamped-two-epochs-partial": dict(
        loss="wbce", loss_weights=[0.7, 1.3], threshold=0.3, epochs=2, data_size=90, round_targets=True
    ),
    "inference-only": dict(train=False, op="cat"),
    "window-averages": dict(print_freq=4, epochs=2, data_size=160, round_targets=True, optimizer="adagrad"),
}


def expected_lines(cfg: dict) -> list[tuple[int, int, float, float]]:
    """(epoch, iteration, mean loss, accuracy %) of each printed line: averages over the lines' own windows."""
    records, nbatches = reference_losses(cfg), -(-cfg["data_size"] // cfg["batch"])
    lines, window = [], []
    for epoch, index, loss, correct in records:
        if index == 0:
            window = []
        window.append((loss, correct))
        if (index + 1) % cfg["print_freq"] == 0 or index + 1 == nbatches:
            mean_loss = sum(loss for loss, _ in window) / len(window)
            accuracy = 100 * sum(correct for _, correct in window) / (len(window) * cfg["batch"])
            lines.append((epoch, index + 1, mean_loss, accuracy))
            window = []
    return lines


def command_line(cfg: dict) -> list[str]:
    def dashed(values):
        return "-".join(str(v) for v in values)

    args = [
        f"--numpy-rand-seed={cfg['seed']}", f"--arch-embedding-size={dashed(cfg['tables'])}",
        f"--arch-sparse-feature-size={cfg['dim']}", f"--arch-mlp-bot={dashed(cfg['bottom'])}",
        f"--arch-mlp-top={dashed(cfg['top'])}", f"--arch-interaction-op={cfg['op']}",
        f"--loss-threshold={cfg['threshold']}", f"--optimizer={cfg['optimizer']}",
        f"--learning-rate={cfg['lr']}", f"--mini-batch-size={cfg['batch']}", f"--data-size={cfg['data_size']}",
        f"--nepochs={cfg['epochs']}", f"--num-indices-per-lookup={cfg['nipl']}",
        f"--loss-function={cfg['loss']}", f"--loss-weights={dashed(cfg['loss_weights'])}",
        f"--print-freq={cfg['print_freq']}",
    ]  # fmt: skip
    flags = dict(itself="--arch-interaction-itself", fixed="--num-indices-per-lookup-fixed")
    flags.update(round_targets="--round-targets")
    args += [flag for key, flag in flags.items() if cfg[key]]
    if not cfg["train"]:
        args.append("--inference-only")
    return args


@pytest.mark.parametrize("name", CASES)
def test_losses_match_the_reference(name: str) -> None:
    cfg = {**BASE, **CASES[name]}
    result = run_script(*command_line(cfg))
    assert result.returncode == 0, result.stderr
    printed = finished_lines(result.stdout)
    expected = expected_lines(cfg)
    assert len(printed) == len(expected) > 0
    for line, (epoch, it, loss, accuracy) in zip(printed, expected, strict=True):
        assert line["phase"] == ("training" if cfg["train"] else "inference")
        assert (line["epoch"], line["it"]) == (epoch, it)
        # printed to 6 decimals (5e-7), plus float32 summation order: up to 1.2e-7 observed before printing
        assert line["loss"] == pytest.approx(loss, abs=1e-5)
        assert line["accuracy"] == pytest.approx(accuracy, abs=1e-3)
    if cfg["data_size"] % cfg["batch"]:
        assert "Breaking out of the epoch as  batch was partial. Number of samples: 10" in result.stdout


def test_workers_give_the_same_batches_as_the_main_process() -> None:
    cfg = {**BASE, "epochs": 2}
    alone = run_script(*command_line(cfg))
    with_workers = run_script(*command_line(cfg), "--num-workers=2")
    assert alone.returncode == with_workers.returncode == 0, with_workers.stderr
    assert [r["loss"] for r in finished_lines(alone.stdout)] == [r["loss"] for r in finished_lines(with_workers.stdout)]


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("tables, nipl", [([1, 2, 5000], 7), ([3_000_000], 38), ([10, 4], 1)])
def test_generated_batches_equal_the_sample_by_sample_generator(tables: list[int], nipl: int, fixed: bool) -> None:
    argv = [f"--arch-embedding-size={'-'.join(map(str, tables))}", "--arch-mlp-bot=3-2", "--mini-batch-size=64"]
    argv += [f"--num-indices-per-lookup={nipl}", "--data-size=100", "--round-targets"]
    argv += ["--num-indices-per-lookup-fixed"] if fixed else []
    args, sizes, _ = dlrm_s_pytorch.parse_command_line(argv)
    dataset = dlrm_s_pytorch.RandomDataset(args, sizes)
    for epoch, index, j in [(0, 0, 0), (0, 1, 1), (3, 1, 7)]:  # two batches an epoch: j = 2 * epoch + index
        dataset.epoch = epoch
        ours = dataset[index]
        expected = random_batch(j, 64 if index == 0 else 36, 3, tables, nipl, fixed, round_targets=True)
        for mine, theirs in zip(tensors_of(ours), tensors_of(expected), strict=True):
            assert torch.equal(mine, theirs)


def tensors_of(batch) -> list:
    dense, offsets, indices, targets = batch
    return [dense, *offsets, *indices, targets]


@pytest.mark.parametrize("rows", [None, (70_000, 140_000)])  # the whole table, or rows drawn in three chunks
def test_a_table_over_65536_rows_starts_as_the_reference_draws_it(rows: tuple[int, int] | None) -> None:
    tables = [3, 140_007, 5]
    argv = ["--arch-embedding-size=3-140007-5", "--arch-sparse-feature-size=4", "--arch-mlp-bot=5-4"]
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*argv, "--arch-mlp-top=6-1", "--arch-interaction-op=dot"])
    shards = None if rows is None else [Shard(1, *rows, 0)]
    np.random.seed(5)
    ours = dlrm_s_pytorch.DLRM(args, sizes, shards=shards)
    np.random.seed(5)
    reference = ReferenceDLRM(tables, 4, [5, 4], [6, 1], "dot", itself=False, threshold=0.0)
    expected = [table.weight[slice(*rows) if rows else slice(None)] for table in reference.tables]
    drawn = [table.weight for table in ours.embeddings]
    assert len(drawn) == (3 if rows is None else 1)
    for mine, theirs in zip(drawn, expected if rows is None else expected[1:2], strict=True):
        assert torch.equal(mine, theirs)
    mlps = [*reference.bottom.parameters(), *reference.top.parameters()]  # drawn after the tables
    assert len(mlps) == 6 and all(torch.equal(a, b) for a, b in zip(ours.dense.parameters(), mlps, strict=True))
