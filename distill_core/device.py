"""Where a model runs, and in which precision.

The device is the GPU Ray gave this worker when it has one (Ray sets CUDA_VISIBLE_DEVICES to
the GPUs it assigned, so `cuda` is that GPU; a worker given none sees no GPU), else the CPU.

Precision (the preset's `precision`):
- `fp32`: every weight, activation and optimizer state in float32; no autocast.
- `bf16`: what trains keeps float32 master weights and optimizer state and runs its forward
  under autocast to bfloat16; what is frozen (the teacher, its lm_head, a model under
  evaluation) is held in bfloat16. The losses compute in float32 (they cast their inputs).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def prepare(device: torch.device, threads: int | None = None, deterministic: bool = False) -> None:
    """Per-process settings: TF32 matmuls on CUDA (fp32 work that autocast leaves, such as
    the losses' reductions, at tensor-core speed), the CPU thread count when given, and with
    `deterministic` torch's deterministic algorithms on the CPU, where they make a restarted
    trial recompute the same numbers. Not on CUDA: there they would cost time (NaN-filled
    allocations, sorted scatters) and still leave cuBLAS and the attention backward free to
    vary, so a GPU run resumes from its checkpoint, not bit for bit."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Which algorithms run is what makes a rerun identical; filling every new tensor with
        # NaN first (a debugging aid that comes with the mode) is ~5% of a step's time.
        torch.utils.deterministic.fill_uninitialized_memory = False
    if threads:
        torch.set_num_threads(threads)


def frozen_dtype(precision: str) -> torch.dtype:
    """The dtype a frozen model is held in."""
    _check(precision)
    return torch.bfloat16 if precision == "bf16" else torch.float32


def autocast(device: torch.device, precision: str):
    """The context a trainable model's forward runs in."""
    _check(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def without_autocast(device_type: str):
    """Autocast off: float32 work (sums of probabilities, attention scores) inside a bf16
    forward. A device type autocast does not know (meta, in tests) has nothing to turn off."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA (the CPU keeps the reference implementation, so a
    CPU run's numbers stay those of earlier versions)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=True if device.type == "cuda" else None)


def to_device(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A host tensor on `device`: from pinned memory without blocking the host (it queues the
    copy behind the work already queued and goes on); on the CPU, the tensor itself."""
    if tensor is None or tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=tensor.is_pinned())


def pin(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Page-locked host memory for a tensor bound for a GPU (what makes the copy asynchronous)."""
    if tensor is None or device.type != "cuda":
        return tensor
    return tensor.pin_memory()


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
