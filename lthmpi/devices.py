"""Which device a rank trains on, and what follows from it: pure decisions, testable without a GPU.

Why pure: this box has no GPU, so every choice (which GPU a rank takes, how much of its memory, which kernels
and how many steps per compiled call, what an op without a deterministic GPU kernel means) is made here from
plain numbers and strings; lthmpi/runtime.py only applies the result to TensorFlow.

Ranks and GPUs: node-local rank r takes GPU r mod G of the G GPUs it sees. Ranks that end up on one physical
GPU each get an equal share of its memory (a per-process memory limit), never all of it. Where a launcher gives
each rank its own CUDA_VISIBLE_DEVICES (e.g. SLURM's --gpu-bind), the ranks' values are compared, so two ranks
on two different GPUs are not counted as sharing one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .config import DEVICES, ConfigError

# Memory a process uses on its GPU outside TensorFlow's allocator (CUDA context, cuDNN/cuBLAS handles and
# workspaces): taken off each rank's share so that the shares together fit.
CUDA_CONTEXT_MB = 512
RESERVE = 0.05  # of the GPU's memory, left for the driver and other processes
MIN_SHARE_MB = 1024  # below this a rank's share is refused: too many ranks on one GPU


class DeviceError(ConfigError):
    """A device request that cannot be met (no GPU, too many ranks on one GPU); one line, exit 2."""


@dataclass(frozen=True)
class NodeSlot:
    """Where a rank sits on its node: node-local rank and size, and every local rank's CUDA_VISIBLE_DEVICES."""
    local_rank: int = 0
    local_size: int = 1
    visible: tuple = ()  # one entry per local rank (None: unset); () = nobody's is known (one process)


@dataclass(frozen=True)
class Placement:
    """The device one rank trains on."""
    kind: str  # "cpu" | "gpu"
    gpu: int | None = None  # index into the GPUs this process sees
    physical: str = ""  # the GPU's identity on the node (its CUDA_VISIBLE_DEVICES entry or ordinal)
    sharing: int = 1  # ranks of this node on that GPU, this one included
    memory_limit_mb: int | None = None  # per-process cap; None = TensorFlow's default (the whole GPU)

    @property
    def label(self) -> str:
        """What a task records as its device: "cpu" or "gpu:<identity>"."""
        return "cpu" if self.kind == "cpu" else f"gpu:{self.physical}"


def _entries(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [e.strip() for e in value.split(",") if e.strip() and e.strip() != "-1"]


def physical_gpu(local_rank: int, gpus: int, visible: str | None) -> str:
    """The identity of the GPU node-local rank `local_rank` takes, given the G = `gpus` it sees (when
    `visible`, its CUDA_VISIBLE_DEVICES, is unset) or the list in `visible`."""
    entries = _entries(visible)
    if entries is None:
        return str(local_rank % gpus)
    if not entries:
        return ""
    return entries[local_rank % len(entries)]


def assign_gpu(slot: NodeSlot, gpus: int) -> tuple[int, str, int]:
    """(index into this rank's GPUs, the GPU's identity, how many of the node's ranks use that GPU)."""
    if slot.local_size < 1 or not 0 <= slot.local_rank < slot.local_size:
        raise ValueError(f"node-local rank {slot.local_rank} is not in [0, {slot.local_size})")
    if gpus < 1:
        raise ValueError("assign_gpu needs at least one GPU")
    if slot.visible and len(slot.visible) != slot.local_size:
        raise ValueError(f"{len(slot.visible)} CUDA_VISIBLE_DEVICES values for {slot.local_size} local ranks")
    index = slot.local_rank % gpus
    if not slot.visible:
        return index, str(index), len(range(index, slot.local_size, gpus))
    mine = _entries(slot.visible[slot.local_rank])
    ident = mine[index] if mine else str(index)
    ids = [physical_gpu(r, gpus, v) for r, v in enumerate(slot.visible)]
    ids[slot.local_rank] = ident
    return index, ident, ids.count(ident)


def memory_share_mb(total_mb: int | None, sharing: int, gpu: str = "0") -> int | None:
    """Each rank's memory limit on a GPU of `total_mb` shared by `sharing` ranks; None = no limit needed
    (one rank) or not knowable (total unknown: TF then grows its memory on demand instead)."""
    if sharing < 1:
        raise ValueError(f"sharing must be >= 1, not {sharing}")
    if sharing == 1 or not total_mb:
        return None
    share = int(total_mb * (1 - RESERVE) / sharing) - CUDA_CONTEXT_MB
    if share < MIN_SHARE_MB:
        most = max(1, int(total_mb * (1 - RESERVE) / (MIN_SHARE_MB + CUDA_CONTEXT_MB)))
        raise DeviceError(f"{sharing} ranks share GPU {gpu} ({total_mb} MiB): each would get {max(share, 0)} MiB, "
                          f"less than {MIN_SHARE_MB}; start at most {most} ranks per GPU on this node")
    return share


def no_gpu_line(host: str, built_with_cuda: bool) -> str:
    """The one line for parallel.device = "gpu" where TensorFlow sees no GPU."""
    why = ("TensorFlow is the CUDA build, so no GPU or driver is usable here: check nvidia-smi"
           if built_with_cuda else "this TensorFlow is a CPU-only build: run LTHMPI_DEVICE=gpu ./run/setup.sh")
    return (f"parallel.device = \"gpu\" but TensorFlow sees no GPU on {host} ({why}); "
            f"or set parallel.device = \"auto\" (or \"cpu\") to train on the CPU")


def place(device: str, slot: NodeSlot, gpus: int, total_mb: int | None = None, host: str = "this host",
          built_with_cuda: bool = False) -> Placement:
    """The device of the rank at `slot`, given `parallel.device` and the `gpus` GPUs this process sees."""
    if device not in DEVICES:
        raise ConfigError(f"parallel.device {device!r} is unknown (choose one of {', '.join(DEVICES)})")
    if device == "cpu" or (device == "auto" and gpus == 0):
        return Placement("cpu")
    if gpus == 0:
        raise DeviceError(no_gpu_line(host, built_with_cuda))
    index, ident, sharing = assign_gpu(slot, gpus)
    return Placement("gpu", index, ident, sharing, memory_share_mb(total_mb, sharing, ident))


def parse_gpu_memory(nvidia_smi_csv: str) -> list[int]:
    """Total MiB per GPU from `nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits`."""
    out = []
    for line in nvidia_smi_csv.splitlines():
        line = line.strip().split()[0] if line.strip() else ""
        if line.isdigit():
            out.append(int(line))
    return out


@dataclass(frozen=True)
class KernelPlan:
    """How a net trains on a device: compiled with XLA or not, whole blocks of steps per call or one step
    per call, and the sparse-kernel threshold (0 = never)."""
    jit: bool
    fused: bool
    sparse_below: float
    why: str = ""
    step_forms: bool = False  # the step runs in either of two forms, chosen by parallel.conv_step (CPU conv nets)


def kernel_plan(kind: str, convolutions: bool, sparse_below: float, precision: str = "float32") -> KernelPlan:
    """The kernels and call shape for a net on `kind` ("cpu" | "gpu") in `precision`.

    CPU, conv nets: one step per call, by default not compiled by XLA but run by TensorFlow's graph executor on
    its oneDNN kernels (only the optimizer update and re-mask inside it are XLA-compiled:
    training.dense.CompiledSteps). XLA:CPU runs a convolution inside a while loop ~100x slower than in a call
    of its own; one step per call it was ~2x slower than oneDNN on an Intel box (run/bench_conv.py, docs/gpu.md)
    but faster on an AMD EPYC, so the step's form, graph or XLA, is parallel.conv_step's (`step_forms`:
    auto times both at start-up, training/step_form.py). CPU, Dense-only nets: whole
    blocks of steps in one XLA call. GPU: every net runs whole blocks under XLA (the conv limitation is
    XLA:CPU's). The sparse C kernels are float32 CPU code: never on a GPU, never in mixed precision."""
    if kind == "gpu":
        return KernelPlan(jit=True, fused=True, sparse_below=0.0,
                          why="sparse kernels are CPU-only: masked nets train on the dense kernels on a GPU")
    if precision != "float32":
        sparse_below, why = 0.0, "sparse kernels are float32: mixed precision trains on the dense kernels"
    else:
        why = ""
    if convolutions:
        return KernelPlan(jit=False, fused=False, sparse_below=sparse_below, why=why, step_forms=True)
    return KernelPlan(jit=True, fused=True, sparse_below=sparse_below, why=why)


_NONDETERMINISTIC = (
    re.compile(r"A deterministic GPU implementation of (?P<op>.+?),? (?:when [^,]*, )?is not currently available"),
    re.compile(r"Deterministic GPU implementation of (?P<op>.+?) not available"),
    re.compile(r"(?P<op>GPU \w+ gradient ops) do not yet have a deterministic XLA implementation"),
    re.compile(r"(?P<op>[\w ]+?) (?:does not|do not) (?:yet )?(?:have|support) (?:a )?deterministic"),
)
_NODE = (re.compile(r"\{\{node ([^}]+)\}\}"), re.compile(r"Detected at node ['\"]?([^\s'\"]+)"))


def determinism_error_line(message: str) -> str | None:
    """One line for a TensorFlow error raised because an op has no deterministic (GPU or XLA) kernel, naming
    the op and how to proceed; None when `message` is some other error."""
    for pattern in _NONDETERMINISTIC:
        m = pattern.search(message)
        if m:
            break
    else:
        return None
    node = next((n.group(1) for p in _NODE for n in [p.search(message)] if n), None)
    at = f" (at {node})" if node else ""
    return (f"TensorFlow has no deterministic kernel for {m.group('op').strip()}{at} on this device: set "
            f"train.deterministic = false to train without op determinism (recorded in the results), or "
            f"parallel.device = \"cpu\"")
