"""The tokenizer metadata llama.cpp reads from a GGUF language model (``tokenizer.ggml.*``).

llama.cpp tokenizes text itself, so the GGUF file must describe the tokenizer completely:

- ``tokenizer.ggml.model``: the algorithm. llama.cpp implements byte-level BPE (``gpt2``),
  SentencePiece (``llama``), WordPiece (``bert``), Unigram (``t5``) and a few model-specific
  ones; it has **no word-level tokenizer**. distiq writes ``gpt2`` from a Hugging Face
  byte-level BPE tokenizer (``tokenizers`` model ``BPE`` with a ``ByteLevel`` decoder: GPT-2,
  SmolLM / SmolVLM, Qwen2, Llama 3 and most recent checkpoints).
- ``tokenizer.ggml.pre``: the pre-tokenizer (how text is split before BPE), one of the names
  llama.cpp's ``llama-vocab.cpp`` knows. distiq recognises the split patterns of ``gpt-2``
  (``ByteLevel`` with its built-in regex), ``smollm`` (single digits, then GPT-2's regex),
  ``qwen2`` and ``llama-bpe`` (their ``Split`` regexes); another one must be named
  (``tokenizer_pre=``), since a wrong one silently tokenizes differently.
- ``tokens`` (id order, padded with ``[PAD<id>]`` to the embedding's rows), ``token_type``
  (1 normal, 3 control = special added tokens, 4 user-defined = other added tokens, 5 unused =
  padding), ``merges`` (``"left right"``), the ``bos`` / ``eos`` / ``unk`` / ``pad`` ids,
  ``add_bos_token`` / ``add_eos_token`` (what ``tokenizer(text)`` does) and the chat template.

A word-level vocabulary (distiq's built-in demo tokenizer, ``distiq.models.tokenizer``) cannot
be represented: a ``gpt2`` vocabulary without merges does not load (llama.cpp requires
``tokenizer.ggml.merges``, and gguf-py cannot write an empty array), BPE with no merges would
split every word into characters anyway, llama.cpp's pre-tokenizers neither lower-case nor split
punctuation as ``tokenizers``' ``Whitespace`` does, and nothing else maps a whole word to one id.
Such runs are refused with that explanation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Split regexes of the Hugging Face tokenizer.json files whose llama.cpp pre-tokenizer is known
# (llama-vocab.cpp quotes them as the "original regex from tokenizer.json").
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_TOKENIZERS = ("gpt-2", "smollm", "qwen2", "llama-bpe")

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


class TokenizerError(ValueError):
    """A tokenizer llama.cpp cannot represent (or that distiq cannot describe to it)."""


@dataclass
class Vocab:
    """Everything ``tokenizer.ggml.*`` holds for one language model."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def write(self, writer: Any) -> None:
        """Add the metadata to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)

    def summary(self) -> dict:
        """The manifest's view: model, pre-tokenizer, sizes and special ids."""
        return {
            "model": self.model,
            "pre": self.pre,
            "tokens": len(self.tokens),
            "merges": len(self.merges),
            "special_ids": dict(self.special_ids),
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "chat_template": self.chat_template is not None,
        }


def _word_level_error(kind: str) -> TokenizerError:
    return TokenizerError(
        f"the run's tokenizer is a {kind} tokenizer, which llama.cpp cannot represent: llama.cpp "
        "tokenizes text itself and implements byte-level BPE (gpt2), SentencePiece (llama), "
        "WordPiece (bert) and Unigram (t5), but no word-level vocabulary (a BPE vocabulary "
        "without merges would split every word into characters). Train the model with a "
        "byte-level BPE tokenizer (any recent Hugging Face checkpoint's) to run it in llama.cpp, "
        "or export it with --format onnx / packed, which keep distiq's tokenizer"
    )


def detect_pre_tokenizer(pre_tokenizer: dict | None) -> str | None:
    """The llama.cpp pre-tokenizer name of a tokenizer.json ``pre_tokenizer``, or None."""
    if not pre_tokenizer:
        return None
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    if pre_tokenizer.get("type") != "Sequence":
        steps = [pre_tokenizer]
    kinds = [s.get("type") for s in steps]
    last = steps[-1]
    if kinds[-1] != "ByteLevel" or last.get("add_prefix_space"):
        return None
    if kinds == ["ByteLevel"] and last.get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and steps[0].get("individual_digits")
        and last.get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not last.get("use_regex", True):
        pattern = steps[0].get("pattern", {}).get("Regex")
        return {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}.get(pattern)
    return None


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    out = []
    for merge in merges:
        if isinstance(merge, str):
            out.append(merge)
            continue
        left, right = merge
        if " " in left or " " in right:
            raise TokenizerError(
                f"the BPE merge {merge!r} contains a space, which llama.cpp's 'left right' merge "
                "strings cannot hold"
            )
        out.append(f"{left} {right}")
    return out


def _adds(tokenizer: Any, token_id: int | None, first: bool) -> bool:
    """Whether ``tokenizer(text)`` puts ``token_id`` first (or last) around plain text."""
    if token_id is None:
        return False
    ids = tokenizer("a b", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    if len(ids) <= len(plain):
        return False
    return (ids[0] if first else ids[-1]) == token_id


def build_vocab(tokenizer: Any, n_vocab: int, *, tokenizer_pre: str | None = None) -> Vocab:
    """The GGUF vocabulary of a Hugging Face fast tokenizer.

    Args:
        tokenizer: a ``PreTrainedTokenizerFast`` (the run's).
        n_vocab: rows of the model's token embedding; the token list is padded to it.
        tokenizer_pre: llama.cpp's pre-tokenizer name, when the tokenizer's own is not one
            distiq recognises (see the module docstring).

    Raises:
        TokenizerError: a tokenizer llama.cpp cannot represent (word-level, WordPiece, a
            SentencePiece-style BPE), an unrecognised pre-tokenizer, or more tokens than
            embedding rows.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(
            f"the run's tokenizer ({type(tokenizer).__name__}) is not a Hugging Face fast "
            "tokenizer (tokenizer.json), which distiq reads to write llama.cpp's vocabulary"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "WordLevel":
        raise _word_level_error("word-level (WordLevel)")
    decoder = spec.get("decoder") or {}
    if kind != "BPE" or decoder.get("type") != "ByteLevel":
        raise TokenizerError(
            f"the run's tokenizer is a {kind} model with a {decoder.get('type')} decoder; "
            "distiq writes llama.cpp vocabularies for byte-level BPE tokenizers (BPE model, "
            "ByteLevel decoder) only. SentencePiece-style tokenizers (Llama 2, Gemma) can be "
            "converted with llama.cpp's own convert_hf_to_gguf.py --vocab-only"
        )
    pre = tokenizer_pre or detect_pre_tokenizer(spec.get("pre_tokenizer"))
    if pre is None:
        raise TokenizerError(
            f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} is not one "
            f"distiq recognises ({', '.join(KNOWN_PRE_TOKENIZERS)}); pass tokenizer_pre= with "
            "the llama.cpp name that splits text the same way (llama-vocab.cpp lists them)"
        )

    merges = _merges(model)
    if not merges:
        raise TokenizerError(
            "the run's BPE tokenizer has no merges: llama.cpp refuses a gpt2 vocabulary without "
            "tokenizer.ggml.merges ('cannot find tokenizer merges in model file'), and with "
            "none it would split every word into single bytes"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise TokenizerError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model's token embedding "
            f"has only {n_vocab} rows: the tokenizer does not belong to this model"
        )
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [TOKEN_UNUSED] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id] = text
        if token_id in added:
            types[token_id] = TOKEN_CONTROL if added[token_id].special else TOKEN_USER_DEFINED
        else:
            types[token_id] = TOKEN_NORMAL
    special = {}
    for kind_name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind_name}_token_id", None)
        if token_id is not None:
            special[kind_name] = int(token_id)
    template = getattr(tokenizer, "chat_template", None)
    return Vocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=merges,
        special_ids=special,
        add_bos=_adds(tokenizer, special.get("bos"), first=True),
        add_eos=_adds(tokenizer, special.get("eos"), first=False),
        chat_template=template if isinstance(template, str) else None,
    )
