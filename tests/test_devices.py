"""The device decisions of lthmpi/devices.py, on CPU: which GPU a rank takes, its memory share, the kernels and
call shape per device, the one line for an op without a deterministic GPU kernel; the set-up's choice of
TensorFlow build; and the device, precision and determinism every task records."""
from __future__ import annotations

import os
import subprocess

import pytest

from lthmpi.config import ConfigError, from_dict
from lthmpi.validation import validate
from lthmpi.devices import (CUDA_CONTEXT_MB, MIN_SHARE_MB, RESERVE, DeviceError, NodeSlot, Placement, assign_gpu,
                            determinism_error_line, kernel_plan, memory_share_mb, parse_gpu_memory, place)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpus_of(local_size: int, gpus: int, visible=()) -> list[tuple[int, str, int]]:
    return [assign_gpu(NodeSlot(r, local_size, tuple(visible)), gpus) for r in range(local_size)]


@pytest.mark.parametrize("local_size, gpus, expected", [
    (1, 1, [(0, "0", 1)]),
    (1, 4, [(0, "0", 1)]),  # one rank on a 4-GPU node: the first GPU, alone
    (4, 4, [(0, "0", 1), (1, "1", 1), (2, "2", 1), (3, "3", 1)]),
    (2, 1, [(0, "0", 2), (0, "0", 2)]),  # two ranks share the one GPU
    (5, 2, [(0, "0", 3), (1, "1", 2), (0, "0", 3), (1, "1", 2), (0, "0", 3)]),  # more ranks than GPUs: r mod G
    (8, 3, [(0, "0", 3), (1, "1", 3), (2, "2", 2), (0, "0", 3), (1, "1", 3), (2, "2", 2), (0, "0", 3), (1, "1", 3)]),
])
def test_rank_r_takes_gpu_r_mod_g_and_counts_who_shares_it(local_size, gpus, expected):
    assert gpus_of(local_size, gpus) == expected
    for r, (index, _, sharing) in enumerate(expected):  # the count is the number of ranks mapped there
        assert sharing == sum(1 for q in range(local_size) if q % gpus == index)


def test_per_rank_visible_devices_are_not_counted_as_sharing():
    # a launcher that binds one GPU per rank (SLURM --gpu-bind): each rank sees G = 1, its own GPU
    assert gpus_of(4, 1, ["0", "1", "2", "3"]) == [(0, "0", 1), (0, "1", 1), (0, "2", 1), (0, "3", 1)]
    # two GPUs bound per pair of ranks: ranks 0 and 1 see "4,5", ranks 2 and 3 see "6,7"
    assert gpus_of(4, 2, ["4,5", "4,5", "6,7", "6,7"]) == [(0, "4", 1), (1, "5", 1), (0, "6", 1), (1, "7", 1)]
    # every rank sees the same two GPUs: three ranks, ranks 0 and 2 on GPU 2
    assert gpus_of(3, 2, ["2,3"] * 3) == [(0, "2", 2), (1, "3", 1), (0, "2", 2)]


def test_bad_slots_are_refused():
    with pytest.raises(ValueError, match="not in"):
        assign_gpu(NodeSlot(3, 3), 1)
    with pytest.raises(ValueError, match="at least one GPU"):
        assign_gpu(NodeSlot(0, 1), 0)
    with pytest.raises(ValueError, match="2 CUDA_VISIBLE_DEVICES values for 3"):
        assign_gpu(NodeSlot(0, 3, ("0", "1")), 2)


def test_memory_share_splits_the_gpu_and_leaves_room_for_each_cuda_context():
    total = 143771  # an H200, MiB
    assert memory_share_mb(total, 1) is None  # alone: TensorFlow's default
    assert memory_share_mb(None, 4) is None  # size unknown: memory growth instead
    for n in (2, 3, 8):
        share = memory_share_mb(total, n)
        assert share == int(total * (1 - RESERVE) / n) - CUDA_CONTEXT_MB
        assert n * (share + CUDA_CONTEXT_MB) <= total  # the shares fit, context included
    assert memory_share_mb(total, 2) > 2 * memory_share_mb(total, 4)


def test_too_many_ranks_on_one_gpu_is_one_line_that_says_how_many_fit():
    with pytest.raises(DeviceError) as e:
        memory_share_mb(8000, 6, gpu="1")
    line = str(e.value)
    assert "\n" not in line and "6 ranks share GPU 1 (8000 MiB)" in line and "start at most 4 ranks per GPU" in line
    assert memory_share_mb(8000, 4) >= MIN_SHARE_MB  # and 4 do fit


def test_placement_per_device_setting():
    slot = NodeSlot(1, 2)
    assert place("cpu", slot, gpus=2) == Placement("cpu")
    assert place("auto", slot, gpus=0) == Placement("cpu")
    p = place("auto", slot, gpus=2, total_mb=80000)
    assert (p.kind, p.gpu, p.sharing, p.memory_limit_mb, p.label) == ("gpu", 1, 1, None, "gpu:1")
    p = place("gpu", NodeSlot(1, 3), gpus=2, total_mb=80000)
    assert (p.gpu, p.sharing, p.label) == (1, 1, "gpu:1")
    p = place("gpu", NodeSlot(2, 3), gpus=2, total_mb=80000)
    assert (p.gpu, p.sharing, p.memory_limit_mb) == (0, 2, memory_share_mb(80000, 2))
    assert Placement("cpu").label == "cpu"


@pytest.mark.parametrize("cuda, words", [(False, ["CPU-only build", "LTHMPI_DEVICE=gpu ./run/setup.sh"]),
                                         (True, ["CUDA build", "nvidia-smi"])])
def test_gpu_requested_without_a_gpu_is_one_line(cuda, words):
    with pytest.raises(DeviceError) as e:
        place("gpu", NodeSlot(), gpus=0, host="node7", built_with_cuda=cuda)
    line = str(e.value)
    assert isinstance(e.value, ConfigError) and "\n" not in line
    for w in ['parallel.device = "gpu"', "no GPU on node7", 'parallel.device = "auto"', *words]:
        assert w in line, (w, line)


def test_kernel_plan_per_device():
    gpu = kernel_plan("gpu", convolutions=True, sparse_below=0.3)
    assert (gpu.fused, gpu.jit, gpu.sparse_below) == (True, True, 0.0) and "CPU-only" in gpu.why
    assert kernel_plan("gpu", convolutions=False, sparse_below=0.3).sparse_below == 0.0  # masked MLPs: dense
    conv = kernel_plan("cpu", convolutions=True, sparse_below=0.3)
    assert not conv.fused and not conv.jit and conv.sparse_below == 0.3  # oneDNN graph, one step per call
    dense = kernel_plan("cpu", convolutions=False, sparse_below=0.3)
    assert dense.fused and dense.jit and dense.sparse_below == 0.3
    mixed = kernel_plan("cpu", convolutions=False, sparse_below=0.3, precision="mixed_bfloat16")
    assert mixed.fused and mixed.sparse_below == 0.0 and "float32" in mixed.why


@pytest.mark.parametrize("message, op, node", [
    ("{{function_node __wrapped__ResizeNearestNeighborGrad_device_/job:localhost/replica:0/task:0/device:GPU:0}} "
     "A deterministic GPU implementation of ResizeNearestNeighborGrad is not currently available. "
     "[Op:ResizeNearestNeighborGrad]", "ResizeNearestNeighborGrad", None),
    ("Deterministic GPU implementation of SoftmaxCrossEntropyWithLogits not available.",
     "SoftmaxCrossEntropyWithLogits", None),
    ("A deterministic GPU implementation of fused batch-norm backprop, when training is disabled, is not currently "
     "available.", "fused batch-norm backprop", None),
    ("Detected at node gradient_tape/sequential/max_pooling2d_3/MaxPool/MaxPoolGrad defined at (most recent call "
     "last):\n<stack traces unavailable>\nGPU MaxPool gradient ops do not yet have a deterministic XLA implementation."
     "\n\t [[{{node gradient_tape/sequential/max_pooling2d_3/MaxPool/MaxPoolGrad}}]]",
     "GPU MaxPool gradient ops", "gradient_tape/sequential/max_pooling2d_3/MaxPool/MaxPoolGrad"),
])
def test_an_op_without_a_deterministic_kernel_becomes_one_line_naming_it(message, op, node):
    line = determinism_error_line(message)
    assert line is not None and "\n" not in line
    assert f"no deterministic kernel for {op}" in line and "train.deterministic = false" in line
    assert (f"(at {node})" in line) if node else "(at " not in line


def test_other_errors_are_not_taken_for_determinism():
    assert determinism_error_line("OOM when allocating tensor with shape[128,64,32,32]") is None
    assert determinism_error_line("") is None


def test_nvidia_smi_memory_parsing():
    assert parse_gpu_memory("143771\n143771\n") == [143771, 143771]
    assert parse_gpu_memory("81559 MiB\n\n[N/A]\n") == [81559]
    assert parse_gpu_memory("") == []


def test_precision_is_part_of_the_identity_and_device_is_not():
    base = from_dict({})
    assert (base.train.precision, base.train.deterministic, base.parallel.device) == ("float32", True, "auto")
    assert from_dict({"parallel": {"device": "cpu"}}).hash() == base.hash()
    assert from_dict({"train": {"precision": "mixed_bfloat16"}}).hash() != base.hash()
    assert from_dict({"train": {"deterministic": False}}).hash() != base.hash()
    for bad, words in (({"train": {"precision": "fp16"}}, "train.precision 'fp16' is unknown"),
                       ({"parallel": {"device": "GPU"}}, "parallel.device 'GPU' is unknown"),
                       ({"train": {"deterministic": "no"}}, "train.deterministic must be true or false")):
        with pytest.raises(ConfigError, match=words):
            validate(from_dict(bad))


def with_nvidia_smi(tmp_path, gpus: int) -> dict:
    """The environment with an nvidia-smi first on PATH that lists `gpus` GPUs (0: fails, as without a driver)."""
    fake = tmp_path / f"bin{gpus}"
    fake.mkdir(exist_ok=True)
    listing = "".join(f'echo "GPU {i}: NVIDIA H200 (UUID: GPU-{i})"; ' for i in range(gpus))
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\n{listing}exit {0 if gpus else 9}\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "LTHMPI_DEVICE"}
    env["PATH"] = f"{fake}:{env['PATH']}"
    return env


def setup_dry_run(device: str | None, tmp_path) -> subprocess.CompletedProcess:
    """run/setup.sh's install commands, printed (LTHMPI_SETUP_DRY_RUN), where nvidia-smi fails."""
    env = with_nvidia_smi(tmp_path, 0)
    env.update(LTHMPI_SETUP_DRY_RUN="1", LTHMPI_VENV=str(tmp_path / "venv"))
    if device is not None:
        env["LTHMPI_DEVICE"] = device
    return subprocess.run([os.path.join(REPO, "run", "setup.sh")], capture_output=True, text=True, env=env,
                          timeout=60)


def test_setup_installs_one_tensorflow_build_per_device(tmp_path):
    cpu = setup_dry_run(None, tmp_path)
    assert cpu.returncode == 0, cpu.stderr
    assert ".[cpu,local-mpi,test]" in cpu.stdout and "[gpu" not in cpu.stdout and cpu.stderr == ""
    gpu = setup_dry_run("gpu", tmp_path)
    assert gpu.returncode == 0, gpu.stderr
    assert ".[gpu,local-mpi,test]" in gpu.stdout and "uninstall -y -q tensorflow-cpu" in gpu.stdout
    note = [ln for ln in gpu.stderr.splitlines() if ln]
    assert len(note) == 1 and "no NVIDIA GPU or driver found" in note[0] and 'parallel.device = "auto"' in note[0]
    bad = setup_dry_run("tpu", tmp_path)
    assert bad.returncode == 2 and "LTHMPI_DEVICE=tpu is unknown" in bad.stderr and bad.stdout == ""
    assert not (tmp_path / "venv").exists()


def test_setup_cfg_keeps_the_two_builds_in_separate_extras():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    requires = cfg["options"]["install_requires"]
    extras = cfg["options.extras_require"]
    assert "tensorflow" not in requires  # neither build unless an extra asks for it
    assert "tensorflow-cpu" in extras["cpu"] and "and-cuda" not in extras["cpu"]
    assert "tensorflow[and-cuda]" in extras["gpu"] and "tensorflow-cpu" not in extras["gpu"]


def test_every_task_records_its_device_precision_and_determinism(tiny_run):
    from lthmpi.results import load

    tasks = load(tiny_run)["tasks"]
    assert tasks and all(t["device"] == "cpu" and t["precision"] == "float32" and t["deterministic"] for t in tasks)


def gpu_check(tmp_path, gpus: int, *args) -> subprocess.CompletedProcess:
    """run/gpu_check.sh --dry-run where nvidia-smi lists `gpus` GPUs."""
    env = with_nvidia_smi(tmp_path, gpus)
    return subprocess.run([os.path.join(REPO, "run", "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "o"),
                           *args], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)


def test_gpu_check_plans_one_and_two_ranks_per_gpu_against_the_cpu(tmp_path):
    two = gpu_check(tmp_path, 2)
    assert two.returncode == 0, two.stderr
    runs = [ln for ln in two.stdout.splitlines() if ln.startswith("+ ")]
    plan = [(ln.split("--run-dir ")[1].split()[0].rsplit("/", 1)[1], ln.split("-np ")[1].split()[0]) for ln in runs]
    assert plan == [("resnet20_gpu_1pergpu", "2"), ("resnet20_cpu_1pergpu", "2"), ("resnet20_gpu_2pergpu", "4"),
                    ("resnet20_cpu_2pergpu", "4"), ("lenet300_100_gpu_1pergpu", "2"), ("lenet300_100_cpu_1pergpu", "2"),
                    ("lenet300_100_gpu_2pergpu", "4"), ("lenet300_100_cpu_2pergpu", "4")]
    assert all(("parallel.device=gpu" in ln) == ("_gpu_" in name) for ln, (name, _) in zip(runs, plan))
    assert not (tmp_path / "o").exists()  # a dry run makes nothing


def test_gpu_check_without_a_gpu_says_so_and_plans_the_cpu_half(tmp_path):
    none = gpu_check(tmp_path, 0, "--iterations", "20", "--", "--set", "train.precision=mixed_bfloat16")
    assert none.returncode == 0, none.stderr
    assert none.stderr.strip().splitlines() == ["gpu_check: no NVIDIA GPU found (nvidia-smi missing or listing "
                                                "none): running the CPU half only"]
    runs = [ln for ln in none.stdout.splitlines() if ln.startswith("+ ")]
    assert len(runs) == 4 and all("parallel.device=cpu" in ln and "train.iterations=20" in ln
                                  and "train.precision=mixed_bfloat16" in ln for ln in runs)
    bad = gpu_check(tmp_path, 0, "--iterations", "x")
    assert bad.returncode == 2 and "--iterations must be a positive integer" in bad.stderr


def test_gpu_check_report_names_every_tasks_device_and_compares_the_grids(tiny_run, tmp_path):
    import shutil

    runs = []
    for device in ("cpu", "gpu"):  # the tiny run twice, as if the second grid had run on a GPU
        runs.append(tmp_path / f"lenet300_100_{device}_1pergpu")
        shutil.copytree(tiny_run, runs[-1])
    out = subprocess.run([os.path.join(REPO, ".venv", "bin", "python"), os.path.join(REPO, "run", "gpu_check_report.py"),
                          *map(str, runs)], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    tasks = [ln for ln in out.stdout.splitlines() if ln.startswith("  m")]
    assert len(tasks) == 24 and all("device cpu" in ln and "ms/step" in ln for ln in tasks)
    rows = [ln.split() for ln in out.stdout.splitlines() if ln.startswith("lenet300_100 ")]
    assert [r[2] for r in rows] == ["cpu", "gpu"] and rows[1][4] == "1.00"  # same runs: ratio 1


def test_a_training_error_from_an_op_without_a_deterministic_kernel_is_reported_as_that_line():
    from lthmpi.errors import EXIT_USAGE, describe_error

    class UnimplementedError(Exception):  # what TensorFlow raises, by its message
        pass

    err = UnimplementedError("Graph execution error:\n\nDetected at node gradients/MaxPoolGrad defined at ...\n"
                             "GPU MaxPool gradient ops do not yet have a deterministic XLA implementation.\n"
                             "\t [[{{node gradients/MaxPoolGrad}}]]")
    line, code, bug = describe_error(err)
    assert (code, bug) == (EXIT_USAGE, False) and line == determinism_error_line(str(err))
    assert "GPU MaxPool gradient ops" in line and "train.deterministic = false" in line
    assert describe_error(RuntimeError("something else"))[1:] != (EXIT_USAGE, False)
