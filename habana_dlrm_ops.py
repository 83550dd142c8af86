"""The custom embedding-bag op of the Habana DLRM port, and the optimizers that run inside backward.

The original built this for Gaudi; the design is kept on every device:

1. Host-side preprocessing per table and batch (``preprocess_bags``), run in the data loader's collate
   function: the bags' indices and offsets, plus the sorted distinct rows the batch touches, the bag of each
   sorted occurrence and where each distinct row's occurrences start. Everything lands in buffers of a fixed
   maximum size with valid counts, so shapes never change from batch to batch.
2. ``EmbeddingBag``: the forward sums each bag's rows; the backward sums one gradient row per distinct index
   and hands it to the table's ``SparseOptimizer``, which updates the table (and its Adagrad state) in place.
   The table never holds a ``.grad``.
3. ``DenseOptimizer``: SGD or Adagrad for the MLPs, applied to each parameter as soon as autograd has its
   gradient, so the MLPs' gradients never all exist at once.

Importing this module needs only torch; the Habana bridge is never required.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

OPTIMIZERS = ("sgd", "adagrad")
ADAGRAD_EPS = 1e-10  # the original's sparse kernel and torch.optim.Adagrad's default
DENSE_CHUNK = 1 << 20  # elements per step of the dense Adagrad update


@dataclass
class BagBatch:
    """One table's lookups for one batch, in fixed-size buffers; only the first ``num_*`` entries are valid."""

    indices: Tensor  # [capacity] the rows looked up, bag after bag
    offsets: Tensor  # [batch + 1] where each bag starts in ``indices``, then the total
    unique_indices: Tensor  # [capacity] the distinct rows, ascending
    sorted_bags: Tensor  # [capacity] the bag of each occurrence, occurrences sorted by row
    unique_starts: Tensor  # [capacity + 1] where each distinct row's occurrences start in ``sorted_bags``
    num_indices: int
    num_unique: int


def preprocess_bags(indices: Tensor, offsets: Tensor, batch_size: int, capacity: int) -> BagBatch:
    """Build a table's ``BagBatch`` from its bags: ``offsets`` holds each bag's start in ``indices``.

    Bags past ``len(offsets)`` (a partial batch) are empty. De-duplication is exact: every distinct row appears
    once in ``unique_indices``, whatever its value.
    """
    num_bags, num_indices = offsets.numel(), indices.numel()
    if num_indices > capacity:
        raise ValueError(f"a batch holds {num_indices} lookups into one table, more than the buffer's {capacity}")
    if num_bags > batch_size:
        raise ValueError(f"a batch holds {num_bags} bags, more than the buffer's {batch_size}")
    indices = indices.to(torch.int64)
    bounds = torch.cat([offsets.to(torch.int64), torch.tensor([num_indices])])
    bag_of_index = torch.repeat_interleave(torch.arange(num_bags), bounds.diff())
    sorted_indices, order = torch.sort(indices, stable=True)
    unique_indices, counts = torch.unique_consecutive(sorted_indices, return_counts=True)
    num_unique = unique_indices.numel()

    batch = BagBatch(
        indices=torch.zeros(capacity, dtype=torch.int64),
        offsets=torch.full((batch_size + 1,), num_indices, dtype=torch.int64),
        unique_indices=torch.zeros(capacity, dtype=torch.int64),
        sorted_bags=torch.zeros(capacity, dtype=torch.int64),
        unique_starts=torch.full((capacity + 1,), num_indices, dtype=torch.int64),
        num_indices=num_indices,
        num_unique=num_unique,
    )
    batch.indices[:num_indices] = indices
    batch.offsets[:num_bags] = bounds[:-1]
    batch.unique_indices[:num_unique] = unique_indices
    batch.sorted_bags[:num_indices] = bag_of_index[order]
    batch.unique_starts[0] = 0
    batch.unique_starts[1 : num_unique + 1] = torch.cumsum(counts, 0)
    return batch


class SparseOptimizer:
    """SGD or Adagrad on the rows of an embedding table that a batch touched, in place.

    Adagrad: ``state[r] += g**2; w[r] -= lr * g / (sqrt(state[r]) + 1e-10)``, the math of
    ``torch.optim.Adagrad(eps=1e-10)``; SGD: ``w[r] -= lr * g``. ``g`` is the row's gradient summed over
    every occurrence in the batch.
    """

    def __init__(self, name: str, lr: float) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}")
        self.name, self.lr = name, lr

    def initial_state(self, weight: Tensor) -> Tensor | None:
        return torch.zeros_like(weight) if self.name == "adagrad" else None

    def update(self, weight: Tensor, state: Tensor | None, rows: Tensor, grads: Tensor) -> None:
        if self.name == "adagrad":
            state.index_add_(0, rows, grads * grads)
            std = state.index_select(0, rows).sqrt_().add_(ADAGRAD_EPS)
            grads = grads / std
        weight.index_add_(0, rows, grads, alpha=-self.lr)


class _EmbeddingBagSum(torch.autograd.Function):
    """Sum-pooled bags forward; coalesced gradients and the sparse update in backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, bags: BagBatch, table: EmbeddingBag) -> Tensor:
        ctx.bags, ctx.table = bags, table
        return nn.functional.embedding_bag(
            bags.indices[: bags.num_indices], weight, bags.offsets, mode="sum", include_last_offset=True
        )

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[None, None, None]:
        bags, table = ctx.bags, ctx.table
        # Summing grad_output's rows over each distinct row's occurrences is itself a sum-pooled bag lookup.
        row_grads = nn.functional.embedding_bag(
            bags.sorted_bags[: bags.num_indices],
            grad_output.to(table.weight.dtype).contiguous(),
            bags.unique_starts[: bags.num_unique + 1],
            mode="sum",
            include_last_offset=True,
        )
        table.apply_update(bags.unique_indices[: bags.num_unique], row_grads)
        return None, None, None


class EmbeddingBag(nn.Module):
    """An embedding table with sum pooling whose training update happens inside backward."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.optimizer: SparseOptimizer | None = None
        self.register_buffer("moments", None)

    def set_optimizer(self, optimizer: SparseOptimizer) -> None:
        self.optimizer = optimizer
        self.moments = optimizer.initial_state(self.weight.detach())

    @torch.no_grad()
    def apply_update(self, rows: Tensor, grads: Tensor) -> None:
        if self.optimizer is None:
            raise RuntimeError("backward through an EmbeddingBag that has no optimizer")
        self.optimizer.update(self.weight, self.moments, rows, grads)

    def forward(self, bags: BagBatch) -> Tensor:
        return _EmbeddingBagSum.apply(self.weight, bags, self)

    def extra_repr(self) -> str:
        rows, dim = self.weight.shape
        return f"{rows}, {dim}, mode=sum"


class DenseOptimizer:
    """SGD or Adagrad (torch's math, eps 1e-10) applied to each parameter inside backward.

    A parameter is updated the moment autograd has accumulated its gradient, and the gradient is dropped
    right after, so only one layer's gradient exists at a time. The result equals ``torch.optim.SGD`` /
    ``torch.optim.Adagrad`` stepping after backward, because no parameter's value is read by autograd after its
    own gradient is ready.
    """

    def __init__(self, params: list[nn.Parameter], name: str, lr: float) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}")
        self.name, self.lr = name, lr
        self.state = {p: torch.zeros_like(p) for p in params} if name == "adagrad" else {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._update) for p in params]

    @torch.no_grad()
    def _update(self, param: nn.Parameter) -> None:
        grad = param.grad
        if self.name == "adagrad":
            # In chunks, so the temporary ``std`` stays small; the math is element by element, as torch's.
            flat = (param.view(-1), grad.reshape(-1), self.state[param].view(-1))
            for weight, g, state_sum in zip(*(t.split(DENSE_CHUNK) for t in flat), strict=True):
                state_sum.addcmul_(g, g, value=1)
                std = state_sum.sqrt().add_(ADAGRAD_EPS)
                weight.addcdiv_(g, std, value=-self.lr)
        else:
            param.add_(grad, alpha=-self.lr)
        param.grad = None
