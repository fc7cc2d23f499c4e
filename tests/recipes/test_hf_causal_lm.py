"""recipes/hf_causal_lm.py: data, the token count after the causal shift, exactness under accumulation and
2 processes (with a wrong scaling shown to fail), smoke runs in-process and launched, the HF export."""

from __future__ import annotations

import json
import os

import pytest
import torch

from framework import Engine, load_weights
from framework.checkpoint.weights import full_weights
from framework.cli import main as cli
from tests.helpers import ROOT, launch
from tests.recipes import launch_commands, load_recipe

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach for the Hub
hf = load_recipe("hf_causal_lm")

SMOKE = ("--smoke", "--progress", "false", "--sample-tokens", "0")
# The framework's claim (README "The exactness guarantee"): max |parameter difference| <= 1e-5.
TOL = 1e-5


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _tiny() -> hf.Config:
    """A few files, a small vocabulary and a 2-layer model: every test below runs in seconds."""
    return hf.Config(
        max_files=12,
        held_out_every=4,
        vocab_size=384,
        block_size=64,
        hidden_size=64,
        intermediate_size=128,
        n_layer=2,
        n_head=2,
    )


@pytest.fixture(scope="module")
def data():
    return hf.make_data(_tiny())


def test_docstring_begins_with_its_launch_commands():
    first = launch_commands(hf.__doc__)
    assert first[0].startswith("python recipes/hf_causal_lm.py")
    text = "\n".join(first)
    for cmd in (
        "accelerate launch --config_file launch/cpu.yaml recipes/hf_causal_lm.py",
        "accelerate launch --config_file launch/cpu_ddp.yaml recipes/hf_causal_lm.py",
        "--micro-batch-size",
        "--smoke",
        "python -m framework export runs/hf_causal_lm --hf",
    ):
        assert cmd in text


def test_files_are_held_out_whole_and_the_tokenizer_is_deterministic_and_lossless(data):
    cfg = _tiny()
    train_texts, val_texts = hf.source_files(cfg)
    assert len(train_texts) == 9 and len(val_texts) == 3  # files 0, 4, 8 of 12 are held out
    assert not set(train_texts) & set(val_texts)
    tokenizer, train, val = data
    again = hf.train_tokenizer(train_texts, cfg.vocab_size)
    assert again.get_vocab() == tokenizer.get_vocab()  # every process trains the same tokenizer
    assert len(tokenizer) == cfg.vocab_size
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.bos_token_id)  # <eos> is learned
    text = val_texts[0]  # never seen by the tokenizer's training, still encoded exactly (byte-level)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    lengths = [len(s["input_ids"]) for s in train]
    assert max(lengths) <= cfg.block_size and min(lengths) >= 2
    assert len(set(lengths)) > 10, "sequences end at line breaks, so their lengths vary"
    ends = [tokenizer.decode(s["input_ids"][-1:]) for s in train]
    assert sum("\n" in e or e == hf.EOS for e in ends) / len(ends) > 0.9  # 0.94 here; the rest: long lines
    # Joined back, the sequences are the files: nothing is lost or repeated at the cuts.
    ids = [i for s in val for i in s["input_ids"]]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "".join(val_texts)


def test_count_items_is_what_the_transformers_loss_averages_over(data):
    tokenizer, train, _ = data
    collate = hf.make_collator(tokenizer)
    batch = dict(collate([train[i] for i in (0, 5, 9, 30)]))
    lengths = torch.tensor([len(train[i]["input_ids"]) for i in (0, 5, 9, 30)])
    assert len(set(lengths.tolist())) > 1  # padding happens
    labels = batch["labels"]
    assert torch.equal(labels == hf.IGNORE, batch["attention_mask"] == 0), "exactly the padding is ignored"
    torch.manual_seed(0)
    module = hf.CausalLM(_tiny(), tokenizer)
    out = module(batch)
    n = module.count_items(batch)
    assert int(n) == int((lengths - 1).sum())  # each sequence predicts all but its first token
    # transformers' own sum / num_items path agrees only with this count, ...
    summed = module.lm(**batch, num_items_in_batch=n).loss
    torch.testing.assert_close(summed, module.compute_loss(out, labels), rtol=1e-6, atol=0)
    # ... and it is the token mean written out by hand, with the shift.
    logits, target = out.logits[:, :-1], labels[:, 1:]
    by_hand = torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100])
    torch.testing.assert_close(by_hand, out.loss, rtol=1e-6, atol=0)
    # Counting the labels before the shift would be off by one token per sequence.
    assert int((labels != hf.IGNORE).sum()) == int(n) + len(lengths)


# ---------------------------------------------------------------- the recipe's runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The smoke run, one process, one forward per global batch: what the other splits must reproduce."""
    run_dir = tmp_path_factory.mktemp("hf") / "ref"
    result = hf.main([*SMOKE, "--run-dir", str(run_dir)])
    return run_dir, result


def test_smoke_in_process(reference, capsys):
    run_dir, result = reference
    assert result["steps"] == 8 and result["val/ppl"] > 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/token_acc" in r for r in records) == 2  # validated at the ends of epochs 0 and 1 (steps 3, 6)
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6, 8]
    assert result["val/ppl"] < result["unigram_ppl"] * 2  # sane, though 8 steps learn little
    for f in ("config.json", "recipe_config.yaml", "hf/export.json", "hf/config.json", "hf/tokenizer/tokenizer.json"):
        assert (run_dir / f).is_file(), f


def test_hf_export_gives_the_trained_logits_and_the_tokenizer(reference, tmp_path, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = reference
    out = tmp_path / "exported"
    assert (
        cli(["export", str(run_dir), "--hf", str(out), "-o", str(tmp_path / "lm.safetensors"), "--prefix", "lm."]) == 0
    )
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == hf.PAD and tokenizer.eos_token == hf.EOS
    # The trained module, from its own checkpoint, with the recipe's smoke config.
    cfg = hf.parse_config(hf.Config, ["--config", str(run_dir / "recipe_config.yaml")])  # the run's own settings
    original = hf.make_data(cfg)[0]
    assert tokenizer("def f(x):\n    return x")["input_ids"] == original("def f(x):\n    return x")["input_ids"]
    module = load_weights(hf.CausalLM(cfg, original), run_dir).eval()
    ids = tokenizer(["import os\nprint(os.sep)\n", "class A:\n    pass\n"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got, want = model(**ids).logits, module.lm(**ids).logits
    assert torch.equal(got, want), (got - want).abs().max()
    # The -o file is the bare HF model's state dict: it loads strictly into a fresh one.
    from safetensors.torch import load_file

    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(load_file(str(tmp_path / "lm.safetensors")))
    assert torch.equal(fresh.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_accumulated_micro_batches_match_one_forward(reference, tmp_path):
    run_dir, _ = reference
    acc = tmp_path / "acc"
    hf.main([*SMOKE, "--run-dir", str(acc), "--micro-batch-size", "4"])  # 4 micro-batches of 4, padded apart
    assert json.loads((acc / "config.json").read_text())["resolved"]["accumulation"] == 4
    diff = _max_diff(full_weights(acc), full_weights(run_dir))
    assert diff <= TOL, diff


@pytest.mark.multiprocess
def test_two_processes_match_one_under_accelerate_launch(reference, tmp_path):
    run_dir, _ = reference
    ddp = tmp_path / "ddp"
    proc = launch(ROOT / "recipes/hf_causal_lm.py", *SMOKE, "--run-dir", str(ddp), "--micro-batch-size", "4")
    assert proc.stdout.count("hf_causal_lm: val/ppl=") == 1, proc.stdout  # only rank 0 prints the summary
    resolved = json.loads((ddp / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["accumulation"] == 2  # 16 = 2 processes x 2 x 4
    diff = _max_diff(full_weights(ddp), full_weights(run_dir))
    assert diff <= TOL, diff


@pytest.mark.multiprocess
def test_tensor_parallel_over_two_processes_matches_one_and_exports(reference, tmp_path):
    # The model's own HF plan (attention and MLP split over 2 processes; the tied embedding whole) trains to the
    # one-process parameters, and `export --hf` assembles whole weights from the shards.
    from transformers import AutoModelForCausalLM

    run_dir, _ = reference
    tp = tmp_path / "tp"
    proc = launch(ROOT / "recipes/hf_causal_lm.py", *SMOKE, "--run-dir", str(tp), "--tp-size", "2")
    assert proc.stdout.count("hf_causal_lm: val/ppl=") == 1
    assert json.loads((tp / "config.json").read_text())["resolved"]["strategy"] == "tp"
    assert _max_diff(full_weights(tp), full_weights(run_dir)) <= TOL
    out = tmp_path / "exported"
    assert cli(["export", str(tp), "--hf", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    reference_model = AutoModelForCausalLM.from_pretrained(_export(run_dir, tmp_path / "ref-export"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reference_model.state_dict().items(), strict=True):
        assert float((a - b).abs().max()) <= TOL, name


def _export(run_dir, out):
    assert cli(["export", str(run_dir), "--hf", str(out)]) == 0
    return out


class NaiveScaling(hf.CausalLM):
    """The common bug: every micro-batch weighs the same (its token mean / accumulation steps), as a
    plain ``accelerator.backward(loss)`` loop does, whatever its number of tokens."""

    def count_items(self, batch):
        return 1


def _fit(data, module_cls, micro: int) -> dict[str, torch.Tensor]:
    cfg = _tiny()
    tokenizer, train, _ = data
    torch.manual_seed(cfg.seed)
    module = module_cls(cfg, tokenizer)
    engine = Engine(
        max_steps=8,
        batch_size=16,
        micro_batch_size=micro,
        seed=0,
        collate_fn=hf.make_collator(tokenizer),
        progress=False,
    )
    engine.fit(module, train[:43])  # 3 steps an epoch, the last one partial (11 sequences)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_naive_scaling_breaks_the_tolerance_the_engine_meets(data):
    full, micro = _fit(data, hf.CausalLM, 16), _fit(data, hf.CausalLM, 4)
    naive = _fit(data, NaiveScaling, 4)
    assert _max_diff(micro, full) <= TOL
    assert _max_diff(naive, full) > 10 * TOL, _max_diff(naive, full)
