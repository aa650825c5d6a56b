"""Chat templates, stop tokens and GGUF byte-level BPE tokenizers of the model families
(Qwen2/2.5, Qwen3, Llama 3.x, Gemma 2/3, Phi-3, Mistral).

References, each independent of the code under test:

* transformers' ``apply_chat_template`` (its own jinja environment), on the same template and
  the same ``tokenizers`` object, for every template rendered here:

  - the models' real templates (Qwen2.5, Qwen3, Gemma 2, Llama 3.1 / 3.2 / 3.3, Phi-3.5,
    Mistral Nemo), fetched at test time from the llama-cpp-python sdist, which vendors
    llama.cpp's byte copies of them (``real_templates``; the repository keeps no copy). A
    failed fetch fails the test; ``HEXIN_CHAT_TEMPLATES`` naming a folder of ``*.jinja``
    files checks those instead, without a download. Each is rendered in a folder set up as
    the family's files set it up, and the token it writes after an assistant's turn must
    end a reply. Gemma 3's is not among them: llama.cpp keeps none, and the packages found
    that carry one (axolotl, unsloth) carry edited copies, so its own way (the system
    message folded into the first user turn) is not checked against the real file;
  - hexin's own templates, built from the jinja features those files use (whitespace
    control, ``namespace``, ``loop``, slicing, ``raise_exception``, ``strftime_now``,
    ``tojson`` with its options, ``bos_token`` / ``eos_token``);
* ``tokenizers`` pipelines built from the pre-tokenizer regexes transformers itself defines
  for Qwen2 (``tokenization_qwen2.PRETOKENIZE_REGEX``) and Llama 3 (``TikTokenConverter``),
  for the GGUF vocabularies with ``tokenizer.ggml.pre`` = ``qwen2`` / ``llama-bpe``;
* the pipeline transformers' ``GemmaConverter`` builds (no space prefix), for a SentencePiece
  GGUF vocabulary written as llama.cpp writes Gemma's.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import pytest
import real_templates
from jinja2 import TemplateError
from test_gguf import write_tiny_gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from tool_specs import TOOLS

from hexin.errors import ModelFormatError
from hexin.output import Completion, OutputProcessor
from hexin.sampling import SamplingParams
from hexin.tokenizer import ChatTemplateError
from hexin.tokenizer import Tokenizer as HexinTokenizer
from hexin.weights import load_model
from hexin.weights.gguf import load_gguf
from hexin.weights.registry import bundled_path

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

STORY_DIR = bundled_path("story")
#: BOS / EOS as the test folders' tokenizer_config.json names them (Gemma's spelling)
FOLDER_SPECIALS = {"bos_token": "<bos>", "eos_token": "<eos>"}

SYSTEM = {"role": "system", "content": "You are terse.  Answer in one line."}
TWO_TURNS = [
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4 — of course. 日本語 😀"},
    {"role": "user", "content": 'And "3+3"? Say it in JSON, e.g. {"a": 1}.'},
]

#: hexin's own templates in each family's turn format, written with the jinja features the
#: real ones use. They are not the models' files (see the module docstring).
FEATURE_TEMPLATES = {
    "blocks": (  # plain block tags on their own indented lines: trim_blocks, lstrip_blocks
        "{% for message in messages %}\n"
        "    {% if message.role == 'system' %}\n"
        "<<SYS>>{{ message.content }}<</SYS>>\n"
        "    {% else %}\n"
        "[{{ message.role | upper }}] {{ message.content | trim }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    ),
    "chatml": (
        "{%- if messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
        "{%- set messages = messages[1:] %}"
        "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
        "{%- endif %}\n"
        "{%- set ns = namespace(last_user=-1) %}\n"
        "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}"
        "{% endif %}{% endfor %}\n"
        "{%- for m in messages %}\n"
        "    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>' + '\\n' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|im_start|>assistant\\n' }}\n"
        "{%- endif %}\n"
    ),
    "header": (
        "{{- bos_token }}\n"
        "{%- if not date_string is defined %}{% set date_string = strftime_now('%d %b %Y') %}"
        "{% endif %}\n"
        "{%- if messages[0]['role'] == 'system' %}\n"
        "    {%- set system_message = messages[0]['content']|trim %}\n"
        "    {%- set messages = messages[1:] %}\n"
        "{%- else %}\n"
        '    {%- set system_message = "" %}\n'
        "{%- endif %}\n"
        '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
        '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
        "{{- system_message }}{{- '<|eot_id|>' }}\n"
        "{%- for message in messages %}\n"
        "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        "+ message['content'] | trim + '<|eot_id|>' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}\n"
        "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
        "{%- endif %}\n"
    ),
    "turns": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for message in messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "tags": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' and message['content'] %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% if loop.last %}{{ {'n': loop.length, 'z': [1, 2]} | tojson(separators=(',', ':'),"
        " sort_keys=true) }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}

#: special tokens added to the story vocabulary, as the families' vocabularies hold them
FAMILY_SPECIALS = [
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|end|>",
    "<|endoftext|>",
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<s>",
    "</s>",
    "<|assistant|>",
]


@dataclass(frozen=True)
class Family:
    """A family's real chat template (its file name in llama.cpp's models/templates) and how
    its files set up the tokenizer: tokenizer_config.json's BOS / EOS, generation_config.json's
    ``eos_token_id`` (as tokens), and the token the template writes after an assistant's
    reply (None where not known)."""

    template: str
    bos: str | None
    eos: str
    generation_eos: tuple[str, ...]
    turn_end: str | None


_QWEN = {"bos": None, "eos": "<|im_end|>", "generation_eos": ("<|im_end|>", "<|endoftext|>")}
_LLAMA3 = {
    "bos": "<|begin_of_text|>",
    "eos": "<|eot_id|>",
    "generation_eos": ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"),
    "turn_end": "<|eot_id|>",
}
REAL_FAMILIES = {
    "qwen2.5": Family("Qwen-Qwen2.5-7B-Instruct.jinja", **_QWEN, turn_end="<|im_end|>"),
    "qwen3": Family("Qwen-Qwen3-0.6B.jinja", **_QWEN, turn_end="<|im_end|>"),
    "gemma2": Family(
        "google-gemma-2-2b-it.jinja", "<bos>", "<eos>", ("<eos>", "<end_of_turn>"), "<end_of_turn>"
    ),
    "llama3.1": Family("meta-llama-Llama-3.1-8B-Instruct.jinja", **_LLAMA3),
    "llama3.2": Family("meta-llama-Llama-3.2-3B-Instruct.jinja", **_LLAMA3),
    "llama3.3": Family("meta-llama-Llama-3.3-70B-Instruct.jinja", **_LLAMA3),
    "phi3.5": Family(
        "microsoft-Phi-3.5-mini-instruct.jinja",
        "<s>",
        "<|endoftext|>",  # the document end; generation_config.json names <|end|>
        ("<|end|>", "<|assistant|>", "<|endoftext|>"),
        "<|end|>",
    ),
    "mistral-nemo": Family(
        "mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>", ("</s>",), "</s>"
    ),
}


def _real_cases() -> dict[str, Family]:
    """The families above; with ``HEXIN_CHAT_TEMPLATES`` set, each ``*.jinja`` file of that
    folder instead (set up as its family where it is one of theirs, else as the test folders
    are, with no known turn end)."""
    if (folder := real_templates.override()) is None:
        return REAL_FAMILIES
    by_file = {f.template: (name, f) for name, f in REAL_FAMILIES.items()}
    bos, eos = FOLDER_SPECIALS["bos_token"], FOLDER_SPECIALS["eos_token"]
    return dict(
        by_file.get(p.name, (p.stem, Family(p.name, bos, eos, (), None)))
        for p in sorted(folder.glob("*.jinja"))
    )


REAL_CASES = _real_cases()


def family_folder(tmp_path: Path, generation_eos: Any = None) -> Path:
    """The story model's tokenizer with the families' chat specials added, as an HF folder."""
    folder = tmp_path / "family"
    folder.mkdir()
    tok = Tokenizer.from_file(str(STORY_DIR / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in FAMILY_SPECIALS])
    tok.save(str(folder / "tokenizer.json"))
    cfg = json.loads((STORY_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.update(FOLDER_SPECIALS)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if generation_eos is not None:
        gen = {"bos_token_id": 1, "eos_token_id": generation_eos}
        (folder / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return folder


def folder_with_template(tmp_path: Path, template: str, **config: Any) -> Path:
    """``family_folder`` with ``template`` (and ``config``) in its tokenizer_config.json."""
    folder = family_folder(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.update(chat_template=template, **config)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def real_family_folder(tmp_path: Path, family: Family, template: str) -> Path:
    """The family folder with ``template``, set up as ``family``'s files set it up."""
    folder = folder_with_template(tmp_path, template, bos_token=family.bos, eos_token=family.eos)
    inner = Tokenizer.from_file(str(folder / "tokenizer.json"))
    gen = {"eos_token_id": [inner.token_to_id(t) for t in family.generation_eos]}
    (folder / "generation_config.json").write_text(json.dumps(gen), encoding="utf-8")
    return folder


def transformers_render(
    specials: dict[str, str], template: str, messages: list[dict], tools: list | None = None
) -> str:
    """transformers' rendering, with the BOS / EOS strings the model's files name."""
    tok = Tokenizer.from_file(str(STORY_DIR / "tokenizer.json"))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    return ref.apply_chat_template(
        messages, chat_template=template, tools=tools, tokenize=False, add_generation_prompt=True
    )


def assert_renders_like_transformers(
    tok: HexinTokenizer, template: str, specials: dict[str, str], tools: list | None = None
) -> str:
    """The two-turn conversation, with a system message where the template takes one (and
    ``tools``, if given); returns hexin's rendering."""
    assert tok.chat_template == template  # as loaded from the model's files
    messages = [SYSTEM, *TWO_TURNS]
    try:
        expected = transformers_render(specials, template, messages, tools)
    except TemplateError:  # the template refuses a system message: both must refuse it
        with pytest.raises(ChatTemplateError):
            tok.apply_chat_template(messages, tools=tools)
        messages = list(TWO_TURNS)
        expected = transformers_render(specials, template, messages, tools)
    got = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    assert got.encode("utf-8") == expected.encode("utf-8")
    assert "3+3" in got  # the whole conversation is there
    return got


# ============================================================================================
# 1. Stop tokens
# ============================================================================================


@pytest.mark.parametrize("generation_eos", [None, 7, [2, 7]])
def test_end_of_turn_specials_and_generation_config_end_a_reply(
    tmp_path: Path, generation_eos: Any
) -> None:
    folder = family_folder(tmp_path, generation_eos)
    tok = HexinTokenizer.from_hf_folder(folder)
    ids = {t: tok.token_to_id(t) for t in FAMILY_SPECIALS}
    assert tok.eos_token_ids[0] == ids["<eos>"] and tok.eos_token == "<eos>"  # tokenizer_config
    assert tok.bos_token_id == ids["<bos>"]
    turn_ends = {ids[t] for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")}
    assert turn_ends <= set(tok.eos_token_ids)
    # <|endoftext|> ends a reply only where the model's files name it
    assert ids["<|endoftext|>"] not in tok.eos_token_ids
    assert (7 in tok.eos_token_ids) == (generation_eos is not None)
    assert len(set(tok.eos_token_ids)) == len(tok.eos_token_ids)


def test_generation_config_eos_naming_endoftext_makes_it_a_stop(tmp_path: Path) -> None:
    probe = family_folder(tmp_path)
    eot = HexinTokenizer.from_hf_folder(probe).token_to_id("<|endoftext|>")
    shutil.rmtree(probe)
    tok = HexinTokenizer.from_hf_folder(family_folder(tmp_path, [eot]))
    assert eot in tok.eos_token_ids


def test_plain_added_token_spelled_like_a_turn_end_is_not_a_stop(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    tok = Tokenizer.from_file(str(STORY_DIR / "tokenizer.json"))
    tok.add_tokens([AddedToken("<|im_end|>", special=False)])
    tok.save(str(folder / "tokenizer.json"))
    loaded = HexinTokenizer.from_hf_folder(folder)
    assert loaded.token_to_id("<|im_end|>") not in loaded.eos_token_ids


@pytest.mark.parametrize("bad", ['{"eos_token_id": "2"}', '{"eos_token_id": [2, true]}', "{"])
def test_bad_generation_config_is_refused(tmp_path: Path, bad: str) -> None:
    folder = family_folder(tmp_path)
    (folder / "generation_config.json").write_text(bad, encoding="utf-8")
    with pytest.raises(ModelFormatError, match=r"generation_config\.json"):
        HexinTokenizer.from_hf_folder(folder)


@pytest.mark.parametrize("stop", ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"])
def test_the_stop_token_ends_the_reply(tmp_path: Path, stop: str) -> None:
    tok = HexinTokenizer.from_hf_folder(family_folder(tmp_path))
    reply = tok.encode(f"Once upon a time{stop} there was more", add_bos=False)
    out = OutputProcessor(tok, SamplingParams(temperature=0.0), 100, completion := Completion())
    for token in reply:
        out.add(token)
        if out.finished:
            break
    out.finish()
    assert completion.stop_reason == "eos"
    assert completion.text == "Once upon a time"
    assert completion.token_ids == reply[: reply.index(tok.token_to_id(stop))]


def test_gguf_end_of_turn_tokens_are_stops(tmp_path: Path) -> None:
    """A Gemma-style vocabulary: EOS ``<eos>``, turns end with the control ``<end_of_turn>``
    (llama.cpp writes it as ``eot_token_id`` too, but it is found without that key)."""
    from test_gguf import _tiny_byte_level_vocab

    vocab = _tiny_byte_level_vocab()
    vocab["tokens"][:3] = ["<eos>", "<start_of_turn>", "<end_of_turn>"]
    write_tiny_gguf(tmp_path / "g.gguf", vocab=vocab | {"bos": 1, "eos": 0})
    loaded = load_model(tmp_path / "g.gguf")
    assert loaded.tokenizer.eos_token_ids == (0, 2)


# ============================================================================================
# 2. Chat templates against transformers
# ============================================================================================


@pytest.mark.parametrize("name", sorted(FEATURE_TEMPLATES))
def test_template_from_tokenizer_config_renders_like_transformers(
    tmp_path: Path, name: str
) -> None:
    tok = HexinTokenizer.from_hf_folder(folder_with_template(tmp_path, FEATURE_TEMPLATES[name]))
    assert_renders_like_transformers(tok, FEATURE_TEMPLATES[name], FOLDER_SPECIALS)


@pytest.mark.parametrize("name", sorted(FEATURE_TEMPLATES))
def test_template_from_gguf_metadata_renders_like_transformers(tmp_path: Path, name: str) -> None:
    template = FEATURE_TEMPLATES[name]

    def meta(w: gguf.GGUFWriter) -> None:
        w.add_chat_template(template)

    write_tiny_gguf(tmp_path / "t.gguf", more_metadata=meta)
    tok = load_model(tmp_path / "t.gguf").tokenizer
    assert tok.chat_template == template
    # the tiny vocabulary's BOS and EOS are both its token 0
    specials = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    assert_renders_like_transformers(tok, template, specials)


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("name", ["header", "chatml"])
def test_gguf_chat_prompt_is_encoded_as_transformers_encodes_it(
    tmp_path: Path, name: str, add_bos: bool
) -> None:
    """A rendered chat gets no BOS added, as transformers' ``apply_chat_template(tokenize=
    True)``: one where the template writes it (Llama 3's ``{{ bos_token }}``), none where
    it does not (ChatML, as SmolLM2's), whatever ``add_bos_token`` says. The reference is
    transformers' own GGUF tokenizer of the same file."""
    from test_gguf import _tiny_byte_level_vocab

    template = FEATURE_TEMPLATES[name]
    vocab = _tiny_byte_level_vocab()
    bos = len(vocab["tokens"])
    added = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab["tokens"] += added
    vocab["types"] += [3] * len(added)

    def meta(w: gguf.GGUFWriter) -> None:
        w.add_add_bos_token(add_bos)
        w.add_chat_template(template)

    write_tiny_gguf(tmp_path / "t.gguf", vocab=vocab | {"bos": bos, "eos": 2}, more_metadata=meta)
    tok = load_model(tmp_path / "t.gguf").tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    messages = [SYSTEM, *TWO_TURNS]
    expected = reference.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=True
    )
    ids = tok.encode_chat(tok.apply_chat_template(messages))
    assert ids == expected
    assert ids.count(bos) == (1 if "bos_token" in template else 0)
    assert ids[0] == bos or "bos_token" not in template


def test_folder_saved_by_transformers_keeps_its_template_and_stops(tmp_path: Path) -> None:
    """transformers' ``save_pretrained`` writes the template to chat_template.jinja (not
    tokenizer_config.json); hexin reads it there and renders what transformers, loading the
    same folder, renders."""
    inner = Tokenizer.from_file(str(family_folder(tmp_path) / "tokenizer.json"))
    saved = transformers.PreTrainedTokenizerFast(
        tokenizer_object=inner, chat_template=FEATURE_TEMPLATES["header"], **FOLDER_SPECIALS
    )
    folder = tmp_path / "saved"
    saved.save_pretrained(folder)
    tok = HexinTokenizer.from_hf_folder(folder)
    assert tok.chat_template == FEATURE_TEMPLATES["header"]
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    messages = [SYSTEM, *TWO_TURNS]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.token_to_id("<|eot_id|>") in tok.eos_token_ids


@pytest.fixture(scope="session")
def real_template_dir() -> Path:
    """The families' real templates: fetched once (see ``real_templates``), or the folder
    ``HEXIN_CHAT_TEMPLATES`` names."""
    return real_templates.template_folder(f.template for f in REAL_FAMILIES.values())


@pytest.mark.parametrize("name", list(REAL_CASES))
def test_real_template_renders_like_transformers(
    tmp_path: Path, real_template_dir: Path, name: str
) -> None:
    """Rendered byte-identical to transformers (with the tools too, where the template takes
    them), and the token that ends an assistant's turn in it stops a reply."""
    family = REAL_CASES[name]
    template = (real_template_dir / family.template).read_text(encoding="utf-8")
    tok = HexinTokenizer.from_hf_folder(real_family_folder(tmp_path, family, template))
    specials = {"bos_token": family.bos, "eos_token": family.eos}
    specials = {k: v for k, v in specials.items() if v is not None}
    got = assert_renders_like_transformers(tok, template, specials)
    if "tools" in template:
        with_tools = assert_renders_like_transformers(tok, template, specials, TOOLS)
        assert "get_weather" in with_tools and "get_weather" not in got
    if family.turn_end is not None:
        reply = TWO_TURNS[1]["content"]
        assert got.split(reply, 1)[1].startswith(family.turn_end)
        stop = tok.token_to_id(family.turn_end)
        assert stop in tok.eos_token_ids
        assert stop in tok.encode(got)  # written in the prompt, it is that one special token


# ============================================================================================
# 3. GGUF byte-level BPE with the Qwen2 and Llama 3 pre-tokenizers
# ============================================================================================


def _reference_split(pre: str) -> str:
    """The split regex transformers uses for the family."""
    if pre == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        return PRETOKENIZE_REGEX
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return inspect.signature(TikTokenConverter.__init__).parameters["pattern"].default


BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog. I'm sure it's fine, isn't it? We'll see.",
    "In 2024 there were 366 days; 3.14159 and 1234567890 are numbers.",
    "def main():\n    print('hello world')\n    return 0\n\n\nif __name__ == '__main__':\n",
    "你好世界，今天天气很好。日本語のテキストです。한국어 텍스트",
    "emoji 😀🎉👍🏽 and café naïve Grüße — русский текст",
    "   many    spaces\t\ttabs\n\nnewlines\r\nwindows lines   ",
]
BPE_TEXTS = [
    *BPE_CORPUS,
    "DON'T YOU'LL WE'VE they'd I'M",
    "12345 678 9 00001",
    "x  1  22   333",
    "\n\n\n  \n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "unseen words: zxqv jklm 🦄",
    "",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def family_bpe(pre: str) -> Tokenizer:
    """A small byte-level BPE trained on ``BPE_CORPUS`` with the family's pre-tokenizer,
    the way the family's tokenizer.json is laid out."""
    tok = Tokenizer(models.BPE(ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_reference_split(pre)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(BPE_CORPUS * 3, trainer=trainer)
    return tok


@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe"])
def test_gguf_byte_level_bpe_matches_the_family_tokenizer(tmp_path: Path, pre: str) -> None:
    reference = family_bpe(pre)
    spec = json.loads(reference.to_str())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    gguf_vocab = {
        "tokens": tokens,
        "types": [3 if t in SPECIALS else 1 for t in tokens],
        "merges": merges,
        "bos": 0,
        "eos": tokens.index("<|im_end|>"),
    }

    def meta(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_pre(pre)
        w.add_add_bos_token(False)

    write_tiny_gguf(tmp_path / "bpe.gguf", vocab=gguf_vocab, more_metadata=meta)
    m = load_gguf(tmp_path / "bpe.gguf")
    for text in BPE_TEXTS:
        ours = m.tokenizer.encode(text)
        theirs = reference.encode(text)
        assert ours.ids == theirs.ids, (text, ours.tokens, theirs.tokens)
        assert m.tokenizer.decode(ours.ids, skip_special_tokens=False) == text
    enc = m.tokenizer.encode("<|im_start|>user")
    assert enc.tokens[0] == "<|im_start|>"  # chat markup is one special token
    assert tokens.index("<|im_end|>") in m.config.eos_token_ids


def test_qwen2_and_llama3_pre_tokenizers_split_digits_their_own_way(tmp_path: Path) -> None:
    """Qwen2 splits numbers into single digits, Llama 3 into groups of up to three."""
    got = {}
    for pre in ("qwen2", "llama-bpe"):
        reference = family_bpe(pre)
        spec = json.loads(reference.to_str())
        tokens = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

        def meta(w: gguf.GGUFWriter, pre: str = pre) -> None:
            w.add_tokenizer_pre(pre)

        vocab = {"tokens": tokens, "types": [3 if t in SPECIALS else 1 for t in tokens]}
        path = tmp_path / f"{pre}.gguf"
        write_tiny_gguf(path, vocab=vocab | {"merges": merges}, more_metadata=meta)
        inner = load_gguf(path).tokenizer
        got[pre] = [p for p, _ in inner.pre_tokenizer.pre_tokenize_str("x 12345")]
    assert got["qwen2"] == ["x", "Ġ", "1", "2", "3", "4", "5"]
    assert got["llama-bpe"] == ["x", "Ġ", "123", "45"]


# ============================================================================================
# 4. GGUF SentencePiece vocabulary laid out as Gemma's (no space prefix)
# ============================================================================================


def test_gguf_sentencepiece_without_space_prefix_matches_gemma_layout(tmp_path: Path) -> None:
    """llama.cpp writes Gemma's vocabulary as ``llama`` with ``add_space_prefix`` false; the
    reference is the story vocabulary in the pipeline transformers' GemmaConverter builds:
    spaces to "▁" with no prefix, a split that keeps each "▁" with the text before it, byte
    fallback, and a decoder that strips nothing."""
    from test_gguf import SPM_TEXTS, story_vocab
    from tokenizers import normalizers

    gguf_vocab, spec = story_vocab("spm", with_bytes=True)
    model = spec["model"]
    reference = Tokenizer(
        models.BPE(
            vocab=model["vocab"],
            merges=[
                tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]
            ],
            unk_token="<unk>",
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    reference.normalizer = normalizers.Replace(" ", "▁")
    reference.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    reference.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )

    def meta(w: gguf.GGUFWriter) -> None:
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)
        w.add_add_space_prefix(False)

    write_tiny_gguf(
        tmp_path / "gemma.gguf", vocab=gguf_vocab, tokenizer_model="llama", more_metadata=meta
    )
    tok = load_gguf(tmp_path / "gemma.gguf").tokenizer
    for text in [*SPM_TEXTS, "漢字とカタカナ 🎉🎉", "  two leading spaces", "trailing  "]:
        ours = tok.encode(text, add_special_tokens=False)
        assert ours.ids == reference.encode(text).ids, (text, ours.tokens)
        assert tok.decode(ours.ids) == text
