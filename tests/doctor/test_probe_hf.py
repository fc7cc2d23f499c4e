"""framework/doctor/probe.py on Hugging Face causal LMs (issue #19): with dict batches the default
``count_items`` (``len(labels)``) counts sequences while the model's loss is a mean over the labelled
tokens after the causal shift; the default doctor names the mistake and the count to use, the fixed
module is clean, and the probe changes nothing of training.

Tiny GPT-2 and Llama models are built from configs (no download), inside a LoopModule that takes the
HF convention: dict batches of right-padded sequences of varying length, ``labels`` -100 on padding.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from framework import Engine, LoopModule, LoopWarning

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 50, 16


def make_model(kind: str):
    if kind == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config)  # dropout 0.1 (embeddings, attention, residuals)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=LENGTH,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


class CausalLM(LoopModule):
    """The HF way: forward(**batch) computes the loss from ``labels``; the default split_batch and
    count_items (``len(batch["labels"])``, the number of sequences) unless ``count_tokens``."""

    def __init__(self, kind: str, count_tokens: bool = False) -> None:
        super().__init__()
        self.model = make_model(kind)
        self.count_tokens = count_tokens

    def forward(self, inputs):
        return self.model(**inputs)

    def compute_loss(self, outputs, targets):
        return outputs.loss

    def count_items(self, batch):
        if self.count_tokens:
            return (batch["labels"][:, 1:] != -100).sum()  # what the doctor's fix says
        return super().count_items(batch)


class Padded(torch.utils.data.Dataset):
    """Right-padded sequences of 3 to LENGTH tokens: input_ids, attention_mask, labels (-100 on padding)."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(3, LENGTH + 1, (n, 1), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths).long()
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g) * self.mask
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def fit(module: LoopModule, doctor: str = "basic", steps: int = 2) -> tuple[Engine, list[str]]:
    engine = Engine(max_steps=steps, batch_size=16, micro_batch_size=8, progress=False, doctor=doctor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.fit(module, Padded())
    return engine, [str(w.message) for w in caught if issubclass(w.category, LoopWarning)]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_default_count_items_of_a_causal_lm_is_named_with_the_token_count(kind):
    torch.manual_seed(0)
    engine, said = fit(CausalLM(kind))
    assert [f.check for f in engine.doctor.findings] == ["count_weights"], engine.doctor.format_report()
    assert len(said) == 1
    msg = said[0]
    assert msg.startswith("CausalLM.count_items does not count what CausalLM.compute_loss averages over")
    assert "weighted by the target tokens that are not -100 after the causal shift" in msg
    assert 'Fix: define count_items(self, batch) returning (batch["labels"][:, 1:] != -100).sum()' in msg

    torch.manual_seed(0)
    engine, said = fit(CausalLM(kind, count_tokens=True))
    assert engine.doctor.findings == [] and said == [], engine.doctor.format_report()
    assert "count_weights" in engine.doctor.ran


def test_the_probe_on_a_causal_lm_trains_bitwise_like_no_doctor():
    """GPT-2 has dropout everywhere: the probe's three forwards (eval mode, forked RNG, on a copy of the
    module) must not move the RNG or any parameter, although it warns."""
    results = []
    for level in ("off", "basic"):
        torch.manual_seed(0)
        module = CausalLM("gpt2")
        engine, said = fit(module, doctor=level, steps=3)
        assert len(said) == (level == "basic") and ("count_weights" in engine.doctor.ran) == (level == "basic")
        results.append((module.state_dict(), torch.get_rng_state()))
    (ref, ref_rng), (state, rng) = results
    assert state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)
    assert torch.equal(rng, ref_rng)
