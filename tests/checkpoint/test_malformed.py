"""Every malformed checkpoint file is a CorruptCheckpointError naming the file (and the key), raised
before anything is applied; resume="auto" skips such a checkpoint with one warning and resumes the
older one. Table-driven, through the public paths: Engine(resume=path), resume="auto",
framework.load_weights. Each case changes the newest checkpoint (step 8) of a run that also has
step 4; "resealed" cases also rewrite manifest.json and SHA256SUMS to match (a careful tamperer),
so the error comes from the content check, not from the hashes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import framework
from framework.checkpoint import CheckpointError, CheckpointReader, CorruptCheckpointError
from framework.checkpoint.fileformat import JSON, Float, Int, Keys, ListOf, MapOf, Maybe, Str, TupleOf, expect, key_path
from tests.helpers import TinyClassifier, fit_tiny, reseal


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base") / "run"
    fit_tiny(run)  # checkpoints at steps 4 and 8
    return run


# ---------------------------------------------------------------- how each case breaks step 8


def flip_bit(name: str) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        data = bytearray((ckpt / name).read_bytes())
        data[len(data) // 2] ^= 0x04
        (ckpt / name).write_bytes(bytes(data))

    return do


def swap_model_from_step_4(ckpt: Path) -> None:
    shutil.copyfile(ckpt.parent / "step-00000004" / "model.safetensors", ckpt / "model.safetensors")


def truncate(name: str, seal: bool = False) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) // 2])
        if seal:
            reseal(ckpt)

    return do


def replace_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        (ckpt / name).write_bytes(data)
        reseal(ckpt)

    return do


def symlinked_model(ckpt: Path) -> None:
    copy = ckpt.parent.parent / "model-copy.safetensors"  # the same bytes: only the link is wrong
    shutil.copyfile(ckpt / "model.safetensors", copy)
    os.remove(ckpt / "model.safetensors")
    os.symlink(copy, ckpt / "model.safetensors")


def remove(name: str) -> Callable[[Path], None]:
    return lambda ckpt: os.remove(ckpt / name)


def edit_json(name: str, change: Callable[[dict], object]) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        obj = json.loads((ckpt / name).read_text())
        result = change(obj)
        (ckpt / name).write_text(json.dumps(obj if result is None else result))
        reseal(ckpt)

    return do


def deep(n: int) -> object:
    out: object = 0
    for _ in range(n):
        out = [out]
    return out


def dangling_tensor_reference(state: dict) -> None:
    text = json.dumps(state["state"]["optimizer"])
    key = text.split('{"__tensor__": "', 1)[1].split('"', 1)[0]
    state["state"]["optimizer"] = json.loads(text.replace(f'"{key}"', '"optimizer/nothing/here"', 1))


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda ckpt: reseal(ckpt, edit=change)


def rewrite_rng_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        tensors = load_file(str(ckpt / "rng-rank0.safetensors"))
        change(tensors)
        os.remove(ckpt / "rng-rank0.safetensors")
        save_file(tensors, str(ckpt / "rng-rank0.safetensors"))
        reseal(ckpt)

    return do


def rewrite_state_tensors(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def do(ckpt: Path) -> None:
        tensors = load_file(str(ckpt / "state.safetensors"))
        change(tensors)
        os.remove(ckpt / "state.safetensors")
        save_file(tensors, str(ckpt / "state.safetensors"))
        reseal(ckpt)

    return do


EXP_AVG = "optimizer/state/net.0.weight/exp_avg"  # (TinyClassifier's first weight is [32, 8]; AdamW's moment)


def _nan_at(key: str, value: float) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][3, 4] = value

    return change


def drop_files(*names: str) -> Callable[[Path], None]:
    """Remove files and their manifest entries, and reseal: what a careful tamperer (or a sloppy copy) leaves."""

    def do(ckpt: Path) -> None:
        manifest = json.loads((ckpt / "manifest.json").read_text())
        for name in names:
            os.remove(ckpt / name)
            del manifest["files"][name]
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
        reseal(ckpt)

    return do


def bad_aliases(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"aliases": json.dumps({"x": "not.stored"})})
    reseal(ckpt)


def manifest_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda ckpt: (ckpt / "manifest.json").write_bytes(data)


def edit_sums(ckpt: Path) -> None:
    lines = (ckpt / "SHA256SUMS").read_text().splitlines(keepends=True)
    lines[0] = "0" * 64 + lines[0][64:]
    (ckpt / "SHA256SUMS").write_text("".join(lines))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/framework_pickle_marker_should_not_exist",))


def _set(path: tuple, value: object) -> Callable[[dict], None]:
    def change(obj: dict) -> None:
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return change


def _delete(*path: str) -> Callable[[dict], None]:
    def change(obj: dict) -> None:
        for k in path[:-1]:
            obj = obj[k]
        del obj[path[-1]]

    return change


# (case id, how step 8 breaks, the file the error must name, the key or phrase it must name too,
#  whether load_weights(step 8) must refuse it as well: it verifies the whole checkpoint)
CASES = [
    ("model bit flip", flip_bit("model.safetensors"), "model.safetensors", "SHA-256", True),
    ("model swapped in from step 4 (same size)", swap_model_from_step_4, "model.safetensors", "SHA-256", True),
    ("state tensors bit flip", flip_bit("state.safetensors"), "state.safetensors", "SHA-256", True),
    ("model truncated", truncate("model.safetensors"), "model.safetensors", "the manifest says", True),
    ("model truncated, resealed", truncate("model.safetensors", seal=True), "model.safetensors",
     "not a valid safetensors file", True),
    ("model a planted pickle, resealed", replace_bytes("model.safetensors", pickle.dumps(_Evil())),
     "model.safetensors", "not a valid safetensors file", True),
    ("model a symlink to the same bytes", symlinked_model, "model.safetensors", "symbolic link", True),
    ("model aliases metadata points nowhere", bad_aliases, "model.safetensors", "aliases", True),
    ("a listed file is missing", remove("rng-rank0.safetensors"), "rng-rank0.safetensors", "missing", True),
    ("state.json truncated, resealed", truncate("state.json", seal=True), "state.json", "not valid JSON", False),
    ("state.json not UTF-8", replace_bytes("state.json", b'\xff\xfe{"step"'), "state.json", "not valid JSON", False),
    ("state.json a planted pickle", replace_bytes("state.json", pickle.dumps(_Evil())), "state.json",
     "not valid JSON", False),
    ("state.json a list", edit_json("state.json", lambda s: []), "state.json", "expected an object", False),
    ("counters.step a string", edit_json("state.json", _set(("state", "counters", "step"), "8")), "state.json",
     "counters.step", False),
    ("counters.step negative", edit_json("state.json", _set(("state", "counters", "step"), -1)), "state.json",
     "counters.step", False),
    ("counters.should_stop a number", edit_json("state.json", _set(("state", "counters", "should_stop"), 1)), "state.json",
     "counters.should_stop", False),
    ("counters missing", edit_json("state.json", _delete("state", "counters")), "state.json", "state.counters: missing", False),
    ("a counter that is no counter (run_dir)", edit_json("state.json", _set(("state", "counters", "run_dir"), "/victim")),
     "state.json", "state.counters.run_dir: unknown key", False),
    ("an unknown top-level key", edit_json("state.json", _set(("_rt",), None)), "state.json", "unknown key", False),
    ("metrics value a string", edit_json("state.json", _set(("state", "metrics", "val/loss"), "low")), "state.json",
     "metrics['val/loss']", False),
    ("optimizer nested 100000 deep", edit_json("state.json", _set(("state", "optimizer"), "<deep>")), "state.json",
     "RecursionError", False),
    ("optimizer nested 200 deep", edit_json("state.json", _set(("state", "optimizer"), deep(200))), "state.json",
     "nested deeper than", False),
    ("optimizer refers to a missing tensor", edit_json("state.json", dangling_tensor_reference), "state.json",
     "optimizer: a malformed entry", False),
    ("optimizer param groups mangled", edit_json("state.json", _set(("state", "optimizer", "param_groups"), [])), "state.json",
     "optimizer", False),
    ("manifest missing", remove("manifest.json"), "manifest.json", "the save (or a prune) did not finish", True),
    ("manifest not JSON", manifest_bytes(b'{"format": 2, "files": {'), "manifest.json", "not valid JSON", True),
    ("manifest nested 100000 deep", manifest_bytes(b"[" * 100_000 + b"]" * 100_000), "manifest.json",
     "RecursionError", True),
    ("manifest files is a list", edit_manifest(_set(("files",), ["model.safetensors"])), "manifest.json",
     "files: expected an object", True),
    ("manifest file name with a slash", edit_manifest(_set(("files", "sub/x"), {"size": 1, "sha256": "0" * 64})),
     "manifest.json", "files['sub/x']: bad key", True),
    ("manifest file name ..", edit_manifest(_set(("files", ".."), {"size": 1, "sha256": "0" * 64})),
     "manifest.json", "files['..']: bad key", True),
    ("manifest negative size", edit_manifest(_set(("files", "state.json", "size"), -5)), "manifest.json",
     "files['state.json'].size", True),
    ("manifest size a bool", edit_manifest(_set(("files", "state.json", "size"), True)), "manifest.json",
     "files['state.json'].size", True),
    ("manifest sha256 not hex", edit_manifest(_set(("files", "state.json", "sha256"), "xyz")), "manifest.json",
     "files['state.json'].sha256", True),
    ("manifest unknown key", edit_manifest(_set(("owner",), "me")), "manifest.json", "owner: unknown key", True),
    ("manifest lists SHA256SUMS", edit_manifest(_set(("files", "SHA256SUMS"), {"size": 1, "sha256": "0" * 64})),
     "manifest.json", "reserved name", True),
    ("manifest monitor_value a string", edit_manifest(_set(("monitor_value",), "0.3")), "manifest.json",
     "monitor_value", True),
    ("SHA256SUMS missing", remove("SHA256SUMS"), "SHA256SUMS", "incomplete", True),
    ("SHA256SUMS disagrees", edit_sums, "SHA256SUMS", "does not list the same", True),
    ("rng numpy position out of range", edit_json("rng-rank0.json", _set(("numpy", 1), 9999)), "rng-rank0.json",
     "numpy[1]", False),
    ("rng python state too short", edit_json("rng-rank0.json", _set(("python", 1), [1, 2, 3])), "rng-rank0.json",
     "python[1]", False),
    ("rng python position invalid", edit_json("rng-rank0.json", _set(("python", 1), [0] * 624 + [999])),
     "rng-rank0.json", "python", False),
    ("rng python state missing", edit_json("rng-rank0.json", _delete("python")), "rng-rank0.json",
     "python: missing", False),
    ("rng torch state of the wrong shape and dtype", rewrite_rng_tensors(_set(("torch",), torch.zeros(10))),
     "rng-rank0.safetensors", "torch: expected torch.uint8", False),
    ("rng torch state invalid bytes", rewrite_rng_tensors(lambda t: t["torch"].fill_(255)), "rng-rank0.safetensors",
     "not a valid RNG state", False),
    ("rng an unknown state", rewrite_rng_tensors(_set(("evil",), torch.zeros(1))), "rng-rank0.safetensors",
     "evil", False),
    # content checked for shape and range, not only type (issue 28)
    ("optimizer moment of the wrong shape", rewrite_state_tensors(lambda t: t.update({EXP_AVG: t[EXP_AVG].T.contiguous()})),
     "state.safetensors", f"{EXP_AVG}: has shape [8, 32], its parameter's is [32, 8]", False),
    ("optimizer moment flattened", rewrite_state_tensors(lambda t: t.update({EXP_AVG: t[EXP_AVG].flatten()})),
     "state.safetensors", f"{EXP_AVG}: has shape [256]", False),
    ("optimizer moment with a NaN", rewrite_state_tensors(_nan_at(EXP_AVG, float("nan"))), "state.safetensors",
     f"{EXP_AVG}: holds NaN or inf", False),
    ("optimizer moment with an inf", rewrite_state_tensors(_nan_at(EXP_AVG, float("inf"))), "state.safetensors",
     f"{EXP_AVG}: holds NaN or inf", False),
    ("batch_in_epoch past the epoch", edit_json("state.json", _set(("state", "counters", "batch_in_epoch"), 10**9)),
     "state.json", "batch_in_epoch=1000000000, but an epoch of this data has 4 optimizer steps", False),
    ("rng files removed with their manifest entries", drop_files("rng-rank0.json", "rng-rank0.safetensors"),
     "step-00000008", "says 1 process(es) wrote it, each with its RNG state", False),
    ("state.json claims another world size", edit_json("state.json", _set(("world_size",), 2)), "step-00000008",
     "missing ['rng-rank1.json', 'rng-rank1.safetensors']", False),
]  # fmt: skip


def _break(run: Path, change: Callable[[Path], None]) -> Path:
    ckpt = run / "checkpoints" / "step-00000008"
    change(ckpt)
    state = ckpt / "state.json"
    if state.exists() and b"<deep>" in state.read_bytes():  # (written raw: json.dumps cannot nest this deep)
        state.write_bytes(state.read_bytes().replace(b'"<deep>"', b"[" * 100_000 + b"]" * 100_000))
        reseal(ckpt)
    return ckpt


def _params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def _same(module: torch.nn.Module, params: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(module.parameters(), params, strict=True))


@pytest.mark.parametrize(("change", "file", "phrase", "weights_too"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_checkpoint_is_named_never_applied_and_auto_uses_the_older_one(
    tmp_path, base_run, change, file, phrase, weights_too
):
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    ckpt = _break(run, change)

    # An explicit resume: an error naming the file and the key; the module's parameters untouched.
    torch.manual_seed(1)
    module = TinyClassifier()
    before = _params(module)
    with pytest.raises(CorruptCheckpointError) as info:
        fit_tiny(run, module=module, resume=str(ckpt))
    message = str(info.value)
    assert file in message and phrase in message, message
    assert _same(module, before)

    # load_weights refuses what does not verify, and changes nothing.
    if weights_too:
        with pytest.raises(CorruptCheckpointError, match=file.replace(".", r"\.")):
            framework.load_weights(module, ckpt)
        assert _same(module, before)

    # resume="auto": one warning naming step 8 and the older step 4, which it resumes.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, module = fit_tiny(run, module=TinyClassifier(), resume="auto", max_steps=4)
    skips = [str(w.message) for w in caught if "fail verification" in str(w.message)]
    assert len(skips) == 1 and "step-00000008" in skips[0] and "Using the older step-00000004" in skips[0], skips
    assert engine.step == 4
    older = CheckpointReader(run / "checkpoints" / "step-00000004").tensors("model.safetensors")
    assert all(torch.equal(v, older[k]) for k, v in module.state_dict().items())
    # The broken checkpoint is moved aside with the branch it belonged to: "auto" never tries it again.
    assert (run / "checkpoints" / "abandoned" / "step-00000008").is_dir()
    assert not (run / "checkpoints" / "step-00000008").exists()


def test_auto_refuses_to_start_over_when_no_checkpoint_verifies(tmp_path, base_run):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for step in (4, 8):
        flip_bit("model.safetensors")(run / "checkpoints" / f"step-{step:08d}")
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* can be used: step-00000008 .*step-00000004"):
        fit_tiny(run, resume="auto")


def test_a_checkpoint_of_another_format_stops_auto_instead_of_being_skipped(tmp_path, base_run):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    reseal(run / "checkpoints" / "step-00000008", edit=_set(("format",), 1))
    with pytest.raises(CheckpointError, match=r"manifest\.json has format 1, written by an earlier framework") as e:
        fit_tiny(run, resume="auto")
    assert not isinstance(e.value, CorruptCheckpointError)


# ---------------------------------------------------------------- the schema checker itself


SCHEMA = Keys(
    {
        "step": Int(min=0),
        "name": Str(pattern="[a-z]+"),
        "loss": Maybe(Float()),
        "tags": ListOf(str, max_len=2),
        "pair": TupleOf(int, bool),
        "extra": MapOf(Float(finite=False)),
        "blob": JSON(max_depth=3),
    },
    optional={"note": str},
)
GOOD = {"step": 1, "name": "a", "loss": None, "tags": ["x"], "pair": [1, True], "extra": {"nan": float("nan")},
        "blob": {"a": [1, {"b": 2}]}}  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(("step",), True), "state.json: step: expected an int >= 0, got True (bool)"),
        (_set(("step",), 1.0), "step: expected an int >= 0, got 1.0 (float)"),
        (_set(("name",), "A1"), "name: expected a string matching '[a-z]+'"),
        (_set(("loss",), float("inf")), "loss: expected null or a finite number"),
        (_set(("tags",), ["a", "b", "c"]), "tags: expected a list of 0 to 2 entries, got 3"),
        (_set(("tags",), [1]), "tags[0]: expected a string, got 1 (int)"),
        (_set(("pair",), [1]), "pair: expected a list of 2 entries"),
        (_set(("pair",), [1, 0]), "pair[1]: expected true or false"),
        (_set(("extra",), {"k": "v"}), "extra.k: expected a number"),
        (_set(("blob",), [[[[1]]]]), "blob[0][0][0]: nested deeper than 3 levels"),
        (_delete("step"), "step: missing"),
        (_set(("other",), 1), "other: unknown key (expected only 'step', 'name'"),
        (_set(("note",), 3), "note: expected a string"),
    ],
)
def test_expect_names_the_file_the_key_and_what_was_expected(change, message):
    expect(json.loads(json.dumps(GOOD)), SCHEMA, where="state.json")  # (the good one passes)
    bad = json.loads(json.dumps(GOOD))
    change(bad)
    with pytest.raises(CorruptCheckpointError) as info:
        expect(bad, SCHEMA, where="state.json", hint="resume from another checkpoint")
    assert message in str(info.value) and str(info.value).startswith("state.json: ")
    assert str(info.value).endswith("; resume from another checkpoint")


def test_key_paths_read_like_the_code_that_would_index_them():
    assert key_path(("optimizer", "state", 0, "exp_avg")) == "optimizer.state[0].exp_avg"
    assert key_path(("files", "a/b", "size")) == "files['a/b'].size"
    assert key_path(()) == "(top level)"
