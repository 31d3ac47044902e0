"""The measured choice of kernels (`llmscratch.kernels.choice`), tested with fake timings:
a kernel measured slower is not applied, one measured faster is, a decision is cached per
machine and read back instead of measured again, and `force` / `--kernels` skip measuring.
No assertion here depends on real timings."""

from __future__ import annotations

import json

import time

import pytest
import torch
import torch.nn as nn

import llmscratch.kernels.blocked_attention as ba
import llmscratch.kernels.choice as choice
import llmscratch.kernels.linear_cross_entropy as lce
import llmscratch.kernels.split_linear as sl
from llmscratch.kernels import apply_kernels, kernel_path, lm_head_loss
from llmscratch.models.attention import CausalSelfAttention
from llmscratch.models.gpt import GPT, GPTConfig


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """Each test starts with no decision in memory or on disk (conftest moves the cache
    folder to a temp dir), and leaves none behind for other tests; the machine reads as
    idle, so decisions are written to the cache file."""
    monkeypatch.setattr(choice.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    choice.forget()
    yield
    choice.forget()


def fake_timings(monkeypatch, kernel_s: float, reference_s: float) -> list[str]:
    """Make every measurement report these seconds; returns the list of measured keys."""
    measured = []

    def time_pair(kernel, reference, rounds=choice.ROUNDS):
        measured.append(1)
        return [kernel_s] * rounds, [reference_s] * rounds

    monkeypatch.setattr(choice, "time_pair", time_pair)
    return measured


def split_taken(monkeypatch, lin: nn.Linear, rows: int = 1) -> bool:
    """Whether `lin`'s forward on `rows` rows (no autograd: decoding) ran the split."""
    calls = []
    real = sl.split_linear
    monkeypatch.setattr(sl, "split_linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(rows, lin.in_features)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
    return bool(calls)


@pytest.mark.parametrize("kernel_s,expected", [(2.0, False), (0.97, False), (0.5, True)])
def test_split_linear_is_taken_only_where_measured_faster(kernel_s, expected, monkeypatch, capsys):
    # slower, or within the 5% margin: the reference F.linear; clearly faster: the split
    measured = fake_timings(monkeypatch, kernel_s, 1.0)
    lin = sl.SplitLinear.from_linear(nn.Linear(16, 10))
    assert split_taken(monkeypatch, lin) is expected
    assert split_taken(monkeypatch, lin) is expected
    assert len(measured) == 1  # measured once per shape class, then looked up
    key = "split_linear float32 10x16 rows=1 from cache"
    assert choice.decisions()[key]["use"] is expected
    assert key in capsys.readouterr().err  # the decision is said, once, when measured
    assert kernel_path(nn.Sequential(lin)) == {key: ("kernel" if expected else "reference")
                                                + f" ({1 / kernel_s:.2f}x)"}


def test_split_rows_classes_are_decided_apart(monkeypatch):
    measured = fake_timings(monkeypatch, 0.5, 1.0)
    lin = sl.SplitLinear.from_linear(nn.Linear(16, 10))
    assert split_taken(monkeypatch, lin, rows=1) and split_taken(monkeypatch, lin, rows=8)
    assert split_taken(monkeypatch, lin, rows=3)  # the 2-8 class, measured at 8 rows
    assert len(measured) == 2
    assert set(choice.decisions()) == {"split_linear float32 10x16 rows=1 from cache",
                                       "split_linear float32 10x16 rows=2-8 from cache"}


def test_split_is_measured_reading_weights_from_memory_when_the_model_outgrows_the_cache(monkeypatch):
    """Timing one weight again and again keeps it in cache, where the split gains nothing;
    a model bigger than the last-level cache reads every weight from memory at each token.
    So such a model's decision cycles through copies of the weight that together are
    twice the cache, and is a class of its own."""
    monkeypatch.setattr(sl, "last_level_cache_bytes", lambda: 4096)
    seen = {"kernel": [], "reference": []}

    def time_pair(kernel, reference, rounds=choice.ROUNDS):
        for _ in range(30):
            kernel(), reference()
        return [0.5] * rounds, [1.0] * rounds

    monkeypatch.setattr(choice, "time_pair", time_pair)
    monkeypatch.setattr(sl, "_split_linear", lambda x, w: seen["kernel"].append(w.data_ptr()) or x @ w.T)
    monkeypatch.setattr(sl.F, "linear", lambda x, w, b=None: seen["reference"].append(w.data_ptr()) or x @ w.T)
    small = apply_kernels(nn.Sequential(nn.Linear(16, 10, bias=False)))  # 640 bytes: in cache
    big = apply_kernels(nn.Sequential(nn.Linear(16, 10, bias=False), nn.Linear(16, 300, bias=False)))
    with torch.no_grad():
        small[0].split_pays(torch.randn(1, 16))
        assert len(set(seen["kernel"])) == len(set(seen["reference"])) == 1  # hot: the weight itself
        seen["kernel"].clear(), seen["reference"].clear()
        big[0].split_pays(torch.randn(1, 16))  # the model's 19,840 bytes outgrow the 4 KiB "cache"
    # 2 x 4096 bytes of 640-byte copies: 13 distinct weights, each side cycling through all
    assert len(set(seen["kernel"])) == len(set(seen["reference"])) == 13
    assert set(choice.decisions()) == {"split_linear float32 10x16 rows=1 from cache",
                                       "split_linear float32 10x16 rows=1 from memory"}


def test_decision_is_read_from_the_cache_on_the_next_load(monkeypatch):
    fake_timings(monkeypatch, 2.0, 1.0)  # measured slower
    torch.manual_seed(0)
    first = apply_kernels(GPT(GPTConfig.from_name("tiny", vocab_size=97, context_length=16)).eval())
    with torch.no_grad():
        first(torch.randint(0, 97, (1, 1)))
    path = choice.cache_file()
    saved = json.loads(path.read_text())
    assert saved["machine"] == choice.machine()
    assert saved["decisions"] and not any(d["use"] for d in saved["decisions"].values())

    choice.forget(cache=False)  # as a new process: nothing in memory, the file stays
    measured = fake_timings(monkeypatch, 0.1, 1.0)  # would now choose the kernels, if asked
    second = apply_kernels(GPT(GPTConfig.from_name("tiny", vocab_size=97, context_length=16)).eval())
    with torch.no_grad():
        second(torch.randint(0, 97, (1, 1)))
    assert measured == []  # read from the cache, not measured again
    assert not split_taken(monkeypatch, second.h[0].mlp.c_fc)
    assert set(kernel_path(second)) == set(saved["decisions"])


def test_a_decision_measured_on_a_busy_machine_is_not_cached(monkeypatch):
    measured = fake_timings(monkeypatch, 0.5, 1.0)
    monkeypatch.setattr(choice.os, "getloadavg", lambda: (100.0, 100.0, 100.0))
    lin = sl.SplitLinear.from_linear(nn.Linear(16, 10))
    assert split_taken(monkeypatch, lin)  # holds for this process
    assert not choice.cache_file().exists()
    choice.forget(cache=False)  # a new process measures again
    assert split_taken(monkeypatch, sl.SplitLinear.from_linear(nn.Linear(16, 10)))
    assert len(measured) == 2


def test_cache_file_is_per_machine_and_torch_version(monkeypatch):
    here = choice.cache_file()
    other = dict(choice.machine(), torch="0.0.0")
    monkeypatch.setattr(choice, "machine", lambda: other)
    assert choice.cache_file() != here and choice.cache_file().parent == here.parent


def test_force_takes_every_kernel_without_measuring(monkeypatch):
    def never(*a, **k):
        raise AssertionError("measured although forced")

    monkeypatch.setattr(choice, "time_pair", never)
    model = apply_kernels(GPT(GPTConfig.from_name("tiny", vocab_size=97, context_length=16)).eval(), force=True)
    assert split_taken(monkeypatch, model.h[0].attn.c_attn)
    assert "SplitLinear (forced)" in kernel_path(model)
    apply_kernels(model)  # back to the measured choice
    assert not model.h[0].attn.c_attn.force


def test_measuring_turned_off_takes_the_reference_and_caches_nothing(monkeypatch):
    measured = fake_timings(monkeypatch, 0.1, 1.0)
    monkeypatch.setenv(choice.ENV_MEASURE, "0")
    lin = sl.SplitLinear.from_linear(nn.Linear(16, 10))
    assert not split_taken(monkeypatch, lin)
    assert measured == [] and choice.decisions() == {}


@pytest.mark.parametrize("kernel_s,expected", [(2.0, False), (0.5, True)])
def test_blocked_attention_is_taken_only_where_measured_faster(kernel_s, expected, monkeypatch):
    fake_timings(monkeypatch, kernel_s, 1.0)
    calls = []
    real = ba.blocked_causal_attention
    monkeypatch.setattr(ba, "blocked_causal_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    attn = ba.BlockedCausalSelfAttention.from_attention(CausalSelfAttention(32, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 training: where it applies
        attn(torch.randn(1, 16, 32))
    assert bool(calls) is expected
    assert choice.decisions()["blocked_attention bfloat16 heads=2 head_size=16 T<=64"]["use"] is expected


@pytest.mark.parametrize("kernel_s,expected", [(2.0, False), (0.5, True)])
def test_fused_loss_is_taken_only_where_measured_faster(kernel_s, expected, monkeypatch):
    fake_timings(monkeypatch, kernel_s, 1.0)
    calls = []
    real = lce.fused_lm_loss
    monkeypatch.setattr(lce, "fused_lm_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = apply_kernels(GPT(GPTConfig.from_name("tiny", vocab_size=97, context_length=16)))
    x = torch.randint(0, 97, (2, 8))
    lm_head_loss(model, model.hidden_states(x), x).backward()
    assert bool(calls) is expected
    assert model.wte.weight.grad is not None
    assert choice.decisions()["fused_lm_loss float32 vocab=97 C=64 rows<=256"]["use"] is expected


def test_fused_loss_is_measured_at_the_batch_row_count(monkeypatch):
    """The plain loss's cost is memory traffic that grows with the rows: a decision measured
    at 256 rows chose it where, at a training step's 2048 rows, the fused loss made the whole
    step 20% faster. Each row-count class is measured at its own size."""
    sizes = []

    def time_pair(kernel, reference, rounds=choice.ROUNDS):
        real = lce.fused_lm_loss
        lce.fused_lm_loss = lambda h, *a, **k: sizes.append(h.shape[1]) or real(h, *a, **k)
        try:
            kernel()
        finally:
            lce.fused_lm_loss = real
        return [1.0] * rounds, [1.0] * rounds

    monkeypatch.setattr(choice, "time_pair", time_pair)
    weight = torch.randn(97, 16)
    for B, T in ((2, 8), (8, 256), (1, 1000), (64, 1024)):
        lce.fused_wins(torch.randn(B, T, 16), weight)
    assert sizes == [256, 2048, 1024, 4096]
    assert sorted(choice.decisions()) == [f"fused_lm_loss float32 vocab=97 C=16 rows<={n}"
                                          for n in (1024, 2048, 256, 4096)]


def test_a_slow_pair_gets_fewer_rounds(monkeypatch):
    """A decision whose calls take long (the fused loss at its real size) costs about
    MEASURE_SECONDS, never less than MIN_ROUNDS rounds."""
    calls = []
    monkeypatch.setattr(choice, "MEASURE_SECONDS", 0.05)
    slow = lambda: calls.append(1) or time.sleep(0.01)  # noqa: E731
    kernel_s, reference_s = choice.time_pair(slow, slow)
    assert len(kernel_s) == len(reference_s) == choice.MIN_ROUNDS
    monkeypatch.setattr(choice, "MEASURE_SECONDS", 0.5)
    kernel_s, _ = choice.time_pair(slow, slow)
    assert choice.MIN_ROUNDS < len(kernel_s) <= 25


def test_a_win_must_hold_by_the_best_round_and_by_the_median_ratio():
    # one lucky round of the kernel (or one unlucky of the reference) does not decide alone
    assert not choice.kernel_wins([0.5, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0])["use"]
    assert not choice.kernel_wins([0.9, 0.9, 0.9], [0.5, 2.0, 2.0])["use"]  # best ratio below 1
    d = choice.kernel_wins([0.5, 0.6, 0.5], [1.0, 1.0, 1.1])
    assert d["use"] and d["speedup"] == 2.0 and d["kernel_s"] == 0.5


def test_real_measurement_runs_both_and_decides(monkeypatch):
    # the real timer, on a tiny shape: whatever it decides, both sides ran and were timed
    ran = {"kernel": 0, "reference": 0}
    use = choice.choose("test tiny", lambda: ran.__setitem__("kernel", ran["kernel"] + 1),
                        lambda: ran.__setitem__("reference", ran["reference"] + 1))
    assert ran["kernel"] > choice.ROUNDS and ran["reference"] > choice.ROUNDS
    d = choice.decisions()["test tiny"]
    assert d["use"] is use and d["kernel_s"] > 0 and d["reference_s"] > 0


@pytest.mark.parametrize("flags,expected", [([], True), (["--kernels"], "force"), (["--no-kernels"], False)])
def test_cli_kernel_flags(flags, expected, monkeypatch):
    import llmscratch.checkpoints.run as checkpoint
    from llmscratch.cli import main

    asked = []
    real = checkpoint.load_model

    def spy(*a, **k):
        asked.append(k["kernels"])
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "load_model", spy)
    assert main(["generate", "--model", "tiny", "--prompt", "hi", "--max-new-tokens", "2", *flags]) == 0
    assert asked == [expected]


def test_bench_sets_every_decoding_row_against_the_reference(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import harness

    fake_timings(monkeypatch, 2.0, 1.0)  # every kernel measured slower: none taken
    rows, _ = harness.bench_generation("tiny", 2, prompt_len=4, new_tokens=3, rounds=1, peers=False,
                                       uncached=False)
    by_name = {r["impl"]: r for r in rows}
    for dt in ("fp32", "bf16", "int8"):
        row, ref = by_name[f"llmscratch KV cache {dt}"], by_name[f"llmscratch KV cache {dt} no-kernels"]
        assert row["kernels"] is True and ref["kernels"] is False
        assert row["vs_reference"] > 0 and "path" in row
    assert all(v.startswith("reference") for v in by_name["llmscratch KV cache fp32"]["path"].values())
    assert by_name["llmscratch KV cache fp32"]["path"]  # the decode shapes it met are named
    rows, _ = harness.bench_generation("tiny", 1, prompt_len=4, new_tokens=3, rounds=1, peers=False,
                                       uncached=False, kernels=False)
    assert {r["impl"] for r in rows} == {f"llmscratch KV cache {dt}" for dt in ("fp32", "bf16", "int8")}



@pytest.mark.parametrize("measure", ["1", "0"])
def test_measuring_leaves_the_global_rng_untouched(measure, monkeypatch):
    """A measurement at the first forward pass must not shift the training RNG (dropout
    masks), or a resumed run would not end where an uninterrupted one ends."""
    monkeypatch.setenv(choice.ENV_MEASURE, measure)
    fake_timings(monkeypatch, 1.0, 2.0)
    weight, hidden = torch.randn(64, 32), torch.randn(2, 8, 32)
    q = torch.randn(1, 2, 64, 16, dtype=torch.bfloat16)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    sl.split_wins(weight, 1)
    lce.fused_wins(hidden, weight)
    ba.blocked_wins(q)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_run_folder_keeps_its_decisions_and_a_resume_takes_them(tmp_path, monkeypatch):
    """A decision measured on a busy machine is not cached: a resumed run measuring again
    could take the other path, and its float rounding (so its losses) would differ. The
    run folder's kernels.json records what the run took, and a resume adopts it."""
    record = tmp_path / choice.KERNELS_FILE
    lin = nn.Linear(16, 10)
    choice.record_run(record)
    fake_timings(monkeypatch, 0.5, 1.0)  # the split measured faster
    assert split_taken(monkeypatch, sl.SplitLinear.from_linear(lin))
    held = json.loads(record.read_text())["decisions"]
    assert list(held) == ["split_linear float32 10x16 rows=1 from cache"] and held[list(held)[0]]["use"]

    choice.forget()  # a new process on a machine whose cache lost the decision
    measured = fake_timings(monkeypatch, 2.0, 1.0)  # measuring now would choose F.linear
    choice.record_run(record, pin=True)
    assert split_taken(monkeypatch, sl.SplitLinear.from_linear(lin))  # the recorded path
    assert measured == []

    choice.forget()
    choice.record_run(record, pin=False)  # a fresh run in that folder measures
    assert not split_taken(monkeypatch, sl.SplitLinear.from_linear(lin))
    assert measured == [1]
    assert not json.loads(record.read_text())["decisions"]["split_linear float32 10x16 rows=1 from cache"]["use"]

    other = tmp_path / "rank1.json"
    choice.forget()
    choice.record_run(other, write=False)  # another rank: adopts, never writes
    split_taken(monkeypatch, sl.SplitLinear.from_linear(lin))
    assert not other.exists()


@pytest.mark.parametrize("decisions", [
    {"split_linear float32 10x16 rows=1 from cache": True},  # an entry that is not an object
    {"split_linear float32 10x16 rows=1 from cache": {"use": "yes", "speedup": 2.0, "speedup_median": 2.0}},
    {"split_linear float32 10x16 rows=1 from cache": {"use": True}},  # no speed-ups
    ["not", "an", "object"],
])
def test_damaged_decisions_are_measured_again_not_a_crash(tmp_path, monkeypatch, decisions):
    """A run folder's kernels.json or the machine's cache file edited by hand (or written
    by another version) with malformed decisions: those are dropped and measured again,
    never a TypeError at the first forward pass."""
    lin = nn.Linear(16, 10)
    damaged = json.dumps({"decisions": decisions})
    record = tmp_path / choice.KERNELS_FILE
    record.write_text(damaged)
    choice.forget()
    choice.cache_file().parent.mkdir(parents=True, exist_ok=True)
    choice.cache_file().write_text(damaged)
    measured = fake_timings(monkeypatch, 2.0, 1.0)  # F.linear measured faster
    choice.record_run(record, pin=True)
    assert not split_taken(monkeypatch, sl.SplitLinear.from_linear(lin))
    assert measured == [1]
    held = json.loads(record.read_text())["decisions"]
    assert held["split_linear float32 10x16 rows=1 from cache"]["use"] is False
