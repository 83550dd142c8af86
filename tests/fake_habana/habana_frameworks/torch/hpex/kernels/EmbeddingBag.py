"""``embedding_bag_sum_fwd`` / ``_bwd`` with kernel mode 1 (sum-pooled bags), reading only the valid prefixes."""

import torch

from habana_frameworks.torch import record


def _groups(starts: torch.Tensor) -> torch.Tensor:
    """The group of each element, from the groups' start positions (and the end)."""
    return torch.repeat_interleave(torch.arange(starts.numel() - 1), (starts[1:] - starts[:-1]).long())


def forward(
    weights: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor, valid_count: torch.Tensor, kernel_mode: int
) -> torch.Tensor:
    record("EmbeddingBag.forward", valid_count=valid_count.tolist(), kernel_mode=kernel_mode, dtype=indices.dtype)
    assert kernel_mode == 1
    num_offsets, num_indices = valid_count.tolist()
    bags = offsets[:num_offsets]
    out = weights.new_zeros(num_offsets - 1, weights.size(1))
    return out.index_add_(0, _groups(bags), weights[indices[:num_indices].long()])


def backward(
    weight_grad: torch.Tensor,
    grad_output: torch.Tensor,
    sorted_bags: torch.Tensor,
    row_offsets: torch.Tensor,
    valid_count: torch.Tensor,
    kernel_mode: int,
) -> torch.Tensor:
    """Each unique row's gradient, the sum over the bags that hold it, into the first rows of ``weight_grad``."""
    record("EmbeddingBag.backward", valid_count=valid_count.tolist(), kernel_mode=kernel_mode)
    assert kernel_mode == 1
    num_row_offsets, num_indices = valid_count.tolist()
    row_grads = weight_grad[: num_row_offsets - 1]
    bag_grads = grad_output[sorted_bags[:num_indices].long()]
    row_grads.zero_().index_add_(0, _groups(row_offsets[:num_row_offsets]), bag_grads)
    return weight_grad
