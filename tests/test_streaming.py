"""Streaming text: StopMatcher, StreamDecoder and TextStream end to end on the story model."""

from __future__ import annotations

import json
import threading

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from hexin.generate import TextStream
from hexin.model import Llama
from hexin.output import ContextOverflow, StopMatcher
from hexin.sampling import SamplingParams
from hexin.tokenizer import Tokenizer

MULTIBYTE = "café 😀 日本語 naïve"


# -- StopMatcher ---------------------------------------------------------------------------------


def _feed_all(matcher, deltas):
    """Feed deltas until a stop hits; return (emitted pieces, hit, deltas consumed)."""
    emitted = []
    for n, delta in enumerate(deltas, start=1):
        out, hit = matcher.feed(delta)
        emitted.append(out)
        if hit:
            return emitted, True, n
    return emitted, False, len(deltas)


def test_stop_string_split_across_many_deltas_is_never_emitted():
    stop = "\n\nUser:"
    text = "The answer is 42." + stop + " more text"
    emitted, hit, consumed = _feed_all(StopMatcher([stop]), list(text))  # one char per delta
    assert hit
    assert consumed == len("The answer is 42." + stop)  # hit on the stop's last character
    assert "".join(emitted) == "The answer is 42."
    for piece in emitted:
        assert "\n" not in piece and "User" not in piece


def test_stop_split_in_uneven_chunks_emits_the_text_before_it():
    emitted, hit, _ = _feed_all(StopMatcher(["STOP"]), ["Hello S", "T", "", "O", "P world"])
    assert hit
    assert "".join(emitted) == "Hello "
    assert emitted[0] == "Hello "  # the safe part is not held back


def test_text_before_a_stop_in_the_same_delta_is_emitted():
    out, hit = StopMatcher(["<end>"]).feed("all done<end>ignored")
    assert (out, hit) == ("all done", True)


def test_partial_match_that_is_not_a_stop_is_emitted_eventually():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)  # could still become "STOP": held back
    assert m.feed("O") == ("", False)
    assert m.feed("RY") == ("STORY", False)  # no longer a prefix of the stop: released
    assert m.feed("time S") == ("time ", False)
    assert m.flush() == "S"  # a held tail at the end of the stream is not lost
    assert m.flush() == ""


def test_held_tail_is_only_as_long_as_a_real_stop_prefix():
    m = StopMatcher(["abcab"])
    assert m.feed("xxab") == ("xx", False)
    assert m.feed("cab") == ("", True)
    m = StopMatcher(["abcab"])
    assert m.feed("abcaXab") == ("abcaX", False)
    assert m.flush() == "ab"


def test_multiple_stop_strings_stop_at_the_earliest():
    emitted, hit, _ = _feed_all(StopMatcher(["\n\n", "END"]), ["foo E", "N", "D bar\n\n"])
    assert hit and "".join(emitted) == "foo "
    out, hit = StopMatcher(["END", "\n\n"]).feed("a\n\nb END")
    assert (out, hit) == ("a", True)
    # one stop inside another's prefix: the one that completes first wins
    emitted, hit, _ = _feed_all(StopMatcher(["abcd", "bc"]), ["xa", "b", "c", "d"])
    assert hit and "".join(emitted) == "xa"


def test_multiple_stop_strings_hold_back_the_longest_possible_prefix():
    m = StopMatcher(["ab", "xyz"])
    assert m.feed("1xy") == ("1", False)
    assert m.feed("a") == ("xy", False)  # "xya": "a" could still start "ab"
    assert m.feed("c") == ("ac", False)


def test_no_stop_strings_pass_everything_through():
    for stops in ([], [""]):
        m = StopMatcher(stops)
        assert m.feed("abc") == ("abc", False)
        assert m.feed("") == ("", False)
        assert m.flush() == ""


# -- StreamDecoder -------------------------------------------------------------------------------


def _sentencepiece_byte_fallback_tokenizer():
    """A Llama-2-style tokenizer: ▁ for spaces, bytes <0x00>..<0xFF> for characters not in
    the vocabulary, and a Strip decoder that drops the first leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "ca", "▁n"]:
        vocab.setdefault(piece, len(vocab))
    model = models.BPE(vocab, [("c", "a"), ("▁", "n")], unk_token="<unk>", byte_fallback=True)
    inner = tokenizers.Tokenizer(model)
    inner.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    inner.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    inner.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(inner, bos_token_id=1, eos_token_ids=[2], add_bos=True)


def _byte_level_tokenizer():
    """A GPT-2 / Llama-3-style byte-level BPE: every byte is a printable stand-in char."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bos, eos = len(vocab), len(vocab) + 1
    vocab |= {"<|begin|>": bos, "<|end|>": eos}
    inner = tokenizers.Tokenizer(models.BPE(vocab, []))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.add_special_tokens(["<|begin|>", "<|end|>"])
    return Tokenizer(inner, bos_token_id=bos, eos_token_ids=[eos], add_bos=True)


@pytest.fixture(
    params=[_sentencepiece_byte_fallback_tokenizer, _byte_level_tokenizer],
    ids=["sentencepiece-byte-fallback", "byte-level"],
)
def byte_tokenizer(request):
    return request.param()


def _stream(tokenizer, ids):
    decoder = tokenizer.stream_decoder()
    deltas = [decoder.push(i) for i in ids]
    return deltas, decoder.flush()


def test_stream_decoder_reassembles_multibyte_characters_split_over_byte_tokens(byte_tokenizer):
    ids = byte_tokenizer.encode(MULTIBYTE)
    assert len(ids) > len(MULTIBYTE) + 1, "the characters must really be split into bytes"
    deltas, tail = _stream(byte_tokenizer, ids)
    assert "".join(deltas) + tail == byte_tokenizer.decode(ids) == MULTIBYTE
    assert tail == ""
    for delta in deltas:
        assert "\ufffd" not in delta
    # each character is emitted as soon as its last byte arrives, never revised
    assert "😀" in deltas and "日" in deltas and "é" in deltas
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert MULTIBYTE.startswith(emitted)


def test_stream_decoder_flush_returns_an_incomplete_character_as_replacement(byte_tokenizer):
    ids = byte_tokenizer.encode("ab日")
    cut = ids[:-1]  # drop the last of 日's three bytes
    deltas, tail = _stream(byte_tokenizer, cut)
    assert "".join(deltas) == "ab"
    assert tail.endswith("\ufffd") and "".join(deltas) + tail == byte_tokenizer.decode(cut)


def test_stream_decoder_on_the_story_tokenizer(story_dir):
    tok = Tokenizer.from_hf_folder(story_dir)
    # The story vocabulary has no <0xNN> byte tokens, so characters outside it (é, 😀, 日本語)
    # encode as <unk>; streaming must still agree with a full decode.
    ids = tok.encode(MULTIBYTE)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)
    assert all("\ufffd" not in d for d in [*deltas, tail])

    reference = json.loads((story_dir / "REFERENCE.json").read_text(encoding="utf-8"))
    for case in reference["cases"]:
        ids = case["greedy_ids"]
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids) == case["greedy_text"]


# -- TextStream on the story model ---------------------------------------------------------------

PROMPT = "Once upon a time"
GREEDY = {"temperature": 0.0, "top_k": None, "top_p": 1.0}


@pytest.fixture(scope="module")
def story(story_model):
    return Llama(story_model.config, story_model.weights), story_model.tokenizer


@pytest.fixture(scope="module")
def greedy_20(story):
    model, tok = story
    stream = TextStream(model, tok, tok.encode(PROMPT), SamplingParams(**GREEDY, max_tokens=20))
    deltas = list(stream)
    return deltas, stream.completion


def test_greedy_generation_stops_at_max_tokens_with_reason_length(greedy_20, story, story_dir):
    deltas, c = greedy_20
    assert c.stop_reason == "length"
    assert c.completion_tokens == len(c.token_ids) == 20
    assert c.prompt_tokens == len(story[1].encode(PROMPT))
    assert "".join(deltas) == c.text
    assert c.text == story[1].decode(c.token_ids)
    reference = json.loads((story_dir / "REFERENCE.json").read_text(encoding="utf-8"))
    case = next(case for case in reference["cases"] if case["prompt"] == PROMPT)
    assert c.token_ids == case["greedy_ids"][:20]


def _run(story, params, prompt=PROMPT, **kwargs):
    model, tok = story
    stream = TextStream(model, tok, tok.encode(prompt), params, **kwargs)
    deltas = list(stream)
    assert "".join(deltas) == stream.completion.text
    return deltas, stream.completion


def test_stop_string_from_the_middle_of_the_greedy_text_stops_there(greedy_20, story):
    text = greedy_20[1].text
    stop = text[len(text) // 2 : len(text) // 2 + 6]
    before = text[: text.index(stop)]
    assert before, "the stop must not be at the start"
    _, c = _run(story, SamplingParams(**GREEDY, max_tokens=20, stop=[stop]))
    assert c.stop_reason == "stop"
    assert c.text == before
    assert c.completion_tokens < 20


def test_stop_string_straddling_a_token_boundary_is_never_half_emitted(greedy_20, story):
    _, tok = story
    ids, text = greedy_20[1].token_ids, greedy_20[1].text
    boundary = len(tok.decode(ids[:10]))  # text end after token 10
    assert text.startswith(tok.decode(ids[:10]))
    stop = text[boundary - 3 : boundary + 3]
    assert text.index(stop) == boundary - 3  # its first occurrence straddles the boundary
    deltas, c = _run(story, SamplingParams(**GREEDY, max_tokens=20, stop=[stop, "never seen"]))
    assert c.stop_reason == "stop"
    assert c.text == text[: boundary - 3]
    assert c.completion_tokens == 11  # the token completing the stop was generated
    assert stop not in "".join(deltas)


def test_cancel_after_the_first_delta_keeps_the_partial_text(greedy_20, story):
    model, tok = story
    cancel = threading.Event()
    stream = TextStream(
        model, tok, tok.encode(PROMPT), SamplingParams(**GREEDY, max_tokens=20), cancel=cancel
    )
    deltas = []
    for delta in stream:
        deltas.append(delta)
        cancel.set()
    c = stream.completion
    assert c.stop_reason == "cancelled"
    assert deltas and c.text == "".join(deltas)
    assert 1 <= c.completion_tokens < 20
    assert greedy_20[1].text.startswith(c.text)
    assert c.token_ids == greedy_20[1].token_ids[: c.completion_tokens]


def test_prompt_longer_than_the_cache_raises_context_overflow(story):
    model, tok = story
    prompt = tok.encode("Once upon a time there was a little girl named Lily who loved to play")
    assert len(prompt) > 8
    with pytest.raises(ContextOverflow):
        TextStream(model, tok, prompt, SamplingParams(**GREEDY), context_limit=8).run()
    # a prompt exactly filling the cache leaves no room for a single new token either
    with pytest.raises(ContextOverflow):
        TextStream(model, tok, prompt[:8], SamplingParams(**GREEDY), context_limit=8)


def test_generation_is_cut_at_the_cache_limit_with_reason_length(story):
    model, tok = story
    prompt = tok.encode(PROMPT)
    params = SamplingParams(**GREEDY, max_tokens=50)
    c = TextStream(model, tok, prompt, params, context_limit=len(prompt) + 3).run()
    assert c.stop_reason == "length"
    assert c.completion_tokens == 3


def test_same_seed_sampling_gives_the_same_text(story):
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_tokens=40, seed=1234)
    _, first = _run(story, params)
    _, second = _run(story, params)
    assert first.text and first.text == second.text
    assert first.token_ids == second.token_ids
