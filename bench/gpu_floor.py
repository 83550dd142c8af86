"""The GPU floor of the medium bf16 lazy step: its dense path and its dense update, alone and together, and
whether the update can hide behind the products.

Each piece runs as lazy mode runs it (the dense path compiled, the update compiled, the whole replayed as one CUDA
graph), without the embedding op. Prints ms per replay (the median of 5 windows of 200 replays), the matrix
products' rate and the update's memory traffic. Then both traced as one graph with ``torch.func.grad``, which lets
the compiler place each layer's update right after its gradient and, under max-autotune, fuse it into the product.

Then the overlap rows: each pair of linear layer and activation compiled on its own, and each layer's update
launched the moment backward has its gradients, on the same stream or on a second one. A second stream only helps
if the update finds free SMs beside the products, so the rows keep the products off 0 to 48 of the card's SMs
(torch's experimental SM carveout for cuBLAS). Then the fused rows (``fused_adagrad.py``): each layer's weight
gradient and its update made by one Triton kernel, with a check of one step against the unfused update. With
``--autotune``, also the serial rows compiled with Inductor's max-autotune (minutes of compiling). Run it on a GPU
machine: `bash bench/gpu_check.sh floor`.
"""

import argparse
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dlrm_s_pytorch import make_mlp  # noqa: E402
from habana_dlrm_ops import CompiledDenseOptimizer, CUDAGraphStep, TorchKernels  # noqa: E402

try:  # Triton comes with torch's CUDA builds
    from fused_adagrad import TILES, FusedMlp
except ImportError:
    TILES, FusedMlp = [], None

CONFIG = ROOT / "hb_configs" / "single_node_dlrm_lazy_medium_bf16.yaml"
ADAGRAD_BYTES = 4 + 4 + 2 + 4 + 4 + 2  # reads weight, state, bf16 gradient; writes weight, state, bf16 copy
LR = 1e-5
CARVEOUTS = (0, 16, 32, 48)  # SMs kept free of matrix products in the overlap rows


class Mlps(nn.Module):
    """The medium dense path with "cat" interaction: bottom MLP, concatenation with the pooled rows, top MLP."""

    def __init__(self, bottom: list[int], top: list[int]) -> None:
        super().__init__()
        kernels = TorchKernels()
        self.bottom = make_mlp(bottom, kernels)
        self.top = make_mlp(top, kernels, last=nn.Sigmoid)

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


def blockwise_compiled(model: Mlps) -> Mlps:
    """``model`` in bf16 (its parameters stand for the weight copies), each linear layer compiled with its
    activation, so that backward hands over each layer's gradients before it moves to the layer below."""
    for name in ("bottom", "top"):
        layers = list(getattr(model, name))
        blocks = [torch.compile(nn.Sequential(*layers[i : i + 2]), fullgraph=True) for i in range(0, len(layers), 2)]
        setattr(model, name, nn.Sequential(*blocks))
    return model.to(torch.bfloat16)


@contextmanager
def sm_carveout(sms: int) -> Iterator[None]:
    """cuBLAS products launched inside leave ``sms`` SMs free."""
    if not sms:
        yield
        return
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(None)


def updating_in_backward(
    blocks: Mlps, side_stream: bool, inputs: list[Tensor]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A step whose backward updates each layer (lazy mode's compiled Adagrad on fp32 weights, writing ``blocks``'
    bf16 parameters as its copies) as soon as the layer's gradients are accumulated, on a second stream if
    ``side_stream``; and a function that removes the hooks."""
    stream = torch.cuda.Stream() if side_stream else None
    in_flight: list[Tensor] = []

    def launch(layer: list[Tensor], optimizer: CompiledDenseOptimizer) -> None:
        if any(copy.grad is None for copy in layer):
            return
        if stream is None:
            optimizer.step()
            return
        in_flight.extend(copy.grad for copy in layer)  # their memory is not reused before the streams join
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            optimizer.step()

    params = list(blocks.parameters())
    hooks = []
    for layer in zip(params[::2], params[1::2], strict=True):  # each linear layer's weight and bias
        optimizer = CompiledDenseOptimizer([p.detach().float() for p in layer], "adagrad", LR, list(layer))
        hooks += [
            copy.register_post_accumulate_grad_hook(
                lambda _, layer=layer, optimizer=optimizer: launch(layer, optimizer)
            )
            for copy in layer
        ]

    def step() -> None:
        blocks(*inputs).backward()
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
            in_flight.clear()

    def remove() -> None:
        for hook in hooks:
            hook.remove()

    return step, remove


class Floor:
    """The medium configuration's MLPs on the GPU with bf16 weight copies, their compiled update, random inputs."""

    def __init__(self) -> None:
        parameters = yaml.safe_load(CONFIG.read_text())["parameters"]
        self.batch, dim = parameters["mini-batch-size"], parameters["arch-sparse-feature-size"]
        self.bottom = [int(w) for w in parameters["arch-mlp-bot"].split("-")]
        self.top = [self.bottom[-1] + dim] + [int(w) for w in parameters["arch-mlp-top"].split("-")]
        self.model = Mlps(self.bottom, self.top).cuda()
        self.weights = list(self.model.parameters())
        self.copies = {
            name: p.detach().to(torch.bfloat16).requires_grad_() for name, p in self.model.named_parameters()
        }
        self.optimizer = CompiledDenseOptimizer(self.weights, "adagrad", lr=LR, bf16_copies=list(self.copies.values()))
        self.inputs = [torch.rand(self.batch, width, device="cuda") for width in (self.bottom[0], dim, 1)]
        self.gradients = [torch.rand_like(copy) for copy in self.copies.values()]

    def compiled_loss(self, mode: str | None = None) -> Callable[[], Tensor]:
        loss = torch.compile(
            lambda *xs: torch.func.functional_call(self.model, self.copies, xs), fullgraph=True, mode=mode
        )
        return lambda: loss(*self.inputs)

    def dense_path(self, loss: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss().backward()
            for copy in self.copies.values():
                copy.grad = None

        return step

    def update(self) -> None:
        for copy, gradient in zip(self.copies.values(), self.gradients, strict=True):
            copy.grad = gradient
        self.optimizer.step()

    def both(self, loss: Callable[[], Tensor]) -> Callable[[], None]:
        def step() -> None:
            loss().backward()
            self.optimizer.step()

        return step

    def one_graph(self, mode: str | None = None) -> Callable[[], None]:
        """Forward, backward and the update traced as one graph (``torch.func.grad``): the compiler may then update
        each layer as soon as its gradient is ready and, with max-autotune, fuse the update into the product that
        makes the gradient. The pooled rows' gradient is computed too, as the embedding op needs it."""
        dense, pooled, targets = self.inputs
        copies = {name: copy.detach() for name, copy in self.copies.items()}  # no input of the graph needs grad
        weights = [w.detach() for w in self.weights]
        optimizer = CompiledDenseOptimizer(weights, "adagrad", lr=LR, bf16_copies=list(copies.values()))

        def loss(read: dict[str, Tensor], pooled: Tensor) -> Tensor:
            return torch.func.functional_call(self.model, read, (dense, pooled, targets))

        def step() -> Tensor:
            grads, pooled_grad = torch.func.grad(loss, argnums=(0, 1))(copies, pooled)
            with torch.no_grad():
                optimizer.update_all(list(grads.values()))
            return pooled_grad

        return torch.compile(step, fullgraph=True, mode=mode)

    def self_updating_layers(self, tile: dict | None) -> tuple[Callable[[], None], list]:
        """A step of uncompiled bf16 layers that update themselves in backward (``fused_adagrad``), on copies of the
        weights, and the layers."""
        bottom, top = (FusedMlp(mlp, LR, tile) for mlp in (self.model.bottom, self.model.top))
        dense, pooled, targets = self.inputs
        dense, pooled = dense.to(torch.bfloat16), pooled.to(torch.bfloat16).requires_grad_()

        def step() -> None:
            scores = top(torch.cat([bottom(dense), pooled], dim=1))
            nn.functional.binary_cross_entropy(scores.float(), targets).backward()
            pooled.grad = None

        return step, bottom.layers + top.layers

    def tflops(self, ms: float) -> str:  # forward and backward: 3 x 2 FLOPs a multiply-add
        multiply_adds = sum(n * m for widths in (self.bottom, self.top) for n, m in pairwise(widths))
        return f"{6 * multiply_adds * self.batch / ms / 1e9:.0f} TFLOP/s"

    def terabytes_per_s(self, ms: float) -> str:
        return f"{ADAGRAD_BYTES * sum(w.numel() for w in self.weights) / ms / 1e9:.2f} TB/s"

    def samples(self, ms: float) -> str:
        return f"{self.batch / ms * 1000:,.0f} samples/s"


def serial_rows(floor: Floor, mode: str | None = None) -> None:
    """The dense path, the update, and both one after the other, as lazy mode runs them."""
    loss, name = floor.compiled_loss(mode), f" ({mode})" if mode else ""
    dense_ms, update_ms, both_ms = (
        replay_ms(step) for step in (floor.dense_path(loss), floor.update, floor.both(loss))
    )
    print(f"dense path, forward and backward{name}: {dense_ms:.3f} ms ({floor.tflops(dense_ms)})")
    print(f"dense Adagrad update: {update_ms:.3f} ms ({floor.terabytes_per_s(update_ms)})")
    print(f"both, as lazy mode runs them{name}: {both_ms:.3f} ms ({floor.samples(both_ms)})")
    one_graph_ms = replay_ms(floor.one_graph(mode))
    print(f"both, traced as one graph{name}: {one_graph_ms:.3f} ms ({floor.samples(one_graph_ms)})")


def overlap_rows(floor: Floor) -> None:
    print("each layer compiled alone, and updated as soon as backward hands over its gradients:")
    blocks = blockwise_compiled(Mlps(floor.bottom, floor.top).cuda())
    carveouts = CARVEOUTS if hasattr(torch._C, "_set_sm_carveout_experimental") else (0,)  # not in every torch
    for side_stream, carveout in [(False, 0)] + [(True, c) for c in carveouts]:
        step, remove = updating_in_backward(blocks, side_stream, floor.inputs)
        with sm_carveout(carveout):
            ms = replay_ms(step)
        remove()
        where = f"second stream, products off {carveout:2d} SMs" if side_stream else "same stream"
        print(f"  {where}: {ms:.3f} ms ({floor.samples(ms)})")


def fused_rows(floor: Floor) -> None:
    if FusedMlp is None:
        print("no fused rows: Triton does not import")
        return
    print("uncompiled bf16 layers, each weight gradient and its update one Triton kernel in backward:")
    plain, plain_layers = floor.self_updating_layers(None)
    fused, fused_layers = floor.self_updating_layers(TILES[0])
    plain()
    fused()
    # Adagrad's first step moves each weight by lr times the sign of its gradient, so only gradients within rounding
    # of zero may land apart (by 2 lr); a wrong kernel moves about half of them apart.
    pairs = list(zip(plain_layers, fused_layers, strict=True))
    apart = sum(int(((a.weight - b.weight).abs() > LR / 100).sum()) for a, b in pairs)
    print(f"  one step against torch's product, then the update: {apart:,} weights more than lr/100 apart")
    for tile in TILES:
        ms = replay_ms(floor.self_updating_layers(tile)[0])
        shape = f"{tile['BLOCK_ROWS']}x{tile['BLOCK_COLS']}x{tile['BLOCK_BATCH']}, {tile['num_warps']} warps"
        print(f"  tiles {shape}: {ms:.3f} ms ({floor.samples(ms)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--autotune", action="store_true", help="also the serial rows compiled with max-autotune")
    autotune = parser.parse_args().autotune
    floor = Floor()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    elements = sum(w.numel() for w in floor.weights)
    print(f"{torch.cuda.get_device_name()} ({sms} SMs), torch {torch.__version__}", end=": ")
    print(f"batch {floor.batch}, {elements:,} parameters")
    serial_rows(floor)
    overlap_rows(floor)
    fused_rows(floor)
    if autotune:
        serial_rows(floor, "max-autotune-no-cudagraphs")


if __name__ == "__main__":
    main()
