"""framework/doctor/probe.py: the halves probe. ``count_weights`` (every level) catches a count_items that
does not count what the loss averages over, and names the count that does; no false positive on losses a
count cannot decompose or on correct counts; the verdict separates rounding from a count error; the probe
leaves no trace on training. (The Hugging Face cases are in test_probe_hf.py.)

Every test runs a real Engine (or the verdict function on numbers built to sit on one side of a bound).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from framework import Engine, LoopModule, LoopWarning
from framework.doctor.probe import CONSISTENT, MARGIN, Count, count_verdict, rounding_tolerance
from tests.helpers import TinyClassifier, classification_data

X, Y = classification_data(128)


def fit(module: LoopModule, data, **kw) -> tuple[Engine, list[str]]:
    """A short fit with accumulation (micro-batches of 8 in steps of 32: where count_items weighs);
    returns the engine and the LoopWarnings' texts."""
    kw.setdefault("max_steps", 2)
    kw.setdefault("batch_size", 32)
    kw.setdefault("micro_batch_size", 8)
    engine = Engine(progress=False, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.fit(module, data)
    return engine, [str(w.message) for w in caught if issubclass(w.category, LoopWarning)]


def status(engine: Engine, check: str) -> str:
    return {c: s for c, _, s, _ in engine.doctor.report()}[check]


# ------------------------------------------------------------------ the verdict, on both sides of its bounds

TOL = rounding_tolerance([torch.float32])


def test_rounding_tolerance_follows_the_least_precise_dtype():
    assert 16 * torch.finfo(torch.float32).eps == TOL
    assert rounding_tolerance([torch.float32, torch.bfloat16]) == 16 * torch.finfo(torch.bfloat16).eps
    assert rounding_tolerance([torch.int64]) == TOL  # no float dtype: float32's


def weighted(halves, counts):
    (a, b), (na, nb) = halves, counts
    return (na * a + nb * b) / (na + nb)


HALVES = (3.91, 3.87)  # two halves' losses, as a token-mean LM gives them at init
TOKENS = (45.0, 23.0)  # what the loss averages over in each half
SEQUENCES = (4.0, 4.0)  # what a default count_items counts


def test_a_correct_count_within_rounding_is_ok():
    full = weighted(HALVES, TOKENS)
    for noise in (0.0, 3 * TOL, -(CONSISTENT - 1) * TOL):  # rounding, and up to the consistency bound
        verdict = count_verdict(full * (1 + noise), HALVES, TOKENS, [], TOL)
        assert verdict.kind == "ok", (noise, verdict)


def test_a_wrong_count_explained_by_a_natural_one_is_a_mismatch():
    full = weighted(HALVES, TOKENS) * (1 + TOL / 2)  # rounding on top
    tokens = Count("the target tokens", "({t} != -100).sum()", TOKENS)
    verdict = count_verdict(full, HALVES, SEQUENCES, [tokens], TOL)
    assert verdict.kind == "mismatch" and verdict.alternative is tokens
    assert verdict.err_alternative <= TOL < MARGIN * verdict.err_alternative <= verdict.err_module
    # The same numbers with the tokens' count as count_items: fine.
    assert count_verdict(full, HALVES, TOKENS, [Count("items", "len({t})", SEQUENCES)], TOL).kind == "ok"


def test_no_mismatch_without_an_alternative_that_explains_the_halves_to_rounding():
    full = weighted(HALVES, TOKENS)
    near = Count("near", "...", (44.0, 24.0))  # proportions close to, not equal to, the tokens'
    assert count_verdict(full, HALVES, SEQUENCES, [near], TOL).kind == "undecided"
    # An alternative with count_items' own proportions is no alternative.
    same = Count("same", "...", (8.0, 8.0))
    assert count_verdict(full, HALVES, SEQUENCES, [same], TOL).kind == "undecided"
    # A loss outside its halves' range (in-batch negatives: more negatives, a larger loss) decomposes by no count.
    assert count_verdict(4.6, HALVES, SEQUENCES, [Count("t", "...", TOKENS)], TOL).kind == "undecided"
    # Non-finite losses, or nothing counted, decide nothing.
    assert count_verdict(float("nan"), HALVES, TOKENS, [], TOL).kind == "undecided"
    assert count_verdict(3.9, HALVES, (0.0, 0.0), [], TOL).kind == "undecided"


def test_an_alternative_that_explains_only_a_little_better_is_not_enough():
    """count_items misses by less than MARGIN times the alternative's miss: rounding could explain both."""
    exact = weighted(HALVES, TOKENS)
    err_sequences = abs(exact - weighted(HALVES, SEQUENCES)) / exact
    full = exact * (1 + err_sequences / (2 * MARGIN))  # the alternative misses by 1/(2 MARGIN) of count_items' miss
    assert count_verdict(full, HALVES, SEQUENCES, [Count("t", "...", TOKENS)], err_sequences).kind != "mismatch"


# ------------------------------------------------------------------ true positives through the engine


class TokenTagger(LoopModule):
    """Token classification: (batch, length) labels with -100 on padding, a mean over labelled tokens."""

    def __init__(self, count_tokens: bool) -> None:
        super().__init__()
        self.count_tokens = count_tokens
        self.emb = nn.Embedding(20, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, inputs):
        return self.out(self.emb(inputs))

    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())  # ignore_index=-100

    def count_items(self, batch):
        return (batch[1] != -100).sum() if self.count_tokens else len(batch[1])


def tagged_data(n: int = 128, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 20, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n, 1), generator=g)
    labels = torch.randint(0, 5, (n, length), generator=g)
    labels[torch.arange(length) >= lengths] = -100
    return tokens, labels


def test_counting_sequences_under_a_token_mean_warns_and_names_the_token_count():
    torch.manual_seed(0)
    engine, said = fit(TokenTagger(count_tokens=False), tagged_data())
    assert len(said) == 1, said
    msg = said[0]
    assert msg.startswith("TokenTagger.count_items does not count what TokenTagger.compute_loss averages over")
    assert "weighted by the target elements that are not -100" in msg
    assert "Fix: define count_items(self, batch) returning (batch[1] != -100).sum()" in msg
    assert [f.check for f in engine.doctor.findings] == ["count_weights"]
    # With the count it names: nothing to report, and the check ran.
    torch.manual_seed(0)
    engine, said = fit(TokenTagger(count_tokens=True), tagged_data())
    assert said == [] and status(engine, "count_weights") == "ok", engine.doctor.format_report()


# ------------------------------------------------------------------ no false positives


class Regression(LoopModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 4))

    def forward(self, inputs):
        return self.net(inputs)

    def compute_loss(self, outputs, targets):
        return F.mse_loss(outputs, targets)  # a mean over all elements: items x 4


class WithBatchNorm(TinyClassifier):
    def __init__(self, track: bool = True) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.BatchNorm1d(16, track_running_stats=track), nn.ReLU(), nn.Linear(16, 3)
        )


class SumLoss(TinyClassifier):
    def compute_loss(self, outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="sum")


class Contrastive(LoopModule):
    """Supervised contrastive loss with in-batch negatives: an item's loss depends on the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, inputs):
        return F.normalize(self.net(inputs), dim=-1)

    def compute_loss(self, outputs, targets):
        logits = outputs @ outputs.T / 0.1
        logits = logits - 1e4 * torch.eye(len(outputs))  # an item is not its own positive
        positives = (targets[:, None] == targets[None, :]).float() - torch.eye(len(outputs))
        log_p = logits.log_softmax(-1)
        return -((log_p * positives).sum(-1) / positives.sum(-1).clamp(min=1)).mean()


g = torch.Generator().manual_seed(3)
REGRESSION = (torch.randn(128, 8, generator=g), torch.randn(128, 4, generator=g))

NO_FALSE_POSITIVE = {
    "classification": (lambda: TinyClassifier(), (X, Y), {}),
    "dropout": (lambda: TinyClassifier(dropout=0.3), (X, Y), {}),
    "regression-mse": (Regression, REGRESSION, {}),
    "token-mean-correct-count": (lambda: TokenTagger(count_tokens=True), tagged_data(), {}),
    "batchnorm": (WithBatchNorm, (X, Y), dict(micro_batch_size=32)),  # whole batches: no batchnorm warning
    "batchnorm-batch-statistics": (lambda: WithBatchNorm(track=False), (X, Y), dict(micro_batch_size=32)),
    "contrastive-in-batch-negatives": (Contrastive, (X, Y), {}),
    "sum-loss": (SumLoss, (X, Y), {}),
}


@pytest.mark.parametrize("doctor", ["basic", "full"])
@pytest.mark.parametrize("name", list(NO_FALSE_POSITIVE))
def test_no_count_warning_on_losses_whose_count_is_right_or_undecidable(name, doctor):
    make, data, kw = NO_FALSE_POSITIVE[name]
    torch.manual_seed(0)
    engine, said = fit(make(), data, doctor=doctor, **kw)
    report = engine.doctor.format_report()
    if name == "sum-loss":  # the other verdict of the same probe (with accumulation, the default doctor too)
        assert [f.check for f in engine.doctor.findings] == ["loss_scaling"], report
    else:
        assert engine.doctor.findings == [] and said == [], report
    decomposable = name not in ("contrastive-in-batch-negatives", "batchnorm-batch-statistics", "sum-loss")
    assert status(engine, "count_weights") == ("ok" if decomposable else "not run"), report
    if not decomposable:
        assert "not a count-weighted mean of its halves' losses" in engine.doctor.not_run["count_weights"]


# ------------------------------------------------------------------ observation never steers


class Recording(TokenTagger):
    """Records every forward it sees, and draws on the global RNG in forward (noise while training)."""

    def __init__(self) -> None:
        super().__init__(count_tokens=False)  # the wrong count: the probe runs and warns
        self.seen: list[tuple[int, bool]] = []

    def forward(self, inputs):
        self.seen.append((len(inputs), self.training))
        out = super().forward(inputs)
        return out + 0.01 * torch.randn_like(out) if self.training else out


def test_the_probe_leaves_no_trace_on_the_module_the_rng_or_training():
    results = []
    for level in ("off", "basic"):
        torch.manual_seed(0)
        module = Recording()
        engine, said = fit(module, tagged_data(), doctor=level, max_steps=3)
        results.append((module.state_dict(), torch.get_rng_state(), module.seen))
        assert ("count_weights" in engine.doctor.ran) == (level == "basic")
        assert len(said) == (level == "basic")
    (ref, ref_rng, ref_seen), (state, rng, seen) = results
    assert all(torch.equal(state[k], ref[k]) for k in ref)  # bitwise the same parameters
    assert torch.equal(rng, ref_rng)
    assert seen == ref_seen == [(8, True)] * 12  # 3 steps x 4 micro-batches; the probe's forwards left no trace


class _NoCopy(torch.utils.data.TensorDataset):
    def __deepcopy__(self, memo):
        raise AssertionError("the probe copied the training data")


def test_the_probe_copies_the_module_only_not_the_data_or_the_doctor_it_reaches_through_patches():
    # During the watched forward the doctor patches module.zero_grad with one of its own methods; a deepcopy
    # of the module that followed it reached the doctor, the fit and the whole training set (twice the memory).
    x, y = classification_data(96)
    engine = Engine(max_steps=2, batch_size=32, progress=False)
    engine.fit(TinyClassifier(), _NoCopy(x, y))
    assert "count_weights" in engine.doctor.ran  # the probe ran, and copied nothing but the module


# ------------------------------------------------------------------ what the probe sees, and what sees it

CALLS = {"compute_loss": 0}  # a counter the module cannot hide from the probe: outside it


class NanOnThirdCall(TinyClassifier):
    """compute_loss returns NaN on its 3rd call of the process, wherever that call comes from."""

    def compute_loss(self, outputs, targets):
        CALLS["compute_loss"] += 1
        loss = F.cross_entropy(outputs, targets)
        return loss * float("nan") if CALLS["compute_loss"] == 3 else loss


@pytest.mark.parametrize("doctor", ["off", "basic"])
def test_a_nan_on_the_third_compute_loss_call_stops_the_run_with_or_without_the_probe(doctor):
    # Without the doctor the 3rd call is training's own (step 3); with it, the probe's second call on step 1.
    # Either way nan_policy="raise" stops the run before the step that would use it: the probe never swallows it.
    from framework import NonFiniteError

    CALLS["compute_loss"] = 0
    module = NanOnThirdCall()
    before = [p.detach().clone() for p in module.parameters()]
    engine = Engine(max_steps=4, batch_size=32, progress=False, doctor=doctor)
    probe = r"returned a non-finite loss on the doctor's probe \(the micro-batch \S+, its first half nan.*doctor='off'"
    with pytest.raises(
        NonFiniteError, match=probe if doctor == "basic" else r"non-finite loss .* at optimizer step 2 "
    ):
        engine.fit(module, (X, Y))
    if doctor == "basic":  # raised on step 1, before its optimizer step: nothing changed
        assert engine.step == 0 and all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
        assert [f.check for f in engine.doctor.findings] == ["finite"]


def test_under_nan_policy_skip_the_probes_nan_is_a_warning_and_training_goes_on():
    CALLS["compute_loss"] = 0
    engine, said = fit(NanOnThirdCall(), (X, Y), nan_policy="skip", micro_batch_size=32, max_steps=3)
    assert engine.step == 3 and engine.skipped_steps == 0  # training's own losses were all finite
    (warning,) = said
    assert "non-finite loss on the doctor's probe" in warning and "nan_policy='skip': training goes on" in warning
    assert "probe's loss was not finite" in engine.doctor.not_run["count_weights"]


class Stateful(TinyClassifier):
    """Counts its calls in every kind of state a module keeps: a Python int, a list, a buffer updated in place,
    a plain tensor attribute updated in place, and a submodule's int."""

    def __init__(self):
        super().__init__()
        self.calls, self.sizes = 0, []
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.items = torch.zeros(())  # not a buffer
        self.head = nn.Module()
        self.head.calls = 0

    def forward(self, inputs):
        self.calls += 1
        self.sizes.append(len(inputs))
        self.seen += 1
        self.items += len(inputs)
        self.head.calls += 1
        return super().forward(inputs)

    def counters(self):
        return self.calls, list(self.sizes), int(self.seen), float(self.items), self.head.calls


def test_a_stateful_modules_counters_do_not_see_the_probes_calls():
    counted = {}
    for level in ("off", "basic", "full"):
        torch.manual_seed(0)
        module = Stateful()
        engine, _ = fit(module, (X, Y), doctor=level, max_steps=3)
        assert ("count_weights" in engine.doctor.ran) == (level != "off")  # the probe ran: 3 extra forwards
        counted[level] = module.counters()
    assert counted["basic"] == counted["full"] == counted["off"] == (12, [8] * 12, 12, 96.0, 12)


def test_the_default_doctor_catches_a_sum_loss_where_it_changes_the_result():
    # With accumulation the engine weighs micro-batches by count_items (exact for a mean): a sum is wrong there.
    engine, said = fit(SumLoss(), (X, Y))  # micro-batches of 8 in steps of 32, doctor="basic"
    assert [f.check for f in engine.doctor.findings] == ["loss_scaling"] and len(said) == 1
    assert "scales with the batch size, like a sum" in said[0] and "reduction='mean'" in said[0]
    # One process, one micro-batch per step: a sum trains as the plain loop would; "basic" says why it did not judge.
    engine, said = fit(SumLoss(), (X, Y), micro_batch_size=32)
    assert said == [] and "one process without accumulation" in engine.doctor.not_run["loss_scaling"]
    engine, said = fit(SumLoss(), (X, Y), micro_batch_size=32, doctor="full")
    assert [f.check for f in engine.doctor.findings] == ["loss_scaling"]


class KeepsHidden(TinyClassifier):
    """Keeps its last hidden activations on self: a non-leaf tensor with a graph (deepcopy refuses those)."""

    def forward(self, inputs):
        self.last_hidden = self.net[0](inputs)
        return self.net[3](self.net[2](self.net[1](self.last_hidden)))


def test_the_probe_copes_with_a_tensor_a_forward_kept_on_the_module():
    engine, said = fit(KeepsHidden(), (X, Y))
    assert "count_weights" in engine.doctor.ran and said == [], engine.doctor.not_run
