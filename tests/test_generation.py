"""The generation engine: batching must not change results, sampling must follow the model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_harvest_model import train_nano

from selfcorrect.generation import GenerationActor, _decode, generate
from selfcorrect.models import build_model, save_model
from selfcorrect.tasks import INSEC_CLOSE, INSEC_OPEN, RECOGNITION_LINE, get_task, trace_end

MUL = {"digits_a": 2, "digits_b": 2}


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return train_nano("multiplication", MUL, steps=80)


@pytest.fixture(scope="module")
def prefixes():
    task = get_task("multiplication", **MUL)
    rng = np.random.default_rng(3)
    return [task.prompt(task.sample_problem(rng)) + "\n" for _ in range(12)]


def test_greedy_batched_equals_one_at_a_time(trained, prefixes):
    model, tok = trained
    # Uneven prefix lengths (left padding) and a batch size that splits them unevenly.
    mixed = prefixes[:6] + [p + "1" for p in prefixes[6:9]] + ["7*8\n"]
    batched = generate(model, tok, mixed, max_new_tokens=60, batch_size=4)
    single = [generate(model, tok, [p], max_new_tokens=60)[0] for p in mixed]
    assert batched == single


def test_greedy_agrees_with_hf_generate(trained, prefixes):
    """Our KV-cached loop is the model's greedy decoding, cut where its answer stands."""
    model, tok = trained
    ours = generate(model, tok, prefixes[:6], max_new_tokens=60)
    for p, text in zip(prefixes[:6], ours, strict=True):
        enc = tok([p], return_tensors="pt", add_special_tokens=False)
        out = model.generate(
            **enc, max_new_tokens=60, do_sample=False, pad_token_id=tok.pad_token_id
        )
        ref = _decode(tok, out[0, enc["input_ids"].shape[1] :].tolist())
        end = trace_end(ref)
        # No answer that stands: ran to EOS / max_new_tokens like HF.
        assert text == (ref if end is None else ref[:end])


def test_the_preallocated_kv_cache_samples_dynamic_caches_tokens_to_the_bit(
    trained, prefixes, monkeypatch
):
    """Writing the cache in place (no torch.cat per token) changes no token, with rows of
    uneven lengths leaving the batch at different steps."""
    from transformers import DynamicCache

    import selfcorrect.generation as g

    model, tok = trained
    mixed = prefixes[:6] + [p + "1" for p in prefixes[6:9]] + ["7*8\n"]
    kw = {"max_new_tokens": 60, "temperature": 1.0, "seeds": range(10), "batch_size": 10}
    ours = g.generate_rollouts(model, tok, mixed, **kw)
    monkeypatch.setattr(g, "_preallocated_cache_class", lambda: lambda capacity: DynamicCache())
    ref = g.generate_rollouts(model, tok, mixed, **kw)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    assert len({len(r.token_ids) for r in ours}) > 2  # rows did leave the batch early


def test_the_preallocated_kv_cache_grows_past_its_planned_length(trained):
    from transformers import DynamicCache

    from selfcorrect.generation import _preallocated_cache_class

    model, _ = trained
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    logits = {}
    for name, cache in (("planned 3", _preallocated_cache_class()(3)), ("dynamic", DynamicCache())):
        with torch.no_grad():
            out = [model(input_ids=ids[:, :2], cache=cache, use_cache=True).logits[:, -1]]
            for t in range(2, ids.shape[1]):
                out.append(
                    model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits[:, -1]
                )
        logits[name] = torch.stack(out)
        assert cache.get_seq_length() == ids.shape[1]
    assert torch.equal(logits["planned 3"], logits["dynamic"])


def test_stops_after_answer_line(trained, prefixes):
    model, tok = trained
    texts = generate(model, tok, prefixes, max_new_tokens=120)
    answered = [t for t in texts if "ANSWER " in t]
    assert answered, texts  # the trained model writes answers
    for t in answered:
        assert t.endswith("\n") and t.rstrip("\n").split("\n")[-1].startswith("ANSWER ")


def test_sampling_reproducible_per_row_whatever_the_batching(trained, prefixes):
    model, tok = trained
    seeds = list(range(100, 112))
    a = generate(model, tok, prefixes, max_new_tokens=40, temperature=1.0, seeds=seeds)
    b = generate(
        model,
        tok,
        prefixes[::-1],
        max_new_tokens=40,
        temperature=1.0,
        seeds=seeds[::-1],
        batch_size=5,
    )[::-1]
    c = [
        generate(model, tok, [p], max_new_tokens=40, temperature=1.0, seeds=[s])[0]
        for p, s in zip(prefixes[:3], seeds[:3], strict=True)
    ]
    assert a == b
    assert a[:3] == c
    other = generate(model, tok, prefixes, max_new_tokens=40, temperature=1.0, seeds=range(12))
    assert other != a  # the seed matters


def test_sampling_follows_the_softmax(trained):
    """First-token frequencies over many seeds match softmax(logits / T)."""
    model, tok = trained
    prefix = "12*3"
    n, temp = 4000, 1.5
    texts = generate(
        model,
        tok,
        [prefix] * n,
        max_new_tokens=1,
        temperature=temp,
        seeds=range(n),
        batch_size=1000,
    )
    with torch.no_grad():
        ids = tok([prefix], return_tensors="pt", add_special_tokens=False)["input_ids"]
        probs = torch.softmax(model(input_ids=ids).logits[0, -1] / temp, -1)
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    top = torch.topk(probs, 5)
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        piece = _decode(tok, [i])
        freq = counts.get(piece, 0) / n
        sd = (p * (1 - p) / n) ** 0.5
        assert abs(freq - p) < 5 * sd + 1e-3, (piece, freq, p)


def test_decode_keeps_insec_markers_and_drops_padding():
    _, tok = build_model("nano")
    ids = tok(f"12{INSEC_OPEN}3=4{INSEC_CLOSE}\n", add_special_tokens=False)["input_ids"]
    text = _decode(tok, [tok.pad_token_id, tok.bos_token_id, *ids, tok.eos_token_id])
    assert text == f"12{INSEC_OPEN}3=4{INSEC_CLOSE}\n"


def test_trace_end():
    """The stopping rule: an ANSWER line stands once a finished line after it is not a
    recognition line."""
    assert trace_end("1*2=2\nANSWER 2\nmore\n") == len("1*2=2\nANSWER 2\n")
    assert trace_end("1*2=2\nANSWER 2\nmore") is None  # the next line is not finished yet
    assert trace_end("1*2=2\nANSWER 2\n") is None
    assert trace_end("1*2=2\nANSWER 2") is None
    retracted = f"ANSWER 1\n{RECOGNITION_LINE}\n1*2=2\nANSWER 2\n"
    assert trace_end(retracted + "\n \nmore\n") == len(retracted)
    assert trace_end(f"{INSEC_OPEN}ANSWER 1\n{INSEC_CLOSE}\nmore\n") is None
    assert trace_end("xANSWER 2\nmore\n") is None  # not at a line start


class ScriptedLM(torch.nn.Module):
    """Writes ``script`` then EOS, whatever the prompt: the next token is read off the
    position of the last input token (every row's prefix must have ``prefix_len`` tokens)."""

    def __init__(self, tok, script: str, prefix_len: int):
        super().__init__()
        self.ids = tok(script, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        self.vocab = len(tok)
        self.head = torch.nn.Linear(1, self.vocab, bias=False)
        self.config = type("Cfg", (), {"max_position_embeddings": 1024})()
        self.prefix_len = prefix_len
        self.calls = 0

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, position_ids, **kw):
        self.calls += 1
        k = (position_ids[:, -1] + 1 - self.prefix_len).clamp_max(len(self.ids) - 1)
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        logits[torch.arange(input_ids.shape[0]), 0, torch.tensor(self.ids)[k]] = 0.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("recognition", [RECOGNITION_LINE, INSEC_CLOSE])
def test_generation_goes_on_after_an_answer_line_the_model_retracts(recognition):
    """Issue 20.3: an ANSWER line followed by a recognition line is a retracted wrong step,
    not the end of the trace; any other line after an ANSWER line ends it (and is cut)."""
    _, tok = build_model("nano")
    prefix = "12*34\n"
    n = len(tok(prefix, add_special_tokens=False)["input_ids"])
    opener = INSEC_OPEN if recognition == INSEC_CLOSE else ""
    fixed = f"12*4=48\n{opener}ANSWER 1\n{recognition}\n12*30=360\n48+360=408\nANSWER 408\n"
    model = ScriptedLM(tok, fixed, n)
    assert generate(model, tok, [prefix], max_new_tokens=200) == [fixed]
    # Two rows, greedy and sampled, same script: batching and sampling change nothing.
    both = generate(model, tok, [prefix, prefix], max_new_tokens=200, temperature=1.0)
    assert both == [fixed, fixed]
    # The model writes on after its answer without retracting it: stop once that line is done.
    model = ScriptedLM(tok, "12*4=48\nANSWER 1\nmore\nand more\n", n)
    assert generate(model, tok, [prefix], max_new_tokens=200) == ["12*4=48\nANSWER 1\n"]
    assert model.calls == len("12*4=48\nANSWER 1\nmore\n")
    # An item whose prefix ends in an ANSWER line (a harvested premature answer): the line
    # after it is the model's reply and is kept.
    model = ScriptedLM(tok, "12*30=360\nmore\n", n + 9)
    out = generate(model, tok, [prefix + "ANSWER 1\n"], max_new_tokens=200)
    assert out == ["12*30=360\n"]


def test_bad_arguments_are_clear(trained):
    model, tok = trained
    with pytest.raises(ValueError, match="seeds"):
        generate(model, tok, ["1*2\n"], max_new_tokens=4, seeds=[1, 2])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, ["1*2\n"], max_new_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        generate(model, tok, [""], max_new_tokens=4)
    assert generate(model, tok, [], max_new_tokens=4) == []


def test_generation_actor_follows_a_model_path_column(trained, prefixes, tmp_path):
    """Several models in one pass (the eval stage's): each row is continued by the model its
    ``model_path`` names, rows of two models interleaved in one batch."""
    import copy

    model, tok = trained
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    save_model(model, tok, a)
    save_model(other, tok, b)
    actor = GenerationActor(None, max_new_tokens=30, batch_size=4, torch_threads=1)
    batch = {
        "prefix": np.array(prefixes[:4], dtype=object),
        "seed": np.array([1, 2, 3, 4]),
        "temperature": np.zeros(4),
        "model_path": np.array([a, b, a, b], dtype=object),
    }
    out = actor(batch)
    want_a = generate(model, tok, [prefixes[0], prefixes[2]], max_new_tokens=30)
    want_b = generate(other, tok, [prefixes[1], prefixes[3]], max_new_tokens=30)
    assert list(out["completion"]) == [want_a[0], want_b[0], want_a[1], want_b[1]]
    assert want_a != generate(other, tok, [prefixes[0], prefixes[2]], max_new_tokens=30)
    with pytest.raises(KeyError, match="model_path"):
        actor_without = GenerationActor(None, max_new_tokens=4)
        actor_without({k: v for k, v in batch.items() if k != "model_path"})


def test_generation_actor_adds_completion_column(trained, prefixes, tmp_path):
    """The Ray Data callable, called directly: same texts as ``generate``, per-row temperature."""
    model, tok = trained
    save_model(model, tok, str(tmp_path))
    actor = GenerationActor(str(tmp_path), max_new_tokens=30, batch_size=4, torch_threads=1)
    batch = {
        "prefix": np.array(prefixes[:4], dtype=object),
        "seed": np.array([1, 2, 3, 4]),
        "temperature": np.array([0.0, 1.0, 0.0, 1.0]),
        "problem_id": np.array(["a", "b", "c", "d"], dtype=object),
    }
    out = actor(batch)
    assert list(out["problem_id"]) == ["a", "b", "c", "d"]
    greedy = generate(model, tok, [prefixes[0], prefixes[2]], max_new_tokens=30)
    hot = generate(
        model, tok, [prefixes[1], prefixes[3]], max_new_tokens=30, temperature=1.0, seeds=[2, 4]
    )
    assert list(out["completion"]) == [greedy[0], hot[0], greedy[1], hot[1]]


def test_prompt_longer_than_the_context_is_refused_not_truncated(trained, prefixes):
    """The nano model was built with model.max_length=160: its context is 160 positions."""
    model, tok = trained
    assert model.config.max_position_embeddings == 160
    long = "12*34\n" + "12*4=48\n" * 25  # 206 tokens
    with pytest.raises(ValueError, match=r"1 prompt\(s\) do not fit.*160 tokens.*model.max_length"):
        generate(model, tok, [prefixes[0], long], max_new_tokens=4)
    with pytest.raises(ValueError, match="context of 20 tokens"):
        generate(model, tok, [prefixes[0] * 4], max_new_tokens=4, max_length=20)


def test_generation_stops_when_the_context_is_full(trained, prefixes):
    """A prompt near the context gets only the positions that are left, never an index error."""
    model, tok = trained
    near = "12*34\n" + "12*4=48\n" * 19  # 158 of 160 positions
    n = len(tok(near, add_special_tokens=False)["input_ids"])
    kw = {"max_new_tokens": 40, "temperature": 1.0}
    out = generate(model, tok, [near, prefixes[0]], seeds=[5, 7], **kw)
    assert len(tok(out[0], add_special_tokens=False)["input_ids"]) <= 160 - n
    # the short row in the same batch is untouched by its neighbour's limit
    assert out[1] == generate(model, tok, [prefixes[0]], seeds=[7], **kw)[0]


def _break(d, how: str) -> None:
    st = os.path.join(d, "model.safetensors")
    if how == "no config.json":
        os.remove(os.path.join(d, "config.json"))
    elif how == "config.json not JSON":
        open(os.path.join(d, "config.json"), "w").write("{truncated")
    elif how == "truncated safetensors":
        data = open(st, "rb").read()
        open(st, "wb").write(data[: len(data) // 2])
    elif how == "garbage safetensors":
        open(st, "wb").write(os.urandom(4096))
    elif how == "no weights":
        os.remove(st)


@pytest.mark.parametrize(
    "how,match",
    [
        ("missing dir", "does not exist; train it first"),
        ("no config.json", "no config.json"),
        ("config.json not JSON", "config.json is not valid JSON"),
        ("truncated safetensors", "model.safetensors is truncated or corrupt"),
        ("garbage safetensors", "model.safetensors is truncated or corrupt"),
        ("no weights", "holds no \\*.safetensors weights"),
    ],
)
def test_missing_or_corrupt_model_dir_is_one_clear_error(tmp_path, how, match):
    """Caught by the loader every stage uses, and on the driver before any actor starts."""
    from selfcorrect.generation import map_generate
    from selfcorrect.models import ModelPathError, load_model

    model, tok = build_model("nano", 64)
    d = str(tmp_path / "ft")
    if how != "missing dir":
        save_model(model, tok, d)
        _break(d, how)
    with pytest.raises(ModelPathError, match=match):
        load_model(d)
    with pytest.raises(ModelPathError, match=match):
        GenerationActor(d, max_new_tokens=4)
    if how != "missing dir":  # a dir the driver cannot see may exist on the actors' node
        with pytest.raises(ModelPathError, match=f"{match}.*(rerun|train it)"):
            map_generate(None, d, max_new_tokens=4, batch_size=4)


def test_step_surprise_is_the_teacher_forced_minimum_whatever_the_batching(trained, prefixes):
    """Minus the lowest log-probability among the step's tokens after the prefix: checked
    against one plain forward pass per row, for uneven lengths split over batches."""
    from selfcorrect.generation import step_surprise

    model, tok = trained
    steps = ["12*3=36", "12*30=360", "1*1=999999", "7"]
    pre = [prefixes[0], prefixes[1], prefixes[2] + "5*5=25\n", prefixes[3]]
    got = step_surprise(model, tok, pre, steps, batch_size=3)
    for p, s, value in zip(pre, steps, got, strict=True):
        ids = tok(p + s, add_special_tokens=False)["input_ids"]
        n_prefix = len(tok(p, add_special_tokens=False)["input_ids"])  # one token per char
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = -min(float(logp[t - 1, ids[t]]) for t in range(n_prefix, len(ids)))
        assert value == pytest.approx(want, abs=1e-4)
    assert step_surprise(model, tok, [], []) == []
    with pytest.raises(ValueError, match="newline"):
        step_surprise(model, tok, ["12*3"], ["=36"])


def test_a_models_own_greedy_steps_surprise_it_less_than_synthetic_errors(trained, prefixes):
    """What eval's ``wrong_step_surprise`` rests on: the model's own greedy first step is
    what it would write; a synthetic error at the same state mostly is not."""
    from selfcorrect.generation import step_surprise
    from selfcorrect.tasks.base import sample_error

    model, tok = trained
    task = get_task("multiplication", **MUL)
    rng = np.random.default_rng(0)
    own = [t.split("\n")[0] for t in generate(model, tok, prefixes, max_new_tokens=30)]
    wrong = []
    for p in prefixes:
        state = task.initial_state(task.parse_prompt(p.strip()))
        wrong.append(sample_error(task, state, rng)[0])
    s_own = step_surprise(model, tok, prefixes, own)
    s_wrong = step_surprise(model, tok, prefixes, wrong)
    assert max(s_own) < np.log(10)  # greedy: every token is the argmax
    assert np.mean(s_wrong) > np.mean(s_own) + 1.0


def test_surprise_actor_adds_its_column(trained, prefixes, tmp_path):
    from selfcorrect.generation import SurpriseActor, step_surprise

    model, tok = trained
    save_model(model, tok, str(tmp_path))
    actor = SurpriseActor(str(tmp_path), max_new_tokens=1, batch_size=2, torch_threads=1)
    batch = {
        "prefix": np.array(prefixes[:3], dtype=object),
        "step": np.array(["12*3=36", "1*1=1", "9"], dtype=object),
        "key": np.array([0, 1, 2]),
    }
    out = actor(batch)
    assert list(out["key"]) == [0, 1, 2]
    want = step_surprise(model, tok, prefixes[:3], ["12*3=36", "1*1=1", "9"])
    assert np.allclose(out["surprise"], want, atol=1e-5)


def test_surprise_actor_scores_each_row_under_the_model_it_names(trained, prefixes, tmp_path):
    """The eval stage scores every model's wrong steps in one pass: rows name their model,
    and each row gets exactly the surprise its own model gives (a second, untrained model
    gives other numbers, so a mix-up fails)."""
    from selfcorrect.generation import SurpriseActor, step_surprise
    from selfcorrect.models import build_model

    model, tok = trained
    other, _ = build_model("nano", 128, seed=5)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    save_model(model, tok, a)
    save_model(other, tok, b)
    steps = ["12*3=36", "1*1=1", "9", "7*7=49"]
    actor = SurpriseActor(None, max_new_tokens=1, batch_size=2, torch_threads=1)
    out = actor(
        {
            "prefix": np.array(prefixes[:4], dtype=object),
            "step": np.array(steps, dtype=object),
            "model_path": np.array([a, a, b, b], dtype=object),
        }
    )
    want_a = step_surprise(model, tok, prefixes[:2], steps[:2])
    want_b = step_surprise(other.eval(), tok, prefixes[2:4], steps[2:])
    assert np.allclose(out["surprise"], [*want_a, *want_b], atol=1e-4)
    assert not np.allclose(want_b, step_surprise(model, tok, prefixes[2:4], steps[2:]), atol=1e-3)


def test_step_scores_give_the_signal_lines_log_probability_after_the_step(trained, prefixes):
    """``signal_logp``: log P(signal + newline | prefix + step + newline), teacher-forced, checked
    against one plain forward pass per row; the surprise is unchanged by the appended line."""
    from selfcorrect.generation import step_scores, step_surprise

    model, tok = trained
    steps = ["12*3=36", "1*1=999999", "7"]
    pre = [prefixes[0], prefixes[1] + "5*5=25\n", prefixes[2]]
    signals = [RECOGNITION_LINE, RECOGNITION_LINE, None]
    surprise, logp = step_scores(model, tok, pre, steps, signals, batch_size=2)
    assert surprise == pytest.approx(step_surprise(model, tok, pre, steps), abs=1e-5)
    for p, s, sig, value in zip(pre[:2], steps[:2], signals[:2], logp[:2], strict=True):
        head = p + s + "\n"  # one token per character
        ids = tok(head + sig + "\n", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        want = sum(float(lp[t - 1, ids[t]]) for t in range(len(head), len(ids)))
        assert value == pytest.approx(want, abs=1e-3)
        assert value < 0
    assert np.isnan(logp[2])  # no signal asked for this row
    assert step_scores(model, tok, [], []) == ([], [])
    with pytest.raises(ValueError, match="signals"):
        step_scores(model, tok, pre, steps, [None])


def test_surprise_actor_adds_the_signal_column_when_asked(trained, prefixes, tmp_path):
    from selfcorrect.generation import SurpriseActor, step_scores

    model, tok = trained
    save_model(model, tok, str(tmp_path))
    actor = SurpriseActor(str(tmp_path), max_new_tokens=1, batch_size=2, torch_threads=1)
    steps = ["12*3=36", "1*1=1", "9"]
    batch = {
        "prefix": np.array(prefixes[:3], dtype=object),
        "step": np.array(steps, dtype=object),
        "signal": np.array([RECOGNITION_LINE, "", INSEC_CLOSE], dtype=object),
    }
    out = actor(batch)
    want = step_scores(model, tok, prefixes[:3], steps, [RECOGNITION_LINE, None, INSEC_CLOSE])
    assert np.allclose(out["surprise"], want[0], atol=1e-5)
    assert np.isnan(out["signal_logp"][1])
    assert np.allclose(out["signal_logp"][[0, 2]], np.array(want[1])[[0, 2]], atol=1e-5)
    assert "signal_logp" not in actor({k: v for k, v in batch.items() if k != "signal"})
