"""The custom embedding-bag op of the Habana DLRM port, its in-backward optimizers, and one backend per device.

The original built this for Gaudi; the design is kept on every device:

1. Host-side preprocessing per table and batch (``preprocess_bags``), run in the data loader's collate
   function: the bags' indices and offsets, plus the sorted distinct rows the batch touches, the bag of each
   sorted occurrence and where each distinct row's occurrences start. Everything lands in buffers of a fixed
   maximum size with valid counts, so shapes never change from batch to batch.
2. ``EmbeddingBag``: the forward sums each bag's rows; the backward sums one gradient row per distinct index
   and the table's sparse SGD or Adagrad updates it (and its Adagrad state) in place. The table never holds
   a ``.grad``.
3. The MLPs' SGD or Adagrad: in eager mode on the CPU and CUDA (``DenseOptimizer``) applied to each parameter as
   soon as autograd has its gradient, so the MLPs' gradients never all exist at once; in lazy mode one compiled
   step after backward (``CompiledDenseOptimizer``); on Gaudi, and in eager mode when ranks average gradients,
   torch's optimizer or the bridge's ``FusedAdagrad`` after backward.
4. ``Backend``: what differs between the CPU, a CUDA GPU and a Gaudi card (where tensors live, the kernels,
   the dense optimizer, what lazy mode compiles, ``mark_step``, and on CUDA the iteration replayed as one
   graph). ``select_backend`` picks one.

Importing this module needs only torch; the Habana bridge is imported only when a Gaudi card is asked for.
"""

from __future__ import annotations

import importlib
import os
import resource
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, is_dataclass, replace
from types import ModuleType
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

OPTIMIZERS = ("sgd", "adagrad")
ADAGRAD_EPS = 1e-10  # the original's sparse kernel and torch.optim.Adagrad's default
DENSE_CHUNK = 1 << 20  # elements per step of the eager dense Adagrad update on the CPU
INDEX = torch.int32  # the Habana kernels take int32 indices; torch's kernels accept them too
PADDING_BAG = 32  # the most padding entries one throwaway bag sums (WholeBufferKernels)
T = TypeVar("T")


class DeviceUnavailable(Exception):
    """The device asked for is not on this machine."""


def _check_optimizer(name: str) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}")


# ---------------------------------------------------------------------------------------------------------
# Host-side preprocessing
# ---------------------------------------------------------------------------------------------------------


@dataclass
class BagBatch:
    """One table's lookups for one batch, in fixed-size buffers; only the first ``num_*`` entries are valid."""

    indices: Tensor  # [capacity] the rows looked up, bag after bag
    offsets: Tensor  # [batch + 1] where each bag starts in ``indices``, then the total
    unique_indices: Tensor  # [capacity] the distinct rows, ascending
    sorted_bags: Tensor  # [capacity] the bag of each occurrence, occurrences sorted by row
    unique_starts: Tensor  # [capacity + 1] where each distinct row's occurrences start in ``sorted_bags``
    valid_counts: Tensor  # [5] batch + 1, num_indices, num_unique + 1, num_indices, num_unique (the Habana kernels')
    num_indices: int
    num_unique: int

    def to(self, device: torch.device, non_blocking: bool = False) -> BagBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> BagBatch:  # called by the DataLoader's pin_memory thread
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> BagBatch:
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{name: fn(t) for name, t in tensors.items() if isinstance(t, Tensor)})


# (indices [n], bag bounds [bags + 1]) -> (distinct rows ascending [u], bag of each sorted occurrence [n],
# each distinct row's first occurrence in that order, then n [u + 1])
RowGrouper = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def group_rows(indices: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The rows a batch touches, each once, with its occurrences: a full sort, so de-duplication is exact."""
    bag_of_index = torch.repeat_interleave(torch.arange(bounds.numel() - 1, dtype=INDEX), bounds.diff())
    sorted_indices, order = torch.sort(indices, stable=True)
    unique_indices, counts = torch.unique_consecutive(sorted_indices, return_counts=True)
    unique_starts = torch.cat([torch.zeros(1, dtype=INDEX), torch.cumsum(counts, 0, dtype=INDEX)])
    return unique_indices, bag_of_index[order], unique_starts


def preprocess_bags(
    indices: Tensor, offsets: Tensor, batch_size: int, capacity: int, group: RowGrouper = group_rows
) -> BagBatch:
    """Build a table's ``BagBatch`` from its bags: ``offsets`` holds each bag's start in ``indices``.

    Bags past ``len(offsets)`` (a partial batch) are empty. ``group`` finds the distinct rows.
    """
    num_bags, num_indices = offsets.numel(), indices.numel()
    if num_indices > capacity:
        raise ValueError(f"a batch holds {num_indices} lookups into one table, more than the buffer's {capacity}")
    if num_bags > batch_size:
        raise ValueError(f"a batch holds {num_bags} bags, more than the buffer's {batch_size}")
    indices = indices.to(INDEX)
    bounds = torch.cat([offsets.to(INDEX), torch.tensor([num_indices], dtype=INDEX)])
    unique_indices, sorted_bags, unique_starts = group(indices, bounds)
    num_unique = unique_indices.numel()

    batch = BagBatch(
        indices=torch.zeros(capacity, dtype=INDEX),
        offsets=torch.full((batch_size + 1,), num_indices, dtype=INDEX),
        unique_indices=torch.zeros(capacity, dtype=INDEX),
        sorted_bags=torch.zeros(capacity, dtype=INDEX),
        unique_starts=torch.full((capacity + 1,), num_indices, dtype=INDEX),
        valid_counts=torch.tensor([batch_size + 1, num_indices, num_unique + 1, num_indices, num_unique], dtype=INDEX),
        num_indices=num_indices,
        num_unique=num_unique,
    )
    batch.indices[:num_indices] = indices
    batch.offsets[:num_bags] = bounds[:-1]
    batch.unique_indices[:num_unique] = unique_indices
    batch.sorted_bags[:num_indices] = sorted_bags
    batch.unique_starts[: num_unique + 1] = unique_starts
    return batch


# ---------------------------------------------------------------------------------------------------------
# The embedding op
# ---------------------------------------------------------------------------------------------------------


class TorchKernels:
    """The op's three kernels in torch ops, reading only the valid prefixes, and the MLPs' linear layer: the CPU
    and CUDA backends."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        return nn.functional.linear(x, weight, bias)

    def bag_sum(self, weight: Tensor, bags: BagBatch) -> Tensor:
        return nn.functional.embedding_bag(
            bags.indices[: bags.num_indices], weight, bags.offsets, mode="sum", include_last_offset=True
        )

    def row_grads(self, grad_output: Tensor, bags: BagBatch) -> Tensor:
        # Summing grad_output's rows over each distinct row's occurrences is itself a sum-pooled bag lookup.
        return nn.functional.embedding_bag(
            bags.sorted_bags[: bags.num_indices],
            grad_output,
            bags.unique_starts[: bags.num_unique + 1],
            mode="sum",
            include_last_offset=True,
        )

    def sparse_update(
        self, name: str, lr: float, weight: Tensor, moments: Tensor | None, bags: BagBatch, grads: Tensor
    ) -> None:
        """SGD ``w[r] -= lr * g`` or Adagrad ``m[r] += g**2; w[r] -= lr * g / (sqrt(m[r]) + 1e-10)``."""
        rows = self.updated_rows(bags, weight.size(0))
        if name == "adagrad":
            moments.index_add_(0, rows, grads * grads)
            grads = grads / adagrad_std(moments.index_select(0, rows))
        weight.index_add_(0, rows, grads.mul_(-lr))  # index_add_ with alpha is 4x slower on the CPU

    def updated_rows(self, bags: BagBatch, table_rows: int) -> Tensor:
        """The table rows ``sparse_update`` writes, one per row of ``grads``."""
        return bags.unique_indices[: bags.num_unique].long()  # index_add_ on the CPU is 3x slower with int32


class OneDNNKernels(TorchKernels):
    """The CPU: torch's kernels, except that the MLPs' fp32 products run in oneDNN, 10-25 % faster than torch's own
    (MKL's) at the medium configuration's shapes on an AMD Zen 4. Under autocast (bf16) torch's linear layer casts
    and multiplies as before.

    As lazy mode runs them: the product is an op of its own (``dlrm::onednn_product``), because Inductor lowers
    oneDNN's linear only for frozen (inference) weights, and the weight gradient is torch's ``mm``.
    """

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        if torch.is_autocast_enabled(x.device.type) or x.dtype != torch.float32:
            return super().linear(x, weight, bias)
        return _OneDNNLinear.apply(x, weight, bias, self)

    def product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return compilable_onednn_product(x, weight, bias)

    def weight_grad(self, grad_output: Tensor, x: Tensor, weight: nn.Parameter) -> Tensor:
        return torch.mm(grad_output.t(), x)


class BufferedOneDNNKernels(OneDNNKernels):
    """Eager mode on the CPU: the same products, with oneDNN's op called directly (a custom op, called eagerly,
    loads torch's tracing machinery, 70 MB).

    Each weight's gradient is written by torch's ``mm`` into a buffer kept per weight shape, while the gradient last
    written there is gone: the in-backward dense optimizer drops each gradient as soon as it has stepped, so
    backward allocates no 64 MB block per layer, and the heap does not grow around them.
    """

    def __init__(self) -> None:
        self._weight_grads: dict[torch.Size, tuple[Tensor, nn.Parameter]] = {}

    def product(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return onednn_product(x, weight, bias)

    def weight_grad(self, grad_output: Tensor, x: Tensor, weight: nn.Parameter) -> Tensor:
        """``grad_output.T @ x``, in the buffer of ``weight``'s shape unless a gradient still holds it."""
        buffer, last_owner = self._weight_grads.get(weight.shape, (None, None))
        if buffer is None or (last_owner.grad is not None and last_owner.grad.data_ptr() == buffer.data_ptr()):
            buffer = torch.empty_like(weight, memory_format=torch.contiguous_format)
        self._weight_grads[weight.shape] = buffer, weight
        return torch.mm(grad_output.t(), x, out=buffer).view(weight.shape)  # a new tensor: autograd keeps it


def onednn_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


compilable_onednn_product = torch.library.custom_op("dlrm::onednn_product", onednn_product, mutates_args=())


@compilable_onednn_product.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.size(0))


class _OneDNNLinear(torch.autograd.Function):
    """A linear layer whose forward and input gradient are the kernels' oneDNN products, and whose weight gradient
    is their ``weight_grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, kernels: OneDNNKernels) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kernels = kernels
        return kernels.product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, _ = ctx.needs_input_grad
        return (
            ctx.kernels.product(grad_output, weight.t(), None) if needs_x else None,
            ctx.kernels.weight_grad(grad_output, x, weight) if needs_weight else None,
            grad_output.sum(0) if needs_bias else None,
            None,
        )


class WholeBufferKernels(TorchKernels):
    """The same kernels over whole buffers: every shape is the same each batch, and no valid count is read on the
    host, so a CUDA graph can replay them.

    The padding after the valid entries is summed into throwaway bags of at most ``PADDING_BAG`` entries, because
    CUDA's last bag runs to the end of the buffer and one thread sums a bag. Padded distinct rows get zero
    gradients and update distinct rows, adding zeros, so the SGD and Adagrad steps stay exact.
    """

    def bag_sum(self, weight: Tensor, bags: BagBatch) -> Tensor:
        if not weight.size(0):  # a rank's shard of a table with fewer rows than ranks: the padding has no row to read
            return weight.new_zeros(bags.offsets.numel() - 1, weight.size(1))
        offsets = _with_padding_bags(bags.offsets, bags.valid_counts[1], bags.indices.numel())
        pooled = nn.functional.embedding_bag(bags.indices, weight, offsets, mode="sum", include_last_offset=True)
        return pooled[: bags.offsets.numel() - 1]

    def row_grads(self, grad_output: Tensor, bags: BagBatch) -> Tensor:
        starts = _with_padding_bags(bags.unique_starts, bags.valid_counts[1], bags.sorted_bags.numel())
        grads = nn.functional.embedding_bag(bags.sorted_bags, grad_output, starts, mode="sum", include_last_offset=True)
        return grads[: bags.unique_indices.numel()]

    def sparse_update(
        self, name: str, lr: float, weight: Tensor, moments: Tensor | None, bags: BagBatch, grads: Tensor
    ) -> None:
        if weight.size(0):  # a shard of no rows has none to update, not even with the padding's zeros
            super().sparse_update(name, lr, weight, moments, bags, grads)

    def updated_rows(self, bags: BagBatch, table_rows: int) -> Tensor:
        slots = torch.arange(bags.unique_indices.numel(), device=bags.unique_indices.device)
        return torch.where(slots < bags.valid_counts[4], bags.unique_indices, slots % table_rows).long()


def _with_padding_bags(starts: Tensor, count: Tensor, capacity: int) -> Tensor:
    """Bag ``starts`` (their last entry is ``count``, on the device), then throwaway bags of padding up to
    ``capacity``."""
    steps = torch.arange(1, -(-capacity // PADDING_BAG) + 1, device=starts.device, dtype=starts.dtype)
    return torch.cat([starts, (count + steps * PADDING_BAG).clamp_(max=capacity)])


class _EmbeddingBagSum(torch.autograd.Function):
    """Sum-pooled bags forward; coalesced gradients and the sparse update in backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, bags: BagBatch, table: EmbeddingBag) -> Tensor:
        ctx.bags, ctx.table = bags, table
        return table.kernels.bag_sum(weight, bags)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[None, None, None]:
        bags, table = ctx.bags, ctx.table
        row_grads = table.kernels.row_grads(grad_output.to(table.weight.dtype).contiguous(), bags)
        table.apply_update(bags, row_grads)
        return None, None, None


class EmbeddingBag(nn.Module):
    """An embedding table with sum pooling whose training update happens inside backward."""

    def __init__(self, weight: Tensor, kernels: TorchKernels | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.kernels = kernels or TorchKernels()
        self.optimizer: tuple[str, float] | None = None
        self.register_buffer("moments", None)

    def set_optimizer(self, name: str, lr: float) -> None:
        """SGD or Adagrad (the state starts at zero) on the rows each batch touches."""
        _check_optimizer(name)
        self.optimizer = name, lr
        self.moments = torch.zeros_like(self.weight.detach()) if name == "adagrad" else None

    @torch.no_grad()
    def apply_update(self, bags: BagBatch, row_grads: Tensor) -> None:
        if self.optimizer is None:
            raise RuntimeError("backward through an EmbeddingBag that has no optimizer")
        self.kernels.sparse_update(*self.optimizer, self.weight, self.moments, bags, row_grads)

    def forward(self, bags: BagBatch) -> Tensor:
        return _EmbeddingBagSum.apply(self.weight, bags, self)

    def extra_repr(self) -> str:
        rows, dim = self.weight.shape
        return f"{rows}, {dim}, mode=sum"


class Linear(nn.Linear):
    """``nn.Linear`` whose product is the backend's kernel (oneDNN's for fp32 on the CPU)."""

    def __init__(self, in_features: int, out_features: int, kernels: TorchKernels, device: str = "cpu") -> None:
        super().__init__(in_features, out_features, device=device)
        self.kernels = kernels

    def forward(self, x: Tensor) -> Tensor:
        return self.kernels.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------------
# Dense optimizers
# ---------------------------------------------------------------------------------------------------------


def adagrad_update(weight: Tensor, grad: Tensor, state_sum: Tensor, lr: float) -> None:
    """One Adagrad step in place, element by element as ``torch.optim.Adagrad(eps=1e-10)`` computes it."""
    state_sum.addcmul_(grad, grad, value=1)
    weight.addcdiv_(grad, adagrad_std(state_sum), value=-lr)


def adagrad_std(state_sum: Tensor) -> Tensor:
    """``sqrt(state_sum) + 1e-10`` bit for bit, without taking the square root of a subnormal number.

    On x86 that is 30x slower, and tiny gradients (deep layers at small learning rates) fill Adagrad's state with
    them. Below the smallest normal number the root is far under half a unit in the last place of 1e-10, so
    adding 1e-10 gives 1e-10 whichever of them is rooted.
    """
    return state_sum.clamp(min=torch.finfo(state_sum.dtype).tiny).sqrt_().add_(ADAGRAD_EPS)


class DenseOptimizer:
    """SGD or Adagrad (torch's math, eps 1e-10) applied to each parameter inside backward: eager mode.

    A parameter is updated the moment autograd has accumulated its gradient, and the gradient is dropped
    right after, so only one layer's gradient exists at a time. The result equals ``torch.optim.SGD`` /
    ``torch.optim.Adagrad`` stepping after backward, because no parameter's value is read by autograd after its
    own gradient is ready. Adagrad runs in ``chunk``-element pieces (None: whole) so its temporary stays small.
    """

    def __init__(self, params: list[nn.Parameter], name: str, lr: float, chunk: int | None = DENSE_CHUNK) -> None:
        _check_optimizer(name)
        self.name, self.lr, self.chunk = name, lr, chunk
        self.state = {p: torch.zeros_like(p) for p in params} if name == "adagrad" else {}
        for param in params:
            param.register_post_accumulate_grad_hook(self._update)

    def step(self) -> None:
        """Nothing is left to do after backward: every parameter was updated as its gradient arrived."""

    def accumulators(self) -> list[Tensor]:
        """Adagrad's running sums of squared gradients, one per parameter in order (none for SGD)."""
        return list(self.state.values())

    @torch.no_grad()
    def _update(self, param: nn.Parameter) -> None:
        grad = param.grad
        if self.name == "adagrad":
            size = self.chunk or param.numel()
            flat = (param.view(-1), grad.reshape(-1), self.state[param].view(-1))
            for weight, g, state_sum in zip(*(t.split(size) for t in flat), strict=True):
                adagrad_update(weight, g, state_sum, self.lr)
        else:
            param.add_(grad, alpha=-self.lr)
        param.grad = None


class CompiledDenseOptimizer:
    """SGD or Adagrad for every parameter in one compiled call after backward: lazy mode.

    The compiled dense path hands back all its gradients at once anyway, so updating them in one call costs no
    memory, and each parameter's update becomes one fused pass (no temporaries, one launch on a GPU).

    With ``bf16_copies`` (bf16 runs), the forward reads those copies of the parameters and the gradients land
    on them; the same pass upcasts each gradient, updates the fp32 parameter and writes its bf16 copy. That is
    autocast's arithmetic without its casts of every weight and gradient each iteration.
    """

    def __init__(
        self, params: list[nn.Parameter], name: str, lr: float, bf16_copies: list[Tensor] | None = None
    ) -> None:
        _check_optimizer(name)
        self.params, self.name, self.lr, self.copies = params, name, lr, bf16_copies
        self.state = [torch.zeros_like(p) for p in params] if name == "adagrad" else []
        self._update = torch.compile(self.update_all, fullgraph=True, dynamic=False)

    def accumulators(self) -> list[Tensor]:
        return self.state

    @torch.no_grad()
    def step(self) -> None:
        holders = self.copies or self.params
        self._update([t.grad for t in holders])
        for holder in holders:
            holder.grad = None

    def update_all(self, grads: list[Tensor]) -> None:
        """One step from ``grads`` (one per parameter, in order), uncompiled: ``step`` compiles it."""
        for index, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
            grad = grad.float()  # a bf16 copy's gradient, upcast as autocast would
            if self.name == "adagrad":
                adagrad_update(param, grad, self.state[index], self.lr)
            else:
                param.add_(grad, alpha=-self.lr)
            if self.copies:
                self.copies[index].copy_(param)


def torch_optimizer(params: list[nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer:
    """The same math as ``DenseOptimizer``, stepped after backward."""
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, eps=ADAGRAD_EPS)
    return torch.optim.SGD(params, lr=lr)


class StepAfterBackward:
    """A ``torch.optim`` optimizer stepped after backward, as the original did on Gaudi."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def accumulators(self) -> list[Tensor]:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        return [self.optimizer.state[p]["sum"] for p in params if "sum" in self.optimizer.state[p]]


MlpOptimizer = DenseOptimizer | CompiledDenseOptimizer | StepAfterBackward  # each has step() and accumulators()


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


class Backend:
    """The CPU: the interface every device implements, and torch's kernels (the MLPs' fp32 products in oneDNN).

    Lazy mode compiles the dense path (``compile``) and, on the CPU and CUDA, the dense optimizer's step; on CUDA
    it also replays the whole iteration as a graph (``capture``). ``mark_step`` ends each iteration in the loop on
    every device, but only Gaudi needs it.
    """

    device_type = "cpu"
    banner = "Using CPU..."
    process_group = "gloo"  # torch.distributed's backend for this device
    pin_memory = False  # the loader pins batches for asynchronous copies
    dense_chunk: int | None = DENSE_CHUNK
    warmup_iterations = 1  # lazy mode: iterations that compile, kept out of ms/it
    bf16_copies = True  # lazy bf16: the optimizer keeps bf16 copies of the weights

    def __init__(self, lazy: bool) -> None:
        self.lazy = lazy
        self.device = torch.device(self.device_type)
        self.kernels = TorchKernels()
        if self.device_type == "cpu" and torch.backends.mkldnn.is_available():
            self.kernels = OneDNNKernels() if lazy else BufferedOneDNNKernels()

    def emulates_bf16(self) -> bool:
        """Whether bf16 matrix products run in software here, hundreds of times slower than fp32: on a CPU that
        oneDNN has no bf16 kernels for (one without AVX-512)."""
        return self.device_type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def group_rows(self, indices: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return group_rows(indices, bounds)

    def to_device(self, batch: T) -> T:  # a batch of the script's, or a BagBatch: anything with .to()
        return batch.to(self.device, non_blocking=self.pin_memory)

    def compile(self, fn: Callable) -> Callable:
        return torch.compile(fn, fullgraph=True, dynamic=False) if self.lazy else fn

    def dense_optimizer(
        self,
        params: list[nn.Parameter],
        name: str,
        lr: float,
        in_backward: bool = True,
        bf16_copies: list[Tensor] | None = None,
    ) -> MlpOptimizer:
        """Eager: inside backward, unless the gradients must first be averaged across ranks; lazy: compiled."""
        if self.lazy:
            return CompiledDenseOptimizer(params, name, lr, bf16_copies)
        if in_backward:
            return DenseOptimizer(params, name, lr, chunk=self.dense_chunk)
        return StepAfterBackward(torch_optimizer(params, name, lr))

    def capture(self, step: Callable[[Any], T]) -> Callable[[Any], T]:
        """The training iteration as the loop calls it: on a CUDA GPU in lazy mode, a replayed CUDA graph."""
        return step

    def mark_step(self) -> None:
        """The end of an iteration; nothing to do on the CPU."""

    def synchronize(self) -> None:
        """Wait for queued device work; the CPU has none."""

    def memory_report(self) -> str:
        return f"Peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MB"


class CUDABackend(Backend):
    """An NVIDIA GPU: torch's kernels there and pinned batches copied asynchronously. Lazy mode compiles the
    dense path and replays the whole iteration (lookups, dense path, backward, both updates) as one CUDA graph:
    the op reads its fixed-size buffers whole, so no shape changes from batch to batch.
    """

    device_type = "cuda"
    banner = "Using GPU..."
    process_group = "nccl"
    pin_memory = True
    dense_chunk = None  # memory is not short, kernel launches are
    warmup_iterations = 3  # compile, warm up on a side stream, capture and replay

    def __init__(self, lazy: bool, local_rank: int = 0) -> None:
        super().__init__(lazy)
        self.device = torch.device("cuda", local_rank)  # one GPU per local rank
        torch.cuda.set_device(self.device)
        if lazy:
            self.kernels = WholeBufferKernels()

    def capture(self, step: Callable[[Any], T]) -> Callable[[Any], T]:
        return CUDAGraphStep(step, self.warmup_iterations) if self.lazy else step

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_report(self) -> str:
        return f"Peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MB"


class CUDAGraphStep(Generic[T]):
    """A training iteration replayed as a CUDA graph: no Python and no kernel launches per iteration.

    The first ``warmup`` - 1 calls run the iteration on a side stream (compiling, and settling what it allocates),
    the next records it into a graph and replays it. Later calls copy their batch into the recorded one and replay;
    the outputs are the same tensors each time, overwritten by the next replay.
    """

    def __init__(self, step: Callable[[Any], T], warmup: int) -> None:
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Any = None
        self.outputs: T | None = None

    def __call__(self, batch: Any) -> T:
        self.calls += 1
        if self.graph is None and self.calls < self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                outputs = self.step(batch)
            torch.cuda.current_stream().wait_stream(side)
            return outputs
        if self.graph is None:
            self.graph, self.inputs = torch.cuda.CUDAGraph(), batch
            # thread_local: the data loader's pinning thread may allocate while this thread records
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = self.step(batch)
        elif batch is not self.inputs:
            for recorded, new in zip(_tensors(self.inputs), _tensors(batch), strict=True):
                recorded.copy_(new, non_blocking=True)
        self.graph.replay()
        return self.outputs


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a batch (dataclasses and lists of them), in a fixed order."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif is_dataclass(value):
        for field in fields(value):
            yield from _tensors(getattr(value, field.name))


class HPUKernels(TorchKernels):
    """The op's kernels as the original called them on Gaudi (``habana_frameworks.torch.hpex``)."""

    def __init__(self, bag_kernels: ModuleType, sparse_adagrad: ModuleType, sparse_sgd: ModuleType) -> None:
        self.bag_kernels, self.sparse_adagrad, self.sparse_sgd = bag_kernels, sparse_adagrad, sparse_sgd
        self.grad_buffers: dict[tuple, Tensor] = {}
        self.lr_tensors: dict[tuple, Tensor] = {}

    def bag_sum(self, weight: Tensor, bags: BagBatch) -> Tensor:
        return self.bag_kernels.forward(weight, bags.indices, bags.offsets, bags.valid_counts[0:2], 1)

    def row_grads(self, grad_output: Tensor, bags: BagBatch) -> Tensor:
        """Coalesced gradients written into a reused buffer; rows past ``num_unique`` are stale."""
        key = (bags.indices.numel(), grad_output.size(1), grad_output.dtype, grad_output.device)
        if key not in self.grad_buffers:
            self.grad_buffers[key] = grad_output.new_zeros(key[0], key[1])
        buffer = self.grad_buffers[key]
        self.bag_kernels.backward(buffer, grad_output, bags.sorted_bags, bags.unique_starts, bags.valid_counts[2:4], 1)
        return buffer

    def sparse_update(
        self, name: str, lr: float, weight: Tensor, moments: Tensor | None, bags: BagBatch, grads: Tensor
    ) -> None:
        key = (lr, weight.device)
        if key not in self.lr_tensors:
            self.lr_tensors[key] = torch.tensor([lr], device=weight.device)
        if name == "adagrad":
            kernel, state = self.sparse_adagrad, moments
        else:  # the SGD kernel's signature has a moments argument it leaves alone: one row stands in
            kernel, state = self.sparse_sgd, weight.new_zeros(1, weight.size(1))
        kernel.forward(grads, weight, state, bags.unique_indices, self.lr_tensors[key], bags.valid_counts[4:5])


class HPUBackend(Backend):
    """A Gaudi card through the Habana bridge: the hpex kernels, ``FusedAdagrad``, and lazy mode's ``mark_step``.

    Lazy mode is the bridge's own graph mode (``PT_HPU_LAZY_MODE=1``, set before the bridge is imported), so
    nothing is compiled here.
    """

    device_type = "hpu"
    banner = "Using HPU..."
    process_group = "hccl"
    bf16_copies = False

    def __init__(self, lazy: bool) -> None:
        super().__init__(lazy)
        self.core = importlib.import_module("habana_frameworks.torch.core")
        self.hpu = importlib.import_module("habana_frameworks.torch.hpu")
        hpex = "habana_frameworks.torch.hpex"
        self.preproc = importlib.import_module(f"{hpex}.kernels.EmbeddingBagPreproc")
        self.optimizers = importlib.import_module(f"{hpex}.optimizers")
        self.kernels = HPUKernels(
            importlib.import_module(f"{hpex}.kernels.EmbeddingBag"),
            importlib.import_module(f"{hpex}.optimizers.SparseAdagrad"),
            importlib.import_module(f"{hpex}.optimizers.SparseSGD"),
        )

    def group_rows(self, indices: Tensor, bounds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # The radix sort looks at as many 11-bit digits as the largest index needs: the original passed 4 here.
        largest = int(indices.max()) if indices.numel() else 0
        count, unique_indices, sorted_bags, unique_starts = self.preproc.forward(indices, bounds, largest)
        num_unique = int(count[0])
        return unique_indices[:num_unique], sorted_bags, unique_starts[: num_unique + 1]

    def compile(self, fn: Callable) -> Callable:
        return fn

    def dense_optimizer(
        self,
        params: list[nn.Parameter],
        name: str,
        lr: float,
        in_backward: bool = True,
        bf16_copies: list[Tensor] | None = None,
    ) -> StepAfterBackward:
        if name == "adagrad":
            return StepAfterBackward(self.optimizers.FusedAdagrad(params, lr=lr, eps=ADAGRAD_EPS))
        return StepAfterBackward(torch_optimizer(params, name, lr))

    def mark_step(self) -> None:
        if self.lazy:
            self.core.mark_step()

    def synchronize(self) -> None:
        self.hpu.synchronize()

    def memory_report(self) -> str:
        return f"Peak HPU memory: {self.hpu.max_memory_allocated() / 2**20:.1f} MB"


def _habana_card_missing(lazy: bool) -> str | None:
    """Import the Habana bridge with ``PT_HPU_LAZY_MODE`` set from the mode; why no card can be used, or None."""
    previous = os.environ.get("PT_HPU_LAZY_MODE")
    os.environ["PT_HPU_LAZY_MODE"] = "1" if lazy else "0"
    try:
        importlib.import_module("habana_frameworks.torch.core")
        if importlib.import_module("habana_frameworks.torch.hpu").is_available():
            return None
        why = "habana_frameworks.torch.hpu.is_available() is False"
    except ImportError:
        why = "habana_frameworks.torch does not import"
    if previous is None:
        del os.environ["PT_HPU_LAZY_MODE"]
    else:
        os.environ["PT_HPU_LAZY_MODE"] = previous
    return why


def resolve_device(device: str, lazy: bool, no_habana: bool = False, use_gpu: bool = False) -> str:
    """The device type (cpu, cuda or hpu) that ``device`` (auto, cpu, cuda or hpu) names, checked to be here; auto
    takes a Gaudi card, else a GPU, else the CPU.

    ``no_habana`` (``--no-habana``) rules the Gaudi card out and ``use_gpu`` (``--use-gpu``) asks for the GPU, as
    in the original. Nothing is placed on a GPU: the launcher of ``--world_size`` ranks asks this too, and a CUDA
    context of its own would hold memory on GPU 0 for the whole run (or, on a GPU in exclusive-process mode, keep
    rank 0 off it).
    """
    flag = f"--device {device}"
    if device == "auto" and use_gpu:
        device, flag = "cuda", "--use-gpu"
    if device == "auto":
        if not no_habana and _habana_card_missing(lazy) is None:
            return "hpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "hpu" and (why := _habana_card_missing(lazy)):
        raise DeviceUnavailable(f"{flag}: no Gaudi card here ({why})")
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(f"{flag}: no CUDA GPU here (torch.cuda.is_available() is False)")
    return device


def select_backend(
    device: str, lazy: bool, no_habana: bool = False, use_gpu: bool = False, local_rank: int = 0
) -> Backend:
    """The backend of the device ``resolve_device`` finds; ``local_rank`` picks the rank's GPU."""
    device_type = resolve_device(device, lazy, no_habana, use_gpu)
    if device_type == "hpu":
        return HPUBackend(lazy)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DeviceUnavailable(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} here)")
        return CUDABackend(lazy, local_rank)
    return Backend(lazy)
