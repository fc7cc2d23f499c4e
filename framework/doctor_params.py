"""The loop doctor's parameter checks: do the parameters train?

Some parameter is trainable (``trainable``); every trainable one is in the optimizer
(``optimizer_coverage``), receives a gradient (``gradients``) and changes in the first optimizer
steps (``updates``); on a non-finite step, which gradients went non-finite (``finite``). :class:`ParameterChecks` is the base of
:class:`~framework.doctor.Doctor`, which calls these from the engine's hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .doctor_findings import Finding, Recorder, name_list
from .doctor_inspect import fingerprint
from .grads import values_of

# Snapshots of parameters for the `updates` check are exact copies up to this many elements in
# total (1 GiB of fp32); beyond it, a float64 sum and norm per parameter stand in for the copy.
_SNAPSHOT_ELEMENTS = 1 << 28


class ParameterChecks(Recorder):
    """The checks on the parameters and their optimizer; per-fit state, reset by :meth:`_reset_parameters`.

    Example::

        doctor.check_setup(module, optimizer)   # LoopError if nothing is trainable
        doctor.after_backward()                  # trainable parameters that got no gradient
        doctor.after_optimizer_step(applied=True)
    """

    def __init__(self) -> None:
        super().__init__()
        self.off = False
        self.checking = False  # is the current optimizer step a checked one?
        self.nonfinite_detail = ""  # what diagnose_nonfinite found, for the engine's NonFiniteError
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        self._module: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: dict[int, str] = {}  # id(parameter) -> its name in the module
        self._stepped: list[tuple[str, nn.Parameter]] = []  # trainable and in the optimizer
        self._stepped_ids: set[int] = set()
        self._fsdp = False
        self._batching: Any = None
        self._applied = 0  # optimizer steps applied in this fit
        self._grad_seen: set[int] = set()
        self._grad_checks = 0
        self._grads_decided = False
        self._no_grad_ids: set[int] = set()  # reported by "gradients"; not reported again by "updates"
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_exact = True  # copies (True) or fingerprints (False)
        self._updates_decided = False

    def _name(self, module: nn.Module) -> str:
        return type(module).__name__

    def check_setup(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Trainable parameters exist, and every one of them is in an optimizer param group.

        Example::

            doctor.check_setup(module, optimizer)   # LoopError if nothing is trainable
        """
        if self.off:
            return
        name = self._name(module)
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.ran.add("trainable")
        if not trainable:
            self.fail(
                "trainable",
                f"{name} has no trainable parameters (none with requires_grad=True); create layers in "
                "__init__ as attributes and don't freeze all of them",
            )
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self._stepped = [(n, p) for n, p in trainable if id(p) in in_opt]
        self._stepped_ids = {id(p) for _, p in self._stepped}
        if self._fsdp:  # FSDP flattens parameters: names and identities no longer match the optimizer's
            self.not_run["optimizer_coverage"] = "not checked under FSDP"
            return
        self.ran.add("optimizer_coverage")
        missing = [n for n, p in trainable if id(p) not in in_opt]
        if missing:
            self.warn(
                "optimizer_coverage",
                f"{len(missing)} trainable parameter(s) of {name} are in no param group of the optimizer "
                f"from {name}.configure_optimizers, so they get gradients but never change: {name_list(missing)}. "
                "Fix: build the optimizer from self.parameters() (or add a param group for them), or call "
                "requires_grad_(False) on the ones you mean to freeze",
            )

    def after_backward(self, phase: str | None = None) -> None:
        """After the step's last backward, before the optimizer step: which trainable parameters got no
        gradient (metadata only). Decided over the first two checked steps, so a parameter that is
        legitimately idle on one batch (a routed expert) is not reported; under DDP after the first.

        Example::

            loss.backward()
            doctor.after_backward()
        """
        if self.off or not self.checking or self._grads_decided or self._fsdp:
            return
        self.ran.add("gradients")
        self._grad_seen.update(id(p) for _, p in self._stepped if p.grad is not None)
        self._grad_checks += 1
        # Under DDP an unused parameter makes the next forward fail (DDP's "Expected to have finished
        # reduction" error, which names parameter indices): name them now, before that happens.
        # Not per phase (alternating phases): each phase leaves the others' parameters without a gradient
        # (and runs without DDP's wrapper); decided at the fit's end, over every checked phase.
        if phase is None and self._grad_checks >= (1 if getattr(self._batching, "world_size", 1) > 1 else 2):
            self._decide_gradients()

    def _decide_gradients(self) -> None:
        self._grads_decided = True
        missing = [n for n, p in self._stepped if id(p) not in self._grad_seen]
        self._no_grad_ids = {id(p) for _, p in self._stepped if id(p) not in self._grad_seen}
        if missing and self._module is not None:
            name = self._name(self._module)
            self.warn(
                "gradients",
                f"{len(missing)} trainable parameter(s) of {name} received no gradient: {name_list(missing)}. "
                f"{name}.forward does not use them (or the loss does not depend on them), so they never train. "
                "Fix: use them in forward, remove them, or call requires_grad_(False) on them if frozen by design",
            )

    def after_optimizer_step(self, applied: bool, phase: str | None = None) -> None:
        """After step 5: were the parameters changed? Decided after the second applied step (so an lr that
        warms up from 0 is not reported), on a checked step.

        Example::

            optimizer.step()
            doctor.after_optimizer_step(applied=True)
        """
        if self.off:
            return
        self.ran.add("finite")  # the engine's non-finite guard ran before this step
        if applied:
            self._applied += 1
        if self.checking and self._applied >= 2 and self._snapshot is not None:
            self._decide_updates()

    def retract_applied(self) -> None:
        """A step reported applied turned out skipped (the engine read its NaN verdict a step late).

        Example::

            doctor.retract_applied()
        """
        if not self.off and self._applied > 0:
            self._applied -= 1

    def end_fit(self) -> None:
        """Decide what is still pending at the end of a short fit.

        Example::

            doctor.end_fit()   # e.g. gradients after a 1-step fit
        """
        if self.off:
            return
        if not self._grads_decided and self._grad_checks:
            self._decide_gradients()
        if self._snapshot is not None:
            if self._applied >= 2:
                self._decide_updates()
            else:
                self.not_run["updates"] = "fewer than 2 optimizer steps were applied"
        self._snapshot = None
        self.checking = False

    def _take_snapshot(self) -> list[torch.Tensor] | None:
        if self._fsdp or not self._stepped:
            return None
        params = [p for _, p in self._stepped]
        self._snapshot_exact = sum(p.numel() for p in params) <= _SNAPSHOT_ELEMENTS
        if self._snapshot_exact:
            return [p.detach().clone() for p in params]
        return [fingerprint(p) for p in params]

    def _decide_updates(self) -> None:
        snapshot, self._snapshot = self._snapshot, None
        self._updates_decided = True
        if snapshot is None or self._optimizer is None or self._module is None:
            return
        self.ran.add("updates")
        params = [p for _, p in self._stepped]
        now = [p.detach() if self._snapshot_exact else fingerprint(p) for p in params]
        # One host read for all parameters: changed?, and is its gradient all zero?
        flags = torch.stack(
            [torch.ne(s, q).any() for s, q in zip(snapshot, now, strict=True)]
            + [
                (values_of(p.grad).count_nonzero() == 0) if p.grad is not None else torch.tensor(True, device=p.device)
                for p in params
            ]
        ).tolist()
        changed, zero_grad = flags[: len(params)], flags[len(params) :]
        unchanged = [i for i, c in enumerate(changed) if not c and id(params[i]) not in self._no_grad_ids]
        if not unchanged:
            return
        group_of = {id(p): i for i, g in enumerate(self._optimizer.param_groups) for p in g["params"]}
        groups = self._optimizer.param_groups
        reasons: dict[str, list[str]] = {}
        for i in unchanged:
            p = params[i]
            gi = group_of.get(id(p), 0)
            lr = groups[gi].get("lr", None)
            if lr is not None and float(lr) == 0.0:
                why = f"param group {gi} has lr=0"
            elif p.grad is None:
                why = "no gradient"
            elif zero_grad[i]:
                why = "zero gradient"
            else:
                why = f"the optimizer left them unchanged (param group {gi})"
            reasons.setdefault(why, []).append(self._stepped[i][0])
        detail = "; ".join(f"{why}: {name_list(names)}" for why, names in reasons.items())
        name = self._name(self._module)
        self.warn(
            "updates",
            f"{len(unchanged)} trainable parameter(s) of {name} did not change in the first {self._applied} "
            f"optimizer steps ({detail}). Fix: give every param group of {name}.configure_optimizers a non-zero "
            "lr, check that the loss depends on these parameters, or call requires_grad_(False) on parameters "
            "you mean to freeze",
        )

    def diagnose_nonfinite(self, loss: torch.Tensor, params: list[torch.Tensor]) -> str:
        """Name what went non-finite (the loss, which parameters' gradients) before the engine drops the
        gradients; sets :attr:`nonfinite_detail`. Only called on a bad step, so its host reads cost nothing
        on the healthy path.

        Example::

            doctor.diagnose_nonfinite(window_loss, params)   # -> ": the loss is nan (...)"
        """
        self.nonfinite_detail = ""
        if self.off:
            return ""
        name = self._name(self._module) if self._module is not None else "the module"
        with_grad = [(p, values_of(p.grad)) for p in params if p.grad is not None]
        flags = torch.stack([~torch.isfinite(loss).all()] + [~torch.isfinite(g).all() for _, g in with_grad]).tolist()
        parts = []
        if flags[0]:
            parts.append(
                f"{name}.compute_loss returned {float(loss.detach().float()):g} (check the inputs and "
                "targets of that batch, and log()/division by zero in the loss)"
            )
        bad = [self._names.get(id(p), "?") for (p, _), f in zip(with_grad, flags[1:], strict=True) if f]
        if bad:
            parts.append(f"non-finite gradients in {name_list(bad)}")
        self.nonfinite_detail = (": " + "; ".join(parts)) if parts else ""
        self.ran.add("finite")
        self.findings.append(
            Finding(
                "finite",
                "error",
                f"non-finite loss or gradient{self.nonfinite_detail}; fix: lower the learning "
                "rate, set clip_grad_norm, or check that batch's data",
            )
        )
        return self.nonfinite_detail
