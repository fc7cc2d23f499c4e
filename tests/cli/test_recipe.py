"""framework.cli.recipe: typed dataclass configs from defaults < YAML < --key value flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from framework.cli.recipe import ConfigError, convert, load_yaml, parse_config, save_yaml


@dataclass
class Cfg:
    lr: float = 1e-3
    batch_size: int = 64
    micro_batch_size: int | None = None
    model: Literal["mlp", "cnn"] = "mlp"
    name: str = "run"
    smoke: bool = False
    max_time: float | None = 60.0


def test_defaults():
    assert parse_config(Cfg, []) == Cfg()


def test_flags_are_typed_from_the_fields():
    cfg = parse_config(
        Cfg,
        [
            "--lr",
            "3e-4",
            "--batch-size",
            "128",
            "--micro_batch_size",
            "16",
            "--model",
            "cnn",
            "--name",
            "42",
            "--max-time",
            "none",
        ],
    )
    assert cfg == Cfg(lr=3e-4, batch_size=128, micro_batch_size=16, model="cnn", name="42", max_time=None)
    assert isinstance(cfg.lr, float) and isinstance(cfg.batch_size, int) and isinstance(cfg.name, str)


@pytest.mark.parametrize(
    "argv, expected",
    [(["--smoke"], True), (["--smoke", "false"], False), (["--smoke", "yes"], True), (["--smoke", "0"], False)],
)
def test_bool_flag_bare_or_with_value(argv, expected):
    assert parse_config(Cfg, argv).smoke is expected


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nbatch-size: 32\nmodel: cnn\nsmoke: true\nmicro_batch_size: null\n")
    cfg = parse_config(Cfg, ["--config", str(path), "--batch-size", "16"])
    assert cfg == Cfg(lr=0.01, batch_size=16, model="cnn", smoke=True)


def test_yaml_int_for_float_and_whole_float_for_int(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nbatch_size: 64.0\n")
    assert load_yaml(path, Cfg) == {"lr": 1.0, "batch_size": 64}


def test_save_yaml_round_trips(tmp_path):
    cfg = Cfg(lr=0.5, micro_batch_size=8, model="cnn", smoke=True, max_time=None)
    save_yaml(cfg, tmp_path / "sub" / "cfg.yaml")
    assert parse_config(Cfg, ["--config", str(tmp_path / "sub" / "cfg.yaml")]) == cfg


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "1.5"], "expected an integer"),
        (["--lr", "fast"], "expected a number"),
        (["--model", "rnn"], "choose one of"),
        (["--smoke", "maybe"], "expected a boolean"),
        (["--batch-size", "none"], "expected an integer"),
        (["--bach-size", "3"], "unrecognized argument '--bach-size'; did you mean --batch-size?"),
        (["--zzz"], "unrecognized argument '--zzz'; --help lists the flags"),
    ],
)
def test_bad_flags_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(Cfg, argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_no_abbreviated_flags(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--micro", "4"])  # argparse would otherwise take it for --micro-batch-size


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'.*valid keys: lr, batch_size"):
        parse_config(Cfg, ["--config", str(path)])


def test_yaml_is_data_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match=r"constructor|could not determine"):
        load_yaml(path, Cfg)  # safe_load refuses python tags: nothing runs


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_yaml(path, Cfg)


def test_convert_rejects_bool_as_number():
    with pytest.raises(ConfigError):
        convert(True, int, "batch_size")
    assert convert("1e3", int, "n") == 1000
    assert convert("10_000", int, "n") == 10000


def test_not_a_dataclass():
    with pytest.raises(TypeError, match="dataclass"):
        parse_config(dict, [])


def test_help_lists_types_and_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_config(Cfg, ["--help"])
    out = capsys.readouterr().out
    assert "--micro-batch-size" in out and "int | None (default: None)" in out and "{mlp,cnn}" in out


def test_engine_arguments_among_a_recipes_fields_are_checked_documented_and_passed_on():
    from dataclasses import dataclass

    from framework import Engine
    from framework.cli.recipe import engine_options

    @dataclass
    class Config:
        lr: float = 1e-3
        batch_size: int = 64
        keep_last: int = 3
        smoke: bool = False

    cfg = parse_config(Config, ["--keep-last", "2"])
    assert engine_options(cfg) == {"batch_size": 64, "keep_last": 2}  # only the Engine's names
    assert engine_options(cfg, keep_last=5)["keep_last"] == 5
    Engine(**engine_options(cfg))  # accepted as is
    with pytest.raises(SystemExit):  # refused at parse time by the Engine's own check, before anything runs
        parse_config(Config, ["--keep-last", "0"])
