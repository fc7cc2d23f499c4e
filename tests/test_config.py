"""framework/config.py: every Engine argument is checked at construction, with its name and the fix."""

from __future__ import annotations

import json
import math
import os
import re
import signal

import pytest

from framework import Engine
from framework.config import STOP_SIGNALS, EngineConfig, describe, markdown_table

from .helpers import ROOT

# (arguments, the argument the message must name, a fragment of the fix): the outside sweep's 20 cases first.
BAD = [
    ({"max_epochs": -1}, "max_epochs", "positive int"),
    ({"max_epochs": 0}, "max_epochs", "positive int"),
    ({"max_epochs": 1.5}, "max_epochs", "whole number"),
    ({"max_epochs": 2.0}, "max_epochs", "max_epochs=2"),
    ({"max_steps": -5}, "max_steps", "positive int"),
    ({"max_time": -1.0}, "max_time", "positive finite"),
    ({"max_time": math.inf}, "max_time", "positive finite"),
    ({"batch_size": 0}, "batch_size", "positive int"),
    ({"micro_batch_size": -16}, "micro_batch_size", "positive int"),
    ({"limit_train_batches": 0}, "limit_train_batches", "positive int"),
    ({"limit_val_batches": -1}, "limit_val_batches", "positive int"),
    ({"overfit_batches": -1}, "overfit_batches", "positive int"),
    ({"keep_last": 0}, "keep_last", "int >= 1"),
    ({"keep_last": -1}, "keep_last", "int >= 1"),
    ({"keep_best": -1}, "keep_best", "int >= 0"),
    ({"log_every_n_steps": 0}, "log_every_n_steps", "int >= 1"),
    ({"seed": -1}, "seed", "non-negative int"),
    ({"preemption_signals": "SIGTERM"}, "preemption_signals", "not a bare string"),
    ({"preemption_signals": ("SIGNOPE",)}, "preemption_signals", "not a signal"),
    ({"mixed_precision": "fp8"}, "mixed_precision", '"bf16"'),
    ({"doctor": "ful"}, "doctor", "did you mean 'full'"),
    ({"mode": "maximum"}, "mode", '"min" or "max"'),
    # and the rest of the arguments
    ({"checkpoint_every_n_steps": 0}, "checkpoint_every_n_steps", "positive int"),
    ({"val_every_n_steps": 0}, "val_every_n_steps", "positive int"),
    ({"num_workers": -2}, "num_workers", "int >= 0"),
    ({"max_consecutive_skips": 0}, "max_consecutive_skips", "int >= 1"),
    ({"clip_grad_norm": 0.0}, "clip_grad_norm", "positive finite"),
    ({"clip_grad_value": math.nan}, "clip_grad_value", "positive finite"),
    ({"nan_policy": "ignore"}, "nan_policy", '"raise" or "skip"'),
    ({"nan_check": "sometimes"}, "nan_check", '"auto", "step" or "deferred"'),
    ({"strategy": "deepspeed"}, "strategy", '"auto", "ddp" or "fsdp"'),
    ({"ema_decay": 1.0}, "ema_decay", "strictly between 0 and 1"),
    ({"ema_decay": 0.999, "shuffle": "yes"}, "shuffle", "True or False"),
    ({"drop_last": 1}, "drop_last", "True or False"),
    ({"find_unused_parameters": "auto"}, "find_unused_parameters", "True, False or None"),
    ({"collective_timeout": 0}, "collective_timeout", "positive finite"),
    ({"collate_fn": "stack"}, "collate_fn", "a function"),
    ({"log_with": 3}, "log_with", "tracker name"),
    ({"monitor": ""}, "monitor", "non-empty str"),
    ({"resume": 3}, "resume", "'auto'"),
    ({"run_dir": ""}, "run_dir", "directory path"),
    ({"checkpoint_async": None}, "checkpoint_async", "True or False"),
    ({"keep_last": True}, "keep_last", "int >= 1"),  # a bool is not a count
    # preemption_signals: only signals that mean "stop" (issue 28)
    ({"preemption_signals": ("SIG_DFL",)}, "preemption_signals", "'SIG_DFL' is a signal handler constant"),
    ({"preemption_signals": ("SIG_IGN",)}, "preemption_signals", "'SIG_IGN' is a signal handler constant"),
    ({"preemption_signals": ("SIG_BLOCK",)}, "preemption_signals", "'SIG_BLOCK' is a signal-mask constant"),
    ({"preemption_signals": ("SIGTERM", "SIGSEGV")}, "preemption_signals", "'SIGSEGV' reports a crash"),
    ({"preemption_signals": ("SIGBUS",)}, "preemption_signals", "'SIGBUS' reports a crash"),
    ({"preemption_signals": ("SIGFPE",)}, "preemption_signals", "'SIGFPE' reports a crash"),
    ({"preemption_signals": ("SIGILL",)}, "preemption_signals", "'SIGILL' reports a crash"),
    ({"preemption_signals": ("SIGABRT",)}, "preemption_signals", "'SIGABRT' reports a crash"),
    ({"preemption_signals": ("SIGCHLD",)}, "preemption_signals", "'SIGCHLD' does not ask a process to stop"),
    ({"preemption_signals": ("SIGPIPE",)}, "preemption_signals", "'SIGPIPE' does not ask a process to stop"),
    ({"preemption_signals": ("SIGKILL",)}, "preemption_signals", "'SIGKILL' cannot be caught"),
    ({"preemption_signals": ("SIGSTOP",)}, "preemption_signals", "'SIGSTOP' cannot be caught"),
    ({"preemption_signals": (15,)}, "preemption_signals", "15 is not a signal name"),
    # resume: 'AUTO' would be taken for a path (issue 28)
    ({"resume": "AUTO"}, "resume", "use 'auto' (lowercase)"),
    ({"resume": "Auto"}, "resume", "use 'auto' (lowercase)"),
]


@pytest.mark.parametrize(("options", "name", "fix"), BAD, ids=[f"{n}={o[n]!r}" for o, n, _ in BAD])
def test_a_bad_argument_is_refused_at_construction_naming_it_and_the_fix(options, name, fix):
    with pytest.raises(ValueError) as err:
        Engine(**options)
    message = str(err.value)
    assert message.startswith(f"{name}={options[name]!r}; "), message
    assert fix in message, message


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        (
            {"gradient_accumulation_steps": 4, "batch_size": 64},
            r"'gradient_accumulation_steps' \(the engine derives accumulation from the batch sizes \(accumulation = "
            r"batch_size / \(micro_batch_size x world_size\)\): for 4 steps on 1 process, pass micro_batch_size=16 "
            r"with batch_size=64\)",
        ),
        ({"accumulate_grad_batches": 2, "batch_size": 32}, r"for 2 steps on 1 process, pass micro_batch_size=16"),
        ({"gradient_accumulation_steps": 3}, r"micro_batch_size = batch_size / \(gradient_accumulation_steps x world_size\)"),
        ({"lr": 3e-4}, r"'lr' \(the optimizer is the module's: return it from configure_optimizers, e.g. "
                       r"torch.optim.AdamW\(self.parameters\(\), lr=0.0003\)"),
        ({"learning_rate": 0.1}, r"'learning_rate' \(.*configure_optimizers.*lr=0.1"),
        ({"precision": "bf16-mixed"}, r"'precision' \(use mixed_precision='bf16'"),
        ({"precision": "16-mixed"}, r"use mixed_precision='fp16'"),
        ({"devices": 2, "num_nodes": 2}, r"'devices', 'num_nodes' \(processes come from the launcher.*accelerate launch "
                                         r"--config_file launch/cpu_ddp.yaml"),
        ({"gradient_clip_val": 1.0}, r"'gradient_clip_val' \(use clip_grad_norm=1.0"),
    ],
    ids=["accumulation", "lightning-accumulation", "accumulation-no-batch", "lr", "learning_rate", "precision",
         "precision-16", "devices", "gradient_clip_val"],
)  # fmt: skip
def test_arguments_from_other_libraries_name_what_to_write_here(options, hint):
    with pytest.raises(TypeError, match=hint):
        Engine(**options)


def test_an_unknown_argument_suggests_the_close_name():
    with pytest.raises(TypeError, match=r"'max_epoch' \(did you mean 'max_epochs'\?\)"):
        Engine(max_epoch=3)


def test_arguments_that_need_each_other():
    with pytest.raises(ValueError, match=r"need a run_dir"):
        Engine(max_steps=1, keep_best=2)
    with pytest.raises(ValueError, match=r"need a run_dir"):
        Engine(max_steps=1, resume="auto")
    with pytest.raises(ValueError, match=r"tensorboard.*run_dir"):
        Engine(max_steps=1, log_with=["tensorboard"])


def test_good_arguments_land_in_their_groups_and_config_json_is_the_same_object(tmp_path):
    from tests.helpers import TinyClassifier, classification_data

    engine = Engine(max_epochs=1, batch_size=32, keep_last=2, clip_grad_norm=1.0, run_dir=str(tmp_path), progress=False)
    c = engine.config
    assert (c.stop.max_epochs, c.data.batch_size, c.checkpoint.keep_last, c.step.clip_grad_norm) == (1, 32, 2, 1.0)
    assert c.checkpoint_every_epoch  # on by default with a run_dir
    engine.fit(TinyClassifier(), classification_data(64))
    written = json.loads((tmp_path / "config.json").read_text())
    assert {k: written[k] for k in c.to_json()} == c.to_json()
    assert written["preemption_signals"] == ["SIGTERM", "SIGUSR1"]


def test_every_argument_has_one_line_of_documentation_and_the_readme_table_lists_them_all():
    rows = describe()
    names = [name for name, *_ in rows]
    assert len(names) == len(set(names)) == len(EngineConfig.from_options().flat())
    assert all(doc and not doc.endswith(".") for *_, doc in rows)
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Engine arguments") : readme.index("## What lands in the run dir")]
    listed = set(re.findall(r"`(\w+)`", table))
    assert set(names) <= listed, sorted(set(names) - listed)
    assert markdown_table().strip() in table, "README's table is stale: paste framework.config.markdown_table()"


def test_keep_best_with_a_monitor_validation_does_not_log_is_an_error_at_the_first_validation(tmp_path):
    from tests.helpers import TinyClassifier, classification_data

    x, y = classification_data(96)
    engine = Engine(
        max_epochs=2, batch_size=32, keep_best=1, monitor="val/accuracy", run_dir=str(tmp_path), progress=False
    )
    with pytest.raises(ValueError, match=r"monitor='val/accuracy'.*pick one of \['val/acc', 'val/loss'\]"):
        engine.fit(TinyClassifier(), (x, y), (x[:32], y[:32]))
    assert engine.step == 3  # the first epoch trained, its validation found the mistake, nothing was saved
    assert not list((tmp_path / "checkpoints").glob("step-*")) if (tmp_path / "checkpoints").exists() else True


def test_every_stop_signal_is_accepted_and_the_refusal_lists_them():
    for name in STOP_SIGNALS:
        assert EngineConfig.from_options(preemption_signals=(name,)).distributed.preemption_signals == (name,)
    with pytest.raises(ValueError) as err:
        Engine(preemption_signals=("SIGSEGV",))
    assert all(repr(name) in str(err.value) for name in STOP_SIGNALS)


@pytest.mark.parametrize("name", ["SIGHUP", "SIGUSR2"])
def test_a_newly_allowed_signal_really_preempts_a_fit(tmp_path, name):
    """A real signal from inside the run (a callback kills its own process with it): a checkpoint at the agreed
    step boundary, then exit 143."""
    from framework import Callback

    from .helpers import fit_tiny

    class SignalAt(Callback):
        def on_step_end(self, engine, module, metrics):
            if engine.step == 2:
                os.kill(os.getpid(), getattr(signal, name))

    previous = signal.getsignal(getattr(signal, name))
    try:
        with pytest.raises(SystemExit) as info:
            fit_tiny(tmp_path / "run", preemption_signals=(name,), callbacks=[SignalAt()])
    finally:
        signal.signal(getattr(signal, name), previous)  # (a preempted fit leaves its signals ignored)
    assert info.value.code == 143
    assert (tmp_path / "run" / "checkpoints" / "step-00000002" / "manifest.json").is_file()


def test_run_dir_that_is_a_file_is_refused_at_construction_naming_the_fix(tmp_path):
    afile = tmp_path / "notes.txt"
    afile.write_text("not a run dir\n")
    for given in (afile, afile / "sub"):
        with pytest.raises(ValueError) as err:
            Engine(max_steps=1, run_dir=str(given))
        message = str(err.value)
        assert message.startswith(f"run_dir={str(given)!r}; ") and "not a directory" in message, message
        assert "pass a directory" in message
    assert afile.read_text() == "not a run dir\n"


def test_resume_AUTO_is_refused_before_anything_touches_the_disk(tmp_path):
    run = tmp_path / "new-run"
    with pytest.raises(ValueError, match=r"resume='AUTO'; use 'auto' \(lowercase\)"):
        Engine(max_steps=1, run_dir=str(run), resume="AUTO")
    assert not run.exists()  # (no run dir, no .lock)
    # A resume path that does not exist: an error at fit, before the lock is taken.
    from framework import CheckpointError

    from .helpers import TinyClassifier, classification_data

    engine = Engine(max_steps=1, run_dir=str(run), resume=str(tmp_path / "no-such-checkpoint"), progress=False)
    with pytest.raises(CheckpointError, match="does not exist; pass an existing checkpoint directory"):
        engine.fit(TinyClassifier(), classification_data(16))
    assert not run.exists()
