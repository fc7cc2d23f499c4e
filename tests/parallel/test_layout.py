"""framework/parallel/layout.py and tp.py: what a layout is, and every layout or plan that cannot work refused
before anything runs, with the fix in the message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from framework import Engine
from framework.parallel import Layout, tp
from framework.parallel.build import parameters_on_meta, unit_seed
from tests.scripts.layouts_common import TokenLM, token_data


def built(module: TokenLM) -> TokenLM:
    with parameters_on_meta():
        module.configure_model()
    return module


def test_sizes_default_from_the_strategy_and_fill_what_the_others_leave():
    assert Layout.resolve(4).name == "ddp" and Layout.resolve(4).dp_size == 4
    assert Layout.resolve(4, strategy="fsdp") == Layout(1, 4, 1)
    assert Layout.resolve(4, tp_size=2) == Layout(1, 2, 2)  # (with TP the data-parallel dim shards)
    assert Layout.resolve(4, tp_size=2, strategy="ddp") == Layout(2, 1, 2)
    assert Layout.resolve(8, dp_replicate_size=2, tp_size=2) == Layout(2, 2, 2)
    assert Layout.resolve(4, dp_replicate_size=2, dp_shard_size=2).name == "hsdp"
    assert Layout.resolve(1).name == "single" and not Layout.resolve(1).shards


def test_the_ranks_of_a_tp_group_are_neighbours_and_read_the_same_data():
    layout = Layout(1, 2, 2)
    assert [layout.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    assert [layout.reads_for_its_group(r) for r in range(4)] == [True, False, True, False]
    hsdp = Layout(2, 2, 1)
    assert [hsdp.dp_rank(r) for r in range(4)] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(dp_shard_size=2, tp_size=3), r"tp_size=3 does not divide the world size 4"),
        (dict(dp_replicate_size=3), r"is not the world size 4.*product is 4"),
        (dict(dp_shard_size=2, dp_replicate_size=1), r"= 2 is not the world size 4"),
        (dict(dp_shard_size=2, strategy="ddp"), r'strategy="ddp" replicates the model'),
    ],
)
def test_a_layout_whose_product_is_not_the_world_is_refused_with_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        Layout.resolve(4, **kw)


def test_a_size_that_does_not_divide_the_processes_names_the_processes_to_launch():
    # One size alone on too few processes: the other dp size is not 0 ("launch 0 processes") but 1.
    with pytest.raises(ValueError, match=r"= 2 is not the world size 1 .* or launch 2 processes"):
        Layout.resolve(1, dp_shard_size=2)
    with pytest.raises(ValueError, match=r"= 3 is not the world size 4 .* or launch 3 processes"):
        Layout.resolve(4, dp_replicate_size=3)


def test_the_launch_configs_parallelism_section_is_read_and_checked(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
    monkeypatch.setenv("PARALLELISM_CONFIG_DP_SHARD_SIZE", "2")
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    assert Layout.resolve(4) == Layout(1, 2, 2)
    with pytest.raises(ValueError, match=r"tp_size=4 but the launch config's parallelism_config says tp 2"):
        Layout.resolve(4, tp_size=4)
    monkeypatch.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    with pytest.raises(ValueError, match="context parallelism is not supported"):
        Layout.resolve(4)


def test_sizes_that_need_several_processes_are_refused_on_one_before_anything_runs(tmp_path):
    module = TokenLM(tp=True)
    with pytest.raises(ValueError, match=r"tp_size=2 does not divide the world size 1.*launch"):
        Engine(max_steps=1, batch_size=48, tp_size=2, run_dir=str(tmp_path / "a")).fit(module, token_data())
    with pytest.raises(ValueError, match=r"dp_shard_size=4 .* is not the world size 1"):
        Engine(max_steps=1, batch_size=48, dp_shard_size=4).fit(TokenLM(), token_data())
    assert not (tmp_path / "a").exists()  # nothing written


def test_a_plan_without_tp_and_tp_without_a_plan_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"tp_plan\(\) returns a tensor-parallel plan, but the layout has tp_size=1"):
        Engine(max_steps=1, batch_size=48, progress=False).fit(TokenLM(tp=True), token_data())
    with pytest.raises(ValueError, match=r"tp_size=2 splits layers .* but TokenLM has no plan: define tp_plan\(\)"):
        tp.plan_of(TokenLM(tp=False), 2)

    class OwnPlan(TokenLM):
        def parallelize(self, mesh):
            pass

    assert tp.plan_of(OwnPlan(), 2) == {}  # (its own parallelize: no plan needed)


def test_a_plan_is_checked_against_the_module_on_the_meta_device():
    module = built(TokenLM())
    assert next(module.parameters()).device.type == "meta"  # (nothing allocated)
    plan = tp.resolve(module, {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}, 2)
    assert sorted(plan) == ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]
    with pytest.raises(ValueError, match=r"pattern 'blocks.\*.gate' matches no module .* look like"):
        tp.resolve(module, {"blocks.*.gate": "colwise"}, 2)
    with pytest.raises(ValueError, match=r"tp_size=3 does not divide TokenLM.blocks.0.up's out_features \(64\)"):
        tp.resolve(module, {"blocks.*.up": "colwise"}, 3)
    with pytest.raises(ValueError, match=r"tp_size=3 does not divide TokenLM.blocks.0.down's in_features \(64\)"):
        tp.resolve(module, {"blocks.*.down": "rowwise"}, 3)
    with pytest.raises(ValueError, match=r"'packed_colwise' is not a style this engine can apply"):
        tp.resolve(module, {"blocks.*.up": "packed_colwise"}, 2)


def test_a_huggingface_models_own_plan_in_one_line():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    plan = tp.hf_tp_plan(LlamaForCausalLM(config), prefix="lm.")
    assert plan["lm.model.layers.*.self_attn.q_proj"] == "colwise"
    assert plan["lm.model.layers.*.mlp.down_proj"] == "rowwise"
    wrapper = nn.Module()
    wrapper.lm = LlamaForCausalLM(config)
    resolved = tp.resolve(wrapper, plan, 2)
    assert "lm.model.layers.1.self_attn.o_proj" in resolved


def test_unit_seeds_depend_on_the_seed_and_the_path_only():
    assert unit_seed(0, "blocks.0.up") == unit_seed(0, "blocks.0.up")
    assert len({unit_seed(s, p) for s in (0, 1) for p in ("blocks.0.up", "blocks.1.up")}) == 4
    a, b = built(TokenLM()), built(TokenLM())
    from framework.parallel.build import materialize

    torch.manual_seed(123)
    materialize(a, torch.device("cpu"), 0, a.init_weights)
    state = torch.get_rng_state()
    materialize(b, torch.device("cpu"), 0, b.init_weights)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG left alone
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert all(p.device.type == "cpu" and p.abs().sum() > 0 for n, p in a.named_parameters() if "weight" in n)


def test_configure_model_runs_once_per_module_a_later_fit_goes_on_training_it():
    module = TokenLM()
    engine = Engine(max_steps=2, batch_size=48, progress=False)
    engine.fit(module, token_data())
    head, trained = module.head, module.head.weight.detach().clone()
    engine.fit(module, token_data())  # (max_steps reached already: nothing to train, nothing rebuilt)
    assert module.head is head and torch.equal(module.head.weight, trained)
