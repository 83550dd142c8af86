"""bench/fused_adagrad.py on a CUDA GPU: one kernel's weight gradient and Adagrad step equal the unfused ones."""

import sys

import pytest
import torch
from conftest import ROOT

from habana_dlrm_ops import adagrad_update

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")
sys.path.insert(0, str(ROOT / "bench"))
from fused_adagrad import TILES, weight_grad_adagrad  # noqa: E402


@pytest.mark.parametrize("tile", TILES, ids=lambda tile: f"{tile['BLOCK_ROWS']}x{tile['BLOCK_COLS']}")
def test_cuda_fused_weight_grad_and_adagrad_equal_the_unfused_update(tile: dict) -> None:
    torch.manual_seed(0)
    batch, rows, cols, lr = 200, 300, 260, 0.01  # no multiple of any tile: the edges are masked
    grad_out = torch.randn(batch, rows, device="cuda").to(torch.bfloat16)
    inputs = torch.randn(batch, cols, device="cuda").to(torch.bfloat16)
    weight, state = torch.randn(rows, cols, device="cuda"), torch.rand(rows, cols, device="cuda")
    bf16_copy = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
    expected_weight, expected_state = weight.clone(), state.clone()
    grad = (grad_out.double().t() @ inputs.double()).float().to(torch.bfloat16).float()  # as autocast hands it over
    adagrad_update(expected_weight, grad, expected_state, lr)

    weight_grad_adagrad(grad_out, inputs, weight, state, bf16_copy, lr, tile)

    # The kernel sums in fp32 in its own order, so a gradient near a bf16 rounding boundary may round the other way:
    # one bf16 step is at most 2^-7 of it, 2^-6 of its square. A wrong kernel moves weights by up to 2 lr.
    torch.testing.assert_close(state, expected_state, rtol=2**-6, atol=0)
    torch.testing.assert_close(weight, expected_weight, rtol=0, atol=lr * 2**-6)
    torch.testing.assert_close(bf16_copy, weight.to(torch.bfloat16), rtol=0, atol=0)
