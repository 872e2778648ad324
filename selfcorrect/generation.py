"""The one generation engine: batched, KV-cached, left-padded decoding used by harvest, eval and GRPO.

Why our own loop over a KV ``cache`` instead of ``model.generate``:

* sampling must be reproducible *per row* from that row's seed, whatever else is
  in the batch (harvest and eval shard and re-batch rows freely through Ray
  Data, and a retried batch must give the same text). Each row draws one
  uniform number per step from its own ``numpy`` generator and picks its token
  by inverse-CDF, which is vectorised on the device;
* a row stops at EOS or once its trace's answer stands (``tasks.base.trace_end``: an
  ``ANSWER`` line followed by a complete line that is not a recognition line, which is
  then cut; a recognition line after an ANSWER line retracts it and the row goes on, so
  a premature answer can be recognised like any wrong step), and finished rows are
  dropped from the batch and the KV cache, so short answers stop costing compute;
* prompts are sorted by length before batching, so little compute goes on padding;
* the KV cache is preallocated for the prompt plus ``max_new_tokens`` and written in place
  (``_preallocated_cache_class``): transformers' ``DynamicCache`` appends with ``torch.cat``,
  which copies the whole cache at every token (2.57x tokens/s at the eval's batch of 128,
  ``BENCHMARKS.md``).

``benchmarks/bench_generation.py`` compares it with HF ``generate`` (batched and
one prompt at a time) on the same model.

Ray Data: ``GenerationActor`` is the callable class for
``ds.map_batches(GenerationActor, fn_constructor_kwargs=..., concurrency=n)``; it
loads the model once per actor and adds a ``completion`` column.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from selfcorrect.tasks.base import clean_line, is_answer, is_recognition, split_lines, trace_end
from selfcorrect.tokenizer import frame_text

__all__ = [
    "GenerationActor",
    "Rollout",
    "generate",
    "generate_rollouts",
    "generation_ray_args",
    "map_generate",
    "map_step_surprise",
    "step_surprise",
]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return sorted(ids)


_NEWLINE_CACHE: dict[int, torch.Tensor] = {}


def _newline_table(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """bool[vocab]: whether a token's text contains a newline (decoded once per tokenizer)."""
    key = id(tokenizer)
    table = _NEWLINE_CACHE.get(key)
    if table is None or table.numel() != vocab_size:
        n = len(tokenizer)
        flags = np.zeros(vocab_size, dtype=bool)
        for i, piece in enumerate(tokenizer.batch_decode([[i] for i in range(min(n, vocab_size))])):
            flags[i] = "\n" in piece
        table = torch.from_numpy(flags)
        _NEWLINE_CACHE[key] = table
    return table


@functools.cache
def _preallocated_cache_class() -> type:
    """``PreallocatedCache(capacity)``: a KV cache that writes each new position in place.

    transformers' ``DynamicCache`` appends with ``torch.cat``, which copies every layer's
    whole cache at every token: on CPU at batch 128 that copy was 60% of a decode step. This
    cache preallocates the prompt plus ``max_new_tokens`` and hands attention views of the
    same values, so the logits are the same to the bit (``tests/test_generation.py``);
    ``benchmarks/bench_generation.py`` measures the ratio. Built on first use, so importing
    this module does not import transformers.
    """
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            b, h, _, d = key_states.shape  # [batch, kv heads, positions, head dim]
            self.device = key_states.device
            self._k = key_states.new_empty(b, h, self.capacity, d)  # [b, h, capacity, d]
            self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):  # type: ignore[override]
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self._k.shape[-2]:  # more than planned: grow by doubling
                grow = max(end, 2 * self._k.shape[-2]) - self._k.shape[-2]
                self._k = torch.nn.functional.pad(self._k, (0, 0, 0, grow))
                self._v = torch.nn.functional.pad(self._v, (0, 0, 0, grow))
            self._k[:, :, self.length : end] = key_states
            self._v[:, :, self.length : end] = value_states
            self.length = end
            self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]  # views
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.is_initialized:
                self._k, self._v = self._k[indices], self._v[indices]
                self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    class PreallocatedCache(DynamicCache):
        def __init__(self, capacity: int) -> None:
            layer = functools.partial(PreallocatedLayer, capacity)
            Cache.__init__(self, layer_class_to_replicate=layer)  # type: ignore[arg-type]

    return PreallocatedCache


def _strip_specials(text: str, tokenizer: Any) -> str:
    """Remove pad/eos/bos markers only: InSeC's ``<mistake>``/``</mistake>`` must survive."""
    for tok in (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token):
        if tok:
            text = text.replace(tok, "")
    return text


@dataclass(frozen=True)
class Rollout:
    """One continuation as the sampler produced it (``generate_rollouts``).

    ``text`` is what ``generate`` returns for the row. ``token_ids`` are the tokens the
    sampler actually drew, in order: the ones to score when training on the rollout
    (GRPO), since re-tokenising ``text`` can segment it differently under a BPE tokenizer,
    and ``text`` has special tokens stripped and is cut after the ANSWER line.
    """

    text: str
    prompt_ids: tuple[int, ...]  # the prefix as the model saw it
    token_ids: tuple[int, ...]  # every sampled token; the last is the EOS iff stop == "eos"
    stop: str  # "eos" (sampled an EOS) | "answer" | "length" (max_new_tokens) | "context"

    @property
    def sampled_eos(self) -> bool:
        """True when the sampler drew an EOS (then it is the last of ``token_ids``)."""
        return self.stop == "eos"


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prefixes: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[str]:
    """Continue each prefix; returns the continuation texts in input order.

    ``[r.text for r in generate_rollouts(...)]``: see ``generate_rollouts`` for the
    arguments and when a row stops.
    """
    rollouts = generate_rollouts(
        model,
        tokenizer,
        prefixes,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seeds=seeds,
        batch_size=batch_size,
        max_length=max_length,
    )
    return [r.text for r in rollouts]


@torch.inference_mode()
def generate_rollouts(
    model: torch.nn.Module,
    tokenizer: Any,
    prefixes: Sequence[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seeds: Sequence[int] | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> list[Rollout]:
    """Continue each prefix; returns one ``Rollout`` per prefix, in input order.

    Greedy at ``temperature == 0``; otherwise sampling where row ``i`` depends
    only on ``prefixes[i]`` and ``seeds[i]`` (not on batching or order). A row
    stops at EOS, once its answer stands (an ``ANSWER`` line followed by a complete
    line that is not a recognition line; that line is cut unless the ANSWER line was
    the prefix's), at ``max_new_tokens``, or when it fills the model's context. Special
    tokens other than pad/eos/bos (e.g. ``</mistake>``) are kept.

    ``max_length`` is the model's context in tokens (default: the model config's
    ``max_position_embeddings``, which ``model.max_length`` sets for the presets). A prefix
    that does not leave room for one new token is an error: it is never silently truncated.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefixes = list(prefixes)
    if seeds is None:
        seeds = list(range(len(prefixes)))
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prefixes):
        raise ValueError(
            f"got {len(seeds)} seeds for {len(prefixes)} prefixes; pass one per prefix"
        )
    if not prefixes:
        return []
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token"
        )

    # The prompt line in the chat template where the tokenizer has one, as in training.
    ids = tokenizer([frame_text(tokenizer, p) for p in prefixes], add_special_tokens=False)[
        "input_ids"
    ]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prefix {i} is empty; every prefix needs at least the prompt line")
    context = max_length or model_context(model)
    if context is not None:
        too_long = [i for i, row in enumerate(ids) if len(row) >= context]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"{len(too_long)} prompt(s) do not fit the model's context of {context} tokens "
                f"(prefix {i} has {len(ids[i])} tokens: {prefixes[i][:60]!r}...); prompts are "
                "never truncated: raise model.max_length (and retrain) or shorten the prompts"
            )
    # Longest first: similar lengths share a batch (little padding), and memory errors come early.
    order = sorted(range(len(prefixes)), key=lambda i: -len(ids[i]))
    out: list[Rollout | None] = [None] * len(prefixes)
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(order), batch_size):
            rows = order[b0 : b0 + batch_size]
            rollouts = _generate_batch(
                model,
                tokenizer,
                [ids[i] for i in rows],
                [prefixes[i] for i in rows],
                [seeds[i] for i in rows],
                max_new_tokens,
                temperature,
                context,
            )
            for i, r in zip(rows, rollouts, strict=True):
                out[i] = r
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]  # every slot is filled


def _generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    ids: list[list[int]],
    prefixes: list[str],
    seeds: list[int],
    max_new_tokens: int,
    temperature: float,
    context: int | None = None,
) -> list[Rollout]:
    device = next(model.parameters()).device
    B = len(ids)
    T = max(len(r) for r in ids)
    pad = int(tokenizer.pad_token_id)
    input_ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(ids):  # left padding
        input_ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # [B, T]

    # Per-row uniforms, drawn up front from each row's own seed: batching cannot change them.
    uniforms = None
    if temperature > 0:
        uniforms = torch.from_numpy(
            np.stack([np.random.default_rng(s).random(max_new_tokens) for s in seeds])
        ).to(device)  # [B, max_new_tokens] float64

    eos = torch.tensor(_eos_ids(model, tokenizer), dtype=torch.long, device=device)
    vocab = model.get_output_embeddings().weight.shape[0]
    newline = _newline_table(tokenizer, vocab).to(device)
    # Line start for the ANSWER check: the prefix's unfinished last line continues in the output.
    tails = [p[p.rfind("\n") + 1 :] for p in prefixes]
    # Whether the last finished line is an ANSWER line awaiting the next line's verdict
    # (an item whose prefix ends in a premature answer starts so).
    last = [split_lines(p[: p.rfind("\n") + 1])[-1:] for p in prefixes]
    pending = [bool(x) and is_answer(x[0]) for x in last]
    heads = [
        (x[0] + "\n" if pend else "") + t for x, pend, t in zip(last, pending, tails, strict=True)
    ]

    generated: list[list[int]] = [[] for _ in range(B)]  # sampled ids (a sampled EOS too)
    stop = ["length"] * B  # why each row stopped; "length" until something else ends it
    line_start = [0] * B  # token index where each row's unfinished line begins
    active = torch.arange(B, device=device)  # original row of each live batch slot
    cache = _preallocated_cache_class()(T + max_new_tokens)
    step_ids, step_pos, attn = input_ids, positions, mask
    for t in range(max_new_tokens):
        logits = (
            model(
                input_ids=step_ids,
                attention_mask=attn,
                position_ids=step_pos,
                cache=cache,  # transformers 5: `past_key_values` is deprecated
                use_cache=True,
                logits_to_keep=1,
            )
            .logits[:, -1, :vocab]
            .float()
        )  # [b, V]
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            cdf = probs.double().cumsum(-1)  # [b, V]
            u = uniforms[active, t].unsqueeze(-1) * cdf[:, -1:]  # [b, 1]
            nxt = (cdf < u).sum(-1).clamp_max(vocab - 1)
        finished = torch.isin(nxt, eos)
        nxt_cpu = nxt.tolist()
        act_cpu = active.tolist()
        check = (newline[nxt] & ~finished).tolist()
        fin = finished.tolist()
        for slot, (row, tok) in enumerate(zip(act_cpu, nxt_cpu, strict=True)):
            generated[row].append(tok)
            if fin[slot]:
                stop[row] = "eos"
                continue
            if context is not None and len(ids[row]) + len(generated[row]) >= context:
                fin[slot] = True  # the context is full: no position left for another token
                stop[row] = "context"
                continue
            if check[slot]:
                # Only the line(s) this newline completed: earlier lines were checked already.
                head = tails[row] if line_start[row] == 0 else ""
                window = head + _decode(tokenizer, generated[row][line_start[row] :])
                for raw in window.split("\n")[:-1]:
                    line = clean_line(raw)
                    if not line:
                        continue
                    if pending[row] and not is_recognition(line):
                        fin[slot] = True  # the answer stands: the trace is over
                        stop[row] = "answer"
                        break
                    pending[row] = is_answer(line)
                line_start[row] = len(generated[row])
        keep = [s for s, f in enumerate(fin) if not f]
        if not keep:
            break
        if len(keep) < len(act_cpu):
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            active, nxt, attn = active[sel], nxt[sel], attn[sel]
            step_pos = step_pos[sel]
        step_ids = nxt.unsqueeze(-1)  # [b, 1]
        step_pos = step_pos[:, -1:] + 1  # [b, 1]
        attn = torch.cat([attn, torch.ones_like(step_ids)], dim=-1)  # [b, past + 1]

    out = []
    for row in range(B):
        body = generated[row][:-1] if stop[row] == "eos" else generated[row]  # [no EOS]
        text = _decode(tokenizer, body)
        # Cut what follows the answer that stands (exact, whatever the token boundaries).
        end = trace_end(heads[row] + text)
        if end is not None and end > len(heads[row]):
            text = text[: end - len(heads[row])]
        out.append(Rollout(text, tuple(ids[row]), tuple(generated[row]), stop[row]))
    return out


def step_surprise(
    model: torch.nn.Module,
    tokenizer: Any,
    prefixes: Sequence[str],
    steps: Sequence[str],
    batch_size: int = 64,
) -> list[float]:
    """How surprising each ``step`` is to the model right after its ``prefix``: minus the
    lowest log-probability (nats) among the step's tokens, teacher-forced.

    A step the model would have written itself has a low surprise (at greedy decoding every
    token is the argmax); a synthetic error usually has a high one. Eval records it for every
    wrong step, so recognition can be read against the model's belief in the error.
    """
    return step_scores(model, tokenizer, prefixes, steps, batch_size=batch_size)[0]


@torch.no_grad()
def step_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    prefixes: Sequence[str],
    steps: Sequence[str],
    signals: Sequence[str | None] | None = None,
    batch_size: int = 64,
) -> tuple[list[float], list[float]]:
    """Per row, teacher-forced after ``prefix``: (the step's surprise, as ``step_surprise``;
    the log-probability (nats) that the model writes ``signal`` as the next line, i.e.
    ``P(signal + "\\n" | prefix + step + "\\n")``; NaN where the row's signal is None).

    Why the second number: greedy recognition is a threshold (the signal must beat every
    other next line), and a model that ranks the signal higher after a wrong step than after
    the correct one at the same state has learned to tell them apart even when it stays below
    that threshold. Eval compares it after the wrong and after a correct step at the same state.
    """
    if len(prefixes) != len(steps):
        raise ValueError(f"got {len(steps)} steps for {len(prefixes)} prefixes")
    signals = [None] * len(steps) if signals is None else list(signals)
    if len(signals) != len(steps):
        raise ValueError(f"got {len(signals)} signals for {len(steps)} steps")
    if not prefixes:
        return [], []
    device = next(model.parameters()).device
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    # (token ids, the step's tokens [first, end), the signal's tokens [sig, len(ids)))
    rows: list[tuple[list[int], int, int, int]] = []
    for prefix, step, signal in zip(prefixes, steps, signals, strict=True):
        if not prefix.endswith("\n"):
            raise ValueError(f"prefix {prefix[-40:]!r} must end with a newline (render_prefix)")
        head = frame_text(tokenizer, prefix)  # as in training: the step follows directly
        body = head + step.strip()
        text = body if signal is None else body + "\n" + signal + "\n"
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        # The step's tokens: from the first one that ends inside its characters to the last
        # that starts inside them; the signal's: every token that ends inside the signal line.
        first = next((k for k, (_, end) in enumerate(offsets) if end > len(head)), len(ids))
        end = next((k for k, (start, _) in enumerate(offsets) if start >= len(body)), len(ids))
        sig = len(ids)
        if signal is not None:
            sig = next((k for k, (_, e) in enumerate(offsets) if e > len(body) + 1), len(ids))
        if first == 0 or first >= end or (signal is not None and sig >= len(ids)):
            raise ValueError(f"cannot place step {step!r} after prefix {prefix[:60]!r}...")
        rows.append((ids, first, end, sig))
    surprise, signal_logp = [0.0] * len(rows), [math.nan] * len(rows)
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for b0 in range(0, len(order), batch_size):
            batch = order[b0 : b0 + batch_size]
            T = max(len(rows[i][0]) for i in batch)
            ids = torch.full((len(batch), T), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for r, i in enumerate(batch):  # right padding: no effect on earlier positions
                ids[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
                mask[r, : len(rows[i][0])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1)  # [B, T, V]
            # token_logp[b, t] = log P(ids[b, t + 1] | ids[b, : t + 1]): [B, T - 1]
            token_logp = logp[:, :-1].gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
            for r, i in enumerate(batch):
                n, first, end, sig = len(rows[i][0]), rows[i][1], rows[i][2], rows[i][3]
                surprise[i] = float(-token_logp[r, first - 1 : end - 1].min())
                if sig < n:
                    signal_logp[i] = float(token_logp[r, sig - 1 : n - 1].sum())
    finally:
        model.train(was_training)
    return surprise, signal_logp


def model_context(model: torch.nn.Module) -> int | None:
    """The model's context length in tokens (``max_position_embeddings``), if it declares one."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(n) if n else None


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return _strip_specials(
        tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False),
        tokenizer,
    )


# ---------------------------------------------------------------------------
# Ray Data
# ---------------------------------------------------------------------------


def generation_ray_args(use_gpu: bool, cpus_per_actor: float = 1.0) -> dict[str, Any]:
    """Named resource arguments of ``map_batches`` for one generation actor.

    Fault tolerance needs nothing here: Ray Data 2.60 creates pool actors with
    ``max_restarts=-1`` and ``max_task_retries=-1``, so a crashed actor is
    restarted and its unfinished batches re-run (a lost actor costs time, not rows).
    """
    return {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_actor}


def cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def map_generate(
    ds: Any,
    model_path: str | None,
    *,
    max_new_tokens: int,
    batch_size: int,
    num_actors: int = 1,
    use_gpu: bool | None = None,
    actor_cls: type | None = None,
    cpus_per_actor: float = 1.0,
) -> Any:
    """``ds`` (columns ``prefix``, ``seed``, ``temperature``) -> ``ds`` plus ``completion``.

    A fixed pool of ``num_actors`` actors, one model copy each; GPUs are used
    when the cluster has them (``use_gpu=None``). ``actor_cls`` swaps in a
    subclass of ``GenerationActor`` (fault-injection tests do this). ``model_path=None``:
    every row names its model in a ``model_path`` column (check those on the driver).
    """
    import ray

    from selfcorrect.models import check_model_dir

    if model_path is not None and "://" not in model_path and os.path.exists(model_path):
        # A corrupt model fails here with one message, not as a crash in every actor.
        check_model_dir(model_path)
    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    from selfcorrect import console

    spec = console.worker_spec()  # quiet mode: the actors log to the stage's log
    extra = {"console": spec} if spec else {}
    return ds.map_batches(
        actor_cls or GenerationActor,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        fn_constructor_kwargs={
            "model_path": model_path,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "use_gpu": use_gpu,
            "torch_threads": None if use_gpu else max(1, int(cpus_per_actor)),
            **extra,
        },
        **generation_ray_args(use_gpu, cpus_per_actor),
    )


def map_step_surprise(
    ds: Any,
    model_path: str | None,
    *,
    batch_size: int,
    num_actors: int = 1,
    use_gpu: bool | None = None,
    cpus_per_actor: float = 1.0,
) -> Any:
    """``ds`` (columns ``prefix``, ``step``, optionally ``signal``) -> ``ds`` plus ``surprise``
    (and ``signal_logp``; ``SurpriseActor``), on a pool of actors like ``map_generate``'s.
    ``model_path=None``: every row names its model in a ``model_path`` column (several models,
    one pool; rows grouped by model)."""
    import ray

    if use_gpu is None:
        use_gpu = cluster_has_gpus()
    from selfcorrect import console

    spec = console.worker_spec()
    extra = {"console": spec} if spec else {}
    return ds.map_batches(
        SurpriseActor,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        fn_constructor_kwargs={
            "model_path": model_path,
            "max_new_tokens": 1,
            "batch_size": batch_size,
            "use_gpu": use_gpu,
            "torch_threads": None if use_gpu else max(1, int(cpus_per_actor)),
            **extra,
        },
        **generation_ray_args(use_gpu, cpus_per_actor),
    )


class GenerationActor:
    """Ray Data callable class: one model copy per actor; adds a ``completion`` column.

    Input columns: ``prefix`` (str), ``seed`` (int), ``temperature`` (float; may
    vary per row — rows are grouped by temperature). Other columns pass through. With a
    ``model_path`` column, each row is continued by the model it names (several models in
    one pass, one actor pool: the eval stage's way of paying one pool start-up per task);
    the actor keeps one model loaded at a time, so feed rows grouped by model.
    """

    def __init__(
        self,
        model_path: str | None,
        max_new_tokens: int,
        batch_size: int = 64,
        use_gpu: bool = False,
        torch_threads: int | None = None,
        console: dict[str, Any] | None = None,
    ) -> None:
        from selfcorrect import console as _console

        _console.attach_worker(console)  # quiet mode: output to the stage's log
        self.progress = _console.Progress(console)

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.loaded: str | None = None
        if model_path is not None:
            self._load(model_path)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.pid = os.getpid()

    def _load(self, model_path: str) -> None:
        """Make ``model_path`` the actor's model (the previous one is released first)."""
        from selfcorrect.models import load_model

        if model_path == self.loaded:
            return
        self.model = self.tokenizer = None
        if self.device == "cuda":
            torch.cuda.empty_cache()
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model, self.tokenizer = load_model(model_path, dtype=dtype, device=self.device)
        self.loaded = model_path

    def _row_models(self, batch: dict[str, np.ndarray], n: int) -> np.ndarray:
        """Each row's model: its ``model_path`` column, else the model loaded at start."""
        if "model_path" in batch:
            return np.asarray([str(p) for p in batch["model_path"]], dtype=object)
        if self.loaded is None:
            name = type(self).__name__
            raise KeyError(f"{name} without a model_path needs a 'model_path' column")
        return np.full(n, self.loaded, dtype=object)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in ("prefix", "seed", "temperature"):
            if col not in batch:
                raise KeyError(f"GenerationActor needs a {col!r} column; got {sorted(batch)}")
        prefixes = [str(p) for p in batch["prefix"]]
        seeds = np.asarray(batch["seed"]).astype(np.int64)
        temps = np.asarray(batch["temperature"]).astype(np.float64)
        paths = self._row_models(batch, len(prefixes))
        completions = np.empty(len(prefixes), dtype=object)
        for path in dict.fromkeys(paths):  # in order of first appearance
            self._load(path)
            for temp in np.unique(temps[paths == path]):
                idx = np.flatnonzero((paths == path) & (temps == temp))
                texts = generate(
                    self.model,
                    self.tokenizer,
                    [prefixes[i] for i in idx],
                    max_new_tokens=self.max_new_tokens,
                    temperature=float(temp),
                    seeds=[int(seeds[i]) for i in idx],
                    batch_size=self.batch_size,
                )
                for i, t in zip(idx, texts, strict=True):
                    completions[i] = t
        self.progress.add(len(prefixes))
        out = dict(batch)
        out["completion"] = completions
        return out


class SurpriseActor(GenerationActor):
    """Ray Data callable class: the same model copy; adds ``surprise`` (``step_surprise``)
    for columns ``prefix`` and ``step``, and with a ``signal`` column (a line, or "" for none)
    ``signal_logp`` (``step_scores``: the log-probability of that line next; NaN for "").
    Other columns pass through; a ``model_path`` column names each row's model, as for
    ``GenerationActor``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for col in ("prefix", "step"):
            if col not in batch:
                raise KeyError(f"SurpriseActor needs a {col!r} column; got {sorted(batch)}")
        prefixes = [str(p) for p in batch["prefix"]]
        steps = [str(x) for x in batch["step"]]
        signals = [str(x) or None for x in batch["signal"]] if "signal" in batch else None
        paths = self._row_models(batch, len(prefixes))
        # On a CPU, forward batches of 32 (the activations stay in cache): 1.18-1.29x the
        # scoring rate of 128 on tiny's eval rows (bench_eval.py); scores move by float rounding.
        forward_batch = self.batch_size if self.device == "cuda" else min(self.batch_size, 32)
        surprise = np.empty(len(prefixes), dtype=np.float64)
        signal_logp = np.full(len(prefixes), np.nan, dtype=np.float64)
        for path in dict.fromkeys(paths):  # in order of first appearance
            self._load(path)
            idx = np.flatnonzero(paths == path)
            surprise[idx], signal_logp[idx] = step_scores(
                self.model,
                self.tokenizer,
                [prefixes[i] for i in idx],
                [steps[i] for i in idx],
                None if signals is None else [signals[i] for i in idx],
                batch_size=forward_batch,
            )
        out = dict(batch)
        out["surprise"] = surprise
        if signals is not None:
            out["signal_logp"] = signal_logp
        self.progress.add(len(surprise))
        return out
