"""A CPU linear for the few-row products of decoding (csrc/small_batch_linear.cpp).

Why: on a CPU a decode step is bound by streaming the weights from memory, so verifying 8 tokens
should cost about what 1 does; but BLAS sgemm repacks the weights on every call and a 2..8-row
product costs ~2x a 1-row one (bench/kernel_profile.py). That alone ate most of what speculation
saves here. The kernel reads every weight row once for all rows, and it is batch-invariant: a row's
output is bitwise the same whatever other rows ride along, so the target's logits for a token do
not depend on the size of the block it was verified in.

`install(model)` routes the model's `nn.Linear` layers through it for inputs of at most
`MAX_ROWS` rows on CPU float32 without autograd; everything else (prefill, training, GPU, bf16)
keeps `F.linear`. The extension is compiled once (`python -m dspark_common.small_batch_linear`,
run by `make setup`) into the cache directory; without a compiler or on a CPU without AVX2/FMA,
`available()` is False and models keep `F.linear`."""

from __future__ import annotations

import logging
import threading
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dspark_common.settings import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "small_batch_linear.cpp"
# Up to 8 rows: a verify block of up to 7 drafted tokens (the default block) plus its anchor, or a
# draft block. Above 8 the kernel streams the weights once per 8 rows and BLAS is faster
# (bench/kernel_profile.py: 12 and 16 rows).
MAX_ROWS = 8

_lock = threading.Lock()
_ext = None
_failed: str | None = None


def build_dir() -> Path:
    return cache_root() / "extensions" / f"torch-{torch.__version__.replace('+', '_')}"


def _cpu_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def extension():
    """The compiled extension, building it on first use (~1 min); None when it cannot be built."""
    global _ext, _failed
    with _lock:
        if _ext is not None or _failed is not None:
            return _ext
        if not _cpu_supported():
            _failed = "CPU lacks AVX2/FMA"
            return None
        try:
            from torch.utils.cpp_extension import load

            d = build_dir()
            d.mkdir(parents=True, exist_ok=True)
            _ext = load("dspark_small_batch_linear", [str(SOURCE)], build_directory=str(d),
                        extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
        except Exception as e:  # no compiler / headers: fall back to BLAS, loudly
            _failed = f"{type(e).__name__}: {e}"
            log.warning("small-batch linear kernel unavailable (%s); using F.linear", _failed.splitlines()[0])
        return _ext


def available() -> bool:
    return extension() is not None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias through the kernel (float32 CPU tensors, no autograd)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"small-batch linear kernel unavailable: {_failed}")
    return ext.linear(x, weight, bias)


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.dtype == torch.float32 and weight.dtype == torch.float32 and x.device.type == "cpu"
        and weight.is_contiguous() and x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _eligible(x, self.weight):
        return _ext.linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def install(model: nn.Module) -> int:
    """Route `model`'s nn.Linear layers through the kernel (see module doc). Returns how many
    layers were routed: 0 when the kernel is unavailable or the model is not float32 on CPU."""
    if extension() is None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.forward = types.MethodType(_forward, module)
            n += 1
    return n


def installed(module: nn.Module) -> bool:
    """Whether `install` routed this linear through the kernel."""
    return type(module) is nn.Linear and "forward" in module.__dict__


def uninstall(model: nn.Module) -> None:
    for module in model.modules():
        if installed(module):
            del module.forward


if __name__ == "__main__":  # `make setup`: compile now, not in the first request or test
    logging.basicConfig(level=logging.INFO)
    print(f"small-batch linear kernel: {'built' if available() else 'unavailable: ' + str(_failed)} ({build_dir()})")
