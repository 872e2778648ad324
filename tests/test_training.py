"""Unit tests of the training loop, run in-process (no Ray): data feeding, masking, resume."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from selfcorrect.config import ConfigError, load_config
from selfcorrect.data import make_splits
from selfcorrect.loss import LossWeights, collate, encode_example, weighted_lm_loss
from selfcorrect.models import build_model
from selfcorrect.tasks import get_task
from selfcorrect.traces import Span, eift_example, insec_example
from selfcorrect.training import (
    TORCH_STATE,
    ExampleStream,
    LocalSession,
    lr_factor,
    run_training,
    step_problem_indices,
    train_local,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(*overrides: str):
    return load_config(
        os.path.join(REPO, "configs", "smoke.yaml"),
        ["train.log_every=1", "train.cpus_per_worker=1", *overrides],
    )


@pytest.fixture(scope="module")
def mul_prompts() -> list[str]:
    task = get_task("multiplication", digits_a=2, digits_b=2)
    return make_splits(task, 64, 8, 0)["train"].column("prompt").to_pylist()


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _final_state(session: LocalSession) -> dict[str, torch.Tensor]:
    return torch.load(
        os.path.join(session.latest, TORCH_STATE), weights_only=True, map_location="cpu"
    )["model"]


# --------------------------------------------------------------------------- data


def test_step_indices_cover_each_epoch_once_and_are_seeded():
    n, B = 10, 4
    idx = np.concatenate([step_problem_indices(n, s, B, 0, "t", "ft") for s in range(5)])
    assert sorted(idx[:10].tolist()) == list(range(10))  # epoch 0 is a permutation
    assert sorted(idx[10:20].tolist()) == list(range(10))  # so is epoch 1
    assert not np.array_equal(idx[:10], idx[10:20])  # reshuffled per epoch
    again = step_problem_indices(n, 3, B, 0, "t", "ft")
    assert np.array_equal(again, idx[12:16])
    assert not np.array_equal(step_problem_indices(n, 3, B, 1, "t", "ft"), again)


@pytest.mark.parametrize("method", ["ft", "eift", "insec"])
def test_worker_shards_concatenate_to_the_single_worker_batch(mul_prompts, method):
    """Data depends on (seed, step) only: two ranks together see exactly one rank's batch."""
    cfg = _cfg("train.injection_rate=0.5")
    _, tok = build_model("nano", 256)
    s = ExampleStream(cfg, "multiplication", method, mul_prompts, tok)
    one = s.local_batch(7, 0, 1)
    two = s.local_batch(7, 0, 2) + s.local_batch(7, 1, 2)
    assert len(one) == cfg.train.batch_size
    for a, b in zip(one, two, strict=True):
        for k in a:
            assert np.array_equal(a[k], b[k])
    other = s.local_batch(8, 0, 1)
    assert any(
        not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(one, other, strict=True)
    )


def test_eift_stream_injects_errors_at_the_configured_rate(mul_prompts):
    cfg = _cfg("train.injection_rate=0.5")
    _, tok = build_model("nano", 256)
    s = ExampleStream(cfg, "multiplication", "eift", mul_prompts, tok)
    kinds = [b["span_kind"] for step in range(8) for b in s.local_batch(step, 0, 1)]  # 128 examples
    frac = np.mean([np.any(k == Span.WRONG) for k in kinds])
    assert 0.35 < frac < 0.65


def test_too_long_training_examples_are_refused_not_truncated(mul_prompts, tmp_path):
    """model.max_length below the trace length: one message naming the key, on the driver."""
    import ray

    from rayjobs.train import train_one
    from selfcorrect import io

    cfg = _cfg("model.max_length=16")
    _, tok = build_model("nano", 16)
    s = ExampleStream(cfg, "multiplication", "ft", mul_prompts, tok)
    with pytest.raises(ValueError, match=r"tokens exceeds model.max_length=16.*never truncated"):
        s.local_batch(0, 0, 1)
    fits = ExampleStream(_cfg("model.max_length=64"), "multiplication", "ft", mul_prompts, tok)
    assert max(len(b["input_ids"]) for b in fits.local_batch(0, 0, 1)) <= 64
    # the train stage checks the first batch before Ray Train starts any worker
    train = tmp_path / "data" / "train.parquet"
    io.write_parquet(str(train), [{"prompt": p} for p in mul_prompts])
    out = tmp_path / "models" / "ft"
    with pytest.raises(ValueError, match="exceeds model.max_length=16"):
        train_one(cfg, "multiplication", "ft", str(out), train_path=str(train))
    assert not out.exists() and not ray.is_initialized()


def test_unparseable_training_prompt_is_a_clear_error(mul_prompts):
    from selfcorrect.tasks import MalformedProblemError

    _, tok = build_model("nano", 256)
    s = ExampleStream(_cfg(), "multiplication", "ft", ["12*3x"] * len(mul_prompts), tok)
    with pytest.raises(MalformedProblemError, match="'12\\*3x' is not of the form"):
        s.local_batch(0, 0, 1)


def test_hybrid_without_onpolicy_errors_is_a_clear_error(mul_prompts):
    _, tok = build_model("nano", 256)
    with pytest.raises(ValueError, match="on-policy"):
        ExampleStream(_cfg(), "multiplication", "hybrid", mul_prompts, tok)


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 10, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] == pytest.approx(0.1, abs=0.01)


# --------------------------------------------------------------------------- masking


def _eift_batch(tok, seed=0):
    task = get_task("multiplication", digits_a=2, digits_b=2)
    rng = np.random.default_rng(seed)
    exs = [eift_example(task, task.sample_problem(rng), rng, max_errors=2) for _ in range(4)]
    return collate([encode_example(tok, e, LossWeights()) for e in exs], tok.pad_token_id)


def test_wrong_step_tokens_get_exactly_zero_gradient():
    """The logit rows that predict wrong-step tokens receive no gradient; golden ones do."""
    model, tok = build_model("nano", 256, seed=0)
    batch = _eift_batch(tok)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    loss, _ = weighted_lm_loss(logits, batch, batch["loss_weight"][:, 1:].sum())
    loss.backward()
    g = logits.grad.abs().sum(-1)[:, :-1]  # [B, T-1]: row t predicts token t+1
    target_kind = batch["span_kind"][:, 1:]
    wrong = target_kind == Span.WRONG
    golden = (target_kind == Span.GOLDEN) & (batch["attention_mask"][:, 1:] > 0)
    assert wrong.sum() > 0
    assert torch.all(g[wrong] == 0)
    assert torch.all(g[golden] > 0)


def test_batch_weighted_only_on_wrong_steps_yields_zero_parameter_gradient():
    model, tok = build_model("nano", 256, seed=0)
    batch = _eift_batch(tok, seed=1)
    only_wrong = batch["loss_weight"] * (batch["span_kind"] == Span.WRONG)
    assert only_wrong.sum() == 0  # the mask gives wrong steps weight 0 ...
    batch["loss_weight"] = only_wrong
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, _ = weighted_lm_loss(logits, batch, torch.tensor(1.0))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)  # ... so no gradient


def _mistake_prob(model, batch) -> float:
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    p = logits[:, :-1].float().softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    sel = batch["span_kind"][:, 1:] == Span.MISTAKE
    return float(p[sel].mean())


@pytest.mark.parametrize("mode", ["unlikelihood", "mask"])
def test_unlikelihood_pushes_mistake_token_probability_down(mode):
    """Only the unlikelihood term is active (loss weights zeroed): mistakes get less likely;
    with mistake_loss=mask the same batch produces no update at all."""
    model, tok = build_model("nano", 256, seed=0)
    task = get_task("multiplication", digits_a=2, digits_b=2)
    rng = np.random.default_rng(0)
    weights = LossWeights(mistake_loss=mode, w_unlikelihood=1.0)
    exs = [insec_example(task, task.sample_problem(rng), rng, p_mistake=0.5) for _ in range(8)]
    batch = collate([encode_example(tok, e, weights) for e in exs], tok.pad_token_id)
    assert (batch["span_kind"] == Span.MISTAKE).any()
    batch["loss_weight"].zero_()
    before = _mistake_prob(model, batch)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _ = weighted_lm_loss(logits, batch, torch.tensor(float(batch["ul_weight"].sum() + 1)))
        opt.zero_grad()
        if loss.requires_grad:
            loss.backward()
        opt.step()
    after = _mistake_prob(model, batch)
    if mode == "unlikelihood":
        assert after < 0.5 * before
    else:
        assert after == pytest.approx(before, abs=1e-7)


# --------------------------------------------------------------------------- the loop


def test_local_training_reduces_loss_and_writes_a_loadable_model(mul_prompts, tmp_path):
    from selfcorrect.models import load_model

    cfg = _cfg("train.checkpoint_every=0")
    last, session = train_local(
        cfg, "multiplication", "eift", mul_prompts, max_steps=12, checkpoint_root=str(tmp_path)
    )
    hist = session.reports
    assert [h["step"] for h in hist] == list(range(1, 13))
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    assert {"loss_golden", "lr", "tokens_per_s", "grad_norm"} <= set(last)
    model, tok = load_model(os.path.join(session.latest, "model"))
    init, _ = build_model("nano", cfg.model.max_length, seed=cfg.seed)
    changed = [
        not torch.equal(p, q) for p, q in zip(model.parameters(), init.parameters(), strict=True)
    ]
    assert all(changed)


def test_bf16_autocast_trains_and_says_so_in_its_metrics(mul_prompts, tmp_path):
    """The bf16 path (autocast, fp32 master weights) learns like fp32 and stays fp32 on disk."""
    from selfcorrect.models import load_model

    cfg = _cfg("train.checkpoint_every=0", "train.bf16=true")
    last, session = train_local(
        cfg, "multiplication", "ft", mul_prompts, max_steps=12, checkpoint_root=str(tmp_path)
    )
    hist = session.reports
    assert all(h["bf16"] is True for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.5
    model, _ = load_model(os.path.join(session.latest, "model"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_the_attention_kernel_changes_the_arithmetic_not_the_update(mul_prompts, tmp_path):
    """``train.attention``: plain matmul attention (CPU bf16's default) takes the fused
    kernel's step, padding masks included, and the saved model still loads with sdpa."""
    from selfcorrect.models import load_model, resolve_attention

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, True) == "eager"
    assert resolve_attention("auto", cpu, False) == "sdpa"
    assert resolve_attention("auto", gpu, True) == "sdpa"
    assert resolve_attention("sdpa", cpu, True) == "sdpa"
    states = {}
    for kernel in ("sdpa", "eager"):
        cfg = _cfg("train.micro_batch_size=8", f"train.attention={kernel}", "train.bf16=false")
        _, session = train_local(
            cfg,
            "multiplication",
            "eift",
            mul_prompts,
            max_steps=3,
            checkpoint_root=str(tmp_path / kernel),
        )
        states[kernel] = _final_state(session)
        model, _ = load_model(os.path.join(session.latest, "model"))
        assert model.config._attn_implementation == "sdpa"
    init = build_model("nano", cfg.model.max_length, seed=cfg.seed)[0].state_dict()
    for k in states["sdpa"]:
        assert not torch.equal(states["eager"][k], init[k])  # it trained
        torch.testing.assert_close(states["eager"][k], states["sdpa"][k], rtol=1e-3, atol=1e-4)
    with pytest.raises(ConfigError, match="train.attention.*auto, sdpa, eager"):
        _cfg("train.attention=flash")


def test_micro_batching_does_not_change_the_update(mul_prompts, tmp_path):
    """Global-batch normalisation: 1 x 16 and 4 x 4 micro-batches give the same step."""
    a = _final_state(
        train_local(
            _cfg("train.micro_batch_size=16"),
            "multiplication",
            "eift",
            mul_prompts,
            max_steps=2,
            checkpoint_root=str(tmp_path / "a"),
        )[1]
    )
    b = _final_state(
        train_local(
            _cfg("train.micro_batch_size=4"),
            "multiplication",
            "eift",
            mul_prompts,
            max_steps=2,
            checkpoint_root=str(tmp_path / "b"),
        )[1]
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_length_grouped_micro_batches_keep_every_example_and_cut_padding():
    from selfcorrect.training import length_grouped

    lengths = [50, 150, 52, 51, 149, 53, 50, 55]
    examples = [{"input_ids": np.zeros(n, dtype=np.int64), "id": i} for i, n in enumerate(lengths)]
    groups = length_grouped(examples, 4)
    assert [len(g) for g in groups] == [4, 4]
    assert sorted(e["id"] for g in groups for e in g) == list(range(8))
    padded = sum(len(g) * max(len(e["input_ids"]) for e in g) for g in groups)
    unsorted = 4 * 150 + 4 * 149  # the batch cut in order: both halves hold a long trace
    assert padded == 4 * 52 + 4 * 150 < unsorted


def test_resume_from_checkpoint_is_exact(mul_prompts, tmp_path):
    """6 steps straight == 3 steps, checkpoint, new process state, 3 more steps."""
    cfg = _cfg("train.checkpoint_every=3", "train.injection_rate=0.5")
    _, straight = train_local(
        cfg, "multiplication", "eift", mul_prompts, max_steps=6, checkpoint_root=str(tmp_path / "a")
    )
    ckpts = sorted(p for p in os.listdir(straight.root) if p.startswith("checkpoint_"))
    assert len(ckpts) == 2
    resumed = LocalSession(str(tmp_path / "resumed"))
    resumed.latest = str(tmp_path / "at3")
    shutil.copytree(os.path.join(straight.root, ckpts[0]), resumed.latest)
    config = {
        "cfg": cfg.to_dict(),
        "task": "multiplication",
        "method": "eift",
        "prompts": mul_prompts,
        "max_steps": 6,
    }
    run_training(config, resumed)
    assert [r["step"] for r in resumed.reports] == [4, 5, 6]
    a, b = _final_state(straight), _final_state(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_resuming_session_picks_up_its_newest_checkpoint_and_keeps_one(mul_prompts, tmp_path):
    """A Tune trial that trains in its own process (``tune.trainer=in_trial``) and is restarted:
    a new ``LocalSession(resume=True)`` on the same directory goes on from the newest whole
    checkpoint (a half-copied one is ignored) to the model a straight run gives."""
    cfg = _cfg("train.checkpoint_every=3", "train.injection_rate=0.5")
    _, straight = train_local(
        cfg, "multiplication", "eift", mul_prompts, max_steps=6, checkpoint_root=str(tmp_path / "a")
    )
    config = {"cfg": cfg.to_dict(), "task": "multiplication", "method": "eift"}
    root = str(tmp_path / "trial")
    first = LocalSession(root, resume=True, keep=1)
    assert first.latest is None  # nothing there yet
    run_training({**config, "prompts": mul_prompts, "max_steps": 3}, first)
    assert os.listdir(root) == ["checkpoint_000001"]
    os.makedirs(os.path.join(root, "checkpoint_000002.tmp"))  # a copy cut short by a kill
    restarted = LocalSession(root, resume=True, keep=1)
    assert restarted.latest == os.path.join(root, "checkpoint_000001")
    run_training({**config, "prompts": mul_prompts, "max_steps": 6}, restarted)
    assert [r["step"] for r in restarted.reports] == [4, 5, 6]
    assert sorted(os.listdir(root)) == ["checkpoint_000002"]  # the newest only, whole
    a, b = _final_state(straight), _final_state(restarted)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_task_model_hash_follows_only_its_own_base_budget():
    from rayjobs.train import train_hash
    from selfcorrect.config import load_config

    def h(task: str, *ov: str) -> str:
        return train_hash(load_config(None, ["train.base_steps=100", *ov]), task, "eift")

    other_task = "train.base_steps_by_task={sudoku: 50}"
    assert h("multiplication") == h("multiplication", other_task)
    assert h("sudoku") != h("sudoku", other_task)
    assert h("sudoku", "train.base_steps_by_task={sudoku: 100}") == h("sudoku")
    assert h("multiplication", "train.base_lr=0.01") != h("multiplication")


# Every injection setting changed at once: what only error traces see.
_INJECTION_CHANGED = (
    "train.injection_rate=0.5",
    "train.max_errors=2",
    "train.error_placement=step",
    "train.last_step_rate=0.9",
    "train.onpolicy_fraction=0.5",
    "train.p_mistake=0.3",
    "train.mistake_loss=unlikelihood",
    "train.w_recognition=2",
    "train.w_correction=2",
    "train.w_unlikelihood=2",
    "train.w_decision=3",
    "train.probe_every=10",
    "train.probe_items=8",
    "multiplication.error_weights={carry: 1}",
    "multiplication.train_error_weights={digit: 1}",
    "sudoku.error_weights={invalid: 1}",
    "sudoku.train_error_weights={non_naked_single: 1}",
    "sudoku.next_cell_share=1",
)


def test_an_unset_train_error_weights_keeps_a_runs_hashes():
    """Added after runs were recorded: while empty it is not in config.yaml nor any hash, so an
    existing run directory is neither refused nor retrained; set, it moves the methods."""
    from rayjobs.train import train_hash

    cfg = load_config(None)
    assert "train_error_weights" not in cfg.to_dict()["multiplication"]
    assert "train_error_weights" not in cfg.clean_dict()["sudoku"]
    hard = load_config(None, ["multiplication.train_error_weights={digit: 1}"])
    assert hard.to_dict()["multiplication"]["train_error_weights"] == {"digit": 1}
    assert train_hash(hard, "multiplication", "eift") != train_hash(cfg, "multiplication", "eift")
    assert train_hash(hard, "multiplication", "ft") == train_hash(cfg, "multiplication", "ft")


def test_train_error_weights_reach_the_training_traces_only(mul_prompts):
    """A method trained on some error types is still measured on every type: the traces it
    trains on follow ``train_error_weights``; eval's synthetic items keep ``error_weights``."""
    from selfcorrect.evaluate import synthetic_items

    _, tok = build_model("nano", 256)
    hard = "multiplication.train_error_weights={int_10: 0, int_100: 0, carry: 1, digit: 1}"
    cfg = _cfg("train.injection_rate=0.5", "train.error_placement=step", hard)

    def types(c) -> set[str]:
        s = ExampleStream(c, "multiplication", "eift", mul_prompts, tok)
        return {t for step in range(6) for j in range(8) for t in s.trace(step, j, j).error_types}

    assert types(cfg) == {"carry", "digit"}
    assert {"int_10", "int_100"} <= types(_cfg("train.injection_rate=0.5"))
    task = get_task("multiplication", **cfg.task_options("multiplication"))
    rows = [{"prompt": p, "problem_id": i} for i, p in enumerate(mul_prompts[:60])]
    items = synthetic_items(task, rows, 0, 60, cfg.error_weights("multiplication"))
    assert {"int_10", "int_100"} <= {it["error_type"] for it in items}


def test_injection_settings_stay_out_of_the_stages_that_never_see_an_error(tmp_path):
    """A run resumed with another injection rate or injector mix keeps its data, bases, FT,
    harvest and GRPO; the methods with error traces, coverage, eval and the sweep redo."""
    from rayjobs.common import JobContext
    from rayjobs.data import data_hash
    from rayjobs.evaluate import eval_hash
    from rayjobs.grpo import grpo_hash
    from rayjobs.harvest import harvest_hash
    from rayjobs.train import base_config, train_hash
    from selfcorrect.config import INJECTION_KEYS
    from selfcorrect.tune import sweep_hash

    def hashes(*ov: str) -> dict[str, str]:
        cfg = load_config(None, ["train.base_steps=100", *ov])
        ctx = JobContext(cfg, str(tmp_path))
        out = {}
        for t in ("multiplication", "sudoku"):
            out |= {
                f"{t}/data": data_hash(ctx, t),
                f"{t}/base": train_hash(base_config(cfg, t), t, "base"),
                f"{t}/ft": train_hash(cfg, t, "ft"),
                f"{t}/harvest": harvest_hash(cfg, t, "no-such-model"),
                f"{t}/grpo": grpo_hash(cfg, t),
                f"{t}/eift": train_hash(cfg, t, "eift"),
                f"{t}/insec": train_hash(cfg, t, "insec"),
                f"{t}/coverage": cfg.section_hash("seed", t, "coverage"),
                f"{t}/eval": eval_hash(ctx, t, "eift"),
                f"{t}/tune": sweep_hash(cfg, t),
            }
        return out

    before, after = hashes(), hashes(*_INJECTION_CHANGED)
    kept = {k for k in before if k.rsplit("/", 1)[1] in ("data", "base", "ft", "harvest", "grpo")}
    assert {k for k in before if before[k] == after[k]} == kept
    # every injection key is among the overrides above, so none is left untested
    changed = {ov.split("=")[0] for ov in _INJECTION_CHANGED}
    assert changed == {f"{s}.{k}" for s, keys in INJECTION_KEYS.items() for k in keys}
    # a clean-trace setting still reaches them all
    moved = hashes("sudoku.max_empty=10")
    assert all(moved[k] != before[k] for k in before if k.startswith("sudoku/"))
    assert all(moved[k] == before[k] for k in before if k.startswith("multiplication/"))


def test_a_method_keeps_its_model_when_only_settings_it_never_reads_change(mul_prompts):
    """``UNREAD_BY_METHOD``: each listed key leaves the method's training stream unchanged
    (so its hash may leave it out), and every other injection key changes the hash."""
    from rayjobs.train import UNREAD_BY_METHOD, train_hash
    from selfcorrect.config import INJECTION_KEYS

    _, tok = build_model("nano", 256)
    task = get_task("multiplication", digits_a=2, digits_b=2)
    first = task.golden_steps(task.parse_prompt(mul_prompts[0]))[0]
    wrong = first[:-1] + str((int(first[-1]) + 1) % 10)  # the first step, last digit off
    hybrid_records = [
        {"prompt": mul_prompts[0], "prefix_steps": [], "wrong_step": wrong, "error_type": "digit"}
    ]

    def stream_cfg(*ov: str):
        return _cfg("train.injection_rate=0.3", "train.error_placement=step", *ov)

    def stream(method: str, *ov: str) -> list[dict[str, np.ndarray]]:
        onpolicy = hybrid_records if method == "hybrid" else None
        s = ExampleStream(stream_cfg(*ov), "multiplication", method, mul_prompts, tok, onpolicy)
        return [e for step in range(3) for e in s.local_batch(step, 0, 1)]

    changed = {
        k.split("=")[0].split(".")[1]: k for k in _INJECTION_CHANGED if k.startswith("train.")
    }
    changed["error_placement"] = "train.error_placement=trace"  # the base above uses step
    changed["last_step_rate"] = "train.last_step_rate=0.9"
    for method, unread in UNREAD_BY_METHOD.items():
        ref = stream(method)
        for key in unread:
            ov = [changed[key]]
            if key == "error_placement":
                ov.append("train.last_step_rate=null")
            other = stream(method, *ov)
            assert len(other) == len(ref)
            for x, y in zip(ref, other, strict=True):
                assert x.keys() == y.keys(), (method, key)
                assert all(np.array_equal(x[k], y[k]) for k in x), (method, key)
        base = train_hash(stream_cfg(), "multiplication", method)
        for key in INJECTION_KEYS["train"]:
            moved = train_hash(stream_cfg(changed[key]), "multiplication", method) != base
            assert moved == (key not in unread), (method, key)


def test_injection_settings_change_neither_the_data_nor_the_ft_model(mul_prompts, tmp_path):
    """What the hashes above rely on: FT and the data are the same to the bit."""
    from selfcorrect.config import load_config as load

    cfg = load(None, ["sudoku.min_empty=4", "sudoku.max_empty=8"])
    other = load(None, ["sudoku.min_empty=4", "sudoku.max_empty=8", *_INJECTION_CHANGED])
    for t in ("multiplication", "sudoku"):
        a = make_splits(get_task(t, **cfg.task_options(t)), 40, 8, 0)
        b = make_splits(get_task(t, **other.task_options(t)), 40, 8, 0)
        assert all(a[s].equals(b[s]) for s in a)
    states = []
    for i, ov in enumerate([(), _INJECTION_CHANGED]):
        c = _cfg("train.checkpoint_every=0", *ov)
        _, session = train_local(
            c,
            "multiplication",
            "ft",
            mul_prompts,
            max_steps=3,
            checkpoint_root=str(tmp_path / f"{i}"),
        )
        states.append(_final_state(session))
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_a_tasks_own_method_budget_reaches_every_method_of_that_task_only(tmp_path):
    """``train.max_steps_by_task``: the named task's methods (FT too) train that many steps,
    with the LR schedule over them (the job's ``train.max_steps``); the other task's jobs and
    hashes are those of a config without the key; the base keeps its own budget."""
    from rayjobs.common import JobContext
    from rayjobs.train import task_jobs

    def jobs(*ov: str) -> dict[str, tuple[int, str]]:
        cfg = load_config(None, ["train.max_steps=20", "train.base_steps=30", *ov])
        out = {}
        for task in ("multiplication", "sudoku"):
            for key, job in task_jobs(JobContext(cfg, str(tmp_path)), task):
                out[key] = (job.cfg.train.max_steps, job.model_hash)
        return out

    plain, more = jobs(), jobs("train.max_steps_by_task={sudoku: 50}")
    for key, (steps, digest) in more.items():
        if key.endswith("/base"):
            assert (steps, digest) == plain[key] == (30, plain[key][1])
        elif key.startswith("sudoku/"):
            assert steps == 50 and digest != plain[key][1], key
        else:
            assert (steps, digest) == plain[key] == (20, plain[key][1]), key
    assert {k for k in more if k.startswith("sudoku/")} >= {"sudoku/ft", "sudoku/eift"}
    assert jobs("train.max_steps_by_task={sudoku: 20}") == plain
    with pytest.raises(ConfigError, match="max_steps_by_task"):
        load_config(None, ["train.max_steps_by_task={chess: 10}"])


# --------------------------------------------------------------------------- chains


def _chain_job(cfg, out: str, method: str, init: str | None, steps: int) -> dict:
    return {
        "cfg": cfg.to_dict(),
        "method": method,
        "label": os.path.basename(out),
        "init_model_path": init,
        "max_steps": steps,
        "out_dir": out,
        "model_hash": f"hash-{os.path.basename(out)}",
    }


def test_a_chain_trains_each_model_as_its_own_run_would_and_resumes_mid_chain(
    mul_prompts, tmp_path
):
    """One worker group trains base then EIFT-from-base (``run_chain``): each model is
    published before the next starts and is bit-identical to the model a run of its own
    gives; a restart from a checkpoint of the second model skips the published first one and
    resumes the second where it was."""
    from selfcorrect.models import load_model
    from selfcorrect.training import published_state, run_chain

    cfg = _cfg("train.checkpoint_every=3", "train.injection_rate=0.5")
    base, eift = str(tmp_path / "models" / "base"), str(tmp_path / "models" / "eift")
    config = {
        "task": "multiplication",
        "prompts": mul_prompts,
        "chain": [
            _chain_job(cfg, base, "ft", None, 4),
            _chain_job(cfg, eift, "eift", base, 6),
        ],
    }
    session = LocalSession(str(tmp_path / "chain"))
    last = run_chain(config, session)
    assert last["step"] == 6
    assert [r["step"] for r in session.reports] == [1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    for out in (base, eift):
        state = published_state(out, f"hash-{os.path.basename(out)}")
        assert state is not None and state["train_s"] > 0
        assert published_state(out, "another-hash") is None
    # The same two models, each trained alone.
    _, alone_base = train_local(
        cfg, "multiplication", "ft", mul_prompts, max_steps=4, checkpoint_root=str(tmp_path / "a")
    )
    alone_base_dir = os.path.join(alone_base.latest, "model")
    _, alone_eift = train_local(
        cfg,
        "multiplication",
        "eift",
        mul_prompts,
        init_model_path=alone_base_dir,
        max_steps=6,
        checkpoint_root=str(tmp_path / "b"),
    )
    for chained, alone in (
        (base, alone_base_dir),
        (eift, os.path.join(alone_eift.latest, "model")),
    ):
        a, b = load_model(chained)[0].state_dict(), load_model(alone)[0].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{chained} differs from its own run"

    # Restart from the eift checkpoint at step 3 (the chain's 2nd checkpoint of that model).
    ckpts = sorted(p for p in os.listdir(session.root) if p.startswith("checkpoint_"))
    at3 = [
        c for c in ckpts if 'index": 1' in open(os.path.join(session.root, c, "chain.json")).read()
    ][0]
    before = load_model(eift)[0].state_dict()
    shutil.rmtree(eift)
    restarted = LocalSession(str(tmp_path / "restarted"))
    restarted.latest = os.path.join(session.root, at3)
    run_chain(config, restarted)
    assert [r["step"] for r in restarted.reports] == [4, 5, 6]  # base skipped, eift resumed
    assert published_state(eift, "hash-eift")["resumed_at"] == [3]
    after = load_model(eift)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_step_seconds_sums_each_logged_window():
    from selfcorrect.training import step_seconds

    history = [{"step": 10, "step_s": 0.5}, {"step": 25, "step_s": 0.2}, {"step": 25}]
    assert step_seconds(history) == pytest.approx(10 * 0.5 + 15 * 0.2)


# --------------------------------------------------------------------------- compile


def test_compiled_training_compiles_each_shape_once_and_matches_eager(mul_prompts, tmp_path):
    """``train.compile``: micro-batches padded to multiples of ``compile_pad_to`` give a few
    shapes; Dynamo compiles each exactly once (no recompilation after warm-up, probes' eval
    mode switches included) and the losses are the eager loop's."""
    from torch._dynamo.utils import counters

    from selfcorrect.loss import collate
    from selfcorrect.models import load_tokenizer
    from selfcorrect.probes import probe_items
    from selfcorrect.training import length_grouped

    opts = ("train.micro_batch_size=8", "train.batch_size=16", "train.checkpoint_every=0")
    eager_cfg = _cfg(*opts, "train.probe_every=3")
    cfg = _cfg(*opts, "train.probe_every=3", "train.compile=true", "train.compile_pad_to=32")
    task = get_task("multiplication", digits_a=2, digits_b=2)
    test_rows = make_splits(task, 64, 8, 0)["test"].to_pylist()
    probe = probe_items(task, test_rows, None, 0, 4, None)
    steps = 6
    eager, _ = train_local(
        eager_cfg, "multiplication", "eift", mul_prompts, max_steps=steps, probe_items=probe
    )
    before = counters["stats"]["unique_graphs"]
    compiled, session = train_local(
        cfg,
        "multiplication",
        "eift",
        mul_prompts,
        max_steps=steps,
        probe_items=probe,
        checkpoint_root=str(tmp_path),
    )
    graphs = counters["stats"]["unique_graphs"] - before
    # The shapes the run saw, from the same data stream and padding.
    tok = load_tokenizer(os.path.join(session.latest, "model"))
    stream = ExampleStream(cfg, "multiplication", "eift", mul_prompts, tok)
    shapes = {
        tuple(collate(mb, tok.pad_token_id, 32)["input_ids"].shape)
        for s in range(steps)
        for mb in length_grouped(stream.local_batch(s, 0, 1), 8)
    }
    assert all(T % 32 == 0 for _, T in shapes)
    assert graphs == len(shapes), f"{graphs} graphs for shapes {sorted(shapes)}: a recompile"
    assert "probe_synthetic_recognition" in compiled  # the probe ran between compiled steps
    assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-3)
