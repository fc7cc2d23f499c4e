"""How fast and how full: ``train/step_time``, ``train/tflops``, ``train/mfu`` and ``train/memory_mb`` on log steps.

:class:`Throughput` (``Engine(throughput=True)``, the default) subscribes to the loop's events and adds
to each train record, before it is written (the ``train_record`` event):

- ``train/step_time``: seconds per optimizer step since the last record (validation excluded, as for
  ``train/items_per_sec``);
- ``train/tflops``: the model's FLOPs per optimizer step on this process (forward + backward, not the
  optimizer; counted once, on the fit's first step, by :class:`~framework.observability.flops.StepFlops`)
  over ``train/step_time``, in TFLOP/s. Left out, said once, where the count cannot be trusted: a compiled
  model (counting would also run its first step eagerly, changing its result), activation checkpointing
  (its recomputed forwards would count as the model's), an op without a formula;
- ``train/mfu``: ``train/tflops`` over the device's peak (0-1): ``Engine(peak_tflops=...)``, else
  :data:`PEAK_TFLOPS` for known GPUs at the run's precision; left out where neither says (a CPU);
- ``train/memory_mb``: on CUDA the peak memory allocated by tensors since the last record
  (``torch.cuda.max_memory_allocated``, reset after each record); on CPU the process's peak resident set
  (``ru_maxrss``, since the process started), in MiB.

Off log steps it only reads the clock: no host sync, no device call. The first step runs under
``FlopCounterMode`` (a Python dispatch mode: that step is slower, its results the same bit for bit).

Example:

    >>> engine = framework.Engine(max_steps=2, batch_size=32, log_every_n_steps=1, progress=False,
    ...                           peak_tflops=312.0)        # per device: an A100 in bf16, say
    >>> _ = engine.fit(Classifier(), train_data)
    >>> sorted(k for k in engine.metrics if k in ("train/step_time", "train/tflops", "train/mfu", "train/memory_mb"))
    ['train/memory_mb', 'train/mfu', 'train/step_time', 'train/tflops']
    >>> engine.metrics["train/mfu"] == engine.metrics["train/tflops"] / 312.0
    True
"""

from __future__ import annotations

import re
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from .flops import StepFlops

if TYPE_CHECKING:
    from ..fit import Fit

# Dense (no sparsity) peak TFLOP/s per GPU, by the name torch.cuda.get_device_name() gives, first match wins:
# (pattern, bf16/fp16 tensor cores, tf32 tensor cores, fp32). The datasheets give the tensor-core figures
# "with sparsity": half of them is the dense peak.
PEAK_TFLOPS: tuple[tuple[str, float, float, float], ...] = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 1,979 / 989 (sparse) / 67; PCIe 1,513 /
    # 756 / 51; NVL 1,671 / 835 / 60.
    (r"H100.*NVL", 835.5, 417.5, 60.0),
    (r"H100.*PCIe", 756.5, 378.0, 51.0),
    (r"H100", 989.5, 494.5, 67.0),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 1,979 / 989 / 67; NVL 1,671 / 835 / 60.
    (r"H200.*NVL", 835.5, 417.5, 60.0),
    (r"H200", 989.5, 494.5, 67.0),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 624 / 312 (sparse) / 19.5, SXM and PCIe alike.
    (r"A100", 312.0, 156.0, 19.5),
    # NVIDIA L40S datasheet: 733 / 366 (sparse) / 91.6. L4 datasheet: 242 / 120 (sparse) / 30.3.
    (r"L40S", 366.5, 183.0, 91.6),
    (r"\bL4\b", 121.0, 60.0, 30.3),
    # NVIDIA A10 datasheet: 250 / 125 (sparse) / 31.2 (not the A10G, a different part).
    (r"\bA10\b", 125.0, 62.5, 31.2),
)


def known_peak_tflops(device_name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak TFLOP/s of ``device_name`` from :data:`PEAK_TFLOPS` for a run in ``precision`` ("bf16",
    "fp16" or "no"; fp32 matmuls on TF32 tensor cores where ``tf32``), or None for a device not listed.

    Example:

        >>> known_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False)
        312.0
        >>> known_peak_tflops("NVIDIA H100 80GB HBM3", "no", tf32=True)
        494.5
        >>> print(known_peak_tflops("NVIDIA GeForce GTX 1080", "no", tf32=False))
        None
    """
    for pattern, half, tf32_peak, fp32 in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return half if precision in ("bf16", "fp16") else tf32_peak if tf32 else fp32
    return None


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """:func:`known_peak_tflops` for this process's CUDA device (None on any other device): on an H100 SXM,
    ``device_peak_tflops(torch.device("cuda", 0), "bf16")`` is 989.5.

    Example:

        >>> print(device_peak_tflops(torch.device("cpu"), "bf16"))
        None
    """
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest"  # (TF32 allowed for fp32 matmuls)
    return known_peak_tflops(torch.cuda.get_device_name(device), precision, tf32)


def why_not_counted(fit: Fit) -> str | None:
    """Why this fit's FLOPs cannot be counted, or None: a compiled model runs kernels ``FlopCounterMode`` does
    not see, and counting would run its first step eagerly (a different result); under activation
    checkpointing the forwards recomputed in backward would be counted as model FLOPs. With
    ``Engine(compile=True)`` it is ``"the model is compiled (torch.compile)"``.
    """
    compiled = fit.config.precision.compile or any(
        getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule"
        for m in fit.model.modules()
    )
    if compiled:
        return "the model is compiled (torch.compile)"
    if fit.config.distributed.activation_checkpointing:  # (the recomputed forwards are not the model's FLOPs)
        return "activation checkpointing recomputes the blocks' forwards in backward (counted, they would be too)"
    return None


def peak_rss_mb() -> float | None:
    """This process's peak resident set size in MiB (None where ``resource`` is missing: Windows).

    Example:

        >>> peak_rss_mb() > 1.0                       # e.g. 812.4
        True
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # (bytes on macOS, KiB on Linux)


class Throughput:
    """The subscriber behind ``train/step_time``, ``train/tflops``, ``train/mfu``, ``train/memory_mb`` (see the
    module docstring). ``peak_tflops``: the device's peak, or None to look it up. ``Engine(throughput=True)``
    (the default) subscribes one to the loop's events; ``flops_per_step`` is set once the first step is counted.

    Example:

        >>> from framework.config import EngineConfig
        >>> from framework.observability import observers
        >>> throughput = observers(EngineConfig.from_options(peak_tflops=312.0))[-1]
        >>> type(throughput).__name__, throughput.peak_tflops, throughput.flops_per_step
        ('Throughput', 312.0, None)
    """

    def __init__(self, peak_tflops: float | None) -> None:
        self.peak_tflops = peak_tflops
        self.flops_per_step: int | None = None  # this process's model FLOPs per optimizer step, once counted
        self._counting: _FirstStep | None = None  # counting the first step's FLOPs
        self._fit: Fit | None = None
        self._peak: float | None = None
        self._t = 0.0
        self._last_step = 0
        self._paused = 0.0  # seconds of validation since the last record
        self._val_t0: float | None = None

    # ---- the fit

    def on_fit_start(self, fit: Fit) -> None:
        self._fit, rt = fit, fit.rt
        self._t, self._last_step, self._paused = time.perf_counter(), fit.counters.step, 0.0
        self._peak = self.peak_tflops or device_peak_tflops(rt.device, rt.mixed_precision)
        self.flops_per_step = None
        reason = why_not_counted(fit)
        self._counting = _FirstStep(self, StepFlops()) if reason is None else None
        if self._counting is not None:
            # First in the stream: the other subscribers' handlers of the "after" events (the doctor's probe
            # forwards) come after its stops and are not counted. It leaves the stream once it has counted.
            fit.events.subscribe(self._counting, first=True)
        else:
            self._say(f"throughput: {reason}, so its FLOPs are not counted: train/tflops and train/mfu are left out")
        if rt.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(rt.device)  # (train/memory_mb: the peak since the fit started)

    def _end_count(self) -> StepFlops:
        """Stop counting and leave the stream (the first step is done, or the fit raised inside it)."""
        assert self._fit is not None and self._counting is not None
        counting, self._counting = self._counting, None
        self._fit.events.unsubscribe(counting)
        counting.flops.stop()
        return counting.flops

    def _counted(self) -> None:
        """The first step's count is complete: keep it, or say why it is left out."""
        flops = self._end_count()
        if flops.unknown:
            ops = ", ".join(sorted(flops.unknown))
            self._say(
                f"throughput: the model runs {ops}, which torch.utils.flop_counter has no formula for, so its FLOPs "
                "are not counted: train/tflops and train/mfu are left out (register one with "
                "torch.utils.flop_counter.register_flop_formula to count them)"
            )
        elif flops.total == 0:
            self._say(
                "throughput: FlopCounterMode counted no FLOPs in the first step (no matrix product, convolution or "
                "attention ran): train/tflops and train/mfu are left out"
            )
        else:
            self.flops_per_step = flops.total

    # ---- the time that is not training

    def on_validation_start(self) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, module: Any, metrics: dict[str, float]) -> None:
        if self._val_t0 is not None:  # (a standalone engine.validate has no validation_start)
            self._paused += time.perf_counter() - self._val_t0
            self._val_t0 = None

    # ---- the record

    def on_train_record(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        steps = int(record["step"]) - self._last_step
        elapsed = now - self._t - self._paused
        if steps > 0 and elapsed > 0:
            step_time = elapsed / steps
            record["train/step_time"] = step_time
            if self.flops_per_step is not None:
                tflops = self.flops_per_step / step_time / 1e12
                record["train/tflops"] = tflops
                if self._peak is not None:
                    record["train/mfu"] = tflops / self._peak
        memory = self._memory_mb()
        if memory is not None:
            record["train/memory_mb"] = memory
        self._t, self._last_step, self._paused = now, int(record["step"]), 0.0

    def _memory_mb(self) -> float | None:
        assert self._fit is not None
        device = self._fit.rt.device
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2**20  # (allocator statistics: no sync)
            torch.cuda.reset_peak_memory_stats(device)
            return peak
        return peak_rss_mb() if device.type == "cpu" else None

    def on_close(self, error: BaseException | None) -> None:
        if self._counting is not None:  # (a fit that raised inside its first step: the dispatch mode goes)
            self._end_count()

    def _say(self, text: str) -> None:
        fit = self._fit
        if fit is not None and fit.rt.is_main:
            say(fit, text)


class _FirstStep:
    """The first step's forward, loss and backward under the FLOP counter, each from its event to the next;
    a subscriber for that step only (afterwards the loop's per-micro-batch events cost nothing here)."""

    def __init__(self, owner: Throughput, flops: StepFlops) -> None:
        self.owner, self.flops = owner, flops

    def on_forward(self, micro: int, phase: str | None, batch: Any) -> None:
        self.flops.start()

    def on_after_forward(self, micro: int, phase: str | None, real: bool) -> None:
        self.flops.stop()

    def on_loss(self, micro: int, phase: str | None, batch: Any) -> None:
        self.flops.start()

    def on_after_loss(self, micro: int, phase: str | None, loss: Any, outputs: Any) -> None:
        self.flops.stop()

    def on_backward(self, micro: int, phase: str | None) -> None:
        self.flops.start()  # (until the next micro-batch's forward or loss, or after_backward)

    def on_after_backward(self, phase: str | None) -> None:
        self.flops.stop()

    def on_after_optimizer_step(self, applied: bool, phase: str | None) -> None:
        fit = self.owner._fit
        if fit is not None and phase == fit.steps[-1][0]:
            self.owner._counted()  # (the window's last phase stepped: the count is complete)


def say(fit: Fit, text: str) -> None:
    """Print ``text`` on this process: through the progress display if it is on (so a bar is not broken),
    else on stderr (a note the run asked for, shown with ``progress=False`` too), e.g.
    ``say(fit, "profile: wrote runs/x/profile/rank0.trace.json")``.
    """
    if fit.progress.enabled:
        fit.progress.message(text)
    else:
        print(text, file=sys.stderr, flush=True)
