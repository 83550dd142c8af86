"""What a run leaves for people and for serving: metrics, TensorBoard, ONNX, the compute graph; trace data."""

import json
import os
import re
import resource
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import ROOT, finished_lines, run_script

import dlrm_s_pytorch
import trace_data
from distributed_utils import Ranks
from habana_dlrm_ops import group_rows

TINY = ["--arch-sparse-feature-size=4", "--arch-mlp-bot=5-8-4", "--mini-batch-size=16", "--learning-rate=0.05"]
TINY += ["--num-indices-per-lookup=6", "--arch-embedding-size=40-7-200-25", "--arch-mlp-top=20-6-1"]


def test_each_printed_window_appends_a_json_line(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    argv = [*TINY, "--num-batches=10", "--print-freq=4", "--print-time", "--metrics-file", str(metrics)]
    first = run_script(*argv)
    second = run_script(*argv, "--nepochs=2")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["epoch"], r["iteration"], r["step"]) for r in records] == [
        (0, 4, 4), (0, 8, 8), (0, 10, 10),  # the first run
        (0, 4, 4), (0, 8, 8), (0, 10, 10), (1, 4, 14), (1, 8, 18), (1, 10, 20),  # appended by the second
    ]  # fmt: skip
    printed = finished_lines(first.stdout)
    for record, line in zip(records, printed, strict=False):
        assert record["phase"] == "train" and record["auc"] is None
        assert record["loss"] == pytest.approx(line["loss"], abs=1e-6)
        assert 100 * record["accuracy"] == pytest.approx(line["accuracy"], abs=1e-3)
        assert record["ms_per_it"] == pytest.approx(line["ms"], abs=0.01)
        assert record["samples_per_s"] == pytest.approx(16 * 1000 / record["ms_per_it"])


def test_an_inference_runs_reports_are_logged_as_inference(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    result = run_script(*TINY, "--num-batches=4", "--print-freq=2", "--inference-only", "--metrics-file", str(metrics))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["phase"], r["iteration"]) for r in records] == [("inference", 2), ("inference", 4)]


def test_a_full_disk_stops_the_metrics_file_not_the_training(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    full_disk = subprocess.run(
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY, "--num-batches=20", "--print-freq=1",
         "--metrics-file", str(metrics)],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)),  # room for about 5 lines
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert full_disk.returncode == 0, full_disk.stderr
    assert full_disk.stderr.count("\n") == 1, full_disk.stderr
    assert f"--metrics-file {metrics}: cannot write it (File too large)" in full_disk.stderr
    printed = finished_lines(full_disk.stdout)
    assert len(printed) == 20
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # whole lines, none cut short
    assert 0 < len(records) < 20
    assert [r["loss"] for r in records] == pytest.approx([line["loss"] for line in printed[: len(records)]], abs=1e-6)


def test_tensorboard_gets_the_same_metrics(tmp_path: Path) -> None:
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    result = run_script(*TINY, "--num-batches=6", "--print-freq=2", "--tensorboard", str(tmp_path / "tb"))
    assert result.returncode == 0, result.stderr
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [2, 4, 6]
    assert [round(e.value, 6) for e in losses] == [line["loss"] for line in finished_lines(result.stdout)]


def test_a_checkpoint_that_does_not_fit_leaves_no_metrics_behind(tmp_path: Path) -> None:
    assert run_script(*TINY, "--num-batches=2", "--save-model=m.pt", cwd=tmp_path).returncode == 0
    outputs = ["--metrics-file=logs/metrics.jsonl", "--tensorboard=tb"]
    refused = run_script(*TINY, "--num-batches=4", "--load-model=m.pt", "--optimizer=adagrad", *outputs, cwd=tmp_path)
    assert refused.returncode == 2 and "saved with --optimizer sgd, this run has adagrad" in refused.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no empty metrics file, no empty TensorBoard run


@pytest.mark.parametrize(
    "flags, written",
    [
        (["--num-batches=3", "--arch-interaction-op=dot", "--arch-mlp-top=14-6-1", "--save-onnx=m.onnx"], "m.onnx"),
        (["--num-batches=1", "--save-onnx"], "dlrm_s_pytorch.onnx"),  # the original's name
        (["--data-size=3", "--mini-batch-size=4", "--save-onnx"], "dlrm_s_pytorch.onnx"),  # a partial batch
    ],
)
def test_onnx_export_matches_pytorch(flags: list[str], written: str, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = run_script(*TINY, "--optimizer=adagrad", *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / written).stat().st_size > 0 and f"ONNX model written to {written}" in result.stdout
    difference = re.search(r"largest difference from PyTorch (\S+)", result.stdout)
    assert difference and float(difference[1]) < 1e-5, result.stdout


def test_the_served_model_clamps_its_scores_as_the_trained_one() -> None:
    """--loss-threshold clamps the model's scores (in the original's forward), so the exported ones too."""
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*TINY, "--num-batches=1", "--loss-threshold=0.499"])
    model = dlrm_s_pytorch.DLRM(args, sizes)
    preprocess = dlrm_s_pytorch.Preprocessor(args, 16, sizes, model.shards, Ranks(0, 1, 0, 1), group_rows)
    batch = preprocess(dlrm_s_pytorch.RandomDataset(args, sizes)[0])
    with torch.no_grad():
        scores, _, _ = model.dense(batch.dense, model.lookup(batch.bags, 16), batch.targets)
        served = dlrm_s_pytorch.ServingDLRM(model)(*dlrm_s_pytorch.serving_inputs(batch))
    assert scores.min() == 0.499 or scores.max() == 1 - 0.499
    torch.testing.assert_close(served, scores, atol=1e-6, rtol=0)


def test_a_model_onnxruntime_cannot_run_is_one_line_and_stays_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("onnx")

    class Fail(Exception):  # as onnxruntime's own errors: not a RuntimeError
        pass

    def cannot_run(path: str, *_: object, **__: object) -> None:
        raise Fail(f"[ONNXRuntimeError] : 1 : FAIL : Load model from {path} failed: opset 99\nis not supported")

    onnxruntime = types.ModuleType("onnxruntime")
    onnxruntime.SessionOptions, onnxruntime.InferenceSession = types.SimpleNamespace, cannot_run
    monkeypatch.setitem(sys.modules, "onnxruntime", onnxruntime)
    monkeypatch.chdir(tmp_path)
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", "--save-onnx=m.onnx"]) == 2
    refused = "--save-onnx m.onnx: written, but onnxruntime cannot run it ([ONNXRuntimeError] : 1 : FAIL : Load"
    assert capsys.readouterr().err == f"dlrm_s_pytorch.py: error: {refused} model from m.onnx failed: opset 99)\n"
    assert [path.name for path in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("flag", ["--metrics-file", "--tensorboard"])
def test_an_output_the_start_up_check_let_through_but_that_cannot_be_made_is_one_line(
    flag: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The check cannot see every refusal (root under /proc, an NFS server's root_squash): opening it was a
    traceback."""
    if flag == "--tensorboard":
        pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.setattr(dlrm_s_pytorch, "_check_writable", lambda *args, **kwargs: None)  # as such a check passes
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "out"  # its folder is a file
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", f"{flag}={path}"]) == 2
    said = rf"dlrm_s_pytorch\.py: error: {flag} {re.escape(str(path))}: cannot write it \([^\n]+\)\n"
    assert re.fullmatch(said, capsys.readouterr().err)


def test_outputs_in_missing_folders_make_them_as_the_checkpoint_does(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    outputs = {"--save-model": "a/m.pt", "--metrics-file": "b/c/metrics.jsonl", "--save-onnx": "d/m.onnx"}
    result = run_script(*TINY, "--num-batches=2", *[f"{flag}={path}" for flag, path in outputs.items()], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / path).stat().st_size > 0 for path in outputs.values())


def test_a_failed_onnx_write_is_one_line_and_keeps_the_previous_model(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    argv = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY, "--num-batches=1", "--save-onnx=m.onnx"]
    assert subprocess.run(argv, cwd=tmp_path, capture_output=True, timeout=300).returncode == 0
    previous = (tmp_path / "m.onnx").read_bytes()
    assert len(previous) > 1000
    full_disk = subprocess.run(
        [*argv, "--numpy-rand-seed=7"],
        cwd=tmp_path,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full_disk.returncode == 2
    assert full_disk.stderr == "dlrm_s_pytorch.py: error: --save-onnx m.onnx: cannot write it (File too large)\n"
    assert (tmp_path / "m.onnx").read_bytes() == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx"]


@pytest.fixture
def export_as_over_2_gb(monkeypatch) -> None:
    """torch's export of a model over 2 GB, for a small one: each weight in a file named after it beside the model,
    and the loop counters of some embedding bags without types (seen with a 9,000,000 x 64 table)."""
    onnx = pytest.importorskip("onnx")
    export = torch.onnx.export

    def over_2_gb(model: torch.nn.Module, inputs: tuple, path: str, **kwargs) -> None:
        export(model, inputs, path, **kwargs)
        proto = onnx.load(path)
        for loop in (node for node in proto.graph.node if node.op_type == "Loop"):
            for counter in loop.attribute[0].g.input[:2]:
                counter.ClearField("type")
        onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)

    monkeypatch.setattr(torch.onnx, "export", over_2_gb)


def test_a_model_over_2_gb_is_written_with_its_weights_in_one_file(
    export_as_over_2_gb: None, tmp_path: Path, monkeypatch, capsys
) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tables.0.weight").write_text("a file of the user's")  # torch writes beside the model
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", "--save-onnx=m.onnx"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^ONNX model written to m.onnx \(.+ MB\), its weights to m.onnx.data \(.+ MB\)$", out, re.M)
    difference = re.search(r"largest difference from PyTorch (\S+)", out)
    assert difference and float(difference[1]) < 1e-5, out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data", "tables.0.weight"]
    assert (tmp_path / "tables.0.weight").read_text() == "a file of the user's"
    weights = onnx.load("m.onnx", load_external_data=False).graph.initializer
    places = [{entry.key: entry.value for entry in tensor.external_data} for tensor in weights]
    assert len(places) >= 4 + 2 * 4 and {place["location"] for place in places} == {"m.onnx.data"}  # tables, layers
    assert all(int(place["offset"]) % dlrm_s_pytorch.ONNX_WEIGHT_ALIGNMENT == 0 for place in places)


def test_save_onnx_without_the_onnx_package_stops_at_start_up(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(dlrm_s_pytorch, "ONNX_INSTALLED", False)  # torch's exporter cannot write a model then
    monkeypatch.chdir(tmp_path)
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", "--save-onnx=m.onnx", "--save-model=m.pt"]) == 2
    needed = "needs the onnx package, which torch's exporter writes with (requirements-extras.txt)"
    assert capsys.readouterr().err == f"dlrm_s_pytorch.py: error: --save-onnx {needed}\n"
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_plot_compute_graph_writes_graphviz_source(tmp_path: Path) -> None:
    pytest.importorskip("torchviz")
    result = run_script(*TINY, "--num-batches=1", "--plot-compute-graph", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    source = (tmp_path / "dlrm_s_pytorch_graph.dot").read_text()
    assert source.startswith("digraph") and "EmbeddingBag" in source


def test_a_failed_compute_graph_write_is_one_line_and_keeps_the_previous_graph(tmp_path: Path) -> None:
    pytest.importorskip("torchviz")
    previous = tmp_path / "dlrm_s_pytorch_graph.dot"
    previous.write_text("digraph { previous }\n")
    full_disk = subprocess.run(
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY, "--num-batches=1", "--plot-compute-graph"],
        cwd=tmp_path,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)),  # the graph takes more
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full_disk.returncode == 2, full_disk.stderr
    refused = "--plot-compute-graph dlrm_s_pytorch_graph.dot: cannot write it (File too large)"
    assert full_disk.stderr == f"dlrm_s_pytorch.py: error: {refused}\n"
    assert previous.read_text() == "digraph { previous }\n"
    assert [path.name for path in tmp_path.iterdir()] == [previous.name]


@pytest.mark.parametrize(
    "package, flags, notice",
    [
        ("torchviz", ["--plot-compute-graph"], "--plot-compute-graph: torchviz is not installed"),
        ("tensorboard", ["--tensorboard=tb"], "--tensorboard: the tensorboard package is not installed"),
        ("mlperf_logging", ["--mlperf-logging"], "--mlperf-logging: the mlperf-logging package is not installed"),
    ],
)
def test_an_optional_package_missing_is_said_in_one_line(
    package: str, flags: list[str], notice: str, tmp_path: Path
) -> None:
    hidden = tmp_path / "hide"
    (hidden / package).mkdir(parents=True)
    (hidden / package / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY, "--num-batches=1", *flags]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(hidden)}
    )
    assert result.returncode == 0, result.stderr
    assert notice in result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["hide"]  # no graph, no event files


def test_synthetic_trace_data_trains(tmp_path: Path) -> None:
    template = tmp_path / "dist_emb_j.log"
    for table in range(4):
        accesses = [(7 * i + table) % 23 for i in range(300)]
        trace_data.write_trace_distribution(trace_data.table_trace_file(str(template), table), accesses)
    argv = [*TINY, "--num-batches=4", "--print-freq=2", "--data-generation=synthetic"]
    result = run_script(*argv, "--data-trace-file", str(template), "--num-workers=2")
    assert result.returncode == 0, result.stderr
    assert [line["it"] for line in finished_lines(result.stdout)] == [2, 4]
    missing = run_script(*argv, "--data-trace-file", str(tmp_path / "absent_j.log"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "--data-trace-file" in missing.stderr and "absent_0.log" in missing.stderr


def test_mlperf_events_name_the_line_that_logged_them(monkeypatch) -> None:
    pytest.importorskip("mlperf_logging")
    log = dlrm_s_pytorch.MLPerfLog(enabled=True)
    lines = []
    monkeypatch.setattr(log.logger, "_do_log", lambda level, message, clear_line=False: lines.append(message))
    log.log("event", "EVAL_ACCURACY", 0.5, epoch_num=0)
    here = sys._getframe().f_lineno - 1
    event = json.loads(lines[0].removeprefix(":::MLLOG "))
    assert (Path(event["metadata"]["file"]).name, event["metadata"]["lineno"]) == (Path(__file__).name, here)
