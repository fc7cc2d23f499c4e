"""framework/checkpoint/weights.py (export): one safetensors file or a HuggingFace model dir from a run dir's checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from framework import CheckpointError, Engine, LoopModule
from framework.checkpoint import newest_complete
from framework.checkpoint.fileformat import decode, encode_sums
from framework.checkpoint.weights import (
    ExportError,
    export_hf,
    export_safetensors,
    full_weights,
    save_hf_artifacts,
    select_prefix,
)
from framework.cli import main as cli


class Tied(LoopModule):
    """A token model whose output layer shares the embedding matrix (tied weights), plus a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight
        self.head = nn.Linear(20, 3)

    def forward(self, inputs):
        return self.head(self.out(self.emb(inputs)).mean(1))

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets)


def _train(run_dir: Path) -> Tied:
    torch.manual_seed(0)
    x, y = torch.randint(0, 20, (64, 5)), torch.randint(0, 3, (64,))
    module = Tied()
    engine = Engine(max_steps=3, batch_size=16, run_dir=str(run_dir), checkpoint_every_n_steps=1, progress=False)
    engine.fit(module, (x, y))
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Tied]:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    return run_dir, _train(run_dir)


def test_one_file_holds_the_trained_state_dict_with_tied_weights_written_out(trained, tmp_path):
    run_dir, module = trained
    assert cli(["export", str(run_dir), "-o", str(tmp_path / "model.safetensors")]) == 0
    loaded = load_file(str(tmp_path / "model.safetensors"))  # plain safetensors: no framework needed to read it
    expected = module.state_dict()
    assert sorted(loaded) == sorted(expected)  # the tied name is there too
    for name, t in expected.items():
        assert torch.equal(loaded[name], t), name
    fresh = Tied()
    fresh.load_state_dict(loaded)  # strict
    assert torch.equal(fresh.emb.weight, module.emb.weight)


def test_prefix_selects_and_strips_one_submodule(trained, tmp_path):
    run_dir, module = trained
    out = export_safetensors(run_dir, tmp_path / "head.safetensors", prefix="head.")
    loaded = load_file(str(out))
    assert sorted(loaded) == ["bias", "weight"]
    bare = nn.Linear(20, 3)
    bare.load_state_dict(loaded)
    assert torch.equal(bare.weight, module.head.weight)
    with pytest.raises(ExportError, match=r"no weight name starts with 'lm\.'.*'emb\.', 'head\.', 'out\.'"):
        export_safetensors(run_dir, tmp_path / "x.safetensors", prefix="lm.")
    assert select_prefix({"a.b": torch.zeros(1)}, "") == {"a.b": torch.zeros(1)}


def test_the_run_dir_means_its_newest_checkpoint_and_a_named_one_is_that_one(trained):
    run_dir, module = trained
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert names == ["step-00000001", "step-00000002", "step-00000003"]
    newest, first = full_weights(run_dir), full_weights(run_dir / "checkpoints" / names[0])
    assert torch.equal(newest["head.weight"], module.head.weight)
    assert not torch.equal(first["head.weight"], module.head.weight)  # step 1's weights, not the final ones
    assert first["out.weight"] is first["emb.weight"]  # tied, as in module.state_dict()


def test_errors_name_the_fix(tmp_path, trained, capsys):
    with pytest.raises(ExportError, match="does not exist"):
        full_weights(tmp_path / "typo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"train with a run dir \(a recipe's --run-dir, or Engine\(run_dir=...\)\)"):
        full_weights(tmp_path / "empty")
    run_dir, _ = trained
    with pytest.raises(ExportError, match=r"save_hf_artifacts\(run_dir, hf_model, prefix='lm\.', tokenizer=tok\)"):
        export_hf(run_dir, tmp_path / "hf_out")
    with pytest.raises(ExportError, match=r"\*\.safetensors"):
        export_safetensors(run_dir, tmp_path / "model.pt")
    assert cli(["export", str(tmp_path / "empty"), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "export: error: no complete checkpoint" in capsys.readouterr().err
    assert cli(["export", str(run_dir)]) == 2  # nothing asked for
    assert "-o FILE.safetensors, --hf OUT_DIR" in capsys.readouterr().err
    with pytest.raises(ExportError, match=r"has no HuggingFace \.config"):
        save_hf_artifacts(tmp_path, Tied())


def test_usage_lists_every_command(capsys):
    assert cli(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("plot RUN_DIR", "doctor path/to/recipe.py", "export RUN_DIR"):
        assert command in usage


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "/tmp/framework_export_pickle_marker_should_not_exist"


def test_a_planted_pickle_is_refused_not_run(tmp_path, capsys):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    _train(tmp_path / "run")
    ckpt = newest_complete(tmp_path / "run" / "checkpoints")
    assert ckpt is not None
    payload = pickle.dumps(_Evil())
    (ckpt / "model.safetensors").write_bytes(payload)
    # A careful attacker fixes the manifest's size and hash, and SHA256SUMS, too.
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    data = json.dumps(manifest).encode()
    (ckpt / "manifest.json").write_bytes(data)
    (ckpt / "SHA256SUMS").write_bytes(encode_sums(decode(data, where="test").files, data))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        full_weights(tmp_path / "run")
    assert cli(["export", str(tmp_path / "run"), "-o", str(tmp_path / "m.safetensors")]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not os.path.exists(MARKER)


# ---------------------------------------------------------------- HuggingFace


class Wrapped(LoopModule):
    """A transformers model under self.lm, trained with its own loss on dict batches (the recipe's shape)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2
        )
        self.lm = GPT2LMHeadModel(config)

    def forward(self, inputs):
        return self.lm(**inputs)

    def compute_loss(self, outputs, targets):
        return outputs.loss

    def count_items(self, batch):
        return (batch["labels"][:, 1:] != -100).sum()


def test_hf_export_loads_with_from_pretrained_and_gives_the_trained_logits(tmp_path, capsys):
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    module = Wrapped()
    run_dir = tmp_path / "run"
    save_hf_artifacts(run_dir, module.lm, prefix="lm.")
    x = torch.randint(0, 40, (48, 12))
    Engine(max_steps=3, batch_size=16, run_dir=str(run_dir), progress=False).fit(
        module, [{"input_ids": r, "labels": r} for r in x]
    )
    assert json.loads((run_dir / "hf" / "export.json").read_text())["architecture"] == "GPT2LMHeadModel"
    assert cli(["export", str(run_dir), "--hf", str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    module.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, module.lm(input_ids=x).logits)
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # none was recorded
    # An export never lands on top of another one's files.
    with pytest.raises(ExportError, match="not empty"):
        export_hf(run_dir, tmp_path / "out")
    # A prefix that does not fit the recorded model is named as the suspect.
    save_hf_artifacts(run_dir, module.lm, prefix="model.")
    with pytest.raises(ExportError, match=r"no weight name starts with 'model\.'"):
        export_hf(run_dir, tmp_path / "out2")
    with pytest.raises(ExportError, match="prefix='lm'"):
        save_hf_artifacts(run_dir, module.lm, prefix="lm")


# ---------------------------------------------------------------- RUN_DIR/hf/ as export reads it: checked, never followed out


SECRET = "a file outside the run dir: must never land in an export\n"


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    module = Wrapped()
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    save_hf_artifacts(run_dir, module.lm, prefix="lm.")
    x = torch.randint(0, 40, (32, 12))
    Engine(max_steps=2, batch_size=16, run_dir=str(run_dir), progress=False).fit(
        module, [{"input_ids": r, "labels": r} for r in x]
    )
    return run_dir


def _with_tokenizer(hf: Path, *extra: str) -> Path:
    """export.json says a tokenizer was saved; hf/tokenizer/ holds its (stand-in) files."""
    meta = json.loads((hf / "export.json").read_text())
    (hf / "export.json").write_text(json.dumps({**meta, "tokenizer": True}))
    (hf / "tokenizer").mkdir()
    (hf / "tokenizer" / "tokenizer_config.json").write_text('{"model_max_length": 12}')
    return hf / "tokenizer"


def _link_in_tokenizer(hf: Path, secret: Path) -> str:
    os.symlink(secret, _with_tokenizer(hf) / "vocab.json")
    return "vocab.json is a symbolic link"


def _dir_in_tokenizer(hf: Path, secret: Path) -> str:
    (_with_tokenizer(hf) / "nested").mkdir()
    return "tokenizer/nested is a directory"


def _link_as_config(hf: Path, secret: Path) -> str:
    os.remove(hf / "config.json")
    os.symlink(secret, hf / "config.json")
    return "config.json is a symbolic link"


def _hf_dir_a_link(hf: Path, secret: Path) -> str:
    elsewhere = secret.parent / "elsewhere"
    os.replace(hf, elsewhere)
    os.symlink(elsewhere, hf)
    return "hf is a symbolic link"


def _write(name: str, text: str, says: str):
    def do(hf: Path, secret: Path) -> str:
        (hf / name).write_text(text)
        return says

    return do


def _edit_export_json(key: str, value: object, says: str):
    def do(hf: Path, secret: Path) -> str:
        meta = json.loads((hf / "export.json").read_text())
        (hf / "export.json").write_text(json.dumps({**meta, key: value}))
        return says

    return do


HF_CASES = [
    ("a symlink in hf/tokenizer", _link_in_tokenizer),
    ("a sub-directory in hf/tokenizer", _dir_in_tokenizer),
    ("hf/config.json a symlink", _link_as_config),
    ("hf itself a symlink", _hf_dir_a_link),
    ("export.json not JSON", _write("export.json", '{"format": 1, "prefix": ', "export.json is not valid JSON")),
    ("export.json a list", _write("export.json", "[1, 2]", "export.json holds a JSON list, not an object")),
    ("export.json prefix a number", _edit_export_json("prefix", 5, "export.json: prefix: expected a string")),
    ("export.json tokenizer a string", _edit_export_json("tokenizer", "yes", "export.json: tokenizer: expected true")),
    ("export.json names no model class", _edit_export_json("architecture", "AutoConfig", "does not have as a model")),
    ("export.json an unknown key", _edit_export_json("cls", "os.system", "export.json: cls: unknown key")),
    ("config.json not JSON", _write("config.json", "{'n_embd': 16", "config.json is not valid JSON")),
    ("config.json of the wrong types", _write("config.json", '{"model_type": "gpt2", "n_embd": "wide", "n_head": 0}',
                                               "config.json does not build a GPT2LMHeadModel")),
]  # fmt: skip


@pytest.mark.parametrize("change", [c[1] for c in HF_CASES], ids=[c[0] for c in HF_CASES])
def test_export_hf_refuses_a_malformed_or_linked_hf_dir_with_exit_2_and_copies_nothing(
    hf_run, tmp_path, capsys, change
):
    import shutil

    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    run_dir = tmp_path / "run"
    shutil.copytree(hf_run, run_dir)
    says = change(run_dir / "hf", secret)
    out = tmp_path / "out"
    assert cli(["export", str(run_dir), "--hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: error: ") and says in err and "Traceback" not in err, err
    assert not out.exists()  # (refused before anything was written)
    assert secret.read_text() == SECRET


def test_export_hf_copies_the_tokenizers_regular_files(hf_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(hf_run, run_dir)
    _with_tokenizer(run_dir / "hf")
    assert cli(["export", str(run_dir), "--hf", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 12}'
    assert (tmp_path / "out" / "model.safetensors").is_file()
