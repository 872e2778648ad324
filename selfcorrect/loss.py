"""Loss masks and the weighted LM loss: the one place where span labels become token weights.

Span labels live on characters (``traces.Example``); tokens get weights through
the tokenizer's offset mapping, so the same code is right for the character
tokenizer and for any Hugging Face BPE tokenizer. Attention is never masked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from selfcorrect.tasks.base import signal_line
from selfcorrect.tokenizer import chat_head
from selfcorrect.traces import Example, Span


@dataclass(frozen=True)
class LossWeights:
    """Per-span weights. ``mistake_loss`` decides what InSeC mistake tokens contribute.

    ``w_decision`` multiplies ``w_recognition`` on the decision tokens of a recognition
    line (``Span.DECISION``): the one choice the line stands for; the rest is forced.
    """

    w_recognition: float = 1.0
    w_correction: float = 1.0
    mistake_loss: str = "mask"  # mask | unlikelihood
    w_unlikelihood: float = 1.0
    w_decision: float = 1.0

    def __post_init__(self) -> None:
        if self.mistake_loss not in ("mask", "unlikelihood"):
            raise ValueError(
                f"mistake_loss={self.mistake_loss!r}; set it to 'mask' or 'unlikelihood'"
            )
        if min(self.w_recognition, self.w_correction, self.w_unlikelihood, self.w_decision) < 0:
            raise ValueError("loss weights must be >= 0")

    def of(self, kind: int) -> float:
        return {
            Span.PROMPT: 0.0,
            Span.GOLDEN: 1.0,
            Span.WRONG: 0.0,
            Span.RECOGNITION: self.w_recognition,
            Span.CORRECTION: self.w_correction,
            Span.MARKER: 0.0,
            Span.MISTAKE: 0.0,
            Span.DECISION: self.w_recognition * self.w_decision,
        }[Span(kind)]


def token_weights(
    offsets: list[tuple[int, int]], char_labels: np.ndarray, weights: LossWeights
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token (loss weight, unlikelihood weight, span kind) from character spans.

    A token takes the kind of its first character; if any of its characters is
    in a zero-weight span (a wrong step, a marker), the token's weight is 0, so
    the model is never trained to emit any part of a wrong step. Unlikelihood goes to a
    token that holds the character where an InSeC mistake departs from every correct step
    and nothing outside the wrong line (a BPE token straddling a correct line gets none).
    """
    n = len(offsets)
    w = np.zeros(n, dtype=np.float32)
    ul = np.zeros(n, dtype=np.float32)
    kind = np.full(n, int(Span.PROMPT), dtype=np.int8)
    if n == 0:
        return w, ul, kind
    char_w = np.array([weights.of(k) for k in range(len(Span))], dtype=np.float32)
    se = np.asarray(offsets, dtype=np.int64).reshape(n, 2)  # [n_tokens, (start, end)]
    live = np.flatnonzero(se[:, 1] > se[:, 0])  # special tokens have no characters
    if live.size == 0:
        return w, ul, kind
    s, e = se[live, 0], se[live, 1]
    if np.any(s[1:] < e[:-1]):  # tokens sharing characters (byte pieces of one character)
        return token_weights_reference(offsets, char_labels, weights)
    # One reduction per token over its characters [s, e): reduceat over the interleaved
    # bounds [s0, e0, s1, e1, ...] reduces [s_i, e_i) at even positions (odd ones are gaps).
    bounds = np.stack([s, e], axis=1).ravel()  # [2 * n_live]
    labels = np.append(char_labels, char_labels[-1:]).astype(np.int64)  # e may equal len(text)

    def per_token(values: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        return ufunc.reduceat(values, bounds)[::2]

    kind[live] = labels[s]  # a token takes the kind of its first character
    w[live] = per_token(char_w[labels], np.minimum)  # any zero-weight character zeroes it
    if weights.mistake_loss == "unlikelihood":
        wrong = ((labels == Span.MISTAKE) | (labels == Span.WRONG)).astype(np.int8)
        mistake = (labels == Span.MISTAKE).astype(np.int8)
        hit = (per_token(wrong, np.minimum) == 1) & (per_token(mistake, np.maximum) == 1)
        ul[live[hit]] = weights.w_unlikelihood
    return w, ul, kind


def token_weights_reference(
    offsets: list[tuple[int, int]], char_labels: np.ndarray, weights: LossWeights
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``token_weights`` one token at a time: the readable rule the vectorised version is
    tested (and benchmarked) against."""
    n = len(offsets)
    w, ul = np.zeros(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
    kind = np.full(n, int(Span.PROMPT), dtype=np.int8)
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            continue
        kinds = [int(k) for k in char_labels[s:e]]
        kind[i] = kinds[0]
        w[i] = min(weights.of(k) for k in kinds)
        wrong_only = all(k in (Span.MISTAKE, Span.WRONG) for k in kinds)
        if weights.mistake_loss == "unlikelihood" and wrong_only and Span.MISTAKE in kinds:
            ul[i] = weights.w_unlikelihood
    return w, ul, kind


def recognition_signal(example: Example) -> str:
    """The line a model trained on ``example`` writes to flag an error."""
    return signal_line(example.source)


def false_alarm_targets(tokenizer, example: Example, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Per token: the id that would start a recognition line there instead, or -1.

    Only at the lines that follow a correct step (a golden or correction line after a
    golden or correction line): the token where the line first departs from the
    recognition signal, paired with the signal's token at that point. Predicting it
    (argmax) is a false alarm: the model would flag a correct step. The ``ANSWER`` line
    shares ``A`` with the EIFT line, so its departure is at ``N`` vs ``H``.
    """
    signal = recognition_signal(example)
    sig = tokenizer(signal, add_special_tokens=False, return_offsets_mapping=True)
    sig_at = {
        s: t for t, (s, e) in zip(sig["input_ids"], sig["offset_mapping"], strict=True) if e > s
    }
    tok_at = {s: i for i, (s, e) in enumerate(offsets) if e > s}
    out = np.full(len(offsets), -1, dtype=np.int64)
    correct = (Span.GOLDEN, Span.CORRECTION)
    for (_, _, prev), (s, e, kind) in zip(example.spans[:-1], example.spans[1:], strict=True):
        if kind != Span.GOLDEN or prev not in correct:
            continue
        line = example.text[s:e]
        k = 0
        while k < min(len(line), len(signal)) and line[k] == signal[k]:
            k += 1
        if k < len(signal) and k in sig_at and s + k in tok_at:
            out[tok_at[s + k]] = sig_at[k]
    return out


def frame_example(tokenizer, example: Example) -> Example:
    """The example with its prompt line in the tokenizer's chat template (if it has one).

    The template's text is all prompt (weight 0); every later span shifts by the same amount,
    so masks, decision sites and false-alarm sites are unchanged.
    """
    s0, prompt_end, kind = example.spans[0]
    if s0 != 0 or kind != Span.PROMPT:
        raise ValueError("an example must start with its prompt line")
    head = chat_head(tokenizer, example.text[: prompt_end - 1])  # without the newline
    if head is None:
        return example
    d = len(head) - prompt_end
    spans = [(0, len(head), int(Span.PROMPT))] + [
        (s + d, e + d, k) for s, e, k in example.spans[1:]
    ]
    return replace(example, text=head + example.text[prompt_end:], spans=spans)


def encode_example(
    tokenizer, example: Example, weights: LossWeights, max_length: int | None = None
) -> dict[str, np.ndarray]:
    """Text -> token ids plus per-token weights; an EOS token is appended as a golden token.

    ``fa_target`` (``false_alarm_targets``) is for metrics only: it never enters the loss.
    The prompt is put in the chat template first where the tokenizer has one.
    """
    example = frame_example(tokenizer, example)
    enc = tokenizer(example.text, add_special_tokens=False, return_offsets_mapping=True)
    w, ul, kind = token_weights(enc["offset_mapping"], example.char_labels(), weights)
    fa = false_alarm_targets(tokenizer, example, enc["offset_mapping"])
    ids = np.array(enc["input_ids"] + [tokenizer.eos_token_id], dtype=np.int64)
    w = np.append(w, 1.0).astype(np.float32)
    ul = np.append(ul, 0.0).astype(np.float32)
    kind = np.append(kind, int(Span.GOLDEN)).astype(np.int8)
    fa = np.append(fa, -1)
    if max_length is not None and len(ids) > max_length:
        raise ValueError(
            f"training example of {len(ids)} tokens exceeds model.max_length={max_length} "
            "(examples are never truncated); raise model.max_length, or use fewer digits / "
            "fewer errors per trace (train.max_errors)"
        )
    return {
        "input_ids": ids,
        "loss_weight": w,
        "ul_weight": ul,
        "span_kind": kind,
        "fa_target": fa,
    }


def collate(
    batch: list[dict[str, np.ndarray]], pad_id: int, pad_to: int = 1
) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples to the longest, rounded up to a multiple of
    ``pad_to`` (compiled training: few distinct shapes); padding carries zero weight and no
    attention."""
    T = -(-max(len(b["input_ids"]) for b in batch) // pad_to) * pad_to
    B = len(batch)
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "loss_weight": torch.zeros((B, T), dtype=torch.float32),
        "ul_weight": torch.zeros((B, T), dtype=torch.float32),
        "span_kind": torch.zeros((B, T), dtype=torch.long),
        "fa_target": torch.full((B, T), -1, dtype=torch.long),
    }
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        out["input_ids"][i, :n] = torch.as_tensor(b["input_ids"])
        out["attention_mask"][i, :n] = 1
        out["loss_weight"][i, :n] = torch.as_tensor(b["loss_weight"])
        out["ul_weight"][i, :n] = torch.as_tensor(b["ul_weight"])
        out["span_kind"][i, :n] = torch.as_tensor(b["span_kind"].astype(np.int64))
        if "fa_target" in b:
            out["fa_target"][i, :n] = torch.as_tensor(b["fa_target"])
    return out


def global_weight_sum(local: torch.Tensor) -> torch.Tensor:
    """Total loss weight over every data-parallel rank (the loss normaliser)."""
    total = local.detach().clone().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.clamp_min(1e-8)


def weighted_lm_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    normalizer: torch.Tensor,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted next-token loss, normalised by the global-batch weight ``normalizer``.

    logits: [B, T, V]; batch tensors: [B, T]. Token t is predicted from position
    t-1, so weights are shifted by one. Data-parallel frameworks average
    gradients over ranks, so the local loss is scaled by ``world_size`` to make
    the result a sum over the global batch divided by its total weight.
    Returns (loss, per-token stats for span-level logging).
    """
    logits = logits[:, :-1].float()  # [B, T-1, V]
    target = batch["input_ids"][:, 1:]  # [B, T-1]
    w = batch["loss_weight"][:, 1:]  # [B, T-1]
    ul = batch["ul_weight"][:, 1:]  # [B, T-1]
    logp = F.log_softmax(logits, dim=-1)
    tok_logp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    nll = -tok_logp
    loss = (nll * w).sum()
    if torch.any(ul > 0):
        # Unlikelihood: -log(1 - p(token)) pushes the mistake tokens' probability down.
        p = tok_logp.exp().clamp(max=1 - 1e-6)
        loss = loss + (-torch.log1p(-p) * ul).sum()
    loss = loss * world_size / normalizer
    pred = logits.detach().argmax(-1)  # [B, T-1]
    stats = {
        "nll": nll.detach(),
        "kind": batch["span_kind"][:, 1:],
        "weight": w,
        "hit": pred == target,
        "fa_target": batch["fa_target"][:, 1:] if "fa_target" in batch else None,
        "pred": pred,
    }
    return loss, stats


def decision_stats(stats: dict[str, torch.Tensor]) -> tuple[float, float, float, float, float]:
    """(decisions, their summed NLL, decisions argmax-right, false-alarm sites, false alarms).

    A decision is one contiguous run of ``Span.DECISION`` targets (``AH`` of the EIFT line,
    ``</mistake>`` for InSeC): its NLL is the run's summed token NLL (-log p of flagging the
    error), and it is right when every token of the run is the argmax. False-alarm sites are
    the ``fa_target`` positions after correct steps; a false alarm is an argmax there that
    would start the recognition line.
    """
    dec = stats["kind"] == int(Span.DECISION)  # [B, T-1]
    start = dec.clone()
    start[:, 1:] &= ~dec[:, :-1]
    n = float(start.sum())
    nll = float(stats["nll"][dec].sum())
    right = 0.0
    if n:
        run = (start.flatten().cumsum(0) - 1)[dec.flatten()]  # run id of each decision token
        ok = torch.ones(int(n), device=dec.device)
        ok = ok.scatter_reduce(0, run, stats["hit"].flatten()[dec.flatten()].float(), "amin")
        right = float(ok.sum())
    fa_t = stats.get("fa_target")
    sites = alarms = 0.0
    if fa_t is not None:
        site = fa_t >= 0
        sites = float(site.sum())
        alarms = float((stats["pred"][site] == fa_t[site]).sum())
    return n, nll, right, sites, alarms


def span_losses(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean NLL per span kind over tokens with nonzero weight (for metrics)."""
    out = {}
    for kind in Span:
        sel = (stats["kind"] == int(kind)) & (stats["weight"] > 0)
        if sel.any():
            out[f"loss_{kind.name.lower()}"] = float(stats["nll"][sel].mean())
    return out
