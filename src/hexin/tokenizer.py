"""Text <-> token ids: a ``tokenizers``-backed Tokenizer, chat templates and streaming decode.

The same class serves HF folders (``tokenizer.json``) and GGUF files (a vocabulary rebuilt
into a ``tokenizers.Tokenizer``), so everything above it sees one interface.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hexin.errors import HexinError, ModelFormatError


class ChatTemplateError(HexinError):
    """The model's chat template failed to render the given messages."""


class Tokenizer:
    """Encodes prompts (special tokens written in the text are parsed as special tokens) and
    decodes ids, with the BOS/EOS conventions and chat template of its model."""

    def __init__(
        self,
        inner: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None = None,
    ) -> None:
        self.inner = inner
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.add_bos = add_bos and bos_token_id is not None
        self.chat_template = chat_template
        self._template = None
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)
        added = inner.get_added_tokens_decoder()
        # Skipped by id: the library's own skip misses special tokens stored "normalized"
        # (SentencePiece conversions), which would leak text like "<unk>" into replies.
        self.special_ids = frozenset(i for i, t in added.items() if t.special)
        # Added tokens as written in text. ``id_to_token`` gives a "normalized" one in its
        # normalized form ("▁<|start_story|>" behind a prepend-"▁" normalizer), which,
        # written into a prompt, encodes as "▁" and the token.
        self._added_text = {i: t.content for i, t in added.items()}

    # -- constructors -------------------------------------------------------------------
    @classmethod
    def from_hf_folder(cls, folder: Path, eos_token_ids: Sequence[int] = ()) -> Tokenizer:
        """Load ``tokenizer.json`` plus the conventions in ``tokenizer_config.json``.

        The chat template is ``chat_template.jinja`` when the folder has one (it wins over
        ``tokenizer_config.json``'s, as in transformers). A reply ends at any of
        ``eos_token_ids`` (config.json's), tokenizer_config's ``eos_token``,
        generation_config.json's ``eos_token_id`` and the well-known end-of-turn specials.
        """
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{folder}: no tokenizer.json")
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exceptions
            raise ModelFormatError(f"{path}: cannot be read as a tokenizer ({e})") from None
        cfg: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        bos_id = _token_id(inner, cfg.get("bos_token"))
        eos_ids = list(eos_token_ids)
        eos_id = _token_id(inner, cfg.get("eos_token"))
        if eos_id is not None:
            eos_ids.insert(0, eos_id)
        eos_ids += _generation_eos_ids(folder)
        eos_ids += end_of_turn_ids(inner)
        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:  # Llama 3 style: the tokenizer.json post-processor decides
            probe = inner.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
        template = cfg.get("chat_template")
        jinja_path = folder / "chat_template.jinja"  # where transformers >= 4.47 saves it
        if jinja_path.is_file():
            template = jinja_path.read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return cls(
            inner,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos=add_bos,
            chat_template=template,
        )

    # -- encode / decode ----------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it become their ids.

        BOS is added here, never by the inner post-processor, so it is never doubled.
        """
        ids = self.inner.encode(text, add_special_tokens=False).ids
        wants_bos = self.add_bos if add_bos is None else add_bos
        bos = self.bos_token_id
        if wants_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def encode_chat(self, prompt: str) -> list[int]:
        """Token ids of a rendered chat template (``apply_chat_template``'s text), as
        transformers' ``apply_chat_template(tokenize=True)`` gives them: nothing added, so
        the prompt holds the specials the template writes, a BOS once if it writes one and
        none if it does not."""
        return self.encode(prompt, add_bos=False)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.inner.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.inner.id_to_token(token_id)

    @property
    def bos_token(self) -> str:
        """BOS as a template writes it (``bos_token``): text that encodes as the BOS id."""
        return "" if self.bos_token_id is None else self._text_of(self.bos_token_id)

    @property
    def eos_token(self) -> str:
        return self._text_of(self.eos_token_ids[0]) if self.eos_token_ids else ""

    def _text_of(self, token_id: int) -> str:
        """The token as written in text: an added token's content, else the vocabulary's."""
        return self._added_text.get(token_id) or self.id_to_token(token_id) or ""

    # -- chat ---------------------------------------------------------------------------
    @property
    def template_takes_tools(self) -> bool:
        """Whether the chat template renders a ``tools`` list itself (else see
        ``hexin.tools.render``)."""
        return "tools" in (self.chat_template or "")

    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """Render ``messages`` (and ``tools``, for a template that takes them) with the
        model's own jinja2 template, as transformers does."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; use story mode instead")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise_template_error
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(self.chat_template)
            except TemplateError as e:
                raise ChatTemplateError(f"the model's chat template is invalid: {e}") from None
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=list(tools) if tools else None,
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decoding token by token breaks multi-byte UTF-8 (a character spread over byte-fallback
    tokens) and drops the leading space some decoders strip from a lone token. So each step
    decodes a short window of recent tokens, emits only what it adds beyond the window's
    settled prefix, and holds back output that still ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window whose text has been emitted up to _read
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character, or a token with no visible text yet
        delta = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character
        decodes to U+FFFD rather than vanishing)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        full_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :]


#: Special tokens that end a chat turn in the families hexin runs (Qwen/ChatML, Gemma, Llama 3,
#: Phi-3). A reply stops at any of them that the vocabulary holds as a special token, even
#: when the model's files name only the document-level EOS (``<|endoftext|>``,
#: ``<|end_of_text|>``, ``<eos>``), which a chat turn never emits.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>")


def end_of_turn_ids(inner: tokenizers.Tokenizer) -> list[int]:
    """Ids of the well-known end-of-turn tokens that ``inner`` holds as special tokens."""
    specials = {t.content: i for i, t in inner.get_added_tokens_decoder().items() if t.special}
    return [specials[t] for t in END_OF_TURN_TOKENS if t in specials]


def _generation_eos_ids(folder: Path) -> list[int]:
    """``eos_token_id`` of ``generation_config.json`` (an id or a list of ids), which for
    instruct models lists the end-of-turn tokens that config.json leaves out."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e})") from None
    values = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelFormatError(f"{path}: eos_token_id should be a token id or a list of ids")
    return values


def _token_id(inner: tokenizers.Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):  # older configs store AddedToken dictionaries
        token = token.get("content")
    return inner.token_to_id(token) if isinstance(token, str) else None


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' ``tojson``: plain JSON, not HTML-escaped, with json.dumps' options."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)
