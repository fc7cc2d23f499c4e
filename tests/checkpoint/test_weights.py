"""framework.load_weights(module, path, prefix=None, strict=True, ema=False): a submodule's keys, partial
loads that must match something, the EMA weights, and wrong paths that say what to pass. A refused
load never changes a parameter."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import framework
from framework.checkpoint import CheckpointError, CheckpointWriter, CorruptCheckpointError
from tests.helpers import fit_tiny

WHAT = r"pass a run dir, a checkpoint dir \(e\.g\. runs/x/checkpoints/step-00000120\) or a \.safetensors file"


def bare() -> nn.Module:
    """The "HF model": a plain nn.Module, with a BatchNorm so that there are buffers too."""
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


class Wrapper(framework.LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.lm = bare()

    def forward(self, inputs):
        return self.lm(inputs)

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("w") / "run"
    fit_tiny(run, module=Wrapper(), max_epochs=1)
    return run


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_prefix_loads_a_wrappers_submodule_into_the_bare_model(run):
    saved = framework.load_weights(Wrapper(), run).lm.state_dict()
    for prefix in ("lm.", "lm"):
        model = framework.load_weights(bare(), run, prefix=prefix)
        assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_a_prefix_that_selects_nothing_and_a_missing_prefix_say_what_to_pass(run):
    model = bare()
    before = _snapshot(model)
    with pytest.raises(
        CheckpointError, match=r"no key of .*model\.safetensors starts with prefix='nope\.'.*\['lm\.'\]"
    ):
        framework.load_weights(model, run, prefix="nope")
    with pytest.raises(CheckpointError, match=r"pass prefix='lm\.'"):
        framework.load_weights(model, run)
    with pytest.raises(CheckpointError, match=r"none of its keys is in Sequential \(strict=False would load nothing"):
        framework.load_weights(model, run, strict=False)
    assert _unchanged(model, before)


def test_strict_false_loads_the_keys_both_have_and_a_shape_mismatch_changes_nothing(run):
    partial = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3), nn.Linear(3, 2))
    framework.load_weights(partial, run, prefix="lm.", strict=False)
    saved = framework.load_weights(bare(), run, prefix="lm.").state_dict()
    assert torch.equal(partial[0].weight, saved["0.weight"]) and torch.equal(partial[3].bias, saved["3.bias"])
    wrong = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    before = _snapshot(wrong)
    for strict in (True, False):
        with pytest.raises(CheckpointError, match=r"shapes \(checkpoint vs module\) differ: \['3.weight: \[3, 16\] vs"):
            framework.load_weights(wrong, run, prefix="lm.", strict=strict)
    assert _unchanged(wrong, before)  # (load_state_dict alone would have copied 0.* before raising)


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("config.json", "is a json file"),
        ("metrics.jsonl", "is a jsonl file"),
        ("checkpoints/step-00000004/state.json", "is a json file"),
        ("checkpoints/step-00000004/state.safetensors", "optimizer/RNG state, not the model's weights"),
        ("checkpoints/step-00000004/rng-rank0.safetensors", "optimizer/RNG state, not the model's weights"),
        ("not-there", "does not exist"),
        ("plain-dir", "is neither a run dir .* nor a checkpoint dir"),
    ],
)
def test_a_wrong_path_says_what_the_path_should_be(run, target, says):
    (run / "plain-dir").mkdir(exist_ok=True)
    with pytest.raises(CheckpointError, match=f"{says}.*; {WHAT}"):
        framework.load_weights(Wrapper(), run / target)


def test_a_bare_safetensors_file_loads_and_a_file_of_a_checkpoint_is_verified_with_it(tmp_path, run):
    model = bare()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    assert _unchanged(framework.load_weights(bare(), tmp_path / "bare.safetensors"), model.state_dict())
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "step-00000004", ckpt)
    data = bytearray((ckpt / "state.safetensors").read_bytes())
    data[-1] ^= 1
    (ckpt / "state.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"state\.safetensors: its SHA-256 does not match"):
        framework.load_weights(Wrapper(), ckpt / "model.safetensors")


def _checkpoint_with_ema(root: Path, model: nn.Module, ema: dict[str, torch.Tensor] | None) -> Path:
    w = CheckpointWriter(root, "step-00000001")
    w.prepare()
    w.tensors("model.safetensors", {k: v.contiguous() for k, v in model.state_dict().items()})
    if ema is not None:
        w.tensors("ema.safetensors", ema)
    w.commit()
    return w.finalize()


def test_ema_loads_the_averaged_parameters_and_the_saved_buffers(tmp_path):
    torch.manual_seed(0)
    model = bare()
    model[1].running_mean.fill_(0.5)  # a buffer: it comes from model.safetensors
    ema = {n: p.detach() + 1.0 for n, p in model.named_parameters()}
    path = _checkpoint_with_ema(tmp_path / "checkpoints", model, ema)
    loaded = framework.load_weights(bare(), path, ema=True)
    for n, p in loaded.named_parameters():
        assert torch.equal(p, ema[n]), n
    assert torch.equal(loaded[1].running_mean, torch.full((16,), 0.5))
    plain = framework.load_weights(bare(), path)
    assert torch.equal(plain[0].weight, model[0].weight)


def test_ema_without_ema_weights_is_a_clear_error(tmp_path, run):
    model = Wrapper()
    before = _snapshot(model)
    with pytest.raises(
        CheckpointError, match=r"has no EMA weights \(ema\.safetensors\); train with Engine\(ema_decay="
    ):
        framework.load_weights(model, run, ema=True)
    partial_ema = {"0.weight": torch.zeros(16, 8)}
    path = _checkpoint_with_ema(tmp_path / "checkpoints", bare(), partial_ema)
    with pytest.raises(CorruptCheckpointError, match=r"lacks EMA weights for parameters \['0.bias'"):
        framework.load_weights(bare(), path, ema=True)
    save_file({"0.weight": torch.zeros(16, 8)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(CheckpointError, match="ema=True needs a checkpoint"):
        framework.load_weights(bare(), tmp_path / "bare.safetensors", ema=True)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"prefix": 123}, r"prefix=123 is a int; pass a str naming the submodule"),
        ({"prefix": b"lm."}, r"prefix=b'lm\.' is a bytes; .*\(e\.g\. prefix='lm\.'\)"),
        ({"strict": "False"}, r"strict='False' is a str; pass True or False"),
        ({"strict": 0}, r"strict=0 is a int; pass True or False"),
        ({"ema": "False"}, r"ema='False' is a str; pass True or False"),
        ({"ema": None}, r"ema=None is a NoneType; pass True or False"),
    ],
)
def test_load_weights_checks_its_own_arguments_before_reading_anything(run, kwargs, says):
    model = bare()
    before = _snapshot(model)
    with pytest.raises(TypeError, match=says):
        framework.load_weights(model, run, **{"prefix": "lm.", **kwargs})
    assert _unchanged(model, before)
