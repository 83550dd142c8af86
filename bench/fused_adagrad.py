"""A GPU experiment for the floor (``gpu_floor.py``): each linear layer's weight gradient and its Adagrad update in
one Triton kernel.

Lazy mode's bf16 step writes each weight gradient (2 bytes a parameter), then a second pass reads it back with the
fp32 weight and state, and writes them and the bf16 copy. Here the product that makes a tile of the gradient
updates that tile at once: the gradient never reaches memory, and the update's traffic overlaps other tiles'
products. The arithmetic is the product's: the gradient is rounded to bf16, as autocast's product hands it over,
then ``adagrad_update`` and the bf16 copy follow element by element.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from habana_dlrm_ops import ADAGRAD_EPS, adagrad_update  # the importer puts the repository root on sys.path

TILES = [  # the kernel's launch shapes the floor tries
    dict(BLOCK_ROWS=128, BLOCK_COLS=128, BLOCK_BATCH=64, num_warps=8, num_stages=3),
    dict(BLOCK_ROWS=128, BLOCK_COLS=64, BLOCK_BATCH=64, num_warps=4, num_stages=3),
    dict(BLOCK_ROWS=64, BLOCK_COLS=128, BLOCK_BATCH=32, num_warps=4, num_stages=4),
]


@triton.jit
def _weight_grad_adagrad(
    grad_out,  # batch x rows, bf16
    inputs,  # batch x cols, bf16
    weight,  # rows x cols, fp32, contiguous; updated in place
    state_sum,  # rows x cols, fp32, contiguous; updated in place
    bf16_copy,  # rows x cols, bf16, contiguous; rewritten
    batch,
    rows,
    cols,
    grad_out_stride,
    inputs_stride,
    lr,
    eps,
    tiny,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    BLOCK_BATCH: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
    for start in range(0, batch, BLOCK_BATCH):
        sample = start + tl.arange(0, BLOCK_BATCH)
        grad_tile = tl.load(
            grad_out + sample[None, :] * grad_out_stride + row[:, None],
            mask=(sample[None, :] < batch) & (row[:, None] < rows),
            other=0.0,
        )
        input_tile = tl.load(
            inputs + sample[:, None] * inputs_stride + col[None, :],
            mask=(sample[:, None] < batch) & (col[None, :] < cols),
            other=0.0,
        )
        total = tl.dot(grad_tile, input_tile, total)
    grad = total.to(tl.bfloat16).to(tl.float32)
    where = row[:, None] * cols + col[None, :]
    inside = (row[:, None] < rows) & (col[None, :] < cols)
    state = tl.load(state_sum + where, mask=inside) + grad * grad
    std = tl.sqrt_rn(tl.maximum(state, tiny)) + eps
    updated = tl.load(weight + where, mask=inside) + (-lr) * tl.div_rn(grad, std)
    tl.store(state_sum + where, state, mask=inside)
    tl.store(weight + where, updated, mask=inside)
    tl.store(bf16_copy + where, updated.to(tl.bfloat16), mask=inside)


def weight_grad_adagrad(
    grad_out: Tensor, inputs: Tensor, weight: Tensor, state_sum: Tensor, bf16_copy: Tensor, lr: float, tile: dict
) -> None:
    """``weight``'s gradient ``grad_out.T @ inputs`` and its Adagrad step, writing ``bf16_copy``, in one kernel."""
    rows, cols = weight.shape
    grid = (triton.cdiv(rows, tile["BLOCK_ROWS"]), triton.cdiv(cols, tile["BLOCK_COLS"]))
    _weight_grad_adagrad[grid](
        grad_out, inputs, weight, state_sum, bf16_copy, grad_out.size(0), rows, cols,
        grad_out.stride(0), inputs.stride(0), lr, ADAGRAD_EPS, torch.finfo(torch.float32).tiny, **tile,
    )  # fmt: skip


class AdagradLayer:
    """One linear layer's fp32 weight and bias, their Adagrad state, and the bf16 copies the forward reads; its
    backward updates them, with the fused kernel in ``tile``'s shape, or (None) torch's product then the update."""

    def __init__(self, linear: nn.Linear, lr: float, tile: dict | None) -> None:
        self.weight, self.bias = linear.weight.detach().clone(), linear.bias.detach().clone()
        self.weight_state, self.bias_state = torch.zeros_like(self.weight), torch.zeros_like(self.bias)
        self.weight_copy, self.bias_copy = self.weight.to(torch.bfloat16), self.bias.to(torch.bfloat16)
        self.weight_copy.requires_grad_()  # so that backward reaches the first layer, whose input needs none
        self.lr, self.tile = lr, tile

    def __call__(self, x: Tensor) -> Tensor:
        return _UpdatingLinear.apply(x, self.weight_copy, self.bias_copy, self)


class _UpdatingLinear(torch.autograd.Function):
    """A bf16 linear layer whose backward updates its own weights: input gradient first, then the fused kernel."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_copy: Tensor, bias_copy: Tensor, layer: AdagradLayer) -> Tensor:
        ctx.save_for_backward(x)
        ctx.layer = layer
        return nn.functional.linear(x, weight_copy, bias_copy)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None]:
        (x,) = ctx.saved_tensors
        layer, grad_out = ctx.layer, grad_out.contiguous()
        grad_x = grad_out @ layer.weight_copy if ctx.needs_input_grad[0] else None
        if layer.tile is None:
            adagrad_update(layer.weight, (grad_out.t() @ x).float(), layer.weight_state, layer.lr)
            layer.weight_copy.copy_(layer.weight)
        else:
            weight_grad_adagrad(
                grad_out, x.contiguous(), layer.weight, layer.weight_state, layer.weight_copy, layer.lr, layer.tile
            )
        adagrad_update(layer.bias, grad_out.sum(0).float(), layer.bias_state, layer.lr)
        layer.bias_copy.copy_(layer.bias)
        return grad_x, None, None, None


class FusedMlp(nn.Module):
    """An MLP of ``AdagradLayer``s (the weights of ``mlp``'s linear layers) and its activations, in bf16."""

    def __init__(self, mlp: nn.Sequential, lr: float, tile: dict | None) -> None:
        super().__init__()
        self.steps = [AdagradLayer(m, lr, tile) if isinstance(m, nn.Linear) else m for m in mlp]
        self.layers = [step for step in self.steps if isinstance(step, AdagradLayer)]

    def forward(self, x: Tensor) -> Tensor:
        for step in self.steps:
            x = step(x)
        return x
