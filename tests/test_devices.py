"""Device backends (SPEC §4, §5): device selection, lazy mode on the CPU, CUDA, and Gaudi through a test double."""

import collections
import os
import re
import sys

import pytest
import torch
from conftest import ROOT, finished_lines, printed_weights, run_here, run_script
from torch import nn

import dlrm_s_pytorch
import habana_dlrm_ops
from distributed_utils import Ranks

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

TINY = ["--arch-embedding-size=20-3000-7", "--arch-sparse-feature-size=4", "--arch-mlp-bot=5-8-4"]
TINY += ["--arch-mlp-top=12-6-1", "--mini-batch-size=16", "--num-indices-per-lookup=6", "--print-freq=1"]
# lazy against eager: two models, each option used by one of them
LAZY_CASES = {
    "dot-adagrad": ["--arch-interaction-op=dot", "--optimizer=adagrad", "--learning-rate=0.05"],
    "cat-sgd-wbce-clamp": ["--loss-function=wbce", "--loss-weights=0.7-1.3", "--loss-threshold=0.2", "--round-targets"],
}
# Lazy and eager sum in different orders; training amplifies the difference by about 10x every 4 iterations
# with Adagrad (measured on hb_configs/small.yaml: 1e-6 at it 9, 1e-5 at it 16), so compare the first 8.
LAZY_ITERATIONS = 8


def losses(stdout: str) -> list[float]:
    return [line["loss"] for line in finished_lines(stdout)]


# ---------------------------------------------------------------------------------------------------------
# Choosing the device
# ---------------------------------------------------------------------------------------------------------


@NO_CUDA
@pytest.mark.parametrize("argv", [["--device=cuda"], ["--use-gpu"]])
def test_cuda_without_a_gpu_is_one_line_and_exit_2(argv: list[str], capsys) -> None:
    assert dlrm_s_pytorch.main([*TINY, *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no CUDA GPU here" in err and argv[0].split("=")[0] in err


def test_hpu_without_the_bridge_is_one_line_and_exit_2(capsys) -> None:
    assert dlrm_s_pytorch.main([*TINY, "--device=hpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--device hpu: no Gaudi card here" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--use-gpu", "--device=cpu"], "--use-gpu: contradicts --device cpu"),
        (["--no-habana", "--device=hpu"], "--no-habana: contradicts --device hpu"),
    ],
)
def test_contradicting_device_flags_exit_2(argv: list[str], message: str, capsys) -> None:
    assert dlrm_s_pytorch.main([*TINY, *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_launcher_of_ranks_leaves_the_gpus_to_them(monkeypatch) -> None:
    """With ``--world_size 2`` on CUDA this process only starts the ranks: a CUDA context of its own would hold
    memory on GPU 0 all run long, or keep rank 0 off a GPU in exclusive-process mode."""
    started = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: started.append(f"set_device({device})"))
    monkeypatch.setattr(dlrm_s_pytorch.distributed_utils, "spawn_ranks", lambda argv, n: started.append(n) or 0)
    assert dlrm_s_pytorch.main([*TINY, "--device=cuda", "--world_size=2"]) == 0
    assert started == [2]


def test_auto_without_gpu_or_gaudi_is_the_cpu() -> None:
    backend = habana_dlrm_ops.select_backend("auto", lazy=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert backend.device.type == expected


# ---------------------------------------------------------------------------------------------------------
# Lazy mode on the CPU: the dense path compiled
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAZY_CASES)
def test_cpu_lazy_equals_eager(capsys, name: str) -> None:
    argv = [*TINY, *LAZY_CASES[name], f"--num-batches={LAZY_ITERATIONS}", "--print-time", "--device=cpu"]
    eager, lazy = run_here(argv, capsys), run_here([*argv, "--mode=lazy"], capsys)
    assert len(losses(lazy)) == LAZY_ITERATIONS
    assert losses(lazy) == pytest.approx(losses(eager), abs=1e-5, rel=0)
    assert "Lazy mode" not in eager
    assert re.search(r"^Lazy mode: the first 1 it compiled the graphs in [\d.]+ s", lazy, re.M)
    first, *others = [line["ms"] for line in finished_lines(lazy)]
    assert first == -1 and min(others) > 0  # the compiling iteration is not in ms/it


def test_cpu_lazy_bf16_measure_perf_stays_close_to_eager(capsys) -> None:
    argv = [*TINY, "--num-batches=4", "-d", "bf16", "--measure-perf", "--optimizer=adagrad", "--learning-rate=0.01"]
    argv += ["--hmp-opt-level=O2", "--hmp-verbose"]  # the other bf16 tests use O1
    eager, lazy = run_here(argv, capsys), run_here([*argv, "--run-lazy-mode"], capsys)
    assert "bf16 ops: addmm, bmm, dot, linear, mm, mv; fp32 ops: every other op" in lazy
    # bf16 rounds the matrix products' outputs, and fused code may round them at other points
    assert losses(lazy) == pytest.approx(losses(eager), abs=2e-3)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_cpu_lazy_bf16_weight_copies_train_as_autocast(monkeypatch, capsys, optimizer: str) -> None:
    """The optimizer's bf16 copies of the weights train as autocast does.

    Not bit for bit: compiled autocast code may skip rounding a gradient to bf16 inside a fused kernel, where the
    copies' gradients are always bf16 (as in eager autocast), so the weights differ by about one bf16 rounding.
    """
    argv = [*TINY, "--num-batches=6", "-d", "bf16", "--mode=lazy", f"--optimizer={optimizer}", "--learning-rate=0.01"]
    printed = {}
    for copies in (False, True):
        monkeypatch.setattr(habana_dlrm_ops.Backend, "bf16_copies", copies)
        out = run_here([*argv, "--debug-mode", "--print-precision=8"], capsys)
        printed[copies] = (losses(out), printed_weights(out))
    # Adagrad divides each gradient by its own size, so one rounding apart can move a weight by up to lr a step.
    loss_tolerance, weight_tolerance = (1e-5, 1e-4) if optimizer == "sgd" else (2e-3, 6 * 0.01)
    assert len(printed[True][0]) == 6
    assert printed[True][0] == pytest.approx(printed[False][0], abs=loss_tolerance, rel=0)
    assert printed[True][1].keys() == printed[False][1].keys() and len(printed[True][1]) == 3 + 4 + 6
    for name, values in printed[True][1].items():
        torch.testing.assert_close(values, printed[False][1][name], atol=weight_tolerance, rtol=0)


@pytest.mark.parametrize("opt_level", ["O1", "O2"])
def test_hmp_opt_level_chooses_which_ops_run_in_bf16(opt_level: str) -> None:
    """O1 (autocast) runs the products in bf16 and the sigmoid on their bf16 output; O2 runs the sigmoid in fp32."""
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*TINY, "--hmp", f"--hmp-opt-level={opt_level}"])
    dense = dlrm_s_pytorch.DensePath(args, sizes, habana_dlrm_ops.TorchKernels())
    generator = torch.Generator().manual_seed(0)
    x, targets = torch.rand(16, 5, generator=generator), torch.randint(0, 2, (16, 1), generator=generator).float()
    pooled = [torch.rand(16, 4, generator=generator, requires_grad=True) for _ in sizes.tables]

    scores, loss, _ = dense(x, pooled, targets)
    loss.backward()

    plain = [p.detach().requires_grad_() for p in (*pooled, *dense.top_mlp.parameters())]
    plain_pooled, top_params = plain[: len(pooled)], plain[len(pooled) :]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = torch.cat([dense.bottom_mlp(x), *plain_pooled], dim=1)
        for i, (weight, bias) in enumerate(zip(top_params[::2], top_params[1::2], strict=True)):
            hidden = nn.functional.linear(hidden, weight, bias)
            if i < len(top_params) // 2 - 1:
                hidden = torch.relu(hidden)
    expected = torch.sigmoid(hidden.float()) if opt_level == "O2" else torch.sigmoid(hidden).float()
    nn.functional.binary_cross_entropy(expected, targets).backward()
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    for ours, reference in zip([*pooled, *dense.top_mlp.parameters()], plain, strict=True):
        torch.testing.assert_close(ours.grad, reference.grad, rtol=0, atol=0)
    assert torch.equal(scores, scores.bfloat16().float()) == (opt_level == "O1")


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_freed_host_memory_is_kept_for_the_next_iteration(monkeypatch, capsys, mode: str) -> None:
    """glibc keeps what training frees and maps nothing apart, in either mode."""
    calls = []

    class Libc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(dlrm_s_pytorch, "LIBC", Libc())
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=2", f"--mode={mode}"]) == 0
    assert calls == [(dlrm_s_pytorch.M_MMAP_MAX, 0), (dlrm_s_pytorch.M_TRIM_THRESHOLD, 2**31 - 1)]


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_lazy_mode_runs_the_dense_path_and_its_optimizer_compiled(monkeypatch, capsys, mode: str) -> None:
    """What lazy mode hands torch.compile, and that the loop calls what comes back; eager mode compiles nothing.
    (torch.compile is replaced by a counting wrapper, so nothing is really compiled.)"""
    calls = collections.Counter()

    def counting_compile(fn, **options):
        name = type(fn).__name__ if isinstance(fn, torch.nn.Module) else fn.__name__
        calls[name] += 0

        def compiled(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return compiled

    monkeypatch.setattr(torch, "compile", counting_compile)
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=3", "--optimizer=adagrad", f"--mode={mode}"]) == 0
    assert len(finished_lines(capsys.readouterr().out)) == 3
    assert calls == (dict(DensePath=3, update_all=3) if mode == "lazy" else {})


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_compiled_dense_optimizer_equals_torch_optim(optimizer: str) -> None:
    torch.manual_seed(0)
    ours, reference = (
        torch.nn.Sequential(torch.nn.Linear(300, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1)) for _ in "ab"
    )
    reference.load_state_dict(ours.state_dict())
    compiled = habana_dlrm_ops.CompiledDenseOptimizer(list(ours.parameters()), optimizer, lr=0.05)
    ref_opt = (torch.optim.Adagrad if optimizer == "adagrad" else torch.optim.SGD)(reference.parameters(), lr=0.05)
    if optimizer == "adagrad":
        ref_opt.param_groups[0]["eps"] = 1e-10
    for _ in range(3):
        x = torch.randn(10, 300)
        ours(x).square().mean().backward()
        compiled.step()
        ref_opt.zero_grad()
        reference(x).square().mean().backward()
        ref_opt.step()
        assert all(p.grad is None for p in ours.parameters())
    for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
        # compiled code divides by multiplying with a reciprocal: a few ulps apart, where eager is bit-exact
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------------------


def test_a_replayed_graph_gets_every_tensor_of_the_next_batch() -> None:
    """The CUDA graph's recorded batch is refilled from the next batch, tensor for tensor, in the same order."""
    bags = habana_dlrm_ops.preprocess_bags(torch.tensor([4, 2]), torch.tensor([0, 1]), batch_size=2, capacity=3)
    batch = dlrm_s_pytorch.Batch(torch.rand(2, 5), [bags, bags], torch.rand(2, 1), samples=2)
    found = list(habana_dlrm_ops._tensors(batch))
    per_table = [bags.indices, bags.offsets, bags.unique_indices, bags.sorted_bags, bags.unique_starts]
    expected = [batch.dense, *per_table, bags.valid_counts, *per_table, bags.valid_counts, batch.targets]
    assert len(found) == len(expected) == 14 and all(a is b for a, b in zip(found, expected, strict=True))


@CUDA
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_cuda_equals_the_cpu(mode: str) -> None:
    argv = [*TINY, *LAZY_CASES["dot-adagrad"], f"--num-batches={LAZY_ITERATIONS}", "--log-device-mem-alloc"]
    cpu, gpu = run_script(*argv, "--device=cpu"), run_script(*argv, "--device=cuda", f"--mode={mode}")
    assert cpu.returncode == gpu.returncode == 0, gpu.stderr
    assert "Using GPU..." in gpu.stdout and re.search(r"^Peak GPU memory: [\d.]+ MB$", gpu.stdout, re.M)
    assert losses(gpu.stdout) == pytest.approx(losses(cpu.stdout), abs=1e-5, rel=0)


@CUDA
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_cuda_bf16_measure_perf_and_workers(mode: str) -> None:
    argv = [*TINY, "--num-batches=6", "-d", "bf16", "--optimizer=adagrad", "--learning-rate=0.01", "--print-time"]
    cpu = run_script(*argv, "--device=cpu")
    gpu = run_script(*argv, "--device=cuda", f"--mode={mode}", "--num-workers=2")
    perf = run_script(*argv, "--device=cuda", f"--mode={mode}", "--measure-perf")
    assert cpu.returncode == gpu.returncode == perf.returncode == 0, gpu.stderr + perf.stderr
    assert losses(gpu.stdout) == pytest.approx(losses(cpu.stdout), abs=2e-3)
    assert len(losses(perf.stdout)) == 6


@CUDA
def test_cuda_profiling_records_gpu_kernels(tmp_path) -> None:
    result = run_script(*TINY, "--num-batches=2", "--device=cuda", "--enable-profiling", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Self CUDA" in (tmp_path / "dlrm_s_pytorch.prof").read_text()


@CUDA
def test_cuda_medium_configuration_trains() -> None:
    config = ROOT / "hb_configs" / "single_node_dlrm_lazy_medium_bf16.yaml"
    result = run_script("--config", str(config), "--num-batches=6", "--print-freq=6", "--device=cuda")
    assert result.returncode == 0, result.stderr
    [line] = finished_lines(result.stdout)
    assert 0.5 < line["loss"] < 1.0 and line["ms"] > 0


# ---------------------------------------------------------------------------------------------------------
# Gaudi, through the test double in tests/fake_habana (no card here)
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def habana(monkeypatch):
    """The double on sys.path, imported fresh by the script; its "hpu" tensors live on the CPU."""
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fake_habana"))
    monkeypatch.setattr(habana_dlrm_ops.HPUBackend, "device_type", "cpu")
    monkeypatch.setenv("PT_HPU_LAZY_MODE", "unset by the test")
    monkeypatch.delenv("PT_HPU_LAZY_MODE")

    def forget_the_bridge() -> None:
        for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
            del sys.modules[name]

    forget_the_bridge()
    yield lambda: sys.modules["habana_frameworks.torch"]
    forget_the_bridge()


def calls(bridge, name: str) -> list[dict]:
    return [arguments for kernel, arguments in bridge.CALLS if kernel == name]


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_hpu_sets_lazy_mode_before_import_and_marks_each_step_once(habana, capsys, mode: str) -> None:
    argv = [*TINY, "--num-batches=5", "--optimizer=adagrad", f"--mode={mode}"]
    assert dlrm_s_pytorch.main(argv) == 0
    out = capsys.readouterr().out
    bridge = habana()
    assert "Using HPU..." in out and len(finished_lines(out)) == 5
    assert bridge.LAZY_MODE_AT_IMPORT == ("1" if mode == "lazy" else "0")
    sequence = [kernel for kernel, _ in bridge.CALLS if kernel in ("FusedAdagrad.step", "mark_step")]
    expected = ["FusedAdagrad.step", "mark_step"] if mode == "lazy" else ["FusedAdagrad.step"]
    assert sequence == expected * 5  # once per iteration, after both optimizers; never in eager mode


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_hpu_marks_a_step_after_each_test_batch_in_lazy_mode(habana, capsys, mode: str) -> None:
    argv = [*TINY, "--num-batches=4", "--optimizer=adagrad", f"--mode={mode}"]
    args, sizes, _ = dlrm_s_pytorch.parse_command_line(argv)
    args.test_freq = 2  # random data has no test split: its 4 batches stand in for one
    backend, ranks = habana_dlrm_ops.select_backend("hpu", lazy=mode == "lazy"), Ranks(0, 1, 0, 1)
    model = dlrm_s_pytorch.DLRM(args, sizes, backend.kernels)
    data = dlrm_s_pytorch.RandomDataset(args, sizes)
    loaders = [dlrm_s_pytorch.make_loader(args, data, sizes, backend, model.shards, ranks, test=t) for t in (0, 1)]
    assert dlrm_s_pytorch.Trainer(args, model, backend, loaders, ranks).run() == 0
    assert capsys.readouterr().out.count("Testing at - ") == 2
    names = ("EmbeddingBag.forward", "FusedAdagrad.step", "mark_step")
    sequence = [kernel for kernel, _ in habana().CALLS if kernel in names]
    lookups, mark = ["EmbeddingBag.forward"] * 3, ["mark_step"] if mode == "lazy" else []
    two_iterations_then_a_test = 2 * [*lookups, "FusedAdagrad.step", *mark] + 4 * [*lookups, *mark]
    assert sequence == 2 * two_iterations_then_a_test


def test_no_habana_under_device_auto_passes_over_the_gaudi_card(habana, capsys) -> None:
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1"]) == 0
    assert "Using HPU..." in capsys.readouterr().out  # the double imports, so auto would take it
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", "--no-habana"]) == 0
    out = capsys.readouterr().out
    assert ("Using GPU..." if torch.cuda.is_available() else "Using CPU...") in out and "HPU" not in out


def test_hpu_kernels_get_the_documented_arguments(habana, capsys) -> None:
    argv = [*TINY, "--num-batches=2", "--optimizer=adagrad", "--learning-rate=0.25", "--run-lazy-mode"]
    assert dlrm_s_pytorch.main(argv) == 0
    bridge = habana()
    preprocs = calls(bridge, "EmbeddingBagPreproc.forward")
    assert len(preprocs) == 3 * 2  # every table, every batch, in the loader
    for call in preprocs:
        indices, offsets = call["indices"], call["offsets"]
        assert call["max_index"] == int(indices.max())  # the real largest index, not the original's 4
        assert offsets.numel() == 16 + 1 and offsets[-1] == indices.numel()  # the trailing total
    lookups = [call["indices"].numel() for call in preprocs]
    distinct = [call["indices"].unique().numel() for call in preprocs]
    forwards = calls(bridge, "EmbeddingBag.forward")
    assert forwards == [dict(valid_count=[17, n], kernel_mode=1, dtype=torch.int32) for n in lookups]
    # backward visits each batch's tables in reverse order
    backwards = calls(bridge, "EmbeddingBag.backward")
    expected = [dict(valid_count=[u + 1, n], kernel_mode=1) for n, u in zip(lookups, distinct, strict=True)]
    assert backwards == expected[2::-1] + expected[:2:-1]
    updates = calls(bridge, "SparseAdagrad.forward")
    assert updates == [dict(valid_count=[u], lr=[0.25], dtype=torch.int32) for u in distinct[2::-1] + distinct[:2:-1]]
    assert calls(bridge, "FusedAdagrad") == [dict(lr=0.25, eps=1e-10)]


@pytest.mark.parametrize("optimizer, data_type", [("adagrad", "fp32"), ("sgd", "fp32"), ("adagrad", "bf16")])
def test_hpu_training_equals_the_cpu_backend(habana, capsys, optimizer: str, data_type: str) -> None:
    argv = [*TINY, "--num-batches=6", f"--optimizer={optimizer}", "--learning-rate=0.05", "-d", data_type]
    assert dlrm_s_pytorch.main([*argv, "--device=cpu"]) == 0
    on_cpu = capsys.readouterr().out
    assert dlrm_s_pytorch.main([*argv, "--device=hpu", "--mode=lazy"]) == 0
    on_hpu = capsys.readouterr().out
    assert "Using CPU..." in on_cpu and "Using HPU..." in on_hpu
    assert losses(on_hpu) == pytest.approx(losses(on_cpu), abs=1e-6, rel=0)
    assert len(calls(habana(), "SparseSGD.forward" if optimizer == "sgd" else "SparseAdagrad.forward")) == 18


def test_the_double_splits_rows_when_told_a_too_small_largest_index(habana) -> None:
    """Why the largest index matters: the original's 4 sorts one 11-bit digit, and 5000 and 904 share it."""
    from habana_frameworks.torch.hpex.kernels import EmbeddingBagPreproc

    indices, offsets = torch.tensor([5000, 904, 5000], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    assert EmbeddingBagPreproc.forward(indices, offsets, 5000)[0].item() == 2
    assert EmbeddingBagPreproc.forward(indices, offsets, 4)[0].item() == 3


def test_hpu_without_the_hccl_backend_is_one_line_and_exit_2(habana, monkeypatch, capsys) -> None:
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # join_ranks would set them for the rest of the tests
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", "--device=hpu", "--distributed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hccl cannot start" in err and "habana_frameworks.torch.distributed" in err


def test_hpu_with_the_bridge_but_no_card_says_so(habana, monkeypatch, capsys) -> None:
    import habana_frameworks.torch.hpu

    monkeypatch.setattr(habana_frameworks.torch.hpu, "is_available", lambda: False)
    monkeypatch.delenv("PT_HPU_LAZY_MODE", raising=False)
    assert dlrm_s_pytorch.main([*TINY, "--device=hpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "--device hpu: no Gaudi card here" in err
    assert "is_available() is False" in err and "does not import" not in err
    assert "PT_HPU_LAZY_MODE" not in os.environ  # set for the bridge's import, and no card took it
