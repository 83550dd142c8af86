"""The GPU floor of the medium bf16 lazy step: its dense path and its dense update, alone and together.

Each piece runs as lazy mode runs it (the dense path compiled, the update compiled, the whole replayed as one CUDA
graph), without the embedding op. Prints ms per replay (the median of 5 windows of 200 replays), the matrix
products' rate and the update's memory traffic. Run it on a GPU machine: `bash bench/gpu_check.sh floor`.
"""

import statistics
import sys
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dlrm_s_pytorch import make_mlp  # noqa: E402
from habana_dlrm_ops import CompiledDenseOptimizer, CUDAGraphStep, TorchKernels  # noqa: E402

CONFIG = ROOT / "hb_configs" / "single_node_dlrm_lazy_medium_bf16.yaml"
ADAGRAD_BYTES = 4 + 4 + 2 + 4 + 4 + 2  # reads weight, state, bf16 gradient; writes weight, state, bf16 copy


class Mlps(nn.Module):
    """The medium dense path with "cat" interaction: bottom MLP, concatenation with the pooled rows, top MLP."""

    def __init__(self, bottom: list[int], top: list[int]) -> None:
        super().__init__()
        kernels = TorchKernels()
        self.bottom = make_mlp(bottom, sigmoid_last=False, kernels=kernels)
        self.top = make_mlp(top, sigmoid_last=True, kernels=kernels)

    def forward(self, dense: Tensor, pooled: Tensor, targets: Tensor) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            scores = self.top(torch.cat([self.bottom(dense), pooled], dim=1))
        return nn.functional.binary_cross_entropy(scores.float(), targets)


def replay_ms(step: Callable[[], None], replays: int = 200) -> float:
    graphed = CUDAGraphStep(lambda _: step(), warmup=3)
    for _ in range(3 + 10):  # warm up, record, settle
        graphed(None)
    windows = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graphed(None)
        end.record()
        end.synchronize()
        windows.append(start.elapsed_time(end) / replays)
    return statistics.median(windows)


def main() -> None:
    parameters = yaml.safe_load(CONFIG.read_text())["parameters"]
    batch, dim = parameters["mini-batch-size"], parameters["arch-sparse-feature-size"]
    bottom = [int(w) for w in parameters["arch-mlp-bot"].split("-")]
    top = [bottom[-1] + dim] + [int(w) for w in parameters["arch-mlp-top"].split("-")]
    model = Mlps(bottom, top).cuda()
    weights = list(model.parameters())
    copies = {name: p.detach().to(torch.bfloat16).requires_grad_() for name, p in model.named_parameters()}
    optimizer = CompiledDenseOptimizer(weights, "adagrad", lr=1e-5, bf16_copies=list(copies.values()))
    loss = torch.compile(lambda *inputs: torch.func.functional_call(model, copies, inputs), fullgraph=True)
    inputs = [torch.rand(batch, width, device="cuda") for width in (bottom[0], dim, 1)]
    gradients = [torch.rand_like(copy) for copy in copies.values()]

    def dense_path() -> None:
        loss(*inputs).backward()
        for copy in copies.values():
            copy.grad = None

    def update() -> None:
        for copy, gradient in zip(copies.values(), gradients, strict=True):
            copy.grad = gradient
        optimizer.step()

    def both() -> None:
        loss(*inputs).backward()
        optimizer.step()

    multiply_adds = sum(n * m for widths in (bottom, top) for n, m in pairwise(widths))
    elements = sum(p.numel() for p in weights)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: batch {batch}, {elements:,} parameters")
    dense_ms, update_ms, both_ms = replay_ms(dense_path), replay_ms(update), replay_ms(both)
    tflops = 6 * multiply_adds * batch / dense_ms / 1e9  # forward and backward: 3 x 2 FLOPs a multiply-add
    print(f"dense path, forward and backward: {dense_ms:.3f} ms ({tflops:.0f} TFLOP/s)")
    print(
        f"dense Adagrad update:             {update_ms:.3f} ms ({ADAGRAD_BYTES * elements / update_ms / 1e9:.2f} TB/s)"
    )
    print(f"both, as lazy mode runs them:     {both_ms:.3f} ms ({batch / both_ms * 1000:,.0f} samples/s)")


if __name__ == "__main__":
    main()
