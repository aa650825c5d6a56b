"""Rebuilding a ``tokenizers.Tokenizer`` from the vocabulary stored in a GGUF file.

A GGUF carries no ``tokenizer.json``, only llama.cpp's description of one: the token strings,
their types (normal, control, user-defined, byte, ...), per-token scores, optionally BPE merges,
and two names -- ``tokenizer.ggml.model`` (the algorithm) and ``tokenizer.ggml.pre`` (how text is
split before BPE). This module turns that back into a Hugging Face ``tokenizers`` pipeline that
tokenizes the way llama.cpp does:

``gpt2`` (byte-level BPE: GPT-2, Llama 3, SmolLM, Qwen2, ...)
    The tokens are already spelled in the byte-level alphabet and the merges are stored, so the
    model is a plain BPE. What the file only names is the pre-tokenizer: each ``pre`` value maps
    to llama.cpp's split regexes, rebuilt here as ``Split`` + ``ByteLevel`` pre-tokenizers. For
    ``smollm`` (and starcoder, refact, ...) llama.cpp first isolates every single digit
    (``\\p{N}``) and then applies the GPT-2 regex. That digit split matters beyond digits: in
    ``"a  1"`` the digit is cut away first, so the two spaces stay one pre-token (``ĠĠ``),
    while the GPT-2 regex alone splits them as ``" "`` + ``" 1"`` (``Ġ``, ``Ġ``, ``1``).
    transformers' GGUF tokenizer does the latter for "smollm"; llama.cpp and SmolLM's own
    ``tokenizer.json`` (Digits + ByteLevel) do the former. Unknown ``pre`` values fall back
    to the GPT-2 regex, with a warning.

``llama`` (SentencePiece BPE: Llama 1/2, Mistral, TinyLlama, ...)
    llama.cpp tokenizes these by repeatedly merging the adjacent pair whose concatenation is the
    highest-scoring vocabulary entry. That is BPE whose merge ranks are the scores of the merge
    *results*, so the merges are derived from the vocabulary: every split of a token into two
    tokens that are both in the vocabulary is a merge, ranked by the token's score (then by id,
    which keeps the order right for files whose scores are all equal). Unknown characters fall
    back to ``<0xNN>`` byte tokens. Spaces become ``▁``, and with
    ``tokenizer.ggml.add_space_prefix`` (the default) a ``▁`` is prepended to every piece of raw
    text -- at the start and after each special token, as llama.cpp does.

In both, tokens typed CONTROL (and UNKNOWN) become special added tokens and USER_DEFINED ones
plain added tokens, so that ``<|im_start|>`` typed in a prompt is one token, never split.
When ``add_bos_token`` is set the tokenizer's post-processor prepends BOS, as a Hugging Face
``tokenizer.json`` does; ``encode(text, add_special_tokens=False)`` skips it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from hexin.errors import ModelFormatError

__all__ = ["VocabInfo", "build_tokenizer", "read_vocab"]

logger = logging.getLogger(__name__)

# llama.cpp's token types (``enum llama_token_type`` / ``gguf.TokenType``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

#: Texts llama.cpp treats as end-of-generation when present as control tokens, even when the
#: file names no ``eot_token_id`` (e.g. Llama 3 files whose EOS is ``<|end_of_text|>`` but
#: whose chat turns end with ``<|eot_id|>``).
END_OF_TURN_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "<|end_of_text|>",
        "<EOT>",
    }
)

# ---- Pre-tokenizer regexes, by ``tokenizer.ggml.pre`` ----------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Pre-types whose vocabularies were trained on single digits, then GPT-2 splitting.
_DIGITS_THEN_GPT2 = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
_LLAMA3_LIKE = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"})
_QWEN2_LIKE = frozenset({"qwen2", "deepseek-r1-qwen", "megrez"})
_GPT2_LIKE = frozenset({"gpt2", "default", "mpt", "olmo", "jais"})
#: llama.cpp takes a whole pre-token from the vocabulary when it is there (tiktoken semantics).
_IGNORE_MERGES = _LLAMA3_LIKE


@dataclass(frozen=True)
class VocabInfo:
    """The tokenizer-related metadata of a GGUF file, decoded and checked."""

    model: str
    pre: str
    tokens: Sequence[str]
    token_types: np.ndarray
    scores: np.ndarray | None
    merges: Sequence[str] | None
    bos_token_id: int | None
    eos_token_id: int | None
    #: EOS first, then end-of-turn / end-of-message ids, deduplicated.
    eos_token_ids: tuple[int, ...]
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool


def _opt_id(meta: Mapping[str, Any], key: str, n_tokens: int, source: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ModelFormatError(f"{source}: metadata {key!r} should be a token id, got {value!r}")
    value = int(value)
    if value < 0 or value >= 2**31 - 1:  # llama.cpp writes -1 / 0xFFFFFFFF for "none"
        return None
    if value >= n_tokens:
        raise ModelFormatError(
            f"{source}: metadata {key!r} = {value} is outside the vocabulary of {n_tokens} tokens"
        )
    return value


def read_vocab(meta: Mapping[str, Any], source: str) -> VocabInfo:
    """Collect and validate the ``tokenizer.*`` metadata. ``source`` names the file in errors."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError(f"{source} has no tokenizer (tokenizer.ggml.model is missing)")
    if model not in ("gpt2", "llama"):
        raise ModelFormatError(
            f"{source}: tokenizer type {model!r} (tokenizer.ggml.model) is not supported; "
            "hexin rebuilds 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) vocabularies"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFormatError(f"{source}: tokenizer.ggml.tokens is missing or not a string list")
    n = len(tokens)

    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.full(n, NORMAL, dtype=np.int32)
    if not isinstance(types, np.ndarray) or types.shape != (n,):
        raise ModelFormatError(f"{source}: tokenizer.ggml.token_type must hold {n} integers")
    scores = meta.get("tokenizer.ggml.scores")
    if scores is not None and (not isinstance(scores, np.ndarray) or scores.shape != (n,)):
        raise ModelFormatError(f"{source}: tokenizer.ggml.scores must hold {n} numbers")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (
        not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)
    ):
        raise ModelFormatError(f"{source}: tokenizer.ggml.merges must be a list of strings")

    bos = _opt_id(meta, "tokenizer.ggml.bos_token_id", n, source)
    eos = _opt_id(meta, "tokenizer.ggml.eos_token_id", n, source)
    eot = _opt_id(meta, "tokenizer.ggml.eot_token_id", n, source)
    eom = _opt_id(meta, "tokenizer.ggml.eom_token_id", n, source)
    unk = _opt_id(meta, "tokenizer.ggml.unknown_token_id", n, source)
    if unk is None and model == "llama" and "<unk>" in tokens:
        unk = tokens.index("<unk>")
    stops = [eos, eot, eom]
    stops += [i for i, t in enumerate(tokens) if t in END_OF_TURN_TEXTS and types[i] == CONTROL]
    eos_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    def flag(key: str, default: bool) -> bool:
        value = meta.get(key, default)
        return bool(value)

    return VocabInfo(
        model=model,
        pre=str(meta.get("tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=types,
        scores=scores,
        merges=merges,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        unk_token_id=unk,
        # llama.cpp's defaults when the file does not say: SentencePiece and Llama 3 style
        # vocabularies start with BOS, other byte-level ones do not.
        add_bos_token=flag(
            "tokenizer.ggml.add_bos_token",
            model == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3_LIKE,
        ),
        add_eos_token=flag("tokenizer.ggml.add_eos_token", False),
        add_space_prefix=flag("tokenizer.ggml.add_space_prefix", model == "llama"),
    )


def _vocab_dict(vocab: VocabInfo) -> dict[str, int]:
    """token -> id. On duplicate strings the first id wins, except that a special/user token
    keeps its own id: added tokens are looked up by text, so theirs must be exact."""
    out: dict[str, int] = {}
    for i, token in enumerate(vocab.tokens):
        if token not in out or vocab.token_types[i] in (CONTROL, USER_DEFINED, UNKNOWN):
            out[token] = i
    return out


def _stored_merges(vocab: VocabInfo, ids: Mapping[str, int], source: str) -> list[tuple[str, str]]:
    assert vocab.merges is not None
    merges = []
    for line in vocab.merges:
        left, sep, right = line.partition(" ")
        if not sep or left not in ids or right not in ids or left + right not in ids:
            raise ModelFormatError(f"{source}: merge {line!r} does not match the vocabulary")
        merges.append((left, right))
    return merges


def _derived_merges(vocab: VocabInfo, ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary with scores (SentencePiece BPE), best first.

    Every normal token that splits into two normal tokens yields one merge per split point,
    ranked by the token's score (higher first), then its id, then the left piece's id.
    """
    n = len(vocab.tokens)
    scores = vocab.scores if vocab.scores is not None else -np.arange(n, dtype=np.float64)
    normal = {t for t, i in ids.items() if vocab.token_types[i] == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for token in normal:
        tid = ids[token]
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-float(scores[tid]), tid, ids[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _added_tokens(vocab: VocabInfo) -> tuple[list[AddedToken], list[AddedToken]]:
    special, user = [], []
    for i, token in enumerate(vocab.tokens):
        kind = vocab.token_types[i]
        if not token:  # an empty string can never be matched in text
            continue
        if kind in (CONTROL, UNKNOWN):
            special.append(AddedToken(token, special=True, normalized=False))
        elif kind == USER_DEFINED:
            user.append(AddedToken(token, special=False, normalized=False))
    return special, user


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3_LIKE else _QWEN2_SPLIT if pre in _QWEN2_LIKE else None
    if split is None:  # "gpt2", "default" and anything unknown: GPT-2's own regex
        if pre not in _GPT2_LIKE:
            logger.warning(
                "tokenizer.ggml.pre %r is not one hexin knows; splitting text with GPT-2's "
                "regex, which may tokenize some text differently from llama.cpp",
                pre,
            )
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_tokenizer(vocab: VocabInfo, source: str) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to llama.cpp's tokenizer for this vocabulary."""
    ids = _vocab_dict(vocab)
    try:
        merges = (
            _stored_merges(vocab, ids, source)
            if vocab.merges is not None
            else _derived_merges(vocab, ids)
        )
        if vocab.model == "gpt2":
            tok = Tokenizer(
                models.BPE(
                    vocab=ids,
                    merges=merges,
                    ignore_merges=vocab.pre in _IGNORE_MERGES,
                )
            )
            tok.pre_tokenizer = _byte_level_pre_tokenizer(vocab.pre)
            tok.decoder = decoders.ByteLevel()
        else:
            unk = vocab.tokens[vocab.unk_token_id] if vocab.unk_token_id is not None else None
            tok = Tokenizer(
                models.BPE(
                    vocab=ids, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True
                )
            )
            space = normalizers.Replace(" ", "▁")
            tok.normalizer = (
                normalizers.Sequence([normalizers.Prepend("▁"), space])
                if vocab.add_space_prefix
                else space
            )
            steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            if vocab.add_space_prefix:
                steps.append(decoders.Strip(" ", 1, 0))
            tok.decoder = decoders.Sequence(steps)
    except ModelFormatError:
        raise
    except Exception as e:  # tokenizers reports inconsistent vocabularies as plain exceptions
        raise ModelFormatError(f"{source}: cannot rebuild the tokenizer: {e}") from None

    special, user = _added_tokens(vocab)
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    _check_added_ids(tok, vocab, ids, source)

    template_single, specials = ["$A"], []
    if vocab.add_bos_token and vocab.bos_token_id is not None:
        bos = vocab.tokens[vocab.bos_token_id]
        template_single.insert(0, bos)
        specials.append((bos, vocab.bos_token_id))
    if vocab.add_eos_token and vocab.eos_token_id is not None:
        eos = vocab.tokens[vocab.eos_token_id]
        template_single.append(eos)
        specials.append((eos, vocab.eos_token_id))
    if specials:
        tok.post_processor = processors.TemplateProcessing(
            single=template_single,  # lists, not strings: a token may contain spaces
            pair=[*template_single, *(t.replace("$A", "$B") for t in template_single)],
            special_tokens=list(dict.fromkeys(specials)),
        )
    return tok


def _check_added_ids(tok: Tokenizer, vocab: VocabInfo, ids: Mapping[str, int], source: str) -> None:
    """Added tokens are registered by text; make sure each landed on its GGUF id rather than
    on a fresh id past the vocabulary (which the model's embedding would not have)."""
    for i, token in enumerate(vocab.tokens):
        if token and vocab.token_types[i] in (CONTROL, UNKNOWN, USER_DEFINED):
            got = tok.token_to_id(token)
            if got != ids[token]:
                raise ModelFormatError(
                    f"{source}: token {token!r} should have id {ids[token]} but the rebuilt "
                    f"tokenizer gives {got}"
                )
