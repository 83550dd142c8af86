"""``embedding_bag_preproc``: a stable LSD radix sort on 11-bit digits, as many passes as the largest index
needs, then equal neighbours grouped. Too small a ``max_index_value`` sorts only the low digits, so one row can
come out as two groups, as in the original DLRM call that passed 4.
"""

import torch

from habana_frameworks.torch import record

DIGIT_BITS = 11


def forward(
    indices: torch.Tensor, offsets: torch.Tensor, max_index_value: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    record("EmbeddingBagPreproc.forward", indices=indices.clone(), offsets=offsets.clone(), max_index=max_index_value)
    assert indices.dtype == offsets.dtype == torch.int32
    n = indices.numel()
    bag_of = torch.repeat_interleave(torch.arange(offsets.numel() - 1, dtype=torch.int32), offsets.diff())
    order = torch.arange(n)
    passes = max(1, -(-int(max_index_value).bit_length() // DIGIT_BITS))
    for p in range(passes):
        digit = (indices[order] >> (DIGIT_BITS * p)) & ((1 << DIGIT_BITS) - 1)
        order = order[torch.sort(digit, stable=True).indices]
    values = indices[order]
    starts = torch.nonzero(torch.cat([torch.ones(min(n, 1), dtype=torch.bool), values[1:] != values[:-1]]))[:, 0]
    count = starts.numel()
    unique = torch.zeros(n, dtype=torch.int32)
    unique[:count] = values[starts]
    row_offsets = torch.zeros(n + 1, dtype=torch.int32)
    row_offsets[:count] = starts.to(torch.int32)
    row_offsets[count] = n
    return torch.tensor([count], dtype=torch.int32), unique, bag_of[order], row_offsets
