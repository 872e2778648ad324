"""The project's character-level tokenizer, as a real Hugging Face ``PreTrainedTokenizerFast``.

One token per printable ASCII character plus special tokens, so it is saved
with ``save_pretrained`` next to the model and any HF tool can load it. Offsets
are exact character spans, which is what the loss masks are built from.
"""

from __future__ import annotations

import string
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from selfcorrect.tasks.base import INSEC_CLOSE, INSEC_OPEN

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, INSEC_OPEN, INSEC_CLOSE]
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic: the same ids on every machine, so saved models stay readable."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in ALPHABET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character is its own pre-token ([\s\S] so '\n' is one too).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[INSEC_OPEN, INSEC_CLOSE],
        clean_up_tokenization_spaces=False,
        model_max_length=1024,
        padding_side="left",
    )


def chat_head(tokenizer: Any, prompt: str) -> str | None:
    """The prompt in the tokenizer's chat template, up to where the assistant's turn starts.

    None when the tokenizer has no template (the character tokenizer, or a model trained with
    ``model.chat_template: false``, whose saved tokenizer keeps none).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def frame_text(tokenizer: Any, text: str) -> str:
    """``prompt\\nsteps...`` as the model sees it: the prompt line in the chat template, if any.

    Generation prefixes and training texts both go through this (``selfcorrect.loss`` frames
    examples with ``chat_head``), so a model is prompted exactly as it was trained.
    """
    prompt, _, rest = text.partition("\n")
    head = chat_head(tokenizer, prompt)
    return text if head is None else head + rest
