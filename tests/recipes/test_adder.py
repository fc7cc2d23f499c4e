"""recipes/adder.py: data, answer-token loss, the exact-match argument, smoke runs in-process and launched."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import ROOT, launch
from tests.recipes import launch_commands, load_recipe

adder = load_recipe("adder")
V = adder.VOCAB


def _text(row: torch.Tensor) -> str:
    return "".join(V[i] for i in row.tolist())


def test_docstring_begins_with_its_launch_commands():
    first = launch_commands(adder.__doc__)
    assert first[0].startswith("python recipes/adder.py")
    text = "\n".join(first)
    for cmd in (
        "accelerate launch --config_file launch/cpu.yaml recipes/adder.py",
        "accelerate launch --config_file launch/cpu_ddp.yaml recipes/adder.py",
        "--micro-batch-size",
        "--smoke",
    ):
        assert cmd in text


def test_problems_answers_and_the_held_out_set():
    cfg = adder.Config(train_size=20_000, val_size=2_000)
    (x, y), (vx, vy) = adder.make_data(cfg)
    assert len(vx) == 2_000 and len(x) == 20_000
    prompts = {}
    for name, inputs, targets in (("train", x, y), ("val", vx, vy)):
        prompts[name] = [_text(r).split("=")[0] for r in inputs]
        for p, t in zip(prompts[name][:3000], targets[:3000], strict=False):
            a, b = p.split("+")
            assert 1 <= len(a) <= 4 and 1 <= len(b) <= 4
            assert a == str(int(a)) and b == str(int(b)), "no leading zeros"
            answer = _text(t[t != adder.IGNORE])
            assert answer == str(int(a) + int(b))[::-1] + "$", "reversed digits, then the end token"
    assert len(set(prompts["val"])) == 2_000, "held-out problems are distinct"
    assert not set(prompts["val"]) & set(prompts["train"]), "no held-out problem is trained on"
    lengths = {len(p.split("+")[0]) for p in prompts["train"]}
    assert lengths == {1, 2, 3, 4}


def test_only_answer_tokens_count_and_the_count_varies():
    cfg = adder.Config(train_size=512, val_size=64)
    (x, y), _ = adder.make_data(cfg)
    model = adder.Adder(adder.Config(n_layer=1, d_model=32, n_head=2))
    counts = {int(model.count_items((x[i : i + 8], y[i : i + 8]))) for i in range(0, 512, 8)}
    assert len(counts) > 1, "the item count (answer tokens) varies per batch"
    # The loss is the mean over answer tokens only: changing a prompt target's logit changes nothing.
    out = model(x[:8])
    loss = model.compute_loss(out, y[:8])
    manual = torch.nn.functional.cross_entropy(
        out[y[:8, : out.shape[1]] != -100], y[:8, : out.shape[1]][y[:8, : out.shape[1]] != -100]
    )
    assert torch.allclose(loss, manual)


def _greedy(model, prompt: list[int], max_new: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new):
        nxt = int(model(torch.tensor([seq])).argmax(-1)[0, -1])
        seq.append(nxt)
        if nxt == adder.END:
            break
    return seq[len(prompt) :]


def test_teacher_forcing_sees_what_greedy_decoding_sees():
    # compute_metrics' argument: the model is causal, so the logits at answer position t of the
    # padded, teacher-forced batch equal those of the true prefix fed alone (what greedy decoding
    # feeds while it is right). Checked on a random model: every position, no training needed.
    cfg = adder.Config(train_size=1, val_size=32, n_layer=2, d_model=64, n_head=4)
    _, (vx, vy) = adder.make_data(cfg)
    torch.manual_seed(0)
    model = adder.Adder(cfg).eval()
    with torch.no_grad():
        batch_logits = model(vx)
        for i in range(len(vx)):
            length = int((vx[i] != adder.PAD).sum())
            for t in (vy[i] != adder.IGNORE).nonzero().flatten().tolist():
                alone = model(vx[i : i + 1, : t + 1])[0, -1]
                torch.testing.assert_close(alone, batch_logits[i, t], rtol=1e-4, atol=1e-5)
            assert length <= batch_logits.shape[1]
        # And the whole-answer metric agrees with an actual greedy decode, problem by problem.
        exact = model.compute_metrics(batch_logits, vy)["exact_match"].tolist()
        greedy = []
        for row, t in zip(vx, vy, strict=True):
            prompt = row[: int((row == adder.EQUALS).nonzero()[0]) + 1].tolist()
            greedy.append(float(_greedy(model, prompt, 6) == t[t != adder.IGNORE].tolist()))
        assert exact == greedy


def test_exact_match_needs_every_answer_token():
    targets = torch.tensor([[-100, 3, 12, -100], [-100, 3, 12, -100], [-100, -100, 5, 12]])
    logits = torch.full((3, 4, len(V)), -5.0)
    for i, j, tok in [(0, 1, 3), (0, 2, 12), (1, 1, 3), (1, 2, 7), (2, 2, 5), (2, 3, 12)]:
        logits[i, j, tok] = 5.0  # problem 1 gets its end token wrong
    logits[0, 0, 9] = logits[2, 0, 1] = 9.0  # prompt positions never count
    m = adder.Adder(adder.Config(n_layer=1, d_model=32, n_head=2)).compute_metrics(logits, targets)
    assert m["exact_match"].tolist() == [1.0, 0.0, 1.0]  # one value per problem
    assert m["token_acc"].tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # one value per answer token


def test_smoke_in_process(tmp_path, capsys):
    run_dir = tmp_path / "run"
    result = adder.main(["--smoke", "--run-dir", str(run_dir), "--progress", "false"])
    out = capsys.readouterr().out
    assert "adder: val/exact_match=" in out and str(run_dir) in out and "metrics.jsonl" in out
    assert 0.0 <= result["val/exact_match"] <= 1.0 and result["steps"] == 8
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/exact_match" in r for r in records) == 2  # validated at both epoch ends


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "config, extra", [("launch/cpu.yaml", ()), ("launch/cpu_ddp.yaml", ("--micro-batch-size", "16"))]
)
def test_smoke_under_accelerate_launch(tmp_path, config, extra):
    run_dir = tmp_path / "run"
    proc = launch(ROOT / "recipes/adder.py", "--smoke", "--run-dir", str(run_dir), *extra, config=config)
    assert proc.stdout.count("adder: val/exact_match=") == 1, proc.stdout  # only rank 0 prints the summary
    resolved = json.loads((run_dir / "config.json").read_text())["resolved"]
    assert resolved["world_size"] == (2 if "ddp" in config else 1)
    assert resolved["accumulation"] == (2 if extra else 1)  # smoke batch 64 = 2 processes x 2 x 16
