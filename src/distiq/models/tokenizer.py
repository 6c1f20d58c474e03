"""An offline word-level tokenizer: a real Hugging Face tokenizer built from a word list.

The built-in edge VLM speaks the synthetic scenes' closed vocabulary, so one token per word is
both the smallest and the best-conditioned choice: every answer is one or two tokens, and a
tokenizer trained on text would only add merges nobody needs. The result is a
``PreTrainedTokenizerFast`` that saves and loads with ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` like any Hugging Face tokenizer.

Text is lower-cased, split on whitespace and punctuation (``tokenizers``' ``Whitespace``
pre-tokenizer: ``\\w+|[^\\w\\s]+``), and mapped word by word; a word outside the list becomes
``<unk>``. Encoding prepends ``<s>`` (``add_special_tokens=True``), never appends ``</s>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
# Words the prompt formats themselves use, always in the vocabulary.
PROMPT_WORDS = ("question", "answer", ":", "?", ",", ".", "'", "-")


def build_word_tokenizer(
    words: Iterable[str],
    *,
    extra_special_tokens: Iterable[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` plus special tokens.

    Args:
        words: the vocabulary, e.g. ``distiq.data.scenes.vocabulary()``. Each word is lower-cased
            and split like text is (``"don't"`` adds ``don``, ``'`` and ``t``), so every word of
            the list is reachable. Order is kept (ids are stable for a given list); duplicates
            are dropped.
        extra_special_tokens: more special tokens (never split, never lower-cased), e.g. a
            family's ``<|im_start|>``; they follow the five built-in ones
            ``<pad> <s> </s> <unk> <image>`` (ids 0-4).
        chat_template: an optional Jinja chat template stored with the tokenizer.

    Returns:
        the tokenizer; ``tokenizer.image_token`` is ``"<image>"``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(words)
    if not words:
        raise ValueError("build_word_tokenizer needs at least one word; pass the data's vocabulary")
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise TypeError(f"words must be strings, got {bad[:5]!r}")
    extra = [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]

    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *extra):
        vocab.setdefault(token, len(vocab))
    for word in (*PROMPT_WORDS, *words):
        for piece, _ in pre_tokenizer.pre_tokenize_str(word.lower()):
            vocab.setdefault(piece, len(vocab))

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        additional_special_tokens=extra or None,
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
    )
    # Special tokens must be matched before the lower-casing normaliser sees them.
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE, *extra]})
    return tokenizer
