"""DLRM training: the Habana Gaudi port's script, runnable on a CPU, an NVIDIA GPU or a Gaudi card.

Read top to bottom: the command line and its checks, the data (random, trace-driven or Criteo) and its
preprocessing, the model, the training loop with its tests, checkpoints and metrics, the export for serving, and
last ``main``, which puts them together. ``../shared/SPEC.md`` is the contract this file keeps.

    python dlrm_s_pytorch.py --config hb_configs/small.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import errno
import functools
import gc
import importlib.util
import itertools
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn


def interrupt_once(signum: int, frame: object) -> NoReturn:
    """Ctrl-C outside the loop, which has its own handler: the run stops, and a second Ctrl-C does not interrupt its
    way out with a traceback. Each rank of ``--world_size N`` gets it twice: from the terminal, and passed on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # unless ignored
    signal.signal(signal.SIGINT, interrupt_once)

try:  # loading torch takes seconds: Ctrl-C meanwhile stops as it does later, without a traceback
    import numpy as np
    import torch
    import torch.distributed as dist
    import yaml
    from torch import Tensor, nn
    from torch.nn.parallel import DistributedDataParallel

    import data_utils
    import distributed_utils
    import trace_data
    from data_utils import DataError, first_line
    from distributed_utils import EmbeddingExchange, Ranks, Shard
    from habana_dlrm_ops import (
        OPTIMIZERS,
        Backend,
        BagBatch,
        DeviceUnavailable,
        EmbeddingBag,
        Linear,
        MlpOptimizer,
        RowGrouper,
        TorchKernels,
        preprocess_bags,
        resolve_device,
        select_backend,
    )
except KeyboardInterrupt:
    if __name__ == "__main__":  # imported instead (tests, a spawned worker): the importer gets the interrupt
        print("Interrupted.", file=sys.stderr)
        sys.exit(130)
    raise

# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """Bad input: reported as one line with exit code 2, before any work is done."""


class DivergedError(Exception):
    """Training produced non-finite scores: reported as one line with exit code 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse would print the whole usage first
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the original script and its launcher, with the original names, types and defaults."""
    p = _Parser(description="Train DLRM (Deep Learning Recommendation Model) on random, synthetic or Criteo data.")
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
    add("--max-ind-range", type=int, default=-1, help="Criteo: fold category ids into this many rows per table")
    add("--data-sub-sample-rate", type=float, default=0.0, help="Criteo: drop this fraction of negative samples")
    add("--skip-bad-lines", action="store_true", default=False, help="Criteo: skip and count malformed lines")
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
    add("--save-onnx", nargs="?", const="dlrm_s_pytorch.onnx", default=False, help="export the model to ONNX [FILE]")
    add("--use-gpu", action="store_true", default=False)
    add("--print-freq", type=int, default=20)
    add("--test-freq", type=int, default=-1)
    add("--test-mini-batch-size", type=int, default=-1)
    add("--test-num-workers", type=int, default=-1)
    add("--print-time", action="store_true", default=False)
    add("--debug-mode", action="store_true", default=False)
    add("--enable-profiling", action="store_true", default=False)
    add("--plot-compute-graph", action="store_true", default=False)
    add("--save-model", type=str, default="", help="checkpoint file, written at the end and on SIGINT/SIGTERM")
    add("--save-freq", type=int, default=0, help="also save the checkpoint every N iterations")
    add("--load-model", type=str, default="", help="resume from (or, with --inference-only, evaluate) a checkpoint")
    add("--metrics-file", type=str, default="", help="append each printed window and test as a JSON line")
    add("--tensorboard", type=str, default="", help="also write the metrics to TensorBoard in this directory")
    add("--mlperf-logging", action="store_true", default=False)
    add("--mlperf-acc-threshold", type=float, default=0.0)
    add("--mlperf-auc-threshold", type=float, default=0.0)
    add("--mlperf-bin-loader", action="store_true", default=False)
    add("--mlperf-bin-shuffle", action="store_true", default=False)
    add("--no-habana", action="store_true", default=False, help="do not use a Gaudi card")
    add("--hmp", dest="data_type", action="store_const", const="bf16", default="fp32", help="same as --data_type bf16")
    add("--hmp-bf16", type=str, default="", help="the original's list of ops run in bf16")
    add("--hmp-fp32", type=str, default="", help="the original's list of ops kept in fp32")
    add("--hmp-opt-level", type=str, default="O1", choices=["O1", "O2"], help="O2: only the matrix products in bf16")
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
    add("--config", action=_GivenOnce, default="", help="a YAML run configuration (hb_configs/); flags override it")
    return p


class _GivenOnce(argparse.Action):
    """Refuses a second value: a second ``--config`` would drop the first file's values without a word."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, value: str, option: str) -> None:
        given = getattr(namespace, self.dest)
        if given:
            parser.error(f"{option}: given twice, {given!r} and {value!r}: give one")
        setattr(namespace, self.dest, value)


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


def _flag_name(dest: str) -> str:
    """``mini_batch_size`` -> ``--mini-batch-size``, as the command line spells the flag."""
    return "--" + dest.replace("_", "-")


CONFIG_KEYS = {"model", "env_variables", "parameters"}


def _check_path_name(flag: str, path: str) -> None:
    """A path that cannot be looked up (a name longer than its file system allows) stops here, with the reason:
    pathlib's ``exists()`` raises for it."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None


def _check_input_file(flag: str, path: str) -> None:
    """An input file given must be a regular file: reading a pipe waits for a writer, /dev/zero never ends."""
    _check_path_name(flag, path)
    if Path(path).exists() and not Path(path).is_file():
        raise UsageError(f"{flag} {path}: not a regular file")


def _read_text(flag: str, path: str) -> str:
    _check_input_file(flag, path)
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path}: not a text file") from None


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML would keep the last one silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):  # a list or mapping as a key: PyYAML refuses it, below
                continue
            if key.value in lines:
                problem = f"{key.value!r} is given twice, on lines {lines[key.value]} and {key.start_mark.line + 1}"
                raise yaml.constructor.ConstructorError(None, None, problem)
            lines[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)


def load_config(path: str, parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, str]]:
    """Read an ``hb_configs`` YAML file into command-line arguments and environment variables."""
    text = _read_text("--config", path)
    try:
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise UsageError(f"--config {path}: YAML aliases (*name) are not supported")  # they can expand without end
        config = yaml.load(text, Loader=_ConfigLoader)
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise UsageError(f"--config {path}: nested too deeply") from None
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
        # --save-onnx was on/off in the original, as here; --help would print the usage and end the run, with 0
        if action is None or action.nargs not in (0, "?") or action.dest == "help":
            raise UsageError(f"--config {path}: {name!r} in store_true is not an on/off flag")
        argv.append(f"--{name}")
    for name, value in parameters.items():
        action = options.get(f"--{name}")
        if name == "config":
            raise UsageError(f"--config {path}: 'config' cannot be a parameter (a config cannot name another)")
        if action is None:
            raise UsageError(f"--config {path}: unknown parameter {name!r}")
        if action.nargs == 0:
            raise UsageError(f"--config {path}: {name!r} is an on/off flag: list it under store_true")
        if value is None:  # "save-onnx:" would be --save-onnx=None, a file named None
            raise UsageError(f"--config {path}: {name!r} has no value (give one, or leave the parameter out)")
        if isinstance(value, (list, dict)):  # its Python text would be the value: a file named "['a', 'b']"
            raise UsageError(f"--config {path}: {name!r} is {value!r}: give one value")
        if isinstance(value, bool) and action.type is not _parse_bool:  # "save-onnx: false": a file named False
            raise UsageError(f"--config {path}: {name!r} is the YAML boolean {value}: list an on/off flag under "
                             "store_true, and quote a text value")  # fmt: skip
        if not _os_string(str(value)):
            raise UsageError(f"--config {path}: {name!r} is {value!r}, which no command line can hold")
        argv.append(f"--{name}={value}")
    for name, value in env.items():
        if name is None or isinstance(name, bool):  # YAML's null, yes, on, NO …: it would be named "None", "True"
            raise UsageError(f"--config {path}: environment variable name {name!r} is not text (as YAML reads null, "
                             "yes, no, on, off): quote it")  # fmt: skip
        if value is None:  # it would be set to "None"
            raise UsageError(f"--config {path}: environment variable {name!r} has no value (give one, or leave it out)")
        if isinstance(value, (bool, list, dict)):  # it would be set to Python's text of it: "True", "[1, 2]"
            raise UsageError(f"--config {path}: environment variable {name!r} is {value!r}: give text (quoted) "
                             "or a number")  # fmt: skip
    env = {str(k): str(v) for k, v in env.items()}
    for name, value in env.items():
        if not name or "=" in name or not _os_string(name + value):
            raise UsageError(f"--config {path}: {name!r} cannot be an environment variable")
    return argv, env


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and on which line: the first line of PyYAML's message is only its context ("while scanning
    for the next token"), the problem and the line come after it."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if problem.startswith("but "):  # the second half of a sentence: "expected a single document …, but found …"
        problem = f"{error.context}, {problem}"
    mark = getattr(error, "problem_mark", None)
    return f"line {mark.line + 1}: {problem}" if mark else problem


def _os_string(text: str) -> bool:
    """Whether ``text`` can be a command-line argument, a path or in the environment: no NUL, and every character
    encodable (YAML's ``"\\ud800"`` is a lone surrogate, which is not)."""
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return "\0" not in text


@dataclass
class Sizes:
    """The model's dimensions, derived from the flags as the original did."""

    dense_features: int  # m_den = ln_bot[0]
    embedding_dim: int  # m_spa
    tables: list[int]  # ln_emb
    bottom: list[int]  # ln_bot
    top: list[int]  # ln_top, the interaction width first

    def weight_count(self) -> int:
        """The tables' weights, and the linear layers' with their biases."""
        linear = sum((n + 1) * m for layers in (self.bottom, self.top) for n, m in itertools.pairwise(layers))
        return sum(self.tables) * self.embedding_dim + linear


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


ONNX_INSTALLED = importlib.util.find_spec("onnx") is not None
NO_QR_MD = "is not supported: the custom embedding op has no quotient-remainder or mixed-dimension variant"

# (flag, whether the parsed value asks for it, why it cannot run)
UNAVAILABLE = [
    *[(flag, None, NO_QR_MD) for flag in (
        "--md-flag", "--md-threshold", "--md-temperature", "--md-round-dims",
        "--qr-flag", "--qr-threshold", "--qr-operation", "--qr-collisions")],
    ("--activation-function", lambda a: a.activation_function != "relu", "is not supported: the model uses relu"),
    ("--sync-dense-params false", lambda a: not a.sync_dense_params, "is not supported: dense weights stay in sync"),
    ("--save-onnx", lambda a: a.save_onnx and not ONNX_INSTALLED,
     "needs the onnx package, which torch's exporter writes with (requirements-extras.txt)"),
]  # fmt: skip

ONNX_LIMIT = 2**31  # bytes: a protobuf file is smaller, so torch writes the weights of a larger model apart
PROFILE_STEM = "dlrm_s_pytorch"
GRAPH_STEM = "dlrm_s_pytorch_graph"
PROCESSES_PER_CORE = 4  # loader processes, or self-started ranks: more only compete for the cores, and cost memory
# Flags that only mean something with some kinds of data: the --data-generation values they apply to
DATA_FLAGS = {
    ("dataset",): (
        "data_set", "raw_data_file", "processed_data_file", "data_randomize", "max_ind_range", "data_sub_sample_rate",
        "skip_bad_lines", "memory_map", "mlperf_bin_loader", "mlperf_bin_shuffle", "test_freq", "test_mini_batch_size",
        "test_num_workers", "mlperf_acc_threshold", "mlperf_auc_threshold"),
    ("synthetic",): ("data_trace_file", "data_trace_enable_padding"),
    ("random", "synthetic"): ("data_size", "num_indices_per_lookup_fixed"),  # Criteo's targets are 0/1: rounded
}  # fmt: skip
TEST_FLAGS = ("test_mini_batch_size", "test_num_workers", "mlperf_acc_threshold", "mlperf_auc_threshold")

# The original's op lists for bf16: matrix products in bf16, losses and embeddings in fp32.
BF16_OPS = {"addmm", "bmm", "dot", "mm", "mv", "linear"}
FP32_OPS = {"binary_cross_entropy", "mse_loss", "embedding_bag_sum_fwd", "embedding_bag_sum_bwd"}


def _check_op_list(flag: str, path: str, expected: set[str]) -> None:
    ops = {line.strip() for line in _read_text(flag, path).splitlines() if line.strip()}
    if ops != expected:
        raise UsageError(f"{flag} {path}: only the original list is supported ({', '.join(sorted(expected))})")


def _check_model_fits(args: argparse.Namespace, sizes: Sizes) -> None:
    """Stop early, naming the flags, when the weights, optimizer state and a batch cannot fit in memory."""
    weights = sizes.weight_count()
    copies = 2 if args.optimizer == "adagrad" and not args.inference_only else 1
    activations = args.mini_batch_size * (sum(sizes.bottom) + sum(sizes.top)) * 3  # forward, backward, spare
    index_buffers = args.mini_batch_size * args.num_indices_per_lookup * len(sizes.tables) * 4  # 4 int32 buffers
    needed = 4 * (weights * copies + activations + index_buffers)
    available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed > available:
        raise UsageError(
            f"--arch-*, --mini-batch-size: the model, its optimizer state and one batch need {needed / 1e9:.1f} GB, "
            f"more than this machine's {available / 1e9:.1f} GB of memory"
        )


def _check_data_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for generations, dests in DATA_FLAGS.items():
        for dest in dests:
            if args.data_generation not in generations and getattr(args, dest) != parser.get_default(dest):
                kinds = " or ".join(generations)
                raise UsageError(f"{_flag_name(dest)}: applies only with --data-generation {kinds}")
    if args.data_generation != "dataset":
        return
    for dest in ("test_freq", "test_mini_batch_size", "test_num_workers"):
        if getattr(args, dest) < -1:
            raise UsageError(f"{_flag_name(dest)}: must be -1 (the default) or more, got {getattr(args, dest)}")
    for dest in TEST_FLAGS:
        if args.test_freq <= 0 and not args.inference_only and getattr(args, dest) != parser.get_default(dest):
            raise UsageError(f"{_flag_name(dest)}: applies only with --test-freq (or --inference-only)")
    if args.test_freq > 0 and args.inference_only:
        raise UsageError("--test-freq: applies only to training (--inference-only evaluates the test split once)")
    if not args.raw_data_file and not args.processed_data_file:
        raise UsageError("--data-generation dataset: needs --raw-data-file or --processed-data-file")
    if not 0.0 <= args.data_sub_sample_rate < 1.0:
        raise UsageError(f"--data-sub-sample-rate: must be in [0, 1), got {args.data_sub_sample_rate}")
    if args.max_ind_range == 0 or args.max_ind_range < -1:
        raise UsageError(f"--max-ind-range: must be positive (or -1: no limit), got {args.max_ind_range}")
    if args.mlperf_bin_shuffle and not args.mlperf_bin_loader:
        raise UsageError("--mlperf-bin-shuffle: applies only with --mlperf-bin-loader")
    for dest in ("mlperf_acc_threshold", "mlperf_auc_threshold"):
        if not 0.0 <= getattr(args, dest) < 1.0:
            raise UsageError(f"{_flag_name(dest)}: must be in [0, 1), got {getattr(args, dest)}")


def _check_rank_flags(args: argparse.Namespace, world_size: int, counted_by: str) -> None:
    """The flags that depend on the number of ranks (``counted_by``: where that number came from)."""
    for dest in ("mini_batch_size", "test_mini_batch_size"):
        size = getattr(args, dest)
        if size > 0 and size % world_size:
            raise UsageError(f"{_flag_name(dest)} {size} is not divisible by {counted_by}")
    for dest in ("save_onnx", "plot_compute_graph"):
        if getattr(args, dest) and world_size > 1:
            raise UsageError(f"{_flag_name(dest)}: needs one rank (distributed, each rank holds some tables)")


def _check_writable(flag: str, path: str, folder: bool = False, renamed: bool = True) -> None:
    """An output file (or ``folder``) must be creatable: found out at the start, not after hours of training. A file
    that is ``renamed`` into place is first written under a longer name (``data_utils.TEMPORARY_NAME``)."""
    _check_path_name(flag, path)
    target = Path(path)
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), Path("."))
    if target.exists() and not (target.is_dir() if folder else target.is_file()):
        raise UsageError(f"{flag} {path}: not a {'folder' if folder else 'regular file'}")
    where = target if folder and target.exists() else parent  # a file is written beside itself, then renamed
    if (
        not parent.is_dir()
        or not os.access(where, os.W_OK | os.X_OK)
        or (target.exists() and not os.access(target, os.W_OK))
    ):
        raise UsageError(f"{flag} {path}: cannot be written there")
    missing = target.parts[len(parent.parts) :]  # the folders made for it, and its name
    longest = os.pathconf(parent, "PC_NAME_MAX")
    if any(len(os.fsencode(part)) > longest for part in missing):
        raise UsageError(f"{flag} {path}: {os.strerror(errno.ENAMETOOLONG)}")
    if renamed and not folder and len(os.fsencode(target.name)) + data_utils.TEMPORARY_NAME_EXTRA > longest:
        raise UsageError(f"{flag} {path}: {os.strerror(errno.ENAMETOOLONG)} (it is written first as .NAME.PID.tmp, "
                         f"which must fit in {longest} bytes)")  # fmt: skip


def profile_stem(rank: int, world_size: int) -> str:
    """The working-folder name of a rank's ``--enable-profiling`` files, without their suffixes."""
    return f"{PROFILE_STEM}.rank{rank}" if world_size > 1 else PROFILE_STEM


def _working_folder_files(args: argparse.Namespace, world_size: int) -> list[tuple[str, str]]:
    """(flag, file) for each file the run writes in the working folder (the PDF only where Graphviz is installed)."""
    files = []
    if args.enable_profiling:
        stems = [profile_stem(rank, world_size) for rank in range(world_size)]
        files += [("--enable-profiling", f"{stem}{suffix}") for stem in stems for suffix in (".json", ".prof")]
    if args.plot_compute_graph:
        files += [("--plot-compute-graph", f"{GRAPH_STEM}{suffix}") for suffix in (".dot", ".pdf")]
    return files


def _check_no_overwrite(args: argparse.Namespace, world_size: int) -> None:
    """No output file may be an input (the script's own source, the data and the files made from it, the config,
    the checkpoint loaded) or another output: the checkpoint would replace the processed data, the ONNX model the
    checkpoint. Every rank's file counts. Resuming in place (``--load-model F --save-model F``) is fine: each
    rank's checkpoint is written to a temporary file and renamed over the one it loaded."""
    sources = [("training script's", str(path)) for path in Path(__file__).resolve().parent.glob("*.py")]
    on_criteo, on_traces = args.data_generation == "dataset", args.data_generation == "synthetic"
    criteo_files = data_utils.CriteoFiles.from_args(args).kept_files() if on_criteo else []
    tables = range(len(args.arch_embedding_size))
    trace_files = [trace_data.table_trace_file(args.data_trace_file, t) for t in tables] if on_traces else []
    files = [
        *sources, ("--config", args.config), ("--raw-data-file", args.raw_data_file),
        ("--processed-data-file", args.processed_data_file), ("--hmp-bf16", args.hmp_bf16),
        ("--hmp-fp32", args.hmp_fp32),
        *[("--data-trace-file", path) for path in trace_files],
        *[("Criteo data's", str(path)) for path in criteo_files],
        *[("--load-model", checkpoint_file(args.load_model, rank)) for rank in range(world_size) if args.load_model],
        *[("--save-model", checkpoint_file(args.save_model, rank)) for rank in range(world_size) if args.save_model],
        ("--metrics-file", args.metrics_file), ("--save-onnx", args.save_onnx), ("--tensorboard", args.tensorboard),
        *_working_folder_files(args, world_size),
    ]  # fmt: skip
    outputs = ["--save-model", "--metrics-file", "--save-onnx", "--tensorboard", "--enable-profiling",
               "--plot-compute-graph"]  # fmt: skip
    in_place = bool(args.load_model and args.save_model) and (
        Path(args.load_model).resolve() == Path(args.save_model).resolve()
    )
    seen = {}
    for flag, path in files:
        if not path:
            continue
        other = seen.setdefault(Path(path).resolve(), flag)
        if other != flag and flag in outputs and not (in_place and (other, flag) == ("--load-model", "--save-model")):
            raise UsageError(f"{flag} {path}: would overwrite the {other} file")


def _check_rank_files(args: argparse.Namespace, world_size: int) -> None:
    """Every rank's files: no output overwrites another file, each rank's checkpoint can be written, and each rank's
    checkpoint to load is there (one missing beside rank 0's: fewer ranks saved it)."""
    _check_no_overwrite(args, world_size)
    if args.save_model:
        for rank in range(1, world_size):
            _check_writable("--save-model", str(checkpoint_file(args.save_model, rank)))
    if args.load_model and Path(args.load_model).exists():
        for rank in range(1, world_size):
            rank_file = checkpoint_file(args.load_model, rank)
            if not rank_file.exists():
                raise UsageError(f"--load-model {args.load_model}: {rank_file} is missing (saved by fewer than "
                                 f"{world_size} ranks?)")  # fmt: skip


def _check_run_flags(args: argparse.Namespace) -> None:
    _check_rank_flags(args, args.world_size, f"--world_size {args.world_size}")
    for dest in ("load_model", "processed_data_file"):
        if getattr(args, dest):
            _check_input_file(_flag_name(dest), getattr(args, dest))
    for dest in ("save_model", "metrics_file", "save_onnx"):
        path = getattr(args, dest)
        if path:
            _check_writable(_flag_name(dest), path, renamed=dest != "metrics_file")  # metrics: appended line by line
    _check_rank_files(args, args.world_size)
    if args.load_model and not Path(args.load_model).exists():  # found out before the data is prepared
        raise UsageError(f"--load-model {args.load_model}: no such file")
    if args.tensorboard:
        _check_writable("--tensorboard", args.tensorboard, folder=True)
    for flag, written in _working_folder_files(args, args.world_size):
        _check_writable(flag, written)
    if args.save_freq < 0:
        raise UsageError(f"--save-freq: must be zero or more, got {args.save_freq}")
    if args.save_freq and not args.save_model:
        raise UsageError("--save-freq: needs --save-model FILE")
    if args.save_model and args.inference_only:
        raise UsageError("--save-model: nothing is trained with --inference-only")
    if args.load_model and args.measure_perf:
        raise UsageError("--load-model: cannot resume a --measure-perf run (it replays one batch)")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Sizes:
    """Reject every value that cannot run, naming the flag; return the model's sizes."""
    positive = ("mini_batch_size", "num_indices_per_lookup", "print_freq")
    not_negative = ("num_batches", "nepochs", "num_workers", "learning_rate")
    for dest in positive + not_negative:
        value = getattr(args, dest)
        if not math.isfinite(value):
            raise UsageError(f"{_flag_name(dest)}: must be a finite number, got {value}")
        if value < (1 if dest in positive else 0):
            bound = "positive" if dest in positive else "zero or more"
            raise UsageError(f"{_flag_name(dest)}: must be {bound}, got {value}")
    for dest in ("mini_batch_size", "num_indices_per_lookup", "num_batches", "nepochs", "data_size", "max_ind_range"):
        if getattr(args, dest) >= 2**62:
            raise UsageError(f"{_flag_name(dest)}: must be below 2**62, got {getattr(args, dest)}")
    if args.learning_rate > torch.finfo(torch.float32).max:
        raise UsageError(f"--learning-rate: must fit in float32, got {args.learning_rate}")
    if args.loss_weights != _loss_weights(parser.get_default("loss_weights")) and args.loss_function != "wbce":
        raise UsageError("--loss-weights: applies only with --loss-function wbce")
    if not all(math.isfinite(w) and w >= 0 for w in args.loss_weights):
        raise UsageError(f"--loss-weights: must be finite and zero or more, got {args.loss_weights}")
    cores = data_utils.usable_cores()
    for dest in ("num_workers", "test_num_workers"):
        if getattr(args, dest) > PROCESSES_PER_CORE * cores:
            raise UsageError(f"{_flag_name(dest)} {getattr(args, dest)}: more than {PROCESSES_PER_CORE} loader "
                             f"processes for each of this machine's {cores} cores")  # fmt: skip
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
    if not 0.0 <= args.loss_threshold < 1.0:
        raise UsageError(f"--loss-threshold: must be in [0, 1), got {args.loss_threshold}")
    if args.measure_perf and args.num_batches <= 0:
        raise UsageError("--measure-perf: needs --num-batches > 0 (the number of times to replay the batch)")
    if args.data_type != "bf16":
        hmp_flags = {
            "--hmp-bf16": args.hmp_bf16,
            "--hmp-fp32": args.hmp_fp32,
            "--hmp-verbose": args.hmp_verbose,
            "--hmp-opt-level O2": args.hmp_opt_level == "O2",
        }
        for flag, given in hmp_flags.items():
            if given:
                raise UsageError(f"{flag}: applies only with --data_type bf16 (or --hmp)")
    if args.hmp_bf16:
        _check_op_list("--hmp-bf16", args.hmp_bf16, BF16_OPS)
    if args.hmp_fp32:
        _check_op_list("--hmp-fp32", args.hmp_fp32, FP32_OPS)
    _check_data_flags(args, parser)
    _check_run_flags(args)
    sizes = model_sizes(args)
    _check_model_fits(args, sizes)
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
# Data: random, trace-driven or Criteo batches, preprocessed in the loader (so worker processes can prefetch them)
# ---------------------------------------------------------------------------------------------------------


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


class RandomDataset(trace_data.SeededBatches):
    """The original's random batches (seeded per batch by ``SeededBatches``), with its uniform bags."""

    def _bags(self, rng: np.random.RandomState, n: int, table: int) -> tuple[Tensor, Tensor]:
        """One table's bags, drawing the numbers the original drew sample by sample, in bulk.

        Per sample the original drew ``random(1)`` for the bag size k (unless fixed), then ``random(k)``;
        that stream is one ``random(total)``, so draw an upper bound, walk it for the sizes, then rewind and
        consume exactly what was used. Each bag is ``unique(round(r * (rows - 1)))``.
        """
        rows, largest = self.tables[table], self.largest_bag
        if self.fixed_bags:
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


def check_indices(indices: Tensor, rows: int, table: int) -> None:
    """Stop with the table, the index and the range when an index falls outside its table (any device)."""
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= rows):
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise DataError(f"table {table}: index {bad} is out of its range [0, {rows})")


class Preprocessor:
    """The loader's collate function: a raw global batch -> this rank's ``Batch``, with fixed-size buffers."""

    def __init__(
        self,
        args: argparse.Namespace,
        batch_size: int,
        sizes: Sizes,
        shards: list[Shard],
        ranks: Ranks,
        group: RowGrouper,
    ) -> None:
        self.batch_size, self.capacity = batch_size, args.num_indices_per_lookup * batch_size
        self.sizes, self.shards, self.ranks, self.group = sizes, shards, ranks, group
        self.whole = [shard.start == 0 and shard.stop == sizes.tables[shard.table] for shard in shards]

    def __call__(self, raw: tuple[Tensor, list[Tensor], list[Tensor], Tensor]) -> Batch:
        dense, offsets, indices, targets = raw
        local_batch = self.batch_size // self.ranks.world_size
        mine = slice(self.ranks.rank * local_batch, (self.ranks.rank + 1) * local_batch)
        bags = []
        for shard, whole in zip(self.shards, self.whole, strict=True):
            table_indices, table_offsets = indices[shard.table], offsets[shard.table]
            check_indices(table_indices, self.sizes.tables[shard.table], shard.table)
            if not whole:
                table_indices, table_offsets = shard_bags(table_indices, table_offsets, shard)
            bags.append(preprocess_bags(table_indices, table_offsets, self.batch_size, self.capacity, self.group))
        return Batch(dense[mine], bags, targets[mine], dense.size(0))


def make_datasets(
    args: argparse.Namespace, sizes: Sizes
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, Sizes]:
    """(training data, test data or None, the model's sizes): Criteo decides the tables and the dense width.

    Criteo's ``--data-randomize`` draws from numpy's global generator, so this runs before the model is drawn,
    as in the original.
    """
    if args.data_generation == "random":
        return RandomDataset(args, sizes), None, sizes
    if args.data_generation == "synthetic":
        return trace_data.TraceDataset(args, sizes, read_traces(args, sizes)), None, sizes
    train_data, test_data = data_utils.criteo_datasets(args, data_utils.prepare(args))
    return train_data, test_data, dataset_sizes(args, train_data.counts, train_data.dense_features)


def read_traces(args: argparse.Namespace, sizes: Sizes) -> list[trace_data.TraceDistribution]:
    """The synthetic data's trace for each table."""
    try:
        return trace_data.read_table_traces(args.data_trace_file, len(sizes.tables))
    except ValueError as e:  # a missing or malformed trace file
        raise UsageError(f"--data-trace-file: {e}") from None


def dataset_sizes(args: argparse.Namespace, tables: list[int], dense_features: int) -> Sizes:
    """As in the original, the data decides the tables' rows and the bottom MLP's input width."""
    from_data = {"arch_embedding_size": list(tables), "arch_mlp_bot": [dense_features, *args.arch_mlp_bot[1:]]}
    for dest, value in from_data.items():
        if getattr(args, dest) != value:
            print(f"{_flag_name(dest)} {'-'.join(map(str, value))}: from the data")
            setattr(args, dest, value)
    sizes = model_sizes(args)
    _check_model_fits(args, sizes)
    return sizes


class BatchOrder(torch.utils.data.Sampler):
    """Batch positions ``start`` to ``stop``: a resumed epoch starts where its checkpoint stopped."""

    def __init__(self, stop: int) -> None:
        self.start, self.stop = 0, stop

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def make_loader(
    args: argparse.Namespace,
    dataset: torch.utils.data.Dataset,
    sizes: Sizes,
    backend: Backend,
    shards: list[Shard],
    ranks: Ranks,
    test: bool = False,
) -> torch.utils.data.DataLoader:
    """Global batches made by ``--num-workers`` processes (or this one), this rank's part kept, pinned for a GPU.
    Every rank makes the same batches: each one depends only on its position."""
    batch_size, workers, stop = args.mini_batch_size, args.num_workers, len(dataset)
    if test:
        batch_size = args.test_mini_batch_size if args.test_mini_batch_size > 0 else batch_size
        workers = args.test_num_workers if args.test_num_workers >= 0 else workers
    if isinstance(dataset, data_utils.CriteoBatches):  # the original's Criteo loaders dropped a partial last batch
        stop = len(dataset.order) // batch_size
    if not test and args.num_batches > 0:
        stop = min(stop, args.num_batches)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchOrder(stop),
        num_workers=workers,
        collate_fn=Preprocessor(args, batch_size, sizes, shards, ranks, backend.group_rows),
        pin_memory=backend.pin_memory,
        worker_init_fn=functools.partial(leave_stop_signals_to_the_loop, owner=os.getpid()),
    )


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the loop finishes its iteration, saves and stops


def leave_stop_signals_to_the_loop(worker: int, owner: int) -> None:
    """A loader process ignores SIGINT and SIGTERM unless the process that owns the loader (``owner``) sends them,
    which ends it at once (exit code 0, as torch's own SIGTERM handler does). The owner, not the parent: under the
    forkserver start method (Python 3.14's default) the parent is the fork server.

    Ctrl-C, ``kill -TERM -<pgid>`` and batch schedulers signal every process of the job, and the loop must outlive
    its loaders to finish the iteration and save; it stops them itself. Plain SIG_IGN is not enough: at exit,
    multiprocessing ends the loaders still alive (after a failure) with SIGTERM and waits for them, forever. Only
    ``sigwaitinfo`` tells who sent a signal, hence a thread that takes them.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # for every thread: the one below takes them
    threading.Thread(target=_take_stop_signals, args=(owner,), name="stop signals", daemon=True).start()


def _take_stop_signals(owner: int) -> None:
    while True:
        if signal.sigwaitinfo(STOP_SIGNALS).si_pid == owner:
            os._exit(0)


def start_batches(loader: torch.utils.data.DataLoader) -> Iterator[Batch]:
    """``iter(loader)``, which starts its loader processes, with the stop signals held back meanwhile: a process
    starts with its parent's blocked signals, so a signal to the whole job cannot end one before it has called
    ``leave_stop_signals_to_the_loop``. This process gets its own when they are let through again."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextlib.contextmanager
def loader_processes_ended(batches: Iterable[Batch]) -> Iterator[None]:
    """Ends the loader processes of ``batches`` on the way out, here. Left to the garbage collector, they end in the
    iterator's ``__del__``, which a second Ctrl-C must not land in: its KeyboardInterrupt is printed there with a
    traceback, as an ignored exception, and the run goes on."""
    try:
        yield
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's iterator with loader processes
        if shutdown is not None:
            shutdown()


def whole_batches(loader: torch.utils.data.DataLoader) -> int:
    """Batches of the full size: all of them, or all but a partial last one."""
    count = len(loader.dataset)
    return count - (count > 0 and loader.dataset[count - 1][0].size(0) < loader.collate_fn.batch_size)


def epoch_batches(
    loader: torch.utils.data.DataLoader, epoch: int, start: int, replayed: Batch | None
) -> Iterable[Batch]:
    """The batches of one epoch from position ``start``, or with ``--measure-perf`` one batch ``replayed``."""
    if replayed is not None:
        return itertools.repeat(replayed, loader.sampler.stop - start)
    loader.dataset.epoch = epoch
    loader.sampler.start = start
    return start_batches(loader)


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


def make_mlp(widths: list[int], kernels: TorchKernels, last: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers drawn from numpy's global generator, each followed by ReLU (by ``last``, the last one)."""
    layers = []
    for i, (n, m) in enumerate(itertools.pairwise(widths)):
        linear = Linear(n, m, kernels, device="meta")
        weight = np.random.normal(0.0, math.sqrt(2 / (m + n)), size=(m, n)).astype(np.float32)
        bias = np.random.normal(0.0, math.sqrt(1 / m), size=m).astype(np.float32)
        linear.weight = nn.Parameter(torch.from_numpy(weight))
        linear.bias = nn.Parameter(torch.from_numpy(bias))
        layers += [linear, last() if i == len(widths) - 2 else nn.ReLU()]
    return nn.Sequential(*layers)


class Fp32Sigmoid(nn.Module):
    """Sigmoid in fp32 under autocast, for --hmp-opt-level O2 (only the matrix products in bf16).

    The sigmoid is the one op of the model whose result O2's fp32 changes: ReLU, cat and gather are exact in bf16.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.sigmoid(x.float())


class DensePath(nn.Module):
    """Everything after the embedding lookups: bottom MLP, interaction, top MLP, clamp and loss.

    Lazy mode compiles it into one graph; distributed runs wrap it in DDP.
    """

    def __init__(self, args: argparse.Namespace, sizes: Sizes, kernels: TorchKernels) -> None:
        super().__init__()
        self.bottom_mlp = make_mlp(sizes.bottom, kernels)
        self.top_mlp = make_mlp(sizes.top, kernels, last=Fp32Sigmoid if args.hmp_opt_level == "O2" else nn.Sigmoid)
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
            scores = self.predict(dense, pooled).float()
        finite = torch.isfinite(scores)
        scores = self.clamp(torch.where(finite, scores, 0.5))  # a diverged run is reported, not a crash in the loss
        loss = self.loss(scores, targets)
        correct = (torch.round(scores) == targets).sum()
        stats = torch.stack([loss.detach(), correct.float(), (~finite).sum().float()])
        return scores, loss, stats

    def predict(self, dense: Tensor, pooled: list[Tensor]) -> Tensor:
        """The click probability of each sample."""
        return self.top_mlp(self.interact(self.bottom_mlp(dense), pooled))

    def clamp(self, scores: Tensor) -> Tensor:
        """The scores within [t, 1 - t] for a --loss-threshold t in (0, 1): the original's model returned them so."""
        if 0.0 < self.loss_threshold < 1.0:
            return torch.clamp(scores, min=self.loss_threshold, max=1.0 - self.loss_threshold)
        return scores

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
        kernels = kernels or TorchKernels()
        self.shards = shards or [Shard(t, 0, rows, 0) for t, rows in enumerate(sizes.tables)]
        held = {shard.table: shard for shard in self.shards}
        tables = []
        for t, rows in enumerate(sizes.tables):  # every table is drawn, so the generator stays in step
            shard = held.get(t, Shard(t, 0, 0, -1))
            weight = draw_table(rows, sizes.embedding_dim, shard.start, shard.stop)
            if t in held:
                tables.append(EmbeddingBag(weight, kernels))
        self.embeddings = nn.ModuleList(tables)
        self.dense = DensePath(args, sizes, kernels)
        self.exchange = exchange

    def lookup(self, bags: list[BagBatch], local_batch: int) -> list[Tensor]:
        """Each table's pooled embeddings for this rank's ``local_batch`` samples."""
        pooled = [table(table_bags) for table, table_bags in zip(self.embeddings, bags, strict=True)]
        return self.exchange(pooled, local_batch) if self.exchange else pooled

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        for shard, table in zip(self.shards, self.embeddings, strict=True):
            yield str(shard), table.weight
        yield from self.dense.named_parameters()


# ---------------------------------------------------------------------------------------------------------
# What each iteration needs: its statistics, and the dense path with its optimizer
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

    def read(self, first_it: int, last_it: int, epoch: int) -> tuple[float, float, float | None]:
        """(mean loss, accuracy, ms/it or None) of the global batches; waits for the device and the ranks."""
        start = time.perf_counter()
        stats = torch.stack(self.stats)
        world_size = 1
        if dist.is_initialized():
            dist.all_reduce(stats)  # each rank's loss is its own samples' mean; the counts add up
            world_size = dist.get_world_size()
        stats = stats.cpu().double()
        self.timed_seconds += time.perf_counter() - start
        if stats[:, 2].sum():
            span = f"{first_it}-{last_it}" if last_it > first_it else f"{last_it}"
            raise DivergedError(f"it {span} of epoch {epoch}: the scores are not finite (--learning-rate?)")
        iterations = len(self.stats)
        loss = float(stats[:, 0].sum()) / (world_size * iterations)
        accuracy = float(stats[:, 1].sum()) / (self.batch_size * iterations)
        return loss, accuracy, 1000 * self.timed_seconds / self.timed if self.timed else None


def distributed_loss(loss: Tensor) -> float:
    """The global batch's loss, every iteration (``--print-dist-loss``; it waits for every rank)."""
    total = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()
    return total.item()


def dense_step(
    args: argparse.Namespace, dense: DensePath, backend: Backend
) -> tuple[Callable[..., tuple[Tensor, Tensor, Tensor]], MlpOptimizer | None]:
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
        list(dense.parameters()),
        args.optimizer,
        args.learning_rate,
        in_backward=not distributed,
        bf16_copies=list(copies.values()) if copies else None,
    )
    return dense_path, optimizer


# ---------------------------------------------------------------------------------------------------------
# Testing: loss, accuracy, ROC AUC (and the MLPerf metrics)
# ---------------------------------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive outranks a negative (ties count half)."""
    positive = targets > 0.5
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if not positives or not negatives:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)  # tied scores share their average rank
    return float((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """The precision at each distinct threshold, weighted by the recall it adds."""
    order = np.argsort(-scores, kind="mergesort")
    scores, positive = scores[order], targets[order] > 0.5
    last_of_threshold = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = np.cumsum(positive)[last_of_threshold]
    if not true_positives[-1]:
        return float("nan")
    precision = true_positives / (last_of_threshold + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    auc: float
    scores: np.ndarray
    targets: np.ndarray

    def mlperf_metrics(self) -> dict[str, float]:
        """The log loss of every score (whatever --loss-function trained the model), recall, precision and f1 of
        the rounded scores, and the average precision."""
        predicted, actual = np.round(self.scores) > 0.5, self.targets > 0.5
        hits = int((predicted & actual).sum())
        recall = hits / max(1, int(actual.sum()))
        precision = hits / max(1, int(predicted.sum()))
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        ap = average_precision(self.scores, self.targets)
        return dict(loss=log_loss(self.scores, self.targets), recall=recall, precision=precision, f1=f1, ap=ap)


LOG_LOSS_EPS = 1e-15  # scikit-learn 0.23's log_loss (the original's) clips the scores to [eps, 1 - eps]


def log_loss(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean binary cross-entropy of the scores against 0/1 targets, as the original's ``sklearn.metrics.log_loss``."""
    p = np.clip(scores.astype(np.float64), LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    positive = targets > 0.5
    return float(-np.mean(np.where(positive, np.log(p), np.log1p(-p))))


def gather_samples(local: Tensor) -> np.ndarray:
    """Every rank's samples, in rank order (each rank owns a slice of every global batch)."""
    if not dist.is_initialized():
        return local.cpu().numpy()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Metrics for people, and checkpoints
# ---------------------------------------------------------------------------------------------------------


class MetricsLog:
    """Each printed window and test as a JSON line (``--metrics-file``) and in TensorBoard (``--tensorboard``)."""

    def __init__(self, path: str, tensorboard_dir: str, enabled: bool) -> None:
        self.path, self.file = path, None
        if path and enabled:  # in missing folders too, as --save-model; unbuffered: a failed write leaves nothing
            try:  # the start-up check cannot see every refusal (root in /proc, an NFS server's root_squash)
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                self.file = open(path, "ab", buffering=0)  # noqa: SIM115 (for the whole run)
            except OSError as e:
                raise UsageError(f"--metrics-file {path}: cannot write it ({e.strerror})") from None
        self.writer = None
        if tensorboard_dir and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("--tensorboard: the tensorboard package is not installed; metrics go to --metrics-file only")
            else:
                try:
                    self.writer = SummaryWriter(tensorboard_dir)
                except OSError as e:
                    self.close()
                    raise UsageError(f"--tensorboard {tensorboard_dir}: cannot write it ({e.strerror})") from None

    def write(self, record: dict) -> None:
        if self.file:
            finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            self.write_line(json.dumps(finite) + "\n")
        if self.writer:
            for key, value in record.items():
                if key not in ("phase", "epoch", "iteration", "step") and value is not None:
                    self.writer.add_scalar(f"{record['phase']}/{key}", value, record["step"])
            self.writer.flush()

    def write_line(self, line: str) -> None:
        """A full disk stops the metrics, not the training: the file keeps its whole lines, and stdout has them all."""
        end, data = self.file.tell(), line.encode()
        try:
            while data:
                data = data[self.file.write(data) :]
        except OSError as e:
            message = f"cannot write it ({e.strerror}); from here on, metrics are on stdout only"
            print(f"--metrics-file {self.path}: {message}", file=sys.stderr)
            with contextlib.suppress(OSError):
                self.file.truncate(end)
            self.file.close()
            self.file = None

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.writer:
            self.writer.close()


class MLPerfLog:
    """``--mlperf-logging``: the MLPerf compliance events, through the ``mlperf-logging`` package when installed."""

    def __init__(self, enabled: bool) -> None:
        self.logger = self.constants = None
        if enabled:
            try:
                from mlperf_logging import mllog

                self.logger, self.constants = mllog.get_mllogger(), mllog.constants
            except ImportError:
                print("--mlperf-logging: the mlperf-logging package is not installed; no compliance log is written")

    def log(self, kind: str, key: str, value: object = None, **metadata: object) -> None:
        """``kind``: start, end or event (a point in time); ``key``: a name in ``mllog.constants``."""
        if self.logger:
            log = getattr(self.logger, kind)
            # stack_offset 2: the event names the line that called this method, not this one
            log(key=getattr(self.constants, key), value=value, metadata=metadata or None, stack_offset=2)


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded, or a checkpoint, ONNX model or profile that cannot be written: reported
    as one line with exit code 2."""


CHECKPOINT_FORMAT = "dlrm_s_pytorch checkpoint 1"
# flags that decide which batches come where: a resumed run must keep them (--num-batches may grow)
RESUME_FLAGS = ("mini_batch_size", "data_generation", "numpy_rand_seed", "data_set", "data_randomize",
                "num_indices_per_lookup", "num_indices_per_lookup_fixed", "round_targets", "data_trace_enable_padding",
                "max_ind_range", "data_sub_sample_rate", "mlperf_bin_shuffle")  # fmt: skip
# flags that decide what the weights mean beyond their shapes: a loaded model, trained on or evaluated, must keep them
MODEL_FLAGS = ("arch_interaction_op", "arch_interaction_itself")


def resume_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """``RESUME_FLAGS`` that mean something with this run's data: Criteo's bags hold one index each and its
    targets are 0 or 1, so there the bag size and rounding the targets decide nothing."""
    unused = ("num_indices_per_lookup", "round_targets") if args.data_generation == "dataset" else ()
    return tuple(flag for flag in RESUME_FLAGS if flag not in unused)


def checkpoint_file(path: str, rank: int) -> Path:
    """Rank 0's file is ``path``; every other rank saves its own tables beside it."""
    return Path(path if rank == 0 else f"{path}.rank{rank}")


def write_checkpoint(path: Path, state: dict) -> None:
    """Atomically: into a temporary file beside it, flushed to disk, then renamed over the previous one. With
    several ranks, every rank's file is written before any is renamed, so the set stays consistent."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with data_utils.atomic_write(path.resolve()) as temporary, open(temporary, "wb") as f:  # through a link
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
            if dist.is_initialized():
                dist.barrier()
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError, in its own words
        why = e.strerror if isinstance(e, OSError) else "the write stopped part-way: is the disk full?"
        raise CheckpointError(f"--save-model {path}: cannot write it ({why})") from None


def read_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # read as it is copied
    except FileNotFoundError:
        raise CheckpointError(f"--load-model {path}: no such file") from None
    except Exception as e:  # a truncated or corrupt file fails anywhere in unpickling or unzipping
        why = "it holds more than tensors and numbers" if "Weights only load" in str(e) else first_line(e)
        raise CheckpointError(f"--load-model {path}: not a readable checkpoint, truncated or corrupt ({why})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"--load-model {path}: not a checkpoint written by this script's --save-model")
    return state


@contextlib.contextmanager
def fields_of(path: Path) -> Iterator[None]:
    """Reading a checkpoint that has this script's format tag: a field missing or malformed (edited by hand?) is
    one line too."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        why = f"{type(e).__name__}: {first_line(e)}"
        raise CheckpointError(f"--load-model {path}: a field is missing or malformed ({why})") from None


@torch.no_grad()
def load_tensor(path: Path, kind: str, name: str, saved: dict, target: Tensor) -> None:
    """Copy the saved tensor ``name`` into ``target``, or stop naming what does not fit."""
    if name not in saved:  # a table saved with other rows has another name: report its shape
        same_table = [k for k in saved if str(k).split(" rows")[0] == str(name).split(" rows")[0]]
        if not same_table:
            raise CheckpointError(f"--load-model {path}: it has no {kind} {name!r} (saved from a different model?)")
        name = same_table[0]
    found = saved[name]
    if found.shape != target.shape:
        raise CheckpointError(
            f"--load-model {path}: {kind} {name!r} has shape {list(found.shape)}, this model's is {list(target.shape)}"
        )
    target.copy_(found)


def load_weights(path: Path, model: DLRM, saved: dict) -> None:
    """Every weight of ``model`` from ``saved``, which must hold no other: the layers of a deeper MLP can have the
    shapes of a shallower one's."""
    names = set()
    for name, weight in model.named_weights():
        load_tensor(path, "tensor", name, saved, weight)
        names.add(name)
    extra = [name for name in saved if name not in names]
    if extra:
        raise CheckpointError(f"--load-model {path}: it has tensor {extra[0]!r}, which this model has not "
                              "(saved from a different model?)")  # fmt: skip


def numpy_rng_state() -> dict:
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return dict(keys=torch.from_numpy(keys.astype(np.int64)), position=position, has_gauss=has_gauss, gauss=gauss)


def set_numpy_rng_state(state: dict) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["position"], state["has_gauss"], state["gauss"]))


# ---------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Position:
    """Where training stands: batches done in ``epoch``, and iterations done since the start."""

    epoch: int = 0
    batch: int = 0
    iteration: int = 0

    @classmethod
    def saved(cls, fields: dict) -> Position:
        """The position a checkpoint holds; a ValueError unless it is whole numbers, zero or more."""
        position = cls(**fields)
        if not all(type(value) is int and value >= 0 for value in vars(position).values()):
            raise ValueError(f"position {fields} is not whole numbers, zero or more")
        return position


LIBC = ctypes.CDLL(None)  # the C library this process runs on
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


def reuse_freed_host_memory() -> None:
    """Keep the host memory training frees for its next iteration, under glibc (elsewhere nothing changes).

    By default glibc maps allocations over a few MB on their own and returns them, and the top of its heap, when
    freed; the kernel then zeroes the pages of every iteration's activations, weight casts and gradients again.
    Serving every allocation from a heap that is never trimmed made the medium step on the CPU 10-20 % faster in
    eager mode and 20-25 % in lazy mode. Lazy mode calls this once compiling is over: kept, the compiler's own
    allocations raised the peak by 0.25 GB.
    """
    mallopt = getattr(LIBC, "mallopt", None)
    if mallopt is None:
        return
    mallopt(M_MMAP_MAX, 0)  # no allocation gets its own mapping
    mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # freed memory at the top of the heap stays


TEST_BATCHES_BETWEEN_STOP_CHECKS = 16  # with several ranks, each check waits for all of them


class Trainer:
    """The loop: train, test every ``--test-freq`` iterations, print, log metrics, checkpoint, stop on a signal."""

    def __init__(
        self,
        args: argparse.Namespace,
        model: DLRM,
        backend: Backend,
        loaders: tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader | None],
        ranks: Ranks,
        checkpoint: dict | None = None,
    ) -> None:
        self.args, self.model, self.backend, self.ranks = args, model, backend, ranks
        self.train_loader, self.test_loader = loaders
        self.training = not args.inference_only
        self.loaded_from = checkpoint_file(args.load_model, ranks.rank) if checkpoint else None
        self.saved_at = None  # the position of the checkpoint loaded
        self.last_saved = None  # the position this run last saved to --save-model
        if checkpoint:  # before dense_step: lazy bf16 copies the weights it finds
            with fields_of(self.loaded_from):
                self.check_saved_model(checkpoint)
                self.saved_at = Position.saved(checkpoint["position"])
                load_weights(self.loaded_from, model, checkpoint["weights"])
        if self.training:
            for table in model.embeddings:
                table.set_optimizer(args.optimizer, args.learning_rate)
        self.dense_path, self.optimizer = dense_step(args, model.dense, backend)
        # a CUDA graph cannot hold the ranks' exchanges and DDP's hooks
        self.run_iteration = self.forward_backward if dist.is_initialized() else backend.capture(self.forward_backward)
        self.position, self.best = Position(), dict(accuracy=0.0, auc=0.0)
        self.window = Window(args.mini_batch_size)
        self.mlperf = MLPerfLog(args.mlperf_logging and ranks.rank == 0)
        self.stop_signal: int | None = None
        self.untested = False  # a signal cut short the test due at self.position
        self.iterations_here = 0  # by this process: lazy mode's first ones compile
        if checkpoint and self.training:
            with fields_of(self.loaded_from):
                self.restore(checkpoint)
        # last: a checkpoint that does not fit leaves no metrics file or TensorBoard run behind
        self.metrics = MetricsLog(args.metrics_file, args.tensorboard, enabled=ranks.rank == 0)

    # -- checkpoints --------------------------------------------------------------------------------------

    def state(self) -> dict:
        model, window = self.model, self.window
        return {
            "format": CHECKPOINT_FORMAT,
            "world_size": self.ranks.world_size,
            "optimizer": self.args.optimizer,
            "data": {flag: getattr(self.args, flag) for flag in resume_flags(self.args)},
            "model": {flag: getattr(self.args, flag) for flag in MODEL_FLAGS},
            "weights": {name: weight.detach().cpu() for name, weight in model.named_weights()},
            "sparse_state": {
                str(shard): table.moments.cpu()
                for shard, table in zip(model.shards, model.embeddings, strict=True)
                if table.moments is not None
            },
            "dense_state": {name: t.cpu() for name, t in self.dense_accumulators()},
            "position": vars(self.position),
            "window": torch.stack(window.stats).cpu() if window.stats else torch.empty(0, 3),
            "best": self.best,
            "untested": self.untested,
            "rng": dict(numpy=numpy_rng_state(), torch=torch.get_rng_state()),
        }

    def check_saved_model(self, state: dict) -> None:
        """Stop unless the checkpoint was saved by as many ranks, and with the same ``MODEL_FLAGS``, as this run
        (to train or to evaluate). Checked before the weights, whose shapes cannot tell: from other ranks, a split
        table's shape would be named instead, and a dot interaction's weights can have a cat model's shapes."""
        saved_by = state["world_size"]
        if saved_by != self.ranks.world_size:
            ranks = "rank" if saved_by == 1 else "ranks"
            raise CheckpointError(f"--load-model {self.loaded_from}: saved by {saved_by} {ranks}, this run has "
                                  f"{self.ranks.world_size}")  # fmt: skip
        self.check_saved_flags(state.get("model", {}))  # not recorded in the checkpoints of earlier versions

    def check_saved_flags(self, saved: dict) -> None:
        """Each flag the checkpoint recorded (by ``dest``) has the same value in this run."""
        for dest, value in saved.items():
            if getattr(self.args, dest) != value:
                raise CheckpointError(f"--load-model {self.loaded_from}: saved with {_flag_name(dest)} "
                                      f"{value}, this run has {getattr(self.args, dest)}")  # fmt: skip

    def restore(self, state: dict) -> None:
        """Everything a resumed run needs to continue as if it had never stopped."""
        path = self.loaded_from
        data = {flag: value for flag, value in state["data"].items() if flag in resume_flags(self.args)}
        self.check_saved_flags({"optimizer": state["optimizer"], **data})
        for shard, table in zip(self.model.shards, self.model.embeddings, strict=True):
            if table.moments is not None:
                load_tensor(path, "Adagrad state of", str(shard), state["sparse_state"], table.moments)
        for name, accumulator in self.dense_accumulators():
            load_tensor(path, "Adagrad state of", name, state["dense_state"], accumulator)
        self.position, self.best = Position.saved(state["position"]), dict(state["best"])
        self.untested = state.get("untested", False)  # not recorded in the checkpoints of earlier versions
        if self.position.batch > self.train_loader.sampler.stop:
            raise CheckpointError(f"--load-model {path}: saved after batch {self.position.batch} of an epoch, this "
                                  f"run's epochs have {self.train_loader.sampler.stop} (--num-batches)")  # fmt: skip
        if state["window"].dim() != 2 or state["window"].size(1) != 3:
            raise ValueError(f"window has shape {list(state['window'].shape)}, expected [iterations, 3]")
        self.window.stats = [row.to(self.backend.device) for row in state["window"]]
        set_numpy_rng_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if dist.is_initialized():  # every rank's file must come from the same save
            iterations = [None] * self.ranks.world_size
            dist.all_gather_object(iterations, self.position.iteration)
            if len(set(iterations)) > 1:
                raise CheckpointError(f"--load-model {path}: the ranks' files were saved at iterations {iterations}")

    def dense_accumulators(self) -> Iterator[tuple[str, Tensor]]:
        """The dense optimizer's Adagrad sums by parameter name (none for SGD)."""
        names = (name for name, _ in self.model.dense.named_parameters())
        return zip(names, self.optimizer.accumulators(), strict=False)

    def weights_finite(self) -> bool:
        """Every rank's weights are finite (a model that diverged since its last printed line may not be). Told by
        their extremes, which a NaN or an infinity becomes: ``isfinite`` would allocate a byte for every weight.
        A rank may hold no rows of a table split across more ranks than it has rows: that empty shard has none."""
        weights = (weight.detach() for _, weight in self.model.named_weights() if weight.numel())
        extremes = torch.stack([torch.stack(torch.aminmax(weight)).float() for weight in weights])
        finite = torch.isfinite(extremes).all().int()
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def save(self) -> None:
        """Write the checkpoint, unless the weights diverged: they would replace the last good one."""
        path = checkpoint_file(self.args.save_model, self.ranks.rank)
        if not self.weights_finite():
            where = f"it {self.position.batch} of epoch {self.position.epoch}"
            raise DivergedError(f"{where}: the weights are not finite (--learning-rate?); {path} is left as it was")
        write_checkpoint(path, self.state())
        self.last_saved = self.position
        print(f"Saved {path} at it {self.position.batch} of epoch {self.position.epoch}")

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Train (or, with ``--inference-only``, evaluate); the exit code: 0, or 128 + the signal that stopped it."""
        if self.loaded_from:
            print(f"Loaded {self.loaded_from}: saved after it {self.saved_at.batch} of epoch {self.saved_at.epoch}")
        # SIGPIPE: the reader of the output left (| head); the kernel sends it with the write that fails
        handlers = {s: signal.signal(s, self.request_stop) for s in {*STOP_SIGNALS, signal.SIGPIPE}}
        try:
            if not self.training and self.test_loader is not None:
                # a loaded model is tested where it was saved: its result lines up with the run that trained it
                self.position = self.saved_at or Position(batch=self.train_loader.sampler.stop)
                self.test(self.position.batch, self.position.epoch)
            else:
                self.train_epochs()
        finally:
            self.metrics.close()
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return 128 + self.stop_signal if self.stop_signal else 0

    def train_epochs(self) -> None:
        """Every epoch from the position loaded, or until a signal or a threshold; then the checkpoint."""
        print("time/loss/accuracy (if enabled):")
        self.mlperf.log("start", "RUN_START")
        # a run resumed where it had reached a threshold trains no further; a test that a signal cut short before
        # the checkpoint was saved comes first
        stop = self.reached(self.best) or (self.untested and self.test(self.position.batch, self.position.epoch))
        if not stop and not self.batches_left():
            self.say_nothing_is_left_to_train()
        epoch = self.position.epoch
        while not stop and epoch < self.args.nepochs:
            self.mlperf.log("start", "EPOCH_START", epoch_num=epoch)
            stop = self.train_epoch(epoch)
            self.mlperf.log("end", "EPOCH_STOP", epoch_num=epoch)
            epoch += 1
        self.mlperf.log("end", "RUN_STOP", status="aborted" if self.stop_signal else "success")
        if self.args.save_model and self.position != self.last_saved:  # --save-freq may have saved it already
            self.save()

    def batches_left(self) -> bool:
        """Whether the position is before the last epoch's end (a partial last batch counts)."""
        epoch, batch, last_epoch = self.position.epoch, self.position.batch, self.args.nepochs - 1
        return epoch < last_epoch or (epoch == last_epoch and batch < self.train_loader.sampler.stop)

    def say_nothing_is_left_to_train(self) -> None:
        path, saved, nepochs = self.loaded_from, self.saved_at, self.args.nepochs
        if not path:
            print(f"Nothing to train: --nepochs {nepochs}")
            return
        if saved.epoch >= nepochs:
            why = f"saved in epoch {saved.epoch}, and --nepochs {nepochs} ends before it"
        else:
            why = f"saved at the end of this run (it {saved.batch} of epoch {saved.epoch})"
        print(f"Nothing to train: {path} was {why}")

    def request_stop(self, signum: int, frame: object) -> None:
        """Stop after this iteration, saving. In one process, a second Ctrl-C stops at once (the last checkpoint
        stays as it was), for an iteration that takes long: lazy mode's first, which compiles. Not with several
        ranks: a launcher passes on the Ctrl-C its ranks got from the terminal already, so each gets it twice."""
        if signum == signal.SIGINT == self.stop_signal and not dist.is_initialized():
            raise KeyboardInterrupt
        self.stop_signal = signum

    def stopping(self, agree: bool) -> bool:
        """A signal arrived here, or at any rank. Ranks must stop at the same batch, so they compare their signals
        only where told to ``agree`` (an all-reduce): after a printed line, already a point where they wait for
        each other, and every few test batches; not every iteration."""
        if not dist.is_initialized():
            return self.stop_signal is not None
        if not agree:
            return False
        flag = torch.tensor([self.stop_signal or 0], device=self.backend.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:  # a signal that lands during the all-reduce stays set for the next agreement
            self.stop_signal = agreed
        return bool(agreed)

    def train_epoch(self, epoch: int) -> bool:
        """One epoch from the current position; True when the run must stop (a signal or a reached target)."""
        args, backend = self.args, self.backend
        nbatches = self.train_loader.sampler.stop
        start = self.position.batch if epoch == self.position.epoch else 0
        if start == 0:
            self.window = Window(args.mini_batch_size)
        replayed = backend.to_device(next(start_batches(self.train_loader))) if args.measure_perf else None
        # the epoch's last line and test come with its last whole batch, before a checkpoint can be saved there
        last = nbatches if replayed is not None else min(nbatches, whole_batches(self.train_loader))
        warmup = backend.warmup_iterations if backend.lazy else 0
        warmup_seconds = 0.0
        batches = epoch_batches(self.train_loader, epoch, start, replayed)
        with torch.set_grad_enabled(self.training), loader_processes_ended(batches):
            for j, batch in enumerate(batches, start):
                if batch.samples < args.mini_batch_size:
                    print(f"Breaking out of the epoch as  batch was partial. Number of samples: {batch.samples}")
                    return False
                if self.iterations_here == warmup:  # compiling, which allocates once, is over
                    reuse_freed_host_memory()
                begin = time.perf_counter()
                scores, stats = self.step(backend.to_device(batch))
                self.iterations_here += 1
                if self.iterations_here == warmup:
                    backend.synchronize()  # the graphs are compiled: time from here on
                seconds = time.perf_counter() - begin
                warming_up = self.iterations_here <= warmup
                self.window.add(stats, None if warming_up else seconds)
                warmup_seconds += seconds if warming_up else 0.0
                if self.iterations_here == warmup:
                    compiled = f"the first {warmup} it compiled the graphs in {warmup_seconds:.1f} s"
                    print(f"Lazy mode: {compiled} (not in ms/it)")
                self.position = Position(epoch, j + 1, self.position.iteration + 1)
                if args.debug_mode:
                    print(f"batch {j}: dense {batch.dense}\ntargets {batch.targets.view(-1)}\nscores {scores.view(-1)}")
                reported = (j + 1) % args.print_freq == 0 or j + 1 == last
                if reported:
                    self.report(j + 1, nbatches, epoch)
                test_due = args.test_freq > 0 and ((j + 1) % args.test_freq == 0 or j + 1 == last)
                if test_due and self.test(j + 1, epoch):
                    return True
                if args.save_freq and self.position.iteration % args.save_freq == 0:
                    self.save()
                if self.stopping(reported):
                    name = signal.Signals(self.stop_signal).name
                    print(f"Stopped by {name} after it {j + 1}/{nbatches} of epoch {epoch}")
                    return True
        return False

    def step(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """One iteration on the device, then what the loop does with its loss; its scores and stats."""
        scores, loss, stats = self.run_iteration(batch)
        if self.args.print_dist_loss:
            print(f" Distributed Loss :: {distributed_loss(loss):.6f}")
        self.backend.mark_step()
        return scores, stats

    def forward_backward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Forward and loss, and when training backward (the sparse updates run inside) and the dense step."""
        scores, loss, stats = self.forward(batch)
        if self.training:
            loss.backward()  # the sparse updates happen in here, and the dense ones with a DenseOptimizer
            self.optimizer.step()  # the dense update, for every other optimizer
        return scores, loss, stats

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(scores, loss, stats) of a batch on the device: the lookups, then the dense path as the loop runs it."""
        return self.dense_path(batch.dense, self.model.lookup(batch.bags, batch.dense.size(0)), batch.targets)

    def report(self, it: int, nbatches: int, epoch: int) -> None:
        # the epoch's last line between two --print-freq lines leaves its window: the next epoch starts a new one, and
        # a run resumed here with more --num-batches prints the line of the whole window, as the run that never stopped
        window = self.window
        if it % self.args.print_freq == 0:
            self.window = Window(self.args.mini_batch_size)
        loss, accuracy, ms = window.read(it - len(window.stats) + 1, it, epoch)
        phase, logged_phase = ("training", "train") if self.training else ("inference", "inference")
        shown = ms if self.args.print_time and ms is not None else -1  # -1: not measured
        print(
            f"Finished {phase} it {it}/{nbatches} of epoch {epoch}, {shown:.2f} ms/it, "
            f"loss {loss:.6f}, accuracy {100 * accuracy:3.3f} %",
            flush=True,
        )
        if self.args.log_device_mem_alloc:
            print(self.backend.memory_report())
        samples_per_s = self.args.mini_batch_size * 1000 / ms if ms else None
        self.metrics.write(dict(phase=logged_phase, epoch=epoch, iteration=it, step=self.position.iteration,
                                loss=loss, accuracy=accuracy, auc=None, ms_per_it=ms,
                                samples_per_s=samples_per_s))  # fmt: skip

    def test(self, it: int, epoch: int) -> bool:
        """Evaluate the test split, print and log it; True when an ``--mlperf-*-threshold`` is reached, or when a
        signal cut the test short."""
        args = self.args
        self.mlperf.log("start", "EVAL_START", epoch_num=epoch)
        result = self.evaluate()
        nbatches = self.train_loader.sampler.stop
        self.untested = result is None
        if result is None:
            name = signal.Signals(self.stop_signal).name
            print(f"Stopped by {name} during the test after it {it}/{nbatches} of epoch {epoch} (the test is left out)")
            return True
        self.best = dict(accuracy=max(self.best["accuracy"], result.accuracy), auc=max(self.best["auc"], result.auc))
        if args.mlperf_logging:
            m = result.mlperf_metrics()
            print(
                f"Testing at - {it}/{nbatches} of epoch {epoch}, loss {m['loss']:.6f}, recall {m['recall']:.4f}, "
                f"precision {m['precision']:.4f}, f1 {m['f1']:.4f}, ap {m['ap']:.4f}, auc {result.auc:.4f}, "
                f"best auc {self.best['auc']:.4f}, accuracy {100 * result.accuracy:3.3f} %, "
                f"best accuracy {100 * self.best['accuracy']:3.3f} %",
                flush=True,
            )
        else:
            print(
                f"Testing at - {it}/{nbatches} of epoch {epoch}, loss {result.loss:.6f}, "
                f"accuracy {100 * result.accuracy:3.3f} %, best {100 * self.best['accuracy']:3.3f} %\n"
                f"Testing AUC at - {it}/{nbatches} of epoch {epoch}: {result.auc:.6f}, best {self.best['auc']:.6f}",
                flush=True,
            )
        self.mlperf.log("event", "EVAL_ACCURACY", result.auc, epoch_num=epoch)
        self.mlperf.log("end", "EVAL_STOP", epoch_num=epoch)
        self.metrics.write(dict(phase="test", epoch=epoch, iteration=it, step=self.position.iteration,
                                loss=result.loss, accuracy=result.accuracy, auc=result.auc, ms_per_it=None,
                                samples_per_s=None))  # fmt: skip
        return self.reached(dict(accuracy=result.accuracy, auc=result.auc))

    def reached(self, results: dict[str, float]) -> bool:
        """Whether test ``results`` (accuracy, auc) reach an ``--mlperf-*-threshold``, which stops training."""
        for name, threshold in (("accuracy", self.args.mlperf_acc_threshold), ("auc", self.args.mlperf_auc_threshold)):
            if 0 < threshold <= results[name]:
                print(f"MLPerf testing {name} threshold {threshold} reached, stop training")
                return True
        return False

    @torch.no_grad()
    def evaluate(self) -> Evaluation | None:
        """Loss, accuracy and ROC AUC over the whole test split (a last partial batch is left out); None when a
        signal stops it part-way (a test pass can outlast the grace a batch scheduler gives before it kills)."""
        batch_size = self.test_loader.collate_fn.batch_size
        stats, scores, targets = [], [], []
        batches = epoch_batches(self.test_loader, 0, 0, None)
        with loader_processes_ended(batches):
            for k, batch in enumerate(batches):
                if k and k % TEST_BATCHES_BETWEEN_STOP_CHECKS == 0 and self.stopping(agree=True):
                    return None
                if batch.samples < batch_size:
                    print(f"Breaking out of the epoch as  test batch was partial. Number of samples: {batch.samples}")
                    break
                batch = self.backend.to_device(batch)
                batch_scores, _, batch_stats = self.forward(batch)
                stats.append(batch_stats)
                scores.append(batch_scores.detach().float().view(-1))
                targets.append(batch.targets.view(-1))
                self.backend.mark_step()
        totals = torch.stack(stats)  # per batch: a float32 running count of correct predictions is inexact past 2**24
        all_scores, all_targets = gather_samples(torch.cat(scores)), gather_samples(torch.cat(targets))
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        if dist.is_initialized():
            dist.all_reduce(totals)
        if int(totals[:, 2].sum()):  # on any rank's samples: every rank stops
            raise DivergedError("the test scores are not finite (a diverged model?)")
        totals = totals.cpu().double()
        loss = float(totals[:, 0].sum()) / (world_size * len(stats))
        accuracy = float(totals[:, 1].sum()) / all_scores.size
        return Evaluation(loss, accuracy, roc_auc(all_scores, all_targets), all_scores, all_targets)


# ---------------------------------------------------------------------------------------------------------
# Export for serving: ONNX, and a drawing of the compute graph
# ---------------------------------------------------------------------------------------------------------


class ServingDLRM(nn.Module):
    """The trained network with torch's own embedding bags and linear layers, which ONNX and serving runtimes
    understand.

    Inputs: the dense features, then each table's indices and bag offsets (one start per sample).
    """

    def __init__(self, model: DLRM) -> None:
        super().__init__()
        # not cloned: an fp32 table on the CPU is shared with the trained model, not held a second time
        weights = [table.weight.detach().float().cpu() for table in model.embeddings]
        self.tables = nn.ModuleList(nn.EmbeddingBag.from_pretrained(w, freeze=False, mode="sum") for w in weights)
        self.dense = copy.deepcopy(model.dense).float().cpu()
        for layer in self.dense.modules():
            if isinstance(layer, Linear):
                layer.kernels = TorchKernels()  # torch's own products, which the ONNX exporter knows

    def forward(self, dense: Tensor, *bags: Tensor) -> Tensor:
        pooled = [table(bags[2 * t], bags[2 * t + 1]) for t, table in enumerate(self.tables)]
        return self.dense.clamp(self.dense.predict(dense, pooled))


def serving_inputs(batch: Batch) -> tuple[Tensor, ...]:
    """A preprocessed batch as ``ServingDLRM`` takes it: dense, then (indices, offsets) per table."""
    inputs = [batch.dense.float().cpu()]
    for bags in batch.bags:
        samples = batch.dense.size(0)  # a partial batch's buffers hold empty bags after its samples
        inputs += [bags.indices[: bags.num_indices].long().cpu(), bags.offsets[:samples].long().cpu()]
    return tuple(inputs)


ONNX_WEIGHT_ALIGNMENT = 4096  # ONNX's external data: offsets at page multiples let a runtime map the weights


def finish_large_onnx(model_file: Path, weights_name: str) -> None:
    """Over ONNX's 2 GB limit, torch writes each weight to a file of its own beside ``model_file``, named after the
    weight, and leaves out the types of some embedding bags' loop counters, which onnxruntime needs. Gather the
    weights into one file, ``weights_name`` beside it, and give the counters their types."""
    import onnx

    proto = onnx.load(str(model_file), load_external_data=False)
    for loop in (node for node in proto.graph.node if node.op_type == "Loop"):
        (body,) = (attribute.g for attribute in loop.attribute if attribute.name == "body")
        for counter, elem_type in zip(body.input[:2], (onnx.TensorProto.INT64, onnx.TensorProto.BOOL), strict=True):
            counter.type.tensor_type.elem_type = elem_type  # the iteration number, then the condition: scalars
            counter.type.tensor_type.shape.SetInParent()
    with open(model_file.parent / weights_name, "wb") as weights:
        for tensor in proto.graph.initializer:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            part = model_file.parent / {entry.key: entry.value for entry in tensor.external_data}["location"]
            weights.write(bytes(-weights.tell() % ONNX_WEIGHT_ALIGNMENT))
            offset = weights.tell()
            with open(part, "rb") as f:
                shutil.copyfileobj(f, weights)
            part.unlink()
            del tensor.external_data[:]
            for key, value in (("location", weights_name), ("offset", offset), ("length", weights.tell() - offset)):
                tensor.external_data.add(key=key, value=str(value))
    onnx.save(proto, str(model_file))


def export_onnx(model: DLRM, batch: Batch, path: str) -> None:
    """Write the model to ``path`` (its weights to ``path``.data when they pass ONNX's 2 GB limit) and, when
    onnxruntime is installed, check its scores against PyTorch's."""
    serving, inputs = ServingDLRM(model).eval(), serving_inputs(batch)
    names = ["dense"] + [f"{kind}_{t}" for t in range(len(serving.tables)) for kind in ("indices", "offsets")]
    dynamic = {name: {0: "batch" if name in ("dense", "scores") or name.startswith("offsets") else "lookups"}
               for name in [*names, "scores"]}  # fmt: skip
    final = Path(path).resolve()
    weights = final.with_name(f"{final.name}.data")
    try:  # as the checkpoint: in missing folders too, and a failed write leaves any previous file as it was
        final.parent.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(prefix=f".{final.name}.{os.getpid()}.", dir=final.parent) as folder,
            torch.no_grad(),
            warnings.catch_warnings(),
        ):
            # the TorchScript exporter: the newer one needs onnxscript, and this one handles the embedding bags
            warnings.simplefilter("ignore", DeprecationWarning)
            exported = Path(folder) / final.name
            torch.onnx.export(serving, inputs, str(exported), input_names=names, output_names=["scores"],
                              dynamic_axes=dynamic, dynamo=False)  # fmt: skip
            apart = len(os.listdir(folder)) > 1  # torch wrote the weights apart
            if apart:
                finish_large_onnx(exported, weights.name)
                os.replace(exported.with_name(weights.name), weights)  # first: the model names it
            os.replace(exported, final)
    except OSError as e:
        raise CheckpointError(f"--save-onnx {path}: cannot write it ({e.strerror})") from None
    with torch.no_grad():
        expected = serving(*inputs).numpy()
    written = f"ONNX model written to {path} ({final.stat().st_size / 1e6:.1f} MB)"
    if apart:
        written += f", its weights to {weights.name} ({weights.stat().st_size / 1e6:.1f} MB)"
    print(written)
    check_onnx(path, {name: t.numpy() for name, t in zip(names, inputs, strict=True)}, expected)


def check_onnx(path: str, feeds: dict[str, np.ndarray], expected: np.ndarray) -> None:
    """When onnxruntime is installed, run the exported model on the batch and print how far it is from PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: the exported model was not checked")
        return
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its graph optimizer warns about the embedding bags' loops
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        (scores,) = session.run(None, feeds)
    except Exception as e:  # onnxruntime's errors (Fail, InvalidGraph, ...) derive from Exception alone
        raise CheckpointError(f"--save-onnx {path}: written, but onnxruntime cannot run it ({first_line(e)})") from None
    print(f"onnxruntime on one batch: largest difference from PyTorch {np.abs(scores - expected).max():.3g}")


def plot_compute_graph(model: DLRM, batch: Batch) -> None:
    """The autograd graph of one forward pass, as Graphviz source (and a PDF when Graphviz is installed)."""
    try:
        from torchviz import make_dot
    except ImportError:
        print("--plot-compute-graph: torchviz is not installed (pip install torchviz), no graph drawn")
        return
    serving = ServingDLRM(model)
    graph = make_dot(serving(*serving_inputs(batch)).mean(), params=dict(serving.named_parameters()))
    drawn = f"{GRAPH_STEM}.dot"
    write_output("--plot-compute-graph", Path(drawn), lambda path: Path(path).write_text(graph.source))
    if shutil.which("dot"):
        graph.render(GRAPH_STEM, format="pdf", cleanup=True)
        drawn += f" and {GRAPH_STEM}.pdf"
    print(f"Compute graph written to {drawn}")


def export(args: argparse.Namespace, trainer: Trainer) -> None:
    """``--save-onnx`` and ``--plot-compute-graph``, from one batch of the data. Not for a run a signal stopped:
    its network is not the trained one (unless the signal came while the last checkpoint was saved), and a
    scheduler's grace after SIGTERM is short."""
    outputs = {"--save-onnx": args.save_onnx, "--plot-compute-graph": args.plot_compute_graph}
    asked = [flag for flag, given in outputs.items() if given]
    if not asked:
        return
    if trainer.stop_signal:
        print(f"Not exported ({', '.join(asked)}): stopped by {signal.Signals(trainer.stop_signal).name}")
        return
    loader = trainer.test_loader or trainer.train_loader
    batches = epoch_batches(loader, 0, 0, None)
    with loader_processes_ended(batches):
        batch = next(iter(batches))
    if args.save_onnx:
        export_onnx(trainer.model, batch, args.save_onnx)
    if args.plot_compute_graph:
        plot_compute_graph(trainer.model, batch)


# ---------------------------------------------------------------------------------------------------------
# Putting it together: the environment, the ranks, the set-up and main
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def profiling(enabled: bool, device_type: str, name: str) -> Iterator[None]:
    """With ``--enable-profiling``: a torch.profiler trace (``name``.json) and a table of the slowest ops
    (``name``.prof), in the working directory; ``name`` is the rank's ``profile_stem``, which the checks know."""
    if not enabled:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        yield
    sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30)
    write_output("--enable-profiling", Path(f"{name}.json"), prof.export_chrome_trace)
    write_output("--enable-profiling", Path(f"{name}.prof"), lambda path: Path(path).write_text(table))
    print(f"Profile written to {name}.json (chrome trace) and {name}.prof (top ops)")


def write_output(flag: str, path: Path, export: Callable[[str], object]) -> None:
    """``export(temporary)``, renamed to ``path``; a failed write (a full disk) is one line and leaves no file."""
    try:
        with data_utils.atomic_write(path) as temporary:
            export(str(temporary))
            if not temporary.exists():  # torch's trace export only logs a failed write, and leaves its .tmp file
                Path(f"{temporary}.tmp").unlink(missing_ok=True)
                raise CheckpointError(f"{flag} {path}: cannot write it (is the disk full?)")
    except OSError as e:
        raise CheckpointError(f"{flag} {path}: cannot write it ({e.strerror})") from None


RESTARTED = "DLRM_RESTARTED_WITH_CONFIG_ENV"  # set for the restart, so the restarted script knows it is one


def apply_environment(env: dict[str, str], argv: list[str]) -> None:
    """Set the config's ``env_variables``; torch is already loaded, so the script starts again with them."""
    restarted = os.environ.pop(RESTARTED, None) is not None
    changed = [name for name, value in env.items() if os.environ.get(name) != value]
    if not changed:
        return
    if restarted:  # Python itself changed it (LC_CTYPE=C becomes C.UTF-8): another restart would loop forever
        name = changed[0]
        raise UsageError(f"--config: environment variable {name}={env[name]} does not hold: the restarted "
                         f"script finds {name}={os.environ.get(name)}")  # fmt: skip
    os.environ.update(env, **{RESTARTED: "1"})
    sys.stdout.flush()
    try:
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *argv])
    except OSError as e:
        raise UsageError(f"--config: cannot restart with its env_variables ({e.strerror})") from None


def join_ranks(args: argparse.Namespace, backend: Backend, ranks: Ranks | None) -> Ranks:
    """This process's rank; started by a launcher (``ranks``) or with ``--distributed``, it joins the group."""
    if ranks is None and not args.distributed:
        return Ranks(0, 1, 0, 1)
    if ranks is None:  # --distributed without a launcher: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(distributed_utils.free_port()))
        ranks = Ranks(0, 1, 0, 1)
    started = f"{ranks.world_size} rank" + ("s" if ranks.world_size > 1 else "")
    if args.world_size not in (1, ranks.world_size):
        raise UsageError(f"--world_size {args.world_size}: the launcher started {started}")
    _check_rank_flags(args, ranks.world_size, started)
    if ranks.world_size != args.world_size:  # a launcher's ranks, which parsing could not count: their files
        _check_rank_files(args, ranks.world_size)
    try:
        distributed_utils.init_process_group(ranks, backend.process_group)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"{started}: {backend.process_group} cannot start ({first_line(e)})") from None
    return ranks


def build(args: argparse.Namespace, sizes: Sizes, backend: Backend, ranks: Ranks) -> Trainer:
    """This rank's data, model (its tables, by the printed plan, when distributed) and loop, resumed from
    ``--load-model`` when given (read first: a bad checkpoint stops the run before the data is prepared)."""
    checkpoint = read_checkpoint(checkpoint_file(args.load_model, ranks.rank)) if args.load_model else None
    train_data, test_data, sizes = make_datasets(args, sizes)
    shards, exchange = None, None
    if dist.is_initialized():
        plan = distributed_utils.plan_tables(sizes.tables, ranks.world_size)
        print(distributed_utils.describe_plan(plan, ranks.world_size, args.mini_batch_size, sizes.embedding_dim))
        shards = [shard for shard in plan if shard.rank == ranks.rank]
        exchange = EmbeddingExchange(plan, ranks.rank, ranks.world_size, sizes.embedding_dim)
    model = DLRM(args, sizes, backend.kernels, shards, exchange).to(backend.device)
    if args.debug_mode:
        print(f"model sizes: {sizes}, torch threads: {torch.get_num_threads()}\n{model}")
    train_loader = make_loader(args, train_data, sizes, backend, model.shards, ranks)
    if isinstance(train_data, data_utils.CriteoBatches) and train_loader.sampler.stop == 0 and not args.inference_only:
        raise UsageError(f"--mini-batch-size: the training split holds no whole batch of {args.mini_batch_size} "
                         f"samples ({len(train_data.order)} rows)")  # fmt: skip
    test_loader = None
    if test_data is not None and (args.test_freq > 0 or args.inference_only):
        test_loader = make_loader(args, test_data, sizes, backend, model.shards, ranks, test=True)
        if whole_batches(test_loader) == 0:
            batch_size = test_loader.collate_fn.batch_size
            raise UsageError(f"--test-mini-batch-size: the test split holds no whole batch of {batch_size} samples")
    return Trainer(args, model, backend, (train_loader, test_loader), ranks, checkpoint)


def remove_leftovers(args: argparse.Namespace, ranks: Ranks) -> None:
    """Remove the temporary files and folders that runs killed outright (kill -9, the OOM killer, a scheduler when
    its grace ends) left while writing this run's outputs: each would stay beside its output, as big as it. Each rank
    sees to its checkpoint file, rank 0 to the rest."""
    outputs = [checkpoint_file(args.save_model, ranks.rank)] if args.save_model else []
    if ranks.rank == 0:
        outputs += [Path(args.save_onnx)] if args.save_onnx else []
        outputs += [Path(written) for _, written in _working_folder_files(args, ranks.world_size)]
    for output in outputs:
        data_utils.remove_leftovers_of(output.resolve())  # written where a link points


def fail(code: int, message: str, said_here: bool = True, together: bool = False) -> int:
    """One line on stderr (unless not ``said_here``); a distributed rank then leaves at once (the others see it gone),
    or, when every rank failed ``together``, after the others: the rank saying it is not stopped before it has."""
    if said_here:
        print(f"dlrm_s_pytorch.py: error: {message}", file=sys.stderr, flush=True)
    if dist.is_initialized():
        if together:
            with contextlib.suppress(dist.DistError, RuntimeError):
                dist.barrier()
        leave_group(code)
    return code


def leave_group(code: int) -> NoReturn:
    """Exit a distributed rank without interpreter finalization: DDP still holds the process group there,
    and destroying gloo's worker threads that late sometimes aborts ("terminate called without an active
    exception")."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str]) -> int:
    try:
        args, sizes, env = parse_command_line(argv)
        apply_environment(env, argv)
    except (UsageError, DataError) as e:  # DataError: the Criteo files' names, looked at for the overwrite check
        return fail(2, first_line(e))
    try:
        launched = distributed_utils.launched_ranks()
        if launched is not None:
            distributed_utils.stop_when_orphaned()
        local_rank = launched.local_rank if launched else 0
        lazy = args.mode == "lazy"
        device_type = resolve_device(args.device, lazy, args.no_habana, args.use_gpu)
        gpus = torch.cuda.device_count()
        if device_type == "cuda" and args.world_size > gpus:
            raise UsageError(f"--world_size {args.world_size}: nccl needs a GPU per rank, {gpus} here")
        if launched is None and args.world_size > 1:  # start the ranks, each of them this script
            cores = data_utils.usable_cores()
            if args.world_size > PROCESSES_PER_CORE * cores:
                raise UsageError(f"--world_size {args.world_size}: more than {PROCESSES_PER_CORE} ranks to start "
                                 f"on each of this machine's {cores} cores")  # fmt: skip
            if args.data_generation == "dataset":
                data_utils.prepare(args)  # once, before the ranks read it
            if args.data_generation == "synthetic":
                read_traces(args, sizes)  # a bad trace file is reported here once, not by every rank
            return distributed_utils.spawn_ranks([sys.executable, os.path.abspath(__file__), *argv], args.world_size)
        backend = select_backend(device_type, lazy, local_rank=local_rank)
        ranks = join_ranks(args, backend, launched)
    except (DeviceUnavailable, UsageError, DataError, ValueError) as e:
        return fail(2, first_line(e))
    if ranks.rank != 0 and not args.print_all_ranks:
        sys.stdout = open(os.devnull, "w", errors="backslashreplace")  # for the life of the process
    if ranks.local_world_size > 1 and backend.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, data_utils.usable_cores() // ranks.local_world_size))  # share the cores

    np.set_printoptions(precision=args.print_precision)
    torch.set_printoptions(precision=args.print_precision)
    np.random.seed(args.numpy_rand_seed)
    torch.manual_seed(args.numpy_rand_seed)
    if env:  # here, where only rank 0 prints: not by the --world_size launcher, then by each rank again
        print("Environment from --config: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(backend.banner)
    if args.data_type == "bf16" and backend.emulates_bf16():
        print("bf16: this CPU has no bf16 matrix products (they need AVX-512); emulated, they are far slower than fp32")
    if args.mlperf_logging:
        print("command line args: ", json.dumps(vars(args)))
    if args.hmp_verbose:
        fp32_ops = "every other op" if args.hmp_opt_level == "O2" else ", ".join(sorted(FP32_OPS))
        print(f"bf16 ops: {', '.join(sorted(BF16_OPS))}; fp32 ops: {fp32_ops}")

    trainer = None
    try:
        remove_leftovers(args, ranks)
        trainer = build(args, sizes, backend, ranks)
        with profiling(args.enable_profiling, backend.device_type, profile_stem(ranks.rank, ranks.world_size)):
            code = trainer.run()
    except (UsageError, DataError, CheckpointError) as e:
        return fail(2, first_line(e))
    except DivergedError as e:  # every rank finds it at once (its checks are all-reduced): one line, not one a rank
        return fail(1, str(e), said_here=ranks.rank == 0 or args.print_all_ranks, together=True)
    except (dist.DistError, RuntimeError) as e:  # gloo reports a lost rank as a RuntimeError, in set-up or after
        if not dist.is_initialized():
            raise
        # the process group is broken: tearing it down could abort or hang
        signum = trainer and trainer.stop_signal
        if signum:  # the signal also reached a rank still setting up, and ended it there
            name = signal.Signals(signum).name
            return fail(128 + signum, f"rank {ranks.rank} stopped by {name} without saving: another rank had left "
                                      f"({first_line(e)})")  # fmt: skip
        return fail(1, f"rank {ranks.rank} stopped: {first_line(e)}")
    if args.debug_mode:
        for name, weight in trainer.model.named_weights():
            print(f"updated {name}:\n{weight.detach()}")
    if ranks.world_size == 1:
        try:
            export(args, trainer)
        except CheckpointError as e:
            return fail(2, first_line(e))
    if not dist.is_initialized():
        return code
    try:
        dist.barrier()
    except (dist.DistError, RuntimeError) as e:  # a rank that failed at its end (renaming its checkpoint) is gone
        return fail(1, f"rank {ranks.rank} stopped: {first_line(e)}")
    dist.destroy_process_group()
    leave_group(code)


class UnfailingOutput:
    """``sys.stdout`` whose failed writes do not end the run. Once its reader has left (``| head``) it writes
    nowhere: the run goes on, or, while training, stops at the end of the iteration and saves (SIGPIPE). When it
    cannot write for another reason (a full disk) it says so once on stderr and writes nowhere: the run goes on,
    and its checkpoint is saved where there is room."""

    def __init__(self, stream: object) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except OSError as e:
            self.write_nowhere(e)
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except OSError as e:
            self.write_nowhere(e)

    def write_nowhere(self, error: OSError) -> None:
        if not isinstance(error, BrokenPipeError):
            with contextlib.suppress(OSError):  # stderr may be on the same full disk
                print(f"stdout: cannot write it ({error.strerror}); the run goes on, its output from here on is "
                      "lost", file=sys.stderr, flush=True)  # fmt: skip
        nowhere = os.open(os.devnull, os.O_WRONLY)
        os.dup2(nowhere, self.stream.fileno())  # what is still buffered goes there too, at exit
        os.close(nowhere)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


if __name__ == "__main__":
    sys.stdout.reconfigure(errors="backslashreplace")  # as stderr: a file name of bytes not in UTF-8 still prints
    sys.stdout = UnfailingOutput(sys.stdout)
    try:
        exit_code = main(sys.argv[1:])
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        exit_code = 130
    # Leave what is still allocated to the OS: the collector's passes over torch's objects at interpreter exit
    # took 1 s, 2-3 s after torch.compile. Files are closed by then; the atexit handlers still run.
    gc.freeze()
    sys.exit(exit_code)
