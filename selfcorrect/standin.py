"""A local stand-in for a paper model: a Hugging Face model directory made here, nothing downloaded.

The paper presets load an instruct model from the hub (``model.path``): a byte-level BPE
tokenizer with a chat template, a Qwen2 or Llama causal LM, weights in safetensors. This
module writes a directory with the same parts at a few million parameters, so the whole
paper path (BPE offsets in the loss masks, the chat template, InSeC's tokens added to a BPE
vocabulary, LoRA, ZeRO-3 gathering) runs on a laptop CPU before anyone pays for GPUs.

The tokenizer is trained with ``tokenizers`` on the tasks' own traces (clean and with
injected errors), the way a hub tokenizer has merges for the text it will see. The weights
are random: the stand-in proves the plumbing, not the science.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from selfcorrect import io

# What each architecture's instruct tokenizer calls its special tokens, and its chat template
# (the shape of Qwen2.5-Instruct's and Llama-3.2-Instruct's: user turn, then the assistant's).
ARCHS: dict[str, dict[str, Any]] = {
    "qwen2": {
        "config": Qwen2Config,
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "digits": r"\p{N}",  # Qwen2 splits numbers into single digits
        "tokenizer_class": "Qwen2Tokenizer",
        "tokens": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    },
    "llama": {
        "config": LlamaConfig,
        "special": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
        "digits": r"\p{N}{1,3}",  # Llama 3 into groups of up to three
        "tokenizer_class": "PreTrainedTokenizerFast",
        "tokens": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},  # no pad
        "chat_template": (
            "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}"
        ),
    },
}


_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|{digits}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def training_corpus(
    tasks: list[str], n_problems: int = 300, seed: int = 0, options: dict | None = None
) -> list[str]:
    """Clean and error-injected traces of each task (prompts, steps, recognition lines)."""
    from selfcorrect.tasks import get_task
    from selfcorrect.traces import clean_example, eift_example

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for name in tasks:
        task = get_task(name, **(options or {}).get(name, {}))
        for _ in range(n_problems):
            p = task.sample_problem(rng)
            texts.append(clean_example(task, p).text)
            texts.append(eift_example(task, p, rng).text)
    return texts


def train_bpe(texts: list[str], arch: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 / Qwen2 / Llama-3 style) with ``arch``'s special tokens."""
    spec = ARCHS[arch]
    tok = Tokenizer(models.BPE())
    # The split regex of GPT-4-style tokenizers (Qwen2, Llama 3), then bytes to symbols.
    split = _SPLIT.replace("{digits}", spec["digits"])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=spec["special"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        **spec["tokens"],
    )
    fast.chat_template = spec["chat_template"]
    return fast


def make_standin(
    out_dir: str,
    arch: str = "qwen2",
    tasks: tuple[str, ...] = ("multiplication", "sudoku"),
    *,
    vocab_size: int = 2048,
    hidden: int = 192,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 512,
    max_position: int = 2048,
    seed: int = 0,
) -> str:
    """Write a Hugging Face model directory (config, bf16 safetensors, tokenizer) to ``out_dir``.

    The embedding has exactly ``len(tokenizer)`` rows, so adding InSeC's tokens resizes it.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown stand-in architecture {arch!r}; choose from {sorted(ARCHS)}")
    tok = train_bpe(training_corpus(list(tasks), seed=seed), arch, vocab_size)
    spec = ARCHS[arch]
    cfg = spec["config"](
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=True,  # as Qwen2.5-1.5B and Llama-3.2-1B
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    stage = io.staging_dir(out_dir)  # written whole, then moved into place in one rename
    model.save_pretrained(stage, safe_serialization=True)
    tok.save_pretrained(stage)
    # The class the hub model's tokenizer_config.json names, so loading takes the same path.
    cfg_file = os.path.join(stage, "tokenizer_config.json")
    with open(cfg_file) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = spec["tokenizer_class"]
    with open(cfg_file, "w") as f:
        json.dump(tok_cfg, f, indent=2)
    io.replace_dir(stage, out_dir)
    return out_dir


# A paper preset at toy size on CPU: sizes and devices only. The preset's methods, ZeRO stage,
# bf16, chat template and eval conditions stay, so the run takes the paper's code path.
TOY_OVERRIDES = [
    "data.n_train=200",
    "data.n_test=20",
    "train.max_steps=4",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.num_workers=2",
    "train.cpus_per_worker=1",
    "train.use_gpu=false",
    "train.warmup_steps=1",
    "train.lr=1.0e-3",
    "train.checkpoint_every=4",
    "train.log_every=2",
    "harvest.max_problems=16",
    "harvest.temperature=1.0",  # a random-weight model: sampled lines are wrong steps to harvest
    "harvest.num_actors=1",
    "harvest.batch_size=16",
    "harvest.max_new_tokens=48",
    "coverage.n_samples=500",
    "eval.temperatures=[0.0,1.0]",
    "eval.max_problems=6",
    "eval.max_errors=6",
    "eval.num_actors=1",
    "eval.use_gpu=false",
    "eval.batch_size=16",
    "eval.max_new_tokens=48",
    "eval.surprise=false",  # a second actor pool per task; the smoke run skips it too
    "grpo.steps=2",
    "grpo.group_size=2",
    "grpo.prompts_per_step=4",
    "grpo.max_new_tokens=32",
    "grpo.eval_problems=4",
    "tune.injection_rates=[0.2]",
    "tune.max_steps=2",
    "tune.eval_problems=4",
    "tune.val_examples=8",
]


def toy_overrides(model_dir: str, lora: bool = False, gpus: int = 0) -> list[str]:
    """Overrides that run a ``paper-*`` preset on ``model_dir`` at toy size: on CPU workers
    (gloo), or with ``gpus`` > 0 on that many GPUs (NCCL, generation on GPU)."""
    out = [*TOY_OVERRIDES, f"model.path={model_dir}", f"model.lora={str(lora).lower()}"]
    if gpus:
        out += [
            "train.use_gpu=true",
            f"train.num_workers={gpus}",
            f"train.batch_size={4 * gpus}",
            "eval.use_gpu=true",
        ]
    return out
