"""Hybrid-parallel DLRM on torch.distributed (SPEC §7): launching ranks, placing tables, exchanging embeddings.

- Ranks come from torchrun (``RANK``, ``WORLD_SIZE``), from mpirun (the MPI environment), or from
  ``--world_size N``, which starts N local ranks of the script itself (``spawn_ranks``).
- Tables are placed whole, largest first onto the least-loaded rank; a table larger than a rank's share, and
  every table when there are fewer tables than ranks, is split by rows across all ranks (``plan_tables``).
- Every rank generates the same global batch and looks up its own tables (or rows) for all of its samples;
  one all-to-all then hands each rank the pooled embeddings of its own samples (``EmbeddingExchange``).
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_S = 45  # a rank that died or hangs stops the others within this, with an error
SPAWN_POLL_S = 0.2
ORPHAN_POLL_S = 1.0
STOP_GRACE_S = TIMEOUT_S + 15  # a self-started rank asked to stop is killed after this: it may hang, or be stopped


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int  # ranks on this machine


def launched_ranks() -> Ranks | None:
    """This process's place when a launcher started it: torchrun (or ``spawn_ranks``), Open MPI, MPICH."""
    env = os.environ
    for rank_var, size_var, local_rank_var, local_size_var in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ):
        if rank_var in env and size_var in env:
            world_size = _whole_number(size_var)
            local_rank, local_world_size = _whole_number(local_rank_var, 0), _whole_number(local_size_var, world_size)
            ranks = Ranks(_whole_number(rank_var), world_size, local_rank, local_world_size)
            if not 0 <= ranks.rank < ranks.world_size:
                raise ValueError(f"{rank_var}={ranks.rank} does not fit {size_var}={ranks.world_size}")
            if not 0 <= ranks.local_rank < ranks.local_world_size <= ranks.world_size:  # a GPU's index, cores' share
                raise ValueError(
                    f"{local_rank_var}={ranks.local_rank} does not fit {local_size_var}={ranks.local_world_size} "
                    f"of {size_var}={ranks.world_size}"
                )
            return ranks
    return None


def stop_when_orphaned() -> None:
    """A rank whose launcher is killed outright (kill -9) would train on alone to its end: it is sent SIGTERM, as
    by a launcher that stops it, so it saves its checkpoint and stops with the other ranks."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def _whole_number(name: str, default: int | None = None) -> int:
    """The environment variable ``name`` as an int (``default`` when unset), or a ValueError that names it."""
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: not a whole number") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment torchrun gives local rank ``rank`` of ``world_size``, meeting on 127.0.0.1:``port``."""
    return dict(
        os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip


def spawn_ranks(command: list[str], world_size: int) -> int:
    """Run ``command`` as ``world_size`` local ranks; the first rank to fail stops the others. Its exit code."""
    port = free_port()
    processes = [subprocess.Popen(command, env=rank_environment(r, world_size, port)) for r in range(world_size)]

    def forward(signum: int, frame: object) -> None:  # the ranks save their checkpoints and stop together
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (code := _spawned_exit_code([p.poll() for p in processes])) is None:
            time.sleep(SPAWN_POLL_S)
        return code
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in processes:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in processes:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _spawned_exit_code(codes: list[int | None]) -> int | None:
    """The ranks' exit code, from each one's so far (None: still running); None while they are to be waited for.

    The first rank to fail decides, and the others are stopped; but ranks stopping on a signal (each exits with
    the same 128 + N), as after ``spawn_ranks`` passed one on to all, are waited for, so that each saves its
    checkpoint.
    """
    failed = [code for code in codes if code not in (None, 0)]
    if not failed:
        return None if None in codes else 0
    first = failed[0]
    if first > 128 and None in codes and all(code in (None, first) for code in codes):
        return None
    return first if first > 0 else 128 - first  # Popen's -N: killed by signal N


def _mpi_rendezvous() -> None:
    """Under mpirun, agree on rank 0's address and a free port (mpi4py when installed, else the defaults)."""
    try:
        from mpi4py import MPI
    except ImportError:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    address = (socket.gethostname(), str(free_port())) if MPI.COMM_WORLD.Get_rank() == 0 else None
    address = MPI.COMM_WORLD.bcast(address, root=0)
    MPI.Finalize()  # MPI's only job here; ranks leave through os._exit, which would skip finalizing it
    os.environ.setdefault("MASTER_ADDR", address[0])
    os.environ.setdefault("MASTER_PORT", address[1])


def init_process_group(ranks: Ranks, backend: str) -> None:
    """Join the process group (gloo, nccl or hccl) through MASTER_ADDR and MASTER_PORT."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        _mpi_rendezvous()
    address = os.environ["MASTER_ADDR"]
    try:  # a name that does not resolve would be retried until the timeout, twice, with pages of warnings
        socket.getaddrinfo(address, None)
    except socket.gaierror as e:
        raise ValueError(f"MASTER_ADDR={address!r}: {e.strerror}") from None
    if not 0 <= _whole_number("MASTER_PORT") <= 65535:
        raise ValueError(f"MASTER_PORT={os.environ['MASTER_PORT']}: not a port number (0 to 65535)")
    if backend == "hccl":
        try:
            importlib.import_module("habana_frameworks.torch.distributed.hccl")  # registers the backend
        except ImportError as e:
            raise ValueError(f"Habana's bridge has no hccl backend: {e}") from None
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size, timeout=timedelta(seconds=TIMEOUT_S))


# ---------------------------------------------------------------------------------------------------------
# Placement
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """Rows ``start:stop`` of table ``table``, held by rank ``rank``."""

    table: int
    start: int
    stop: int
    rank: int

    def __str__(self) -> str:
        rows = f"{self.start}-{self.stop - 1}" if self.stop > self.start else "none"
        return f"table {self.table} rows {rows}"


def plan_tables(table_rows: list[int], world_size: int) -> list[Shard]:
    """A balanced plan by rows (every table has the same dimension), sorted by rank, then table."""
    share = sum(table_rows) / world_size
    split = [t for t, rows in enumerate(table_rows) if len(table_rows) < world_size or rows > share]
    load = [0] * world_size
    shards = []
    for t in split:
        for rank in range(world_size):
            start, stop = table_rows[t] * rank // world_size, table_rows[t] * (rank + 1) // world_size
            shards.append(Shard(t, start, stop, rank))
            load[rank] += stop - start
    whole = [t for t in range(len(table_rows)) if t not in split]
    for t in sorted(whole, key=lambda t: -table_rows[t]):
        rank = min(range(world_size), key=lambda r: load[r])
        shards.append(Shard(t, 0, table_rows[t], rank))
        load[rank] += table_rows[t]
    return sorted(shards, key=lambda s: (s.rank, s.table, s.start))


def exchange_bytes(plan: list[Shard], rank: int, world_size: int, batch_size: int, dim: int) -> int:
    """Bytes (fp32) that ``rank`` sends to other ranks in one all-to-all; the backward one sends as many."""
    local = sum(1 for s in plan if s.rank == rank)
    return (world_size - 1) * local * (batch_size // world_size) * dim * 4


def describe_plan(plan: list[Shard], world_size: int, batch_size: int, dim: int) -> str:
    held = [", ".join(str(s) for s in plan if s.rank == r) or "no tables" for r in range(world_size)]
    sent = max(exchange_bytes(plan, r, world_size, batch_size, dim) for r in range(world_size))
    lines = [f"  rank {r}: {shards}" for r, shards in enumerate(held)]
    return "\n".join(["Table plan:", *lines, f"  all-to-all: at most {sent / 1024:.1f} KiB sent per rank, each way"])


# ---------------------------------------------------------------------------------------------------------
# The exchange
# ---------------------------------------------------------------------------------------------------------


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` forward; the reverse exchange backward, its gradient scaled by 1 / world size.

    Each rank's loss is the mean over its own samples, so the gradients that come back to a table's owner sum to
    world-size times the global batch's mean gradient; scaling them (not the learning rate) keeps Adagrad equal
    to one rank.
    """

    @staticmethod
    def forward(ctx, sent: Tensor, send_splits: list[int], receive_splits: list[int]) -> Tensor:
        ctx.send_splits, ctx.receive_splits = send_splits, receive_splits
        received = sent.new_empty(sum(receive_splits))
        dist.all_to_all_single(received, sent, receive_splits, send_splits)
        return received

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        returned = grad.new_empty(sum(ctx.send_splits))
        dist.all_to_all_single(returned, grad.contiguous(), ctx.send_splits, ctx.receive_splits)
        return returned / dist.get_world_size(), None, None


class EmbeddingExchange:
    """Pooled embeddings of this rank's shards for the global batch -> every table's, for this rank's samples."""

    def __init__(self, plan: list[Shard], rank: int, world_size: int, dim: int) -> None:
        self.rank, self.world_size, self.dim = rank, world_size, dim
        self.shards_of = [[s for s in plan if s.rank == r] for r in range(world_size)]
        self.num_tables = 1 + max(s.table for s in plan)

    def __call__(self, pooled: list[Tensor], local_batch: int) -> list[Tensor]:
        """``pooled``: this rank's shards for the global batch; ``local_batch``: the samples each rank owns."""
        size = local_batch * self.dim
        send_splits = [len(self.shards_of[self.rank]) * size] * self.world_size
        receive_splits = [len(shards) * size for shards in self.shards_of]
        # [shards, ranks, local batch, dim] -> grouped by the rank that owns the samples
        sent = torch.stack(pooled).view(len(pooled), self.world_size, local_batch, self.dim)
        received = _AllToAll.apply(sent.transpose(0, 1).reshape(-1), send_splits, receive_splits)
        tables: list[Tensor | None] = [None] * self.num_tables
        pieces = received.split(receive_splits)
        for shards, piece in zip(self.shards_of, pieces, strict=True):
            for shard, rows in zip(shards, piece.view(-1, local_batch, self.dim), strict=True):
                # a table split by rows arrives as partial sums, one from each rank
                tables[shard.table] = rows if tables[shard.table] is None else tables[shard.table] + rows
        return tables
