"""DLRM training on random data: the Habana Gaudi port's script, runnable on a CPU.

Read top to bottom: the command line and its checks, the random data and its preprocessing, the model, the
training loop. ``../shared/SPEC.md`` is the contract this file keeps.

    python dlrm_s_pytorch.py --config hb_configs/small.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import distributed_utils
from distributed_utils import EmbeddingExchange, Ranks, Shard
from habana_dlrm_ops import (
    OPTIMIZERS,
    Backend,
    BagBatch,
    DeviceUnavailable,
    EmbeddingBag,
    RowGrouper,
    TorchKernels,
    preprocess_bags,
    select_backend,
)

# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad input: reported as one line with exit code 2, before any work is done."""


class DivergedError(Exception):
    """Training produced non-finite scores: reported as one line with exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print the whole usage first
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the original script and its launcher, with the original names, types and defaults."""
    p = _Parser(description="Train DLRM (Deep Learning Recommendation Model) on random data.")
    add = p.add_argument
    # model
    add("--arch-sparse-feature-size", type=int, default=2, help="embedding dimension")
    add("--arch-embedding-size", type=_sizes, default="4-3-2", help="rows of each table, '-'-separated")
    add("--arch-mlp-bot", type=_sizes, default="4-3-2", help="bottom MLP widths, first = dense features")
    add("--arch-mlp-top", type=_sizes, default="4-2-1", help="top MLP widths after the interaction")
    add("--arch-interaction-op", type=str, default="cat", choices=["dot", "cat"])
    add("--arch-interaction-itself", action="store_true", default=False)
    add("--md-flag", action="store_true", default=False)
    add("--md-threshold", type=int, default=200)
    add("--md-temperature", type=float, default=0.3)
    add("--md-round-dims", action="store_true", default=False)
    add("--qr-flag", action="store_true", default=False)
    add("--qr-threshold", type=int, default=200)
    add("--qr-operation", type=str, default="mult")
    add("--qr-collisions", type=int, default=4)
    add("--activation-function", type=str, default="relu")
    add("--loss-function", type=str, default="bce", choices=["mse", "bce", "wbce"])
    add("--loss-weights", type=_loss_weights, default="1.0-1.0", help="wbce weights of targets 0 and 1")
    add("--loss-threshold", type=float, default=0.0, help="clamp the output to [t, 1-t] when 0 < t < 1")
    add("--round-targets", action="store_true", default=False)
    # data
    add("--data-size", type=int, default=8)
    add("--num-batches", type=int, default=0, help="batches per epoch (overrides --data-size when > 0)")
    add("--data-generation", type=str, default="random", choices=["random", "synthetic", "dataset"])
    add("--data-trace-file", type=str, default="./input/dist_emb_j.log")
    add("--data-set", type=str, default="kaggle", choices=["kaggle", "terabyte"])
    add("--raw-data-file", type=str, default="")
    add("--processed-data-file", type=str, default="")
    add("--data-randomize", type=str, default="total", choices=["total", "day", "none"])
    add("--data-trace-enable-padding", action="store_true", default=False)
    add("--max-ind-range", type=int, default=-1)
    add("--data-sub-sample-rate", type=float, default=0.0)
    add("--num-indices-per-lookup", type=int, default=10, help="largest bag")
    add("--num-indices-per-lookup-fixed", action="store_true", default=False)
    add("--num-workers", type=int, default=0, help="data loader processes that prefetch batches")
    add("--memory-map", action="store_true", default=False)
    # training
    add("--mini-batch-size", type=int, default=4)
    add("--nepochs", type=int, default=1)
    add("--learning-rate", type=float, default=0.5)
    add("--print-precision", type=int, default=5)
    add("--numpy-rand-seed", type=int, default=123)
    add("--sync-dense-params", type=_parse_bool, default=True)
    add("--optimizer", type=str, default="sgd", choices=list(OPTIMIZERS))
    add("--inference-only", action="store_true", default=False)
    add("--save-onnx", action="store_true", default=False)
    add("--use-gpu", action="store_true", default=False)
    add("--print-freq", type=int, default=20)
    add("--test-freq", type=int, default=-1)
    add("--test-mini-batch-size", type=int, default=-1)
    add("--test-num-workers", type=int, default=-1)
    add("--print-time", action="store_true", default=False)
    add("--debug-mode", action="store_true", default=False)
    add("--enable-profiling", action="store_true", default=False)
    add("--plot-compute-graph", action="store_true", default=False)
    add("--save-model", type=str, default="")
    add("--load-model", type=str, default="")
    add("--mlperf-logging", action="store_true", default=False)
    add("--mlperf-acc-threshold", type=float, default=0.0)
    add("--mlperf-auc-threshold", type=float, default=0.0)
    add("--mlperf-bin-loader", action="store_true", default=False)
    add("--mlperf-bin-shuffle", action="store_true", default=False)
    add("--no-habana", action="store_true", default=False, help="do not use a Gaudi card")
    add("--hmp", dest="data_type", action="store_const", const="bf16", default="fp32", help="same as --data_type bf16")
    add("--hmp-bf16", type=str, default="", help="the original's list of ops run in bf16")
    add("--hmp-fp32", type=str, default="", help="the original's list of ops kept in fp32")
    add("--hmp-opt-level", type=str, default="O1")
    add("--hmp-verbose", action="store_true", default=False)
    add("--distributed", action="store_true", default=False)
    add("--print-dist-loss", action="store_true", default=False)
    add("--log-device-mem-alloc", action="store_true", default=False, help="print peak memory with each report")
    add("--run-lazy-mode", dest="mode", action="store_const", const="lazy", default="eager", help="same as --mode lazy")
    add("--measure-perf", action="store_true", default=False, help="replay one batch --num-batches times")
    add("--print-all-ranks", action="store_true", default=False)
    # the original launcher's flags, and ours
    add("--mode", type=str, default="eager", choices=["eager", "lazy", "custom"], help="custom = eager")
    add("-d", "--data_type", type=str, default="fp32", choices=["fp32", "bf16"])
    add("-w", "--world_size", type=int, default=1)
    add("--device", type=str, default="auto", choices=["auto", "cpu", "cuda", "hpu"])
    add("--config", type=str, default="", help="a YAML run configuration (hb_configs/); flags override it")
    return p


def _dash_separated(text: str, kind: type) -> list:
    """``"4-3-2"`` -> ``[4, 3, 2]``; an empty list when any part is not a ``kind``."""
    try:
        return [kind(part) for part in text.split("-")]
    except ValueError:
        return []


def _sizes(text: str) -> list[int]:
    sizes = _dash_separated(text, int)
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected '-'-separated positive integers, got {text!r}")
    return sizes


def _loss_weights(text: str) -> list[float]:
    weights = _dash_separated(text, float)
    if len(weights) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like '1.0-1.0', got {text!r}")
    return weights


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


CONFIG_KEYS = {"model", "env_variables", "parameters"}


def _read_text(flag: str, path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not a text file") from None


def load_config(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, str]]:
    """Read an ``hb_configs`` YAML file into command-line arguments and environment variables."""
    try:
        config = yaml.safe_load(_read_text("--config", path))
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise UsageError(f"--config {path}: expected a mapping with keys {sorted(CONFIG_KEYS)}")
    unknown = sorted(map(str, config.keys() - CONFIG_KEYS))
    if unknown:
        raise UsageError(f"--config {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(CONFIG_KEYS))})")
    if config.get("model", "dlrm") != "dlrm":
        raise UsageError(f"--config {path}: model is {config['model']!r}, this script trains 'dlrm'")
    parameters, env = config.get("parameters") or {}, config.get("env_variables") or {}
    if not isinstance(parameters, dict) or not isinstance(env, dict):
        raise UsageError(f"--config {path}: 'parameters' and 'env_variables' must be mappings")
    parameters = dict(parameters)
    switches = parameters.pop("store_true", None) or []
    if not isinstance(switches, list):
        raise UsageError(f"--config {path}: 'store_true' must be a list of flag names")

    options = {s: a for a in parser._actions for s in a.option_strings}
    argv = []
    for name in switches:
        action = options.get(f"--{name}")
        if action is None or action.nargs != 0:
            raise UsageError(f"--config {path}: {name!r} in store_true is not an on/off flag")
        argv.append(f"--{name}")
    for name, value in parameters.items():
        action = options.get(f"--{name}")
        if action is None or name == "config":
            raise UsageError(f"--config {path}: unknown parameter {name!r}")
        if action.nargs == 0:
            raise UsageError(f"--config {path}: {name!r} is an on/off flag: list it under store_true")
        argv.append(f"--{name}={value}")
    env = {str(k): str(v) for k, v in env.items()}
    for name, value in env.items():
        if not name or "=" in name or "\0" in name + value:
            raise UsageError(f"--config {path}: {name!r} cannot be an environment variable")
    return argv, env


@dataclass
class Sizes:
    """The model's dimensions, derived from the flags as the original did."""

    dense_features: int  # m_den = ln_bot[0]
    embedding_dim: int  # m_spa
    tables: list[int]  # ln_emb
    bottom: list[int]  # ln_bot
    top: list[int]  # ln_top, the interaction width first


def model_sizes(args: argparse.Namespace) -> Sizes:
    tables, bottom, top = args.arch_embedding_size, args.arch_mlp_bot, args.arch_mlp_top
    dim = args.arch_sparse_feature_size
    if len(bottom) < 2:
        raise UsageError("--arch-mlp-bot: needs at least an input and an output width")
    if bottom[-1] != dim:
        raise UsageError(f"--arch-mlp-bot: its output width {bottom[-1]} must equal --arch-sparse-feature-size {dim}")
    if top[-1] != 1:
        raise UsageError(f"--arch-mlp-top: the last width must be 1 (one score per sample), got {top[-1]}")
    features = len(tables) + 1
    if args.arch_interaction_op == "dot":
        pairs = features * (features + 1) // 2 if args.arch_interaction_itself else features * (features - 1) // 2
        interaction = pairs + dim
    else:
        interaction = features * dim
    return Sizes(bottom[0], dim, tables, bottom, [interaction, *top])


LATER_DATA = "is not available yet: this release trains on random data, without testing or checkpoints"
NO_QR_MD = "is not supported: the custom embedding op has no quotient-remainder or mixed-dimension variant"

# (flag, whether the parsed value asks for it, why it cannot run)
UNAVAILABLE = [
    ("--data-generation", lambda a: a.data_generation != "random", LATER_DATA),
    *[(flag, None, LATER_DATA) for flag in (
        "--data-trace-file", "--data-set", "--raw-data-file", "--processed-data-file", "--data-randomize",
        "--data-trace-enable-padding", "--max-ind-range", "--data-sub-sample-rate", "--memory-map",
        "--mlperf-bin-loader", "--mlperf-bin-shuffle", "--test-freq", "--test-mini-batch-size",
        "--test-num-workers", "--mlperf-logging", "--mlperf-acc-threshold", "--mlperf-auc-threshold",
        "--save-model", "--load-model", "--save-onnx", "--plot-compute-graph")],
    *[(flag, None, NO_QR_MD) for flag in (
        "--md-flag", "--md-threshold", "--md-temperature", "--md-round-dims",
        "--qr-flag", "--qr-threshold", "--qr-operation", "--qr-collisions")],
    ("--activation-function", lambda a: a.activation_function != "relu", "is not supported: the model uses relu"),
    ("--sync-dense-params false", lambda a: not a.sync_dense_params, "is not supported: dense weights stay in sync"),
    ("--hmp-opt-level", lambda a: a.hmp_opt_level != "O1", "is not supported: only O1 (the original's op lists)"),
]  # fmt: skip

# The original's op lists for bf16: matrix products in bf16, losses and embeddings in fp32.
BF16_OPS = {"addmm", "bmm", "dot", "mm", "mv", "linear"}
FP32_OPS = {"binary_cross_entropy", "mse_loss", "embedding_bag_sum_fwd", "embedding_bag_sum_bwd"}


def _check_op_list(flag: str, path: str, expected: set[str]) -> None:
    ops = {line.strip() for line in _read_text(flag, path).splitlines() if line.strip()}
    if ops != expected:
        raise UsageError(f"{flag} {path}: only the original list is supported ({', '.join(sorted(expected))})")


def _check_memory(args: argparse.Namespace, sizes: Sizes) -> None:
    """Stop early, naming the flags, when the weights, optimizer state and a batch cannot fit in memory."""
    weights = sum(sizes.tables) * sizes.embedding_dim
    weights += sum((n + 1) * m for layers in (sizes.bottom, sizes.top) for n, m in itertools.pairwise(layers))
    copies = 2 if args.optimizer == "adagrad" and not args.inference_only else 1
    activations = args.mini_batch_size * (sum(sizes.bottom) + sum(sizes.top)) * 3  # forward, backward, spare
    index_buffers = args.mini_batch_size * args.num_indices_per_lookup * len(sizes.tables) * 4 * 2  # 4 int64
    needed = 4 * (weights * copies + activations + index_buffers)
    available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available:
        raise UsageError(
            f"--arch-*, --mini-batch-size: the model, its optimizer state and one batch need {needed / 1e9:.1f} GB, "
            f"more than this machine's {available / 1e9:.1f} GB of memory"
        )


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Sizes:
    """Reject every value that cannot run, naming the flag; return the model's sizes."""
    positive = ("mini_batch_size", "num_indices_per_lookup", "print_freq")
    not_negative = ("num_batches", "nepochs", "num_workers", "learning_rate")
    for dest in positive + not_negative:
        value = getattr(args, dest)
        if not value >= (1 if dest in positive else 0) or not math.isfinite(value):
            bound = "positive" if dest in positive else "zero or more"
            raise UsageError(f"--{dest.replace('_', '-')}: must be {bound}, got {value}")
    if args.num_batches == 0 and args.data_size < 1:
        raise UsageError(f"--data-size: must be positive (or --num-batches set), got {args.data_size}")
    if not 0 <= args.numpy_rand_seed < 2**32:
        raise UsageError(f"--numpy-rand-seed: must be in [0, 2**32), got {args.numpy_rand_seed}")
    if not 0 <= args.print_precision <= 50:
        raise UsageError(f"--print-precision: must be in [0, 50], got {args.print_precision}")
    if args.arch_interaction_itself and args.arch_interaction_op != "dot":
        raise UsageError("--arch-interaction-itself: applies only with --arch-interaction-op dot")
    if args.use_gpu and args.device not in ("auto", "cuda"):
        raise UsageError(f"--use-gpu: contradicts --device {args.device}")
    if args.no_habana and args.device == "hpu":
        raise UsageError("--no-habana: contradicts --device hpu")
    if args.world_size < 1:
        raise UsageError(f"--world_size: must be positive, got {args.world_size}")
    if args.mini_batch_size % args.world_size:
        raise UsageError(f"--mini-batch-size {args.mini_batch_size} is not divisible by --world_size {args.world_size}")
    if not 0.0 <= args.loss_threshold < 1.0:
        raise UsageError(f"--loss-threshold: must be in [0, 1), got {args.loss_threshold}")
    if args.measure_perf and args.num_batches <= 0:
        raise UsageError("--measure-perf: needs --num-batches > 0 (the number of times to replay the batch)")
    if args.data_type != "bf16":
        for flag in ("hmp_bf16", "hmp_fp32", "hmp_verbose"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')}: applies only with --data_type bf16 (or --hmp)")
    if args.hmp_bf16:
        _check_op_list("--hmp-bf16", args.hmp_bf16, BF16_OPS)
    if args.hmp_fp32:
        _check_op_list("--hmp-fp32", args.hmp_fp32, FP32_OPS)
    sizes = model_sizes(args)
    _check_memory(args, sizes)
    for flag, asks_for_it, reason in UNAVAILABLE:
        dest = flag.split()[0].lstrip("-").replace("-", "_")
        used = asks_for_it(args) if asks_for_it else getattr(args, dest) != parser.get_default(dest)
        if used:
            raise UsageError(f"{flag} {reason}")
    return sizes


def parse_command_line(argv: list[str]) -> tuple[argparse.Namespace, Sizes, dict[str, str]]:
    """Parse flags (a ``--config`` file first, the command line over it); return args, sizes and env."""
    parser = build_parser()
    config_argv, env = [], {}
    config_path = parser.parse_known_args(argv)[0].config
    if config_path:
        config_argv, env = load_config(config_path, parser)
    args = parser.parse_args(config_argv + argv)
    return args, check_args(args, parser), env


# ---------------------------------------------------------------------------------------------------------
# Data: random batches, generated and preprocessed in the loader (so worker processes can prefetch them)
# ---------------------------------------------------------------------------------------------------------

FIRST_BATCH_SEED = 987  # the original reseeded numpy with 987 + j before generating batch j


@dataclass
class Batch:
    """This rank's part of a global batch: its samples' dense features and targets, its tables' bags."""

    dense: Tensor  # [local samples, dense features]
    bags: list[BagBatch]  # one per table (or rows of one) this rank holds, for every sample of the global batch
    targets: Tensor  # [local samples, 1]
    samples: int  # in the global batch

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        move = dict(device=device, non_blocking=non_blocking)
        bags = [b.to(**move) for b in self.bags]
        return Batch(self.dense.to(**move), bags, self.targets.to(**move), self.samples)

    def pin_memory(self) -> Batch:  # called by the DataLoader's pin_memory thread
        bags = [b.pin_memory() for b in self.bags]
        return Batch(self.dense.pin_memory(), bags, self.targets.pin_memory(), self.samples)


class RandomDataset(torch.utils.data.Dataset):
    """Item ``index`` is a whole batch of raw samples: dense features, each table's bags, targets."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        self.args, self.sizes = args, sizes
        self.batch_size = args.mini_batch_size
        if args.num_batches > 0:
            self.num_batches, self.data_size = args.num_batches, args.num_batches * self.batch_size
        else:
            self.num_batches, self.data_size = math.ceil(args.data_size / self.batch_size), args.data_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, index: int) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
        """Batch ``index`` of the current epoch: (dense, per-table offsets, per-table indices, targets)."""
        rng = np.random.RandomState(FIRST_BATCH_SEED + self.epoch * self.num_batches + index)
        n = min(self.batch_size, self.data_size - index * self.batch_size)
        dense = torch.from_numpy(rng.rand(n, self.sizes.dense_features).astype(np.float32))
        offsets, indices = [], []
        for rows in self.sizes.tables:
            table_offsets, table_indices = self._bags(rng, n, rows)
            offsets.append(table_offsets)
            indices.append(table_indices)
        targets = rng.rand(n, 1).astype(np.float32)
        if self.args.round_targets:
            targets = np.round(targets)
        return dense, offsets, indices, torch.from_numpy(targets)

    def _bags(self, rng: np.random.RandomState, n: int, rows: int) -> tuple[Tensor, Tensor]:
        """One table's bags, drawing the numbers the original drew sample by sample, in bulk.

        Per sample the original drew ``random(1)`` for the bag size k (unless fixed), then ``random(k)``;
        that stream is one ``random(total)``, so draw an upper bound, walk it for the sizes, then rewind and
        consume exactly what was used. Each bag is ``unique(round(r * (rows - 1)))``.
        """
        largest = self.args.num_indices_per_lookup
        if self.args.num_indices_per_lookup_fixed:
            stream = rng.random(n * largest)
            sizes, starts = np.full(n, largest), np.arange(n) * largest
        else:
            state = rng.get_state()
            stream = rng.random(n * (1 + min(rows, largest)))
            sizes, starts = np.empty(n, np.int64), np.empty(n, np.int64)
            numbers, position, scale = stream.tolist(), 0, min(rows, largest)
            for sample in range(n):
                size = round(max(1.0, numbers[position] * scale))  # round half to even, as numpy's
                sizes[sample], starts[sample] = size, position + 1
                position += 1 + size
            rng.set_state(state)
            rng.random(position)

        sample_of = np.repeat(np.arange(n), sizes)
        first = np.repeat(starts - np.cumsum(sizes) + sizes, sizes)
        values = np.round(stream[first + np.arange(sizes.sum())] * (rows - 1)).astype(np.int64)
        order = np.lexsort((values, sample_of))
        values, sample_of = values[order], sample_of[order]
        keep = np.ones(values.size, dtype=bool)
        keep[1:] = (values[1:] != values[:-1]) | (sample_of[1:] != sample_of[:-1])
        lengths = np.bincount(sample_of[keep], minlength=n)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        return torch.from_numpy(offsets), torch.from_numpy(values[keep])


def shard_bags(indices: Tensor, offsets: Tensor, shard: Shard) -> tuple[Tensor, Tensor]:
    """The bags restricted to the shard's rows, renumbered from its first row (bags keep their places)."""
    lengths = torch.diff(offsets, append=torch.tensor([indices.numel()]))
    bag_of_index = torch.repeat_interleave(torch.arange(offsets.numel()), lengths)
    keep = (indices >= shard.start) & (indices < shard.stop)
    kept = torch.bincount(bag_of_index[keep], minlength=offsets.numel())
    return indices[keep] - shard.start, torch.cumsum(kept, 0) - kept


class Preprocessor:
    """The loader's collate function: a raw global batch -> this rank's ``Batch``, with fixed-size buffers."""

    def __init__(
        self, args: argparse.Namespace, sizes: Sizes, shards: list[Shard], ranks: Ranks, group: RowGrouper
    ) -> None:
        self.batch_size, self.capacity = args.mini_batch_size, args.num_indices_per_lookup * args.mini_batch_size
        self.shards, self.ranks, self.group = shards, ranks, group
        self.whole = [shard.start == 0 and shard.stop == sizes.tables[shard.table] for shard in shards]

    def __call__(self, raw: tuple[Tensor, list[Tensor], list[Tensor], Tensor]) -> Batch:
        dense, offsets, indices, targets = raw
        local_batch = self.batch_size // self.ranks.world_size
        mine = slice(self.ranks.rank * local_batch, (self.ranks.rank + 1) * local_batch)
        bags = []
        for shard, whole in zip(self.shards, self.whole, strict=True):
            table_indices, table_offsets = indices[shard.table], offsets[shard.table]
            if not whole:
                table_indices, table_offsets = shard_bags(table_indices, table_offsets, shard)
            bags.append(preprocess_bags(table_indices, table_offsets, self.batch_size, self.capacity, self.group))
        return Batch(dense[mine], bags, targets[mine], dense.size(0))


def make_loader(
    args: argparse.Namespace, sizes: Sizes, backend: Backend, shards: list[Shard], ranks: Ranks
) -> torch.utils.data.DataLoader:
    """Global batches generated by ``--num-workers`` processes (or this one), this rank's part kept, pinned
    for a GPU. Every rank generates the same batches: each one's seed depends only on its position."""
    return torch.utils.data.DataLoader(
        RandomDataset(args, sizes),
        batch_size=None,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=Preprocessor(args, sizes, shards, ranks, backend.group_rows),
        pin_memory=backend.pin_memory,
    )


def epoch_batches(loader: torch.utils.data.DataLoader, epoch: int, replayed: Batch | None) -> Iterable[Batch]:
    """The batches of one epoch, or with ``--measure-perf`` one batch ``replayed`` every iteration."""
    if replayed is not None:
        return itertools.repeat(replayed, len(loader))
    loader.dataset.epoch = epoch
    return loader


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------

TABLE_DRAW_ROWS = 1 << 16  # draw tables in row chunks: same numbers, no float64 copy of a whole table


def draw_table(rows: int, dim: int, start: int = 0, stop: int | None = None) -> Tensor:
    """Rows ``start:stop`` of ``uniform(-sqrt(1/rows), sqrt(1/rows), (rows, dim))`` from numpy's global generator,
    as float32. Every row is drawn, so the generator ends where it would for the whole table."""
    stop = rows if stop is None else stop
    bound = math.sqrt(1 / rows)
    weight = torch.empty(stop - start, dim)
    out = weight.numpy()
    for first in range(0, rows, TABLE_DRAW_ROWS):
        last = min(rows, first + TABLE_DRAW_ROWS)
        drawn = np.random.uniform(low=-bound, high=bound, size=(last - first, dim))
        keep_from, keep_to = max(first, start), min(last, stop)
        if keep_from < keep_to:
            out[keep_from - start : keep_to - start] = drawn[keep_from - first : keep_to - first]
    return weight


def make_mlp(widths: list[int], sigmoid_last: bool) -> nn.Sequential:
    """Linear layers drawn from numpy's global generator, each followed by ReLU (Sigmoid last if asked)."""
    layers = []
    for i, (n, m) in enumerate(itertools.pairwise(widths)):
        linear = nn.Linear(n, m, device="meta")
        weight = np.random.normal(0.0, math.sqrt(2 / (m + n)), size=(m, n)).astype(np.float32)
        bias = np.random.normal(0.0, math.sqrt(1 / m), size=m).astype(np.float32)
        linear.weight = nn.Parameter(torch.from_numpy(weight))
        linear.bias = nn.Parameter(torch.from_numpy(bias))
        last = i == len(widths) - 2
        layers += [linear, nn.Sigmoid() if last and sigmoid_last else nn.ReLU()]
    return nn.Sequential(*layers)


class DensePath(nn.Module):
    """Everything after the embedding lookups: bottom MLP, interaction, top MLP, clamp and loss.

    Lazy mode compiles it into one graph; distributed runs wrap it in DDP.
    """

    def __init__(self, args: argparse.Namespace, sizes: Sizes) -> None:
        super().__init__()
        self.bottom_mlp = make_mlp(sizes.bottom, sigmoid_last=False)
        self.top_mlp = make_mlp(sizes.top, sigmoid_last=True)
        self.interaction, self.loss_threshold = args.arch_interaction_op, args.loss_threshold
        self.loss_function, self.bf16 = args.loss_function, args.data_type == "bf16"
        features = len(sizes.tables) + 1
        rows, cols = torch.tril_indices(features, features, offset=0 if args.arch_interaction_itself else -1)
        self.register_buffer("pair_index", rows * features + cols, persistent=False)
        self.register_buffer("loss_weights", torch.tensor(args.loss_weights), persistent=False)

    def forward(self, dense: Tensor, pooled: list[Tensor], targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scores, loss, stats): stats holds the loss, the correct predictions and the non-finite scores."""
        # bf16: the matrix products run in bf16 (the original's op lists); embeddings and the loss stay fp32.
        with torch.autocast(dense.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            scores = self.top_mlp(self.interact(self.bottom_mlp(dense), pooled)).float()
        finite = torch.isfinite(scores)
        scores = torch.where(finite, scores, 0.5)  # a diverged run is reported, not a crash inside the loss
        if 0.0 < self.loss_threshold < 1.0:
            scores = torch.clamp(scores, min=self.loss_threshold, max=1.0 - self.loss_threshold)
        loss = self.loss(scores, targets)
        correct = (torch.round(scores) == targets).sum()
        stats = torch.stack([loss.detach(), correct.float(), (~finite).sum().float()])
        return scores, loss, stats

    def interact(self, x: Tensor, pooled: list[Tensor]) -> Tensor:
        if self.interaction == "cat":
            return torch.cat([x, *pooled], dim=1)
        features = torch.cat([x, *pooled], dim=1).view(x.size(0), -1, x.size(1))
        products = torch.bmm(features, features.transpose(1, 2)).flatten(1)
        return torch.cat([x, products.index_select(1, self.pair_index)], dim=1)

    def loss(self, scores: Tensor, targets: Tensor) -> Tensor:
        """mse, bce, or wbce (bce weighted by each sample's target, 0 or 1), on probabilities."""
        if self.loss_function == "mse":
            return nn.functional.mse_loss(scores, targets)
        if self.loss_function == "bce":
            return nn.functional.binary_cross_entropy(scores, targets)
        per_sample = nn.functional.binary_cross_entropy(scores, targets, reduction="none")
        return (per_sample * self.loss_weights[targets.long()]).mean()


class DLRM(nn.Module):
    """Embedding bags on sparse features, then the dense path (``DensePath``).

    The embedding lookups run op by op (their update happens inside backward). A rank holds only the tables, or
    rows of tables, its ``shards`` name; ``exchange`` then brings every table's pooled rows for its own samples.
    """

    def __init__(
        self,
        args: argparse.Namespace,
        sizes: Sizes,
        kernels: TorchKernels | None = None,
        shards: list[Shard] | None = None,
        exchange: EmbeddingExchange | None = None,
    ) -> None:
        super().__init__()
        self.shards = shards or [Shard(t, 0, rows, 0) for t, rows in enumerate(sizes.tables)]
        held = {shard.table: shard for shard in self.shards}
        tables = []
        for t, rows in enumerate(sizes.tables):  # every table is drawn, so the generator stays in step
            shard = held.get(t, Shard(t, 0, 0, -1))
            weight = draw_table(rows, sizes.embedding_dim, shard.start, shard.stop)
            if t in held:
                tables.append(EmbeddingBag(weight, kernels))
        self.embeddings = nn.ModuleList(tables)
        self.dense = DensePath(args, sizes)
        self.exchange = exchange

    def lookup(self, bags: list[BagBatch]) -> list[Tensor]:
        """Each table's pooled embeddings for this rank's samples."""
        pooled = [table(table_bags) for table, table_bags in zip(self.embeddings, bags, strict=True)]
        return self.exchange(pooled) if self.exchange else pooled

    def forward(self, dense: Tensor, bags: list[BagBatch], targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.dense(dense, self.lookup(bags), targets)

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        for shard, table in zip(self.shards, self.embeddings, strict=True):
            yield str(shard), table.weight
        yield from self.dense.named_parameters()


# ---------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------


class Window:
    """The iterations since the last printed line: their statistics stay on the device until the line is due."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size  # global
        self.stats: list[Tensor] = []
        self.timed_seconds, self.timed = 0.0, 0

    def add(self, stats: Tensor, seconds: float | None) -> None:
        """``seconds`` is None for a lazy-mode warm-up iteration, which stays out of ms/it."""
        self.stats.append(stats.clone())  # a CUDA graph's output is overwritten by its next replay
        if seconds is not None:
            self.timed_seconds += seconds
            self.timed += 1

    def read(self) -> tuple[float, float, int]:
        """(mean loss, accuracy, non-finite scores) of the global batches; waits for the device and the ranks."""
        start = time.perf_counter()
        stats = torch.stack(self.stats)
        world_size = 1
        if dist.is_initialized():
            dist.all_reduce(stats)  # each rank's loss is its own samples' mean; the counts add up
            world_size = dist.get_world_size()
        stats = stats.cpu().double()
        self.timed_seconds += time.perf_counter() - start
        iterations = len(self.stats)
        loss = float(stats[:, 0].sum()) / (world_size * iterations)
        return loss, float(stats[:, 1].sum()) / (self.batch_size * iterations), int(stats[:, 2].sum())

    def line(self, phase: str, it: int, nbatches: int, epoch: int, print_time: bool) -> str:
        loss, accuracy, non_finite = self.read()
        if non_finite:
            first = it - len(self.stats) + 1
            raise DivergedError(f"it {first}-{it} of epoch {epoch}: the scores are not finite (--learning-rate?)")
        ms = 1000 * self.timed_seconds / self.timed if print_time and self.timed else -1  # -1: not measured
        return (
            f"Finished {phase} it {it}/{nbatches} of epoch {epoch}, {ms:.2f} ms/it, "
            f"loss {loss:.6f}, accuracy {100 * accuracy:3.3f} %"
        )


def distributed_loss(loss: Tensor) -> float:
    """The global batch's loss, every iteration (``--print-dist-loss``; it waits for every rank)."""
    total = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()
    return total.item()


def dense_step(args: argparse.Namespace, dense: DensePath, backend: Backend):
    """The dense path as the loop calls it (compiled in lazy mode, in DDP when distributed), and its optimizer."""
    distributed, training = dist.is_initialized(), not args.inference_only
    copies = None
    if training and dense.bf16 and backend.lazy and backend.bf16_copies and not distributed:
        copies = {name: p.detach().to(torch.bfloat16).requires_grad_() for name, p in dense.named_parameters()}

    def with_bf16_copies(*inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return torch.func.functional_call(dense, copies, inputs)

    dense_path = backend.compile(with_bf16_copies if copies else dense)
    if distributed:
        device_ids = [backend.device.index] if backend.device.type == "cuda" else None
        dense_path = DistributedDataParallel(dense_path, device_ids=device_ids)
    if not training:
        return dense_path, None
    # DDP averages the gradients at the end of backward, so then the dense optimizer steps after it
    optimizer = backend.dense_optimizer(
        list(dense.parameters()), args.optimizer, args.learning_rate, not distributed, copies and [*copies.values()]
    )
    return dense_path, optimizer


def train(args: argparse.Namespace, model: DLRM, loader: torch.utils.data.DataLoader, backend: Backend) -> None:
    training = not args.inference_only
    if training:
        for table in model.embeddings:
            table.set_optimizer(args.optimizer, args.learning_rate)
    dense_path, optimizer = dense_step(args, model.dense, backend)
    warmup = backend.warmup_iterations if backend.lazy else 0
    phase = "training" if training else "inference"
    nbatches = len(loader)
    replayed = backend.to_device(next(iter(loader))) if args.measure_perf else None

    print("time/loss/accuracy (if enabled):")
    iteration, warmup_seconds = 0, 0.0
    with torch.set_grad_enabled(training):
        for epoch in range(args.nepochs):
            window = Window(args.mini_batch_size)
            for j, batch in enumerate(epoch_batches(loader, epoch, replayed)):
                if batch.samples < args.mini_batch_size:
                    print(f"Breaking out of the epoch as  batch was partial. Number of samples: {batch.samples}")
                    break
                start = time.perf_counter()
                batch = backend.to_device(batch)
                scores, loss, stats = dense_path(batch.dense, model.lookup(batch.bags), batch.targets)
                if args.print_dist_loss:
                    print(f" Distributed Loss :: {distributed_loss(loss):.6f}")
                if training:
                    loss.backward()  # the sparse updates happen in here, and in eager mode the dense ones
                    optimizer.step()
                backend.mark_step()
                iteration += 1
                if iteration == warmup:
                    backend.synchronize()  # the graphs are compiled: time from here on
                seconds = time.perf_counter() - start
                warming_up = iteration <= warmup
                window.add(stats, None if warming_up else seconds)
                warmup_seconds += seconds if warming_up else 0.0
                if iteration == warmup:
                    compiled = f"the first {warmup} it compiled the graphs in {warmup_seconds:.1f} s"
                    print(f"Lazy mode: {compiled} (not in ms/it)")
                if args.debug_mode:
                    print(f"batch {j}: dense {batch.dense}\ntargets {batch.targets.view(-1)}\nscores {scores.view(-1)}")
                if (j + 1) % args.print_freq == 0 or j + 1 == nbatches:
                    print(window.line(phase, j + 1, nbatches, epoch, args.print_time), flush=True)
                    if args.log_device_mem_alloc:
                        print(backend.memory_report())
                    window = Window(args.mini_batch_size)


@contextlib.contextmanager
def profiling(enabled: bool, device_type: str, name: str = "dlrm_s_pytorch") -> Iterator[None]:
    """With ``--enable-profiling``: a torch.profiler trace (``name``.json) and a table of the slowest ops
    (``name``.prof), in the working directory."""
    if not enabled:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        yield
    prof.export_chrome_trace(f"{name}.json")
    sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    Path(f"{name}.prof").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30))
    print(f"Profile written to {name}.json (chrome trace) and {name}.prof (top ops)")


def apply_environment(env: dict[str, str], argv: list[str]) -> None:
    """Set the config's ``env_variables``; torch is already loaded, so the script starts again with them."""
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *argv])


def join_ranks(args: argparse.Namespace, backend: Backend, ranks: Ranks | None) -> Ranks:
    """This process's rank; started by a launcher (``ranks``) or with ``--distributed``, it joins the group."""
    if ranks is None and not args.distributed:
        return Ranks(0, 1, 0, 1)
    if ranks is None:  # --distributed without a launcher: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(distributed_utils.free_port()))
        ranks = Ranks(0, 1, 0, 1)
    if args.world_size not in (1, ranks.world_size):
        raise UsageError(f"--world_size {args.world_size}: the launcher started {ranks.world_size} ranks")
    if args.mini_batch_size % ranks.world_size:
        raise UsageError(f"--mini-batch-size {args.mini_batch_size} is not divisible by {ranks.world_size} ranks")
    try:
        distributed_utils.init_process_group(ranks, backend.process_group)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{ranks.world_size} ranks: {backend.process_group} cannot start ({first_line(e)})") from None
    return ranks


def build(
    args: argparse.Namespace, sizes: Sizes, backend: Backend, ranks: Ranks
) -> tuple[DLRM, torch.utils.data.DataLoader]:
    """This rank's model (its tables, by the printed plan, when distributed) and its loader."""
    shards, exchange = None, None
    if dist.is_initialized():
        plan = distributed_utils.plan_tables(sizes.tables, ranks.world_size)
        print(distributed_utils.describe_plan(plan, ranks.world_size, args.mini_batch_size, sizes.embedding_dim))
        shards = [shard for shard in plan if shard.rank == ranks.rank]
        exchange = EmbeddingExchange(plan, ranks.rank, ranks.world_size, args.mini_batch_size, sizes.embedding_dim)
    model = DLRM(args, sizes, backend.kernels, shards, exchange).to(backend.device)
    return model, make_loader(args, sizes, backend, model.shards, ranks)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def main(argv: list[str]) -> int:
    try:
        args, sizes, env = parse_command_line(argv)
    except UsageError as e:
        print(f"dlrm_s_pytorch.py: error: {e}", file=sys.stderr)
        return 2
    apply_environment(env, argv)
    if env:
        print("Environment from --config: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    try:
        launched = distributed_utils.launched_ranks()
        local_rank = launched.local_rank if launched else 0
        backend = select_backend(args.device, args.mode == "lazy", args.no_habana, args.use_gpu, local_rank)
        gpus = torch.cuda.device_count()
        if backend.device.type == "cuda" and args.world_size > gpus:
            raise UsageError(f"--world_size {args.world_size}: nccl needs a GPU per rank, {gpus} here")
        if launched is None and args.world_size > 1:  # start the ranks, each of them this script
            return distributed_utils.spawn_ranks([sys.executable, os.path.abspath(__file__), *argv], args.world_size)
        ranks = join_ranks(args, backend, launched)
    except (DeviceUnavailable, UsageError, ValueError) as e:
        print(f"dlrm_s_pytorch.py: error: {e}", file=sys.stderr)
        return 2
    if ranks.rank != 0 and not args.print_all_ranks:
        sys.stdout = open(os.devnull, "w")  # for the life of the process
    if ranks.local_world_size > 1 and backend.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks.local_world_size))  # share the cores

    np.set_printoptions(precision=args.print_precision)
    torch.set_printoptions(precision=args.print_precision)
    np.random.seed(args.numpy_rand_seed)
    torch.manual_seed(args.numpy_rand_seed)
    print(backend.banner)
    if args.hmp_verbose:
        print(f"bf16 ops: {', '.join(sorted(BF16_OPS))}; fp32 ops: {', '.join(sorted(FP32_OPS))}")

    model, loader = build(args, sizes, backend, ranks)
    if args.debug_mode:
        print(f"model sizes: {sizes}, torch threads: {torch.get_num_threads()}\n{model}")
    profile_name = f"dlrm_s_pytorch.rank{ranks.rank}" if ranks.world_size > 1 else "dlrm_s_pytorch"
    with profiling(args.enable_profiling, backend.device_type, profile_name):
        try:
            train(args, model, loader, backend)
        except DivergedError as e:
            print(f"dlrm_s_pytorch.py: error: {e}", file=sys.stderr)
            return 1
        except (dist.DistError, RuntimeError) as e:  # gloo reports a lost rank as a RuntimeError
            if not dist.is_initialized():
                raise
            print(f"dlrm_s_pytorch.py: error: rank {ranks.rank} stopped: {first_line(e)}", file=sys.stderr)
            leave_group(1)  # the process group is broken: tearing it down could abort or hang
    if args.debug_mode:
        for name, weight in model.named_weights():
            print(f"updated {name}:\n{weight.detach()}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        leave_group(0)
    return 0


def leave_group(code: int) -> NoReturn:
    """Exit a distributed rank without interpreter finalization: DDP still holds the process group there,
    and destroying gloo's worker threads that late sometimes aborts ("terminate called without an active
    exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
