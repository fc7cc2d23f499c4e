"""Every launch/*.yaml goes through Accelerate's own config loader and `accelerate launch`'s
own argument validation, and resolves to the setup its comments promise."""

from __future__ import annotations

import socket

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

from tests.helpers import ROOT

LAUNCH = ROOT / "launch"
YAMLS = sorted(p.name for p in LAUNCH.glob("*.yaml"))

# file -> (distributed_type, num_processes in the file, mixed_precision)
EXPECTED = {
    "cpu.yaml": ("NO", 1, "no"),
    "cpu_ddp.yaml": ("MULTI_GPU", 2, "no"),
    "gpu.yaml": ("NO", 1, "no"),
    "ddp.yaml": ("MULTI_GPU", -1, "no"),
    "bf16.yaml": ("NO", 1, "bf16"),
    "fp16.yaml": ("NO", 1, "fp16"),
    "fsdp.yaml": ("FSDP", -1, "bf16"),
    "cpu_fsdp.yaml": ("FSDP", 2, "no"),
    "multinode.yaml": ("MULTI_GPU", 16, "no"),
    "cpu_2d.yaml": ("FSDP", 4, "no"),
    "cpu_hsdp.yaml": ("FSDP", 4, "no"),
    "fsdp_tp.yaml": ("FSDP", 8, "bf16"),
    "hsdp.yaml": ("FSDP", 16, "bf16"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_config_is_listed():
    assert set(YAMLS) == set(EXPECTED), "a launch/ YAML without an entry here (or the reverse)"


@pytest.mark.parametrize("name", YAMLS)
def test_loads_with_accelerates_loader(name):
    path = LAUNCH / name
    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` uses
    assert isinstance(config, ClusterConfig)
    assert ClusterConfig.from_yaml_file(str(path)).to_dict() == config.to_dict()  # no unknown keys
    dist, nproc, precision = EXPECTED[name]
    assert config.distributed_type == dist  # a str enum
    assert config.num_processes == nproc
    assert str(config.mixed_precision) == precision
    text = path.read_text()
    assert text.startswith(f"# launch/{name}"), "each file opens with a comment saying what it is for"
    assert "accelerate launch --config_file launch/" + name in text, "each file shows its launch command"


def _resolve(name: str, *flags: str):
    """Run `accelerate launch`'s own validation and environment set-up, stopping short of starting processes."""
    args = launch_command_parser().parse_args(["--config_file", str(LAUNCH / name), *flags, "train.py"])
    args, _, _ = _validate_launch_command(args)
    if args.multi_gpu or args.use_fsdp:
        return args, prepare_multi_gpu_env(args)
    return args, prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml", "bf16.yaml", "fp16.yaml"])
def test_single_process_configs(name):
    args, env = _resolve(name)
    assert args.num_processes == 1 and not args.multi_gpu and not args.use_fsdp
    assert env["ACCELERATE_MIXED_PRECISION"] == EXPECTED[name][2]  # the engine reads it


def test_cpu_ddp_starts_two_workers_on_a_free_port():
    args, _ = _resolve("cpu_ddp.yaml")
    assert args.multi_gpu and args.nproc_per_node == "2" and args.num_machines == 1
    assert int(args.main_process_port) > 0  # 0 in the file: a free port is picked per launch
    assert not args.use_cpu  # use_cpu would collapse the launch to one process (see the file's comments)


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_all_gpu_configs_ask_for_the_gpu_count(name):
    with pytest.raises(ValueError, match="num_processes"):
        _resolve(name)
    args, _ = _resolve(name, "--num_processes", "4")
    assert args.nproc_per_node == "4"


@pytest.mark.parametrize(
    ("name", "min_params", "precision"), [("fsdp.yaml", 1_000_000, "bf16"), ("cpu_fsdp.yaml", 1000, "no")]
)
def test_fsdp_settings_reach_the_workers_where_the_engine_reads_them(name, min_params, precision):
    args, env = _resolve(name, "--num_processes", "2")
    assert args.use_fsdp
    # What framework.parallel.runtime.wants_fsdp and framework.parallel.default_blocks read: FSDP2, the size policy.
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "SIZE_BASED_WRAP" and int(env["FSDP_MIN_NUM_PARAMS"]) == min_params
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == precision


def test_multinode_marks_its_fields_and_resolves_per_node():
    text = (LAUNCH / "multinode.yaml").read_text()
    for key in ("num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"):
        line = next(line for line in text.splitlines() if line.startswith(key + ":"))
        assert "EDIT" in line, f"{key} should be marked EDIT"
    port = str(_free_port())
    args, _ = _resolve("multinode.yaml", "--machine_rank", "1", "--main_process_port", port)
    assert args.nnodes == "2" and args.nproc_per_node == "8" and args.node_rank == 1
    assert args.rdzv_backend == "static" and args.rdzv_endpoint == f"10.0.0.1:{port}"  # node 0 hosts it


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("cpu_2d.yaml", (1, 2, 2)), ("cpu_hsdp.yaml", (2, 2, 1)), ("fsdp_tp.yaml", (1, 4, 2)), ("hsdp.yaml", (2, 8, 1))],
)
def test_layout_configs_reach_the_engine_as_a_layout_of_their_process_count(name, sizes, monkeypatch):
    from framework.parallel import Layout

    flags = ("--machine_rank", "0") if name == "hsdp.yaml" else ()
    args, env = _resolve(name, *flags)
    assert env["ACCELERATE_USE_PARALLELISM_CONFIG"] == "true"
    for key, value in env.items():
        if key.startswith(("PARALLELISM_CONFIG_", "ACCELERATE_USE_")):
            monkeypatch.setenv(key, value)
    layout = Layout.resolve(int(args.num_processes))  # what the engine makes of them (the product is checked)
    assert (layout.dp_replicate, layout.dp_shard, layout.tp) == sizes


def test_readme_covers_every_config():
    readme = (LAUNCH / "README.md").read_text()
    for name in [*YAMLS, "slurm.sbatch", "slurm_env.sh"]:
        assert name in readme, f"launch/README.md does not mention {name}"
