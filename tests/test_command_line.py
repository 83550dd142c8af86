"""The command line as users meet it: configs, flags, bad input, and the lines the loop prints."""

import json
import os
import re
import resource
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, finished_lines, run_script
from torch.utils._python_dispatch import TorchDispatchMode

import data_utils
import distributed_utils
import dlrm_s_pytorch
import habana_dlrm_ops
from distributed_utils import Ranks

SMALL = ["--config", str(ROOT / "hb_configs" / "small.yaml")]
TINY = ["--arch-embedding-size=20-30", "--arch-mlp-bot=3-4-2", "--arch-mlp-top=4-1", "--mini-batch-size=8"]

# Every flag of the original script (habana_port_notes §1) and of its launcher (SPEC §2).
ORIGINAL_FLAGS = """
--arch-sparse-feature-size --arch-embedding-size --arch-mlp-bot --arch-mlp-top --arch-interaction-op
--arch-interaction-itself --md-flag --md-threshold --md-temperature --md-round-dims --qr-flag --qr-threshold
--qr-operation --qr-collisions --activation-function --loss-function --loss-weights --loss-threshold
--round-targets --data-size --num-batches --data-generation --data-trace-file --data-set --raw-data-file
--processed-data-file --data-randomize --data-trace-enable-padding --max-ind-range --data-sub-sample-rate
--num-indices-per-lookup --num-indices-per-lookup-fixed --num-workers --memory-map --mini-batch-size --nepochs
--learning-rate --print-precision --numpy-rand-seed --sync-dense-params --optimizer --inference-only
--save-onnx --use-gpu --print-freq --test-freq --test-mini-batch-size --test-num-workers --print-time
--debug-mode --enable-profiling --plot-compute-graph --save-model --load-model --mlperf-logging
--mlperf-acc-threshold --mlperf-auc-threshold --mlperf-bin-loader --mlperf-bin-shuffle --no-habana --hmp
--hmp-bf16 --hmp-fp32 --hmp-opt-level --hmp-verbose --distributed --print-dist-loss --log-device-mem-alloc
--run-lazy-mode --measure-perf --print-all-ranks --mode -d --data_type -w --world_size --device --config
""".split()


def test_every_original_flag_is_known() -> None:
    parser = dlrm_s_pytorch.build_parser()
    known = {s for action in parser._actions for s in action.option_strings}
    assert set(ORIGINAL_FLAGS) - known == set()


# The original's defaults (habana_port_notes §1), as the original wrote them; --hmp and --run-lazy-mode are
# aliases here that default to the launcher's fp32 and eager.
ORIGINAL_DEFAULTS = dict(
    arch_sparse_feature_size=2, arch_embedding_size="4-3-2", arch_mlp_bot="4-3-2", arch_mlp_top="4-2-1",
    arch_interaction_op="cat", arch_interaction_itself=False, md_flag=False, md_threshold=200, md_temperature=0.3,
    md_round_dims=False, qr_flag=False, qr_threshold=200, qr_operation="mult", qr_collisions=4,
    activation_function="relu", loss_function="bce", loss_weights="1.0-1.0", loss_threshold=0.0,
    round_targets=False, data_size=8, num_batches=0, data_generation="random",
    data_trace_file="./input/dist_emb_j.log", data_set="kaggle", raw_data_file="", processed_data_file="",
    data_randomize="total", data_trace_enable_padding=False, max_ind_range=-1, data_sub_sample_rate=0.0,
    num_indices_per_lookup=10, num_indices_per_lookup_fixed=False, num_workers=0, memory_map=False,
    mini_batch_size=4, nepochs=1, learning_rate=0.5, print_precision=5, numpy_rand_seed=123,
    sync_dense_params=True, optimizer="sgd", inference_only=False, save_onnx=False, use_gpu=False, print_freq=20,
    test_freq=-1, test_mini_batch_size=-1, test_num_workers=-1, print_time=False, debug_mode=False,
    enable_profiling=False, plot_compute_graph=False, save_model="", load_model="", mlperf_logging=False,
    mlperf_acc_threshold=0.0, mlperf_auc_threshold=0.0, mlperf_bin_loader=False, mlperf_bin_shuffle=False,
    no_habana=False, hmp_bf16="", hmp_fp32="", hmp_opt_level="O1", hmp_verbose=False, distributed=False,
    print_dist_loss=False, log_device_mem_alloc=False, measure_perf=False, print_all_ranks=False,
    data_type="fp32", mode="eager", world_size=1,
)  # fmt: skip


def test_defaults_and_their_types_are_the_originals() -> None:
    parser = dlrm_s_pytorch.build_parser()
    for dest, expected in ORIGINAL_DEFAULTS.items():
        default = parser.get_default(dest)
        assert (dest, default, type(default)) == (dest, expected, type(expected))


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_INPUTS = {
    "unknown choice": (["--arch-interaction-op=sum"], "argument --arch-interaction-op: invalid choice"),
    "non-numeric size": (["--mini-batch-size=abc"], "argument --mini-batch-size: invalid int value"),
    "bad size list": (["--arch-embedding-size=10-x-3"], "argument --arch-embedding-size: expected '-'-separated"),
    "bottom output != feature size": (["--arch-mlp-bot=4-3-3"], "--arch-mlp-bot: its output width 3 must equal"),
    "batch not divisible by world size": (["--mini-batch-size=5", "-w", "2"], "is not divisible by --world_size 2"),
    "zero bag size": (["--num-indices-per-lookup=0"], "--num-indices-per-lookup: must be positive"),
    "threshold out of range": (["--loss-threshold=1.5"], "--loss-threshold: must be in [0, 1)"),
    "one loss weight": (["--loss-weights=1.0"], "argument --loss-weights: expected two numbers"),
    "measure-perf without batches": (["--measure-perf"], "--measure-perf: needs --num-batches > 0"),
    "unknown flag": (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    "dataset without files": (["--data-generation=dataset"], "needs --raw-data-file or --processed-data-file"),
    "test flag on random data": (["--test-freq=5"], "--test-freq: applies only with --data-generation dataset"),
    "trace flag on random data": (["--data-trace-enable-padding"], "applies only with --data-generation synthetic"),
    "save-freq without a file": (["--save-freq=5"], "--save-freq: needs --save-model FILE"),
    "save-model in inference": (["--save-model=m.pt", "--inference-only"], "nothing is trained with --inference-only"),
    "sub-sample rate of one": (
        ["--data-generation=dataset", "--raw-data-file=x", "--data-sub-sample-rate=1"],
        "--data-sub-sample-rate: must be in [0, 1)",
    ),
    "zero index range": (
        ["--data-generation=dataset", "--raw-data-file=x", "--max-ind-range=0"],
        "--max-ind-range: must be positive",
    ),
    "checkpoint nowhere to write": (["--save-model=/dev/null/m.pt"], "--save-model /dev/null/m.pt: cannot be written"),
    "metrics into a folder": (["--metrics-file=/tmp"], "--metrics-file /tmp: not a regular file"),
    "checkpoint onto a device": (["--save-model=/dev/null"], "--save-model /dev/null: not a regular file"),
    "tensorboard into a file": (["--tensorboard=/etc/hostname"], "--tensorboard /etc/hostname: not a folder"),
    "onnx over the checkpoint": (["--load-model=m.pt", "--save-onnx=m.pt"], "would overwrite the --load-model"),
    "onnx over the checkpoint saved": (["--save-model=m.pt", "--save-onnx=./m.pt"], "would overwrite the --save-model"),
    "metrics over the checkpoint": (["--save-model=m.pt", "--metrics-file=m.pt"], "would overwrite the --save-model"),
    "profile table over the metrics": (
        ["--metrics-file=dlrm_s_pytorch.prof", "--enable-profiling"],
        "--enable-profiling dlrm_s_pytorch.prof: would overwrite the --metrics-file file",
    ),
    "rank 1's profile over the metrics": (
        ["--metrics-file=dlrm_s_pytorch.rank1.json", "--enable-profiling", "-w", "2", "--mini-batch-size=4"],
        "--enable-profiling dlrm_s_pytorch.rank1.json: would overwrite the --metrics-file file",
    ),
    "rank 1's checkpoint over the metrics": (
        ["--save-model=m.pt", "--metrics-file=m.pt.rank1", "-w", "2", "--mini-batch-size=4"],
        "--metrics-file m.pt.rank1: would overwrite the --save-model file",
    ),
    "rank 0's checkpoint over rank 1's loaded": (
        ["--load-model=m.pt", "--save-model=m.pt.rank1", "-w", "2", "--mini-batch-size=4"],
        "--save-model m.pt.rank1: would overwrite the --load-model file",
    ),
    "tensorboard where the metrics go": (["--metrics-file=m", "--tensorboard=m"], "--tensorboard m: would overwrite"),
    "checkpoint over the data": (
        ["--data-generation=dataset", "--processed-data-file=d.npz", "--save-model=d.npz"],
        "--save-model d.npz: would overwrite the --processed-data-file file",
    ),
    "checkpoint over a processed day": (
        ["--data-generation=dataset", "--raw-data-file=train.txt", "--save-model=train_day_2_processed.npz"],
        "--save-model train_day_2_processed.npz: would overwrite the Criteo data's file",
    ),
    "processed file that is the raw data": (
        ["--data-generation=dataset", "--raw-data-file=train.txt", "--processed-data-file=train.txt"],
        "--processed-data-file train.txt: is the --raw-data-file",
    ),
    "more batches than an index": (["--num-batches=99999999999999999999"], "--num-batches: must be below 2**62"),
    "index range past an index": (
        ["--data-generation=dataset", "--raw-data-file=x", "--max-ind-range=99999999999999999999"],
        "--max-ind-range: must be below 2**62",
    ),
    "learning rate beyond float32": (["--learning-rate=1e39"], "--learning-rate: must fit in float32, got 1e+39"),
    "loss weights without wbce": (["--loss-weights=5-9"], "--loss-weights: applies only with --loss-function wbce"),
    "infinite loss weight": (["--loss-function=wbce", "--loss-weights=inf-1"], "--loss-weights: must be finite"),
    "test batch size below -1": (
        ["--data-generation=dataset", "--raw-data-file=x", "--test-freq=5", "--test-mini-batch-size=-3"],
        "--test-mini-batch-size: must be -1 (the default) or more, got -3",
    ),
    "random-data flag on Criteo": (
        ["--data-generation=dataset", "--raw-data-file=x", "--num-indices-per-lookup-fixed"],
        "--num-indices-per-lookup-fixed: applies only with --data-generation random or synthetic",
    ),
    "test flag with no test": (
        ["--data-generation=dataset", "--raw-data-file=x", "--test-num-workers=2"],
        "--test-num-workers: applies only with --test-freq (or --inference-only)",
    ),
    "test frequency of an evaluation": (
        ["--data-generation=dataset", "--raw-data-file=x", "--test-freq=5", "--inference-only"],
        "--test-freq: applies only to training (--inference-only evaluates the test split once)",
    ),
    "config that never ends": (["--config=/dev/zero"], "--config /dev/zero: not a regular file"),
    "ranks by the thousand": (["-w", "4000", "--mini-batch-size=4000"], "--world_size 4000: more than 4 ranks"),
    "onnx from two ranks": (["--save-onnx", "--world_size=2", "--mini-batch-size=4"], "needs one rank"),
    "qr not supported": (["--qr-flag"], "--qr-flag is not supported"),
    "activation other than relu": (["--activation-function=sigmoid"], "--activation-function is not supported"),
    "op list without bf16": (["--hmp-bf16=ops.txt"], "--hmp-bf16: applies only with --data_type bf16"),
    "O2 without bf16": (["--hmp-opt-level=O2"], "--hmp-opt-level O2: applies only with --data_type bf16"),
    "opt level not O1 or O2": (["--hmp", "--hmp-opt-level=O3"], "--hmp-opt-level: invalid choice: 'O3'"),
    "missing config": (["--config=/nonexistent.yaml"], "--config /nonexistent.yaml: No such file or directory"),
    "top MLP not ending in 1": (["--arch-mlp-top=4-2"], "--arch-mlp-top: the last width must be 1"),
    "tables larger than memory": (["--arch-embedding-size=900000000000"], "more than this machine's"),
    "negative seed": (["--numpy-rand-seed=-1"], "--numpy-rand-seed: must be in [0, 2**32)"),
    "learning rate not a number": (["--learning-rate=nan"], "--learning-rate: must be a finite number, got nan"),
    "infinite learning rate": (["--learning-rate=inf"], "--learning-rate: must be a finite number, got inf"),
    "interaction-itself with cat": (["--arch-interaction-itself"], "applies only with --arch-interaction-op dot"),
    "config not text": (["--config=/bin/sh"], "--config /bin/sh: not a text file"),
    "loader processes by the thousand": (["--num-workers=100000"], "more than 4 loader processes for each of"),
}


@pytest.mark.parametrize("output", ["--save-model", "--metrics-file", "--save-onnx"])
def test_an_output_over_the_scripts_own_source_is_refused(output: str) -> None:
    source = ROOT / "data_utils.py"  # parsed only: a check that let it through would train nothing here
    with pytest.raises(dlrm_s_pytorch.UsageError, match="would overwrite the training script's file"):
        dlrm_s_pytorch.parse_command_line([f"{output}={source}"])


@pytest.mark.parametrize("name", ["day_2", "day_fea_dict_25.npz", "terabyte_processed_test.bin"])
def test_an_output_over_a_terabyte_file_is_refused(tmp_path, name: str) -> None:
    for day in range(3):
        write(tmp_path, f"day_{day}", "")
    argv = ["--data-generation=dataset", "--data-set=terabyte", f"--raw-data-file={tmp_path / 'day'}"]
    with pytest.raises(dlrm_s_pytorch.UsageError, match=f"{name}: would overwrite the Criteo data's file"):
        dlrm_s_pytorch.parse_command_line([*argv, f"--metrics-file={tmp_path / name}"])
    dlrm_s_pytorch.parse_command_line([*argv, f"--metrics-file={tmp_path / 'day_3'}"])  # no such day: not data


def test_an_output_over_one_tables_trace_file_is_refused(tmp_path) -> None:
    argv = ["--data-generation=synthetic", f"--data-trace-file={tmp_path / 'trace_j.log'}"]
    with pytest.raises(dlrm_s_pytorch.UsageError, match="trace_1.log: would overwrite the --data-trace-file file"):
        dlrm_s_pytorch.parse_command_line([*argv, f"--save-model={tmp_path / 'trace_1.log'}"])
    dlrm_s_pytorch.parse_command_line([*argv, f"--save-model={tmp_path / 'trace_3.log'}"])  # 3 tables: 0 to 2


def test_two_ranks_may_resume_in_place(tmp_path) -> None:
    checkpoint = write(tmp_path, "m.pt", "")
    write(tmp_path, "m.pt.rank1", "")
    argv = [f"--load-model={checkpoint}", f"--save-model={checkpoint}", "-w", "2", "--mini-batch-size=4"]
    dlrm_s_pytorch.parse_command_line(argv)  # each rank's file is renamed over the one that rank loaded


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(name: str, capsys, tmp_path, monkeypatch) -> None:
    argv, message = BAD_INPUTS[name]
    monkeypatch.chdir(tmp_path)  # a check that failed would train, and write its relative outputs here
    assert dlrm_s_pytorch.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("dlrm_s_pytorch.py: error: "), err
    assert message in err


@pytest.mark.parametrize(
    "config, message",
    [
        ("model: dlrm\nparameters: {mini-batch-size: 8}\nextra: 1\n", "unknown key 'extra'"),
        ("model: dlrm\nparameters: {mini-batch-sise: 8}\n", "unknown parameter 'mini-batch-sise'"),
        ("model: dlrm\nparameters: {store_true: [mini-batch-size]}\n", "'mini-batch-size' in store_true"),
        ("model: resnet\n", "this script trains 'dlrm'"),
        ("model: [dlrm\n", "not valid YAML"),
        ("model: dlrm\nparameters:\n\tmini-batch-size: 8\n", "YAML (line 3: found character '\\t' that cannot start"),
        ("model: dlrm\n---\nmodel: dlrm\n", "YAML (line 2: expected a single document in the stream, but found"),
        ("model: dlrm\nparameters: [mini-batch-size]\n", "must be mappings"),
        ("model: dlrm\nparameters: {store_true: print-time}\n", "'store_true' must be a list"),
        ("model: dlrm\nparameters: {config: b.yaml}\n", "'config' cannot be a parameter (a config cannot name"),
        ("model: dlrm\nparameters: {store_true: [help]}\n", "'help' in store_true is not an on/off flag"),
        ("model: dlrm\nparameters: {round-targets: true}\n", "'round-targets' is an on/off flag"),
        ("model: dlrm\nenv_variables: {A=B: 1}\n", "'A=B' cannot be an environment variable"),
        ('model: dlrm\nenv_variables: {A: "\\ud800"}\n', "'A' cannot be an environment variable"),
        ('model: dlrm\nparameters: {save-model: "a\\0b"}\n', "'save-model' is 'a\\x00b', which no command line"),
        ('model: dlrm\nparameters: {metrics-file: "\\ud800"}\n', "'metrics-file' is '\\ud800', which no command"),
        ("model: dlrm\nparameters: {metrics-file: }\n", "'metrics-file' has no value"),
        ("model: dlrm\nparameters: {save-onnx: false}\n", "'save-onnx' is the YAML boolean False"),
        ("model: dlrm\nparameters: {save-model: yes}\n", "'save-model' is the YAML boolean True"),
        ("model: dlrm\n1: a\n", "unknown key '1'"),
        ("model: dlrm\nparameters: {? [a, b] : 1}\n", "not valid YAML (line 2: found unhashable key)"),
        (
            "model: dlrm\nparameters:\n  mini-batch-size: 8\n  mini-batch-size: 16\n",
            "not valid YAML ('mini-batch-size' is given twice, on lines 3 and 4)",
        ),
        ("model: dlrm\nparameters: &a {mini-batch-size: 8}\nenv_variables: *a\n", "YAML aliases (*name)"),
        ("model: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),  # deeper only parses longer
    ],
)
def test_bad_config_names_what_is_wrong(tmp_path, capsys, config: str, message: str) -> None:
    assert dlrm_s_pytorch.main(["--config", write(tmp_path, "bad.yaml", config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "config, message",
    [
        ("parameters: {save-model: [a, b]}", "'save-model' is ['a', 'b']: give one value"),
        ("parameters: {metrics-file: {a: 1}}", "'metrics-file' is {'a': 1}: give one value"),
        ("env_variables: {A: [1, 2]}", "environment variable 'A' is [1, 2]: give text (quoted) or a number"),
        ("env_variables: {A: true}", "environment variable 'A' is True: give text (quoted) or a number"),
        ("env_variables: {null: 1}", "environment variable name None is not text"),
        ("env_variables: {ON: 1}", "environment variable name True is not text"),
    ],
)
def test_a_config_value_that_is_not_one_value_is_refused(tmp_path, config: str, message: str) -> None:
    path = write(tmp_path, "bad.yaml", f"model: dlrm\n{config}\n")  # parsed only: an env variable would restart
    with pytest.raises(dlrm_s_pytorch.UsageError, match=re.escape(message)):
        dlrm_s_pytorch.parse_command_line(["--config", path])


@pytest.mark.parametrize(
    "flags",
    [["--load-model"], ["--data-generation=dataset", "--processed-data-file"], ["--data-generation=synthetic",
     "--data-trace-file"]],
)  # fmt: skip
def test_an_input_file_that_is_a_pipe_is_refused_not_waited_on(tmp_path, flags: list[str]) -> None:
    os.mkfifo(tmp_path / "pipe")  # reading it waits for a writer, forever
    result = run_script(*TINY, *flags, str(tmp_path / "pipe"), timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"{tmp_path / 'pipe'}: not a regular file" in result.stderr


@pytest.mark.parametrize(
    "flags",
    [["--config"], ["--load-model"], ["--save-model"], ["--metrics-file"], ["--save-onnx"], ["--tensorboard"],
     ["--hmp", "--hmp-bf16"], ["--data-generation=dataset", "--processed-data-file"],
     ["--data-generation=synthetic", "--data-trace-file"]],
)  # fmt: skip
def test_a_file_name_too_long_is_one_line(tmp_path, monkeypatch, capsys, flags: list[str]) -> None:
    monkeypatch.chdir(tmp_path)  # a check that failed would train, and write its relative outputs here
    assert dlrm_s_pytorch.main([*TINY, *flags, "n" * 300]) == 2  # file systems allow 255 bytes a name
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dlrm_s_pytorch.py: error: {flags[-1]}"), err
    assert "File name too long" in err and os.listdir(tmp_path) == [], err


@pytest.mark.parametrize("flag", ["--save-model", "--metrics-file", "--save-onnx", "--tensorboard"])
def test_an_output_name_too_long_in_a_missing_folder_stops_before_the_run(tmp_path, monkeypatch, capsys, flag) -> None:
    monkeypatch.chdir(tmp_path)  # the folder is made for the output: only once the run is over, for a checkpoint
    assert dlrm_s_pytorch.main([*TINY, flag, "new/" + "n" * 300]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f"{flag} new/{'n' * 300}: File name too long\n"), err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag", ["--save-model", "--save-onnx"])
def test_an_output_whose_temporary_name_is_too_long_stops_before_the_run(tmp_path, monkeypatch, capsys, flag) -> None:
    monkeypatch.chdir(tmp_path)
    fits = "n" * (255 - data_utils.TEMPORARY_NAME_EXTRA)  # with the temporary name's pid and random part
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", flag, fits]) == 0
    assert fits in os.listdir(tmp_path)
    capsys.readouterr()
    too_long = "n" * 250  # fits the file system, but not its temporary name
    assert dlrm_s_pytorch.main([*TINY, flag, too_long]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"dlrm_s_pytorch.py: error: {flag} {too_long}: File name too long")
    assert "Finished training" not in out and too_long not in os.listdir(tmp_path), out


def test_an_environment_variable_without_a_value_is_refused(tmp_path) -> None:
    config = write(tmp_path, "env.yaml", "model: dlrm\nenv_variables: {TEMP_DIR: }\n")
    result = run_script("--config", config, *TINY, "--num-batches=1")  # a process: the variables restart the script
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "environment variable 'TEMP_DIR' has no value" in result.stderr


def test_an_environment_too_large_to_restart_with_is_one_line(tmp_path) -> None:
    config = write(tmp_path, "env.yaml", f"model: dlrm\nenv_variables: {{BIG: {'x' * 200_000}}}\n")
    result = run_script("--config", config, *TINY, "--num-batches=1")  # Linux takes at most 128 KiB a variable
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot restart with its env_variables (Argument list too long)" in result.stderr


def test_an_environment_variable_python_changes_at_start_up_stops_the_run_not_restarts_it_forever(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "PYTHONCOERCECLOCALE")}
    probe = [sys.executable, "-c", "import os; print(os.environ['LC_CTYPE'])"]
    if subprocess.run(probe, env={**env, "LC_CTYPE": "C"}, capture_output=True, text=True).stdout != "C.UTF-8\n":
        pytest.skip("Python does not coerce the C locale here (PEP 538)")
    config = write(tmp_path, "env.yaml", "model: dlrm\nenv_variables: {LC_CTYPE: C}\n")
    command = [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), "--config", config, *TINY, "--num-batches=1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "LC_CTYPE=C does not hold: the restarted script finds LC_CTYPE=C.UTF-8" in result.stderr


def test_bad_input_from_a_real_process_has_no_traceback() -> None:
    result = run_script("--arch-interaction-op=sum")
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_small_config_runs_and_flags_override_it() -> None:
    result = run_script(*SMALL, "--num-batches=7", "--print-freq=3")
    assert result.returncode == 0, result.stderr
    lines = finished_lines(result.stdout)
    assert [line["it"] for line in lines] == [3, 6, 7]
    assert all(line["nbatches"] == 7 and line["ms"] > 0 for line in lines)
    assert all(30 < line["accuracy"] < 70 for line in lines)  # rounded targets, an untrained model


def test_a_second_config_is_refused_not_put_in_place_of_the_first(tmp_path, capsys) -> None:
    first = write(tmp_path, "a.yaml", "model: dlrm\nparameters: {mini-batch-size: 8}\n")
    second = write(tmp_path, "b.yaml", "model: dlrm\nparameters: {learning-rate: 0.1}\n")
    assert dlrm_s_pytorch.main(["--config", first, "--config", second]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--config: given twice, {first!r} and {second!r}: give one" in err, err


def test_a_config_may_switch_on_the_onnx_export_as_the_original_did(tmp_path) -> None:
    pytest.importorskip("onnx")  # without it, --save-onnx is refused at start-up
    config = write(tmp_path, "onnx.yaml", "model: dlrm\nparameters:\n  store_true: [save-onnx]\n")
    args, _, _ = dlrm_s_pytorch.parse_command_line(["--config", config])
    assert args.save_onnx == "dlrm_s_pytorch.onnx"


def test_config_environment_reaches_torch_once(tmp_path) -> None:
    config = write(tmp_path, "env.yaml", "model: dlrm\nenv_variables: {OMP_NUM_THREADS: 1}\nparameters: {}\n")
    result = run_script("--config", config, *TINY, "--debug-mode", "--num-batches=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Environment from --config: OMP_NUM_THREADS=1") == 1
    assert "torch threads: 1\n" in result.stdout


def test_divergence_stops_with_one_line() -> None:
    result = run_script(*TINY, "--learning-rate=1e30", "--num-batches=5")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "the scores are not finite" in result.stderr


EMULATED_BF16 = pytest.mark.skipif(
    habana_dlrm_ops.Backend(lazy=False).emulates_bf16(), reason="this CPU emulates bf16: a medium step takes minutes"
)


@pytest.mark.parametrize(
    "config",
    [
        "single_node_dlrm_eager_medium_fp32.yaml",
        pytest.param("single_node_dlrm_eager_medium_bf16.yaml", marks=EMULATED_BF16),
    ],
)
def test_medium_configuration_trains_two_iterations(config: str) -> None:
    result = run_script("--config", str(ROOT / "hb_configs" / config), "--num-batches=2")
    assert result.returncode == 0, result.stderr
    [line] = finished_lines(result.stdout)
    assert (line["it"], line["nbatches"], line["ms"] > 0) == (2, 2, True)
    assert 0.5 < line["loss"] < 1.0


def test_without_print_time_ms_is_minus_one() -> None:
    result = run_script(*TINY, "--num-batches=4", "--print-freq=2", "--num-workers=2")
    assert result.returncode == 0, result.stderr
    assert [line["ms"] for line in finished_lines(result.stdout)] == [-1.0, -1.0]


def test_measure_perf_replays_one_batch() -> None:
    result = run_script(*TINY, "--num-batches=3", "--print-freq=1", "--measure-perf", "--inference-only")
    assert result.returncode == 0, result.stderr
    losses = [line["loss"] for line in finished_lines(result.stdout)]
    assert len(losses) == 3 and len(set(losses)) == 1  # the same batch, and no training between


def test_bf16_with_the_original_op_lists(tmp_path) -> None:
    bf16 = write(tmp_path, "ops_bf16_dlrm.txt", "addmm\nbmm\ndot\nmm\nmv\nlinear\n")
    fp32 = write(
        tmp_path, "ops_fp32_dlrm.txt", "binary_cross_entropy\nmse_loss\nembedding_bag_sum_fwd\nembedding_bag_sum_bwd\n"
    )
    result = run_script(*TINY, "--hmp", "--hmp-bf16", bf16, "--hmp-fp32", fp32, "--hmp-verbose", "--num-batches=2")
    assert result.returncode == 0, result.stderr
    assert "bf16 ops: addmm, bmm, dot, linear, mm, mv" in result.stdout
    assert len(finished_lines(result.stdout)) == 1


def test_bf16_runs_matrix_products_in_bf16_and_keeps_the_rest_fp32() -> None:
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*TINY, "--arch-interaction-op=dot", "-d", "bf16"])
    args.optimizer, args.num_batches = "adagrad", 2
    model = dlrm_s_pytorch.DLRM(args, sizes)
    seen = {}

    def record_output_dtype(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = output.dtype

        return hook

    modules = [("bottom", model.dense.bottom_mlp[0]), ("top", model.dense.top_mlp[0]), ("table", model.embeddings[0])]
    for name, module in modules:
        module.register_forward_hook(record_output_dtype(name))
    backend = habana_dlrm_ops.Backend(lazy=False)
    ranks = Ranks(0, 1, 0, 1)
    data = dlrm_s_pytorch.RandomDataset(args, sizes)
    loader = dlrm_s_pytorch.make_loader(args, data, sizes, backend, model.shards, ranks)
    assert dlrm_s_pytorch.Trainer(args, model, backend, (loader, None), ranks).run() == 0
    assert seen == dict(bottom=torch.bfloat16, top=torch.bfloat16, table=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert {t.moments.dtype for t in model.embeddings} == {torch.float32}


def test_bf16_on_a_cpu_that_emulates_it_says_so() -> None:
    result = run_script(*TINY, "--num-batches=1", "-d", "bf16")
    assert result.returncode == 0, result.stderr
    emulated = habana_dlrm_ops.Backend(lazy=False).emulates_bf16()
    assert ("bf16: this CPU has no bf16 matrix products" in result.stdout) == emulated


def test_bf16_dot_interaction_multiplies_in_bf16() -> None:
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*TINY, "--arch-interaction-op=dot", "-d", "bf16"])
    dense = dlrm_s_pytorch.DensePath(args, sizes, habana_dlrm_ops.TorchKernels())
    products = []

    class RecordProducts(TorchDispatchMode):  # sees each op as it runs, after autocast has cast its inputs
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("addmm", "bmm", "mm"):
                products.append((func.overloadpacket.__name__, {a.dtype for a in (*args, out) if torch.is_tensor(a)}))
            return out

    with RecordProducts():
        dense(torch.rand(8, 3), [torch.rand(8, 2), torch.rand(8, 2)], torch.ones(8, 1))
    assert ("bmm", {torch.bfloat16}) in products
    assert all(dtypes == {torch.bfloat16} for _, dtypes in products), products


@pytest.mark.parametrize("test_num_workers, expected", [(-1, 2), (0, 0), (1, 1)])
def test_test_num_workers_sets_the_test_loaders_processes(test_num_workers: int, expected: int) -> None:
    args, sizes, _ = dlrm_s_pytorch.parse_command_line([*TINY, "--num-workers=2"])
    args.test_num_workers = test_num_workers  # a Criteo flag: set past the check that random data has no test split
    data, backend = dlrm_s_pytorch.RandomDataset(args, sizes), habana_dlrm_ops.Backend(lazy=False)
    shards, ranks = [distributed_utils.Shard(0, 0, 20, 0), distributed_utils.Shard(1, 0, 30, 0)], Ranks(0, 1, 0, 1)
    test_loader = dlrm_s_pytorch.make_loader(args, data, sizes, backend, shards, ranks, test=True)
    train_loader = dlrm_s_pytorch.make_loader(args, data, sizes, backend, shards, ranks)
    assert (test_loader.num_workers, train_loader.num_workers) == (expected, 2)


def test_bf16_stays_close_to_fp32() -> None:
    fp32 = finished_lines(run_script(*SMALL, "--num-batches=20").stdout)
    bf16 = finished_lines(run_script(*SMALL, "--num-batches=20", "-d", "bf16").stdout)
    assert len(fp32) == len(bf16) == 1
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.02)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # the matrix products really ran in bf16


def test_profiling_writes_a_trace(tmp_path) -> None:
    result = run_script(*TINY, "--num-batches=2", "--enable-profiling", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    trace = json.loads((tmp_path / "dlrm_s_pytorch.json").read_text())
    assert any("embedding_bag" in event.get("name", "") for event in trace["traceEvents"])
    assert "Self CPU" in (tmp_path / "dlrm_s_pytorch.prof").read_text()


def test_a_trace_that_cannot_be_written_is_one_line_and_leaves_no_file(tmp_path) -> None:
    full_disk = subprocess.run(  # files over 256 kB cannot be written, as on a full disk: the trace is larger
        [sys.executable, str(ROOT / "dlrm_s_pytorch.py"), *TINY, "--num-batches=2", "--enable-profiling"],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2**18, 2**18)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full_disk.returncode == 2 and "Traceback" not in full_disk.stderr, full_disk.stderr
    assert "error: --enable-profiling dlrm_s_pytorch.json: cannot write it (is the disk full?)" in full_disk.stderr
    assert "Profile written" not in full_disk.stdout
    assert list(tmp_path.iterdir()) == []  # neither the trace nor a temporary file


def test_a_profile_file_that_cannot_be_written_stops_the_run_before_it_starts(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dlrm_s_pytorch.prof").mkdir()  # the table of the slowest ops, written after training
    assert dlrm_s_pytorch.main([*TINY, "--num-batches=1", "--enable-profiling"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--enable-profiling dlrm_s_pytorch.prof: not a regular file" in err, err


def test_debug_mode_and_memory_log_print_what_they_promise() -> None:
    result = run_script(*TINY, "--num-batches=1", "--debug-mode", "--log-device-mem-alloc", "--print-precision=2")
    assert result.returncode == 0, result.stderr
    assert "EmbeddingBag(20, 2, mode=sum)" in result.stdout
    assert re.search(r"^Peak resident memory: \d+\.\d MB$", result.stdout, re.M)
    assert re.search(r"^updated top_mlp\.0\.weight:", result.stdout, re.M)
    assert re.search(r"dense tensor\(\[\[0\.\d\d, ", result.stdout)  # two decimals, as asked


def readme_command_lines() -> list[list[str]]:
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.split()[2:] for line in lines if line.startswith("python dlrm_s_pytorch.py ")]


def test_readme_command_lines_parse_as_documented() -> None:
    """The original README's two commands: lazy bf16 and eager fp32, on the medium model."""
    commands = [argv for argv in readme_command_lines() if "--arch-embedding-size" in argv]
    assert len(commands) == 2
    parsed = [dlrm_s_pytorch.parse_command_line(argv) for argv in commands]
    assert [(args.mode, args.data_type) for args, _, _ in parsed] == [("lazy", "bf16"), ("eager", "fp32")]
    for args, sizes, _ in parsed:
        assert (sizes.tables, sizes.top[0], args.optimizer) == ([3000000], 128, "adagrad")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "hb_configs").glob("*.yaml")))
def test_every_shipped_config_parses(config: str) -> None:
    args, sizes, env = dlrm_s_pytorch.parse_command_line(["--config", str(ROOT / "hb_configs" / config)])
    assert args.mode == ("lazy" if "_lazy_" in config else "custom")
    assert args.print_time and sizes.top[-1] == 1
