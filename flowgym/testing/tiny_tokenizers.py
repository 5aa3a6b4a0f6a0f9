"""Tokenizers of the real classes built offline from small hand-written vocabularies.

* ``tiny_clip_tokenizer`` / ``tiny_t5_tokenizer`` (from ``tiny_sd3``): CLIP byte-level BPE without
  merges, T5 character-level Unigram.
* ``tiny_qwen_tokenizer(chat_template=None)``: a ``Qwen2Tokenizer`` (the Qwen2 / Qwen2.5-VL / Qwen3
  byte-level BPE with Qwen's pre-tokenizer regex) whose vocabulary is the 256 byte characters, the
  chat special tokens and whole-word merges for the words of Qwen-Image's prompt template, so that
  the template prefix tokenizes into 34 tokens as with the real Qwen tokenizer (the Qwen-Image
  pipeline drops exactly 34). Any text tokenizes (unknown words fall back to bytes).
"""

from __future__ import annotations

from flowgym.testing.tiny_sd3 import bytes_to_unicode, tiny_clip_tokenizer, tiny_t5_tokenizer

__all__ = ["QWEN3_CHAT_TEMPLATE", "QWEN_SPECIAL_TOKENS", "tiny_clip_tokenizer", "tiny_qwen_tokenizer", "tiny_t5_tokenizer"]

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
#: a compact Qwen3 chat template: user turns, the assistant prefix, and the empty thinking block that
#: ``enable_thinking=False`` adds (what ``Flux2KleinPipeline`` renders for every prompt)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
_WORDS = (
    "system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
    " a", " red", " cube", " cat", " cats", " two", " on", " table", " photo", "<think>", "</think>",
)


def tiny_qwen_tokenizer(chat_template: str | None = None, model_max_length: int = 32768):
    """A ``Qwen2Tokenizer`` over bytes plus whole-word merges (see the module docstring)."""
    from transformers import Qwen2Tokenizer

    byte_char = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for char in byte_char.values():
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        if word.startswith("<"):
            continue
        chars = [byte_char[b] for b in word.encode("utf-8")]
        prefix = chars[0]
        for char in chars[1:]:
            if (prefix, char) not in merges:
                merges.append((prefix, char))
            prefix += char
            vocab.setdefault(prefix, len(vocab))
    for special in QWEN_SPECIAL_TOKENS:
        vocab.setdefault(special, len(vocab))
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    )
    tokenizer.add_tokens(["<think>", "</think>"])
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
