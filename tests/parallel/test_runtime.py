"""framework/parallel/runtime.py: which runtime a process gets. One plain process runs without an
Accelerator (no import of Accelerate: memory and start-up it would not earn back), and gets the
device, autocast and GradScaler that Accelerate would give it; launchers (DDP) and trackers get the
Accelerator; DeepSpeed and Megatron launch configs are refused. (Several processes: tests/scripts, launched by the other tests.)"""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch

from framework.parallel.runtime import _one_plain_process, make_runtime, send_to_device
from tests.helpers import ROOT


def test_one_plain_process_trains_without_importing_accelerate():
    code = """
import sys
from framework import Engine
from tests.helpers import TinyClassifier, classification_data
engine = Engine(max_steps=3, batch_size=32, progress=False, mixed_precision="bf16")
engine.fit(TinyClassifier(), classification_data(100))
print(engine._rt.accelerator, engine._rt.device, engine._rt.world_size, "accelerate" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "cpu", "1", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_plain_runtime_gives_what_the_accelerator_gives(tmp_path, precision):
    pytest.importorskip("tensorboard")  # (trackers are what makes a single process take the Accelerator)
    plain = make_runtime(precision)
    accelerated = make_runtime(precision, log_with=["tensorboard"], project_dir=str(tmp_path))
    assert plain.accelerator is None and accelerated.accelerator is not None
    linear = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    dtypes = []
    for rt in (plain, accelerated):
        with rt.autocast():
            dtypes.append(linear(x).dtype)
        assert (rt.device, rt.world_size, rt.rank, rt.is_main, rt.scaler) == (plain.device, 1, 0, True, None)
        assert rt.mixed_precision == precision
    assert dtypes == [torch.bfloat16 if precision == "bf16" else torch.float32] * 2


@pytest.mark.parametrize(
    ("env", "plain"),
    [
        ({}, True),
        ({"WORLD_SIZE": "1"}, True),  # a single-process launch that says so
        ({"ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "True"}, True),  # accelerate launch, 1 process
        ({"WORLD_SIZE": "2"}, False),
        ({"LOCAL_RANK": "0"}, False),  # torchrun with one process: Accelerate builds its process group of one
        ({"OMPI_COMM_WORLD_SIZE": "4"}, False),
        ({"ACCELERATE_USE_FSDP": "true"}, False),
        ({"ACCELERATE_USE_DEEPSPEED": "1"}, False),
        ({"ACCELERATE_TORCH_DEVICE": "cuda:1"}, False),  # a device of Accelerate's choosing
        ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, False),  # (Accelerate then also turns TF32 on)
        ({"ACCELERATE_DYNAMO_BACKEND": "NO"}, True),  # what accelerate launch sets without one
    ],
)
def test_what_counts_as_one_plain_process(monkeypatch, env, plain):
    for name in (
        *("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"),
        *("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM"),
        *("ACCELERATE_TORCH_DEVICE", "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_CPU"),
    ):  # (whatever the shell running the tests has set)
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _one_plain_process() is plain


def test_an_unreadable_flag_is_an_error_not_false(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "maybe")
    with pytest.raises(ValueError, match=r"ACCELERATE_USE_CPU='maybe'; use true or false"):
        make_runtime("no")


@pytest.mark.parametrize(
    "flag,name", [("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED"), ("ACCELERATE_USE_MEGATRON_LM", "MEGATRON-LM")]
)
def test_a_deepspeed_or_megatron_launch_config_is_refused_naming_fsdp(monkeypatch, flag, name):
    # (they step through accelerator.backward and their own optimizer wrappers, which the exact step replaces:
    # run silently, they would train with another loss scaling)
    monkeypatch.setenv(flag, "true")
    with pytest.raises(ValueError, match=rf"asks for {name}, which the engine does not run; shard with FSDP instead"):
        make_runtime("no")


def test_send_to_device_keeps_the_structure():
    Pair = collections.namedtuple("Pair", "inputs targets")

    class Encoding(dict):  # like a tokenizer's BatchEncoding: a mapping with its own .to
        def to(self, device, non_blocking=False):
            return Encoding({k: v.to(device) for k, v in self.items()})

    batch = {
        "pair": Pair(torch.ones(2), [torch.zeros(3), "text", 7]),
        "encoding": Encoding(ids=torch.arange(4)),
        "tuple": (torch.ones(1),),
    }
    moved = send_to_device(batch, torch.device("meta"))
    assert type(moved["pair"]) is Pair and moved["pair"].inputs.is_meta
    assert moved["pair"].targets[0].is_meta and moved["pair"].targets[1:] == ["text", 7]
    assert type(moved["encoding"]) is Encoding and moved["encoding"]["ids"].is_meta
    assert type(moved["tuple"]) is tuple and moved["tuple"][0].is_meta
    assert batch["pair"].inputs.device.type == "cpu"  # the original is left as it was


def test_a_one_process_accelerate_launch_keeps_its_precision(monkeypatch):
    # What `accelerate launch --config_file X.yaml` of one process leaves in the environment.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    for name in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_TORCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    rt = make_runtime()
    assert (rt.accelerator, rt.mixed_precision, rt.device.type) == (None, "bf16", "cpu")
    assert make_runtime("no").mixed_precision == "no"  # the Engine's own argument wins
