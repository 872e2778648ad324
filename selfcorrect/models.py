"""Models: random-init Qwen2-architecture presets with the character tokenizer, or any local HF model.

Everything is saved with ``save_pretrained`` (safetensors) so later stages and
any Hugging Face tool can load it. Nothing here downloads weights unless the
config names a hub model explicitly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from selfcorrect.tasks.base import INSEC_CLOSE, INSEC_OPEN
from selfcorrect.tokenizer import build_char_tokenizer

# name -> (hidden, layers, heads, kv_heads, ffn)
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "nano": (64, 2, 4, 4, 128),
    # tiny's depth at half its width: about a quarter of its compute per token
    "mini": (128, 4, 4, 4, 384),
    "tiny": (256, 4, 4, 4, 768),
    # tiny's width, twice its depth: flagging a wrong step is one token after the whole line
    # (compute the step, compare, gather), a lever for the premise (benchmarks/NOTES.md)
    "tiny-deep": (256, 8, 4, 4, 768),
    "small": (384, 6, 6, 6, 1536),
    "base": (512, 8, 8, 8, 2048),
    "0.5b": (896, 24, 14, 2, 4864),  # Qwen2-0.5B shape (GPU benchmarks)
}


class ModelPathError(FileNotFoundError):
    """A model directory that is missing or unreadable."""


def preset_config(preset: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Qwen2Config:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(PRESETS)}")
    d, n_layers, heads, kv, ffn = PRESETS[preset]
    vocab = 151936 if preset == "0.5b" else len(tokenizer)
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max(max_length, 64),
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rope_theta=10000.0,
        attention_dropout=0.0,
    )


def build_model(
    preset: str, max_length: int = 256, seed: int = 0
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A random-initialised model of ``preset`` and the character tokenizer (seeded init)."""
    tokenizer = build_char_tokenizer()
    cfg = preset_config(preset, tokenizer, max_length)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    return model, tokenizer


def load_model(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a saved model + tokenizer (safetensors only), with a clear error if it is not there."""
    check_model_dir(path)
    try:
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelPathError(f"could not load model from {path!r}: {e}; {_RETRAIN}") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


_RETRAIN = (
    "delete the directory and rerun the stage that wrote it (python -m rayjobs.train, or "
    "rayjobs.grpo for models/grpo), or point model.path at a good Hugging Face model directory"
)


def check_model_dir(path: str) -> None:
    """Fail fast on a local model directory that is missing, half-written or corrupt.

    Reads only ``config.json`` and the safetensors headers (no weights), so a job can call
    it on the driver before it starts actors or workers: a broken model then costs one clear
    message instead of an actor crash deep in transformers. Hub ids and URIs pass through.
    """
    p = Path(path)
    if not p.exists():
        if _looks_like_hub_id(path) or "://" in path:
            return
        raise ModelPathError(
            f"model path {path!r} does not exist; train it first (python -m rayjobs.train) or set "
            "model.path to a local Hugging Face model directory"
        )
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise ModelPathError(
            f"{path!r} is not a Hugging Face model directory (no config.json); it may be a "
            f"half-written or corrupt model: {_RETRAIN}"
        )
    try:
        json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelPathError(f"{cfg_file} is not valid JSON ({e}); {_RETRAIN}") from e
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        pickled = [f.name for f in p.glob("*.bin")] + [f.name for f in p.glob("*.pt")]
        extra = (
            f" (it has {', '.join(pickled)}: pickle-based weights are never loaded, they can run "
            "code; convert them with save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise ModelPathError(f"{path!r} holds no *.safetensors weights{extra}; {_RETRAIN}")
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except (SafetensorError, OSError) as e:
            raise ModelPathError(
                f"weights file {f} is truncated or corrupt ({e}); {_RETRAIN}"
            ) from e


def adapt_tokenizer(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> None:
    """Make a loaded tokenizer what every method trains with: InSeC's markers as tokens and
    the chat template kept or dropped (``model.chat_template``). Saved with each trained
    model, so later stages need no config to match.

    A hub BPE tokenizer would split ``</mistake>`` into many pieces; as one added special
    token (as the character tokenizer has it) InSeC's decision is one token, as EIFT's is.
    """
    missing = [t for t in (INSEC_OPEN, INSEC_CLOSE) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    if not chat_template:
        tokenizer.chat_template = None


def fit_embeddings(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings to the vocabulary. New rows are the mean of the old ones: no
    RNG, so every Ray Train rank (each seeded differently) starts from the same model."""
    old = model.get_input_embeddings().num_embeddings
    if len(tokenizer) <= old:
        return
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for emb in {
            id(m): m
            for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None
        }.values():
            emb.weight[old:] = emb.weight[:old].mean(dim=0)


def insec_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer.convert_tokens_to_ids([INSEC_OPEN, INSEC_CLOSE])


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """AutoTokenizer, except for tokenizers saved as a plain ``tokenizer.json`` (our char one).

    transformers 5 maps ``TokenizersBackend`` tokenizers to the class of the model
    type (Qwen2Tokenizer for our Qwen2 presets), whose byte-level pre-tokenizer
    silently drops newlines from the character tokenizer. Loading the saved
    ``tokenizer.json`` as-is keeps it exactly as trained.
    """
    cfg_file = Path(path) / "tokenizer_config.json"
    if cfg_file.exists():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _looks_like_hub_id(path: str) -> bool:
    return (
        "/" in path
        and not os.path.isabs(path)
        and not path.startswith(".")
        and path.count("/") == 1
    )


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, out_dir: str) -> None:
    """save_pretrained (safetensors) into ``out_dir`` (the caller makes the final move atomic)."""
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def cpu_has_bf16() -> bool:
    """True where the CPU has a bf16 matmul path (AVX512-BF16 or AMX); without one, bf16
    autocast on CPU is 8-55x slower than fp32 (BENCHMARKS.md), with one about 2x faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: stay on the safe side
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_attention(setting: str, device: torch.device, bf16: bool) -> str:
    """``train.attention`` (auto | sdpa | eager) for this worker's own device.

    On a CPU under bf16 autocast, PyTorch's fused attention backward costs ~8x its forward
    (one profiled sudoku step: 27% of the step); plain matmul attention trains ~1.25x faster
    per step there. Without bf16, or on a GPU, the fused kernel is as fast or faster.
    """
    if setting != "auto":
        return setting
    return "eager" if device.type == "cpu" and bf16 else "sdpa"


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """``train.bf16`` (true | false | auto) for this worker's own device."""
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
