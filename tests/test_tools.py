"""Tool calls out of reply text: whole (``parse``) and as a stream (``CallStream``)."""

from __future__ import annotations

import random

import pytest

from hexin import tools

CALL = '{"name": "get_time", "arguments": {"city": "Oslo", "at": {"h": [1, 2]}}}'
REPLY = (
    f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>\n"
    '<tool_call>{"arguments": {}, "name": "b"}</tool_call> then <tool_call>not json</tool_call>'
    " <tool_c"
)


def streamed(text: str, *, whole: bool = False, seed: int = 0) -> tuple[str, list[dict]]:
    """``text`` fed to a CallStream in random pieces: its content and its calls as a
    client assembles them from the deltas."""
    rng, stream, deltas, i = random.Random(seed), tools.CallStream(whole=whole), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        deltas += stream.feed(text[i : i + n])
        i += n
    deltas += stream.close()
    calls: dict[int, dict] = {}
    for entry in (e for d in deltas for e in d.get("tool_calls", [])):
        call = calls.setdefault(entry["index"], {"id": "", "name": "", "arguments": ""})
        call["id"] += entry.get("id", "")
        call["name"] += entry.get("function", {}).get("name", "")
        call["arguments"] += entry.get("function", {}).get("arguments", "")
    assert stream.calls == len(calls)
    return "".join(d.get("content", "") for d in deltas), [calls[i] for i in sorted(calls)]


def test_tool_call_text_is_parsed_in_auto_mode():
    """A reply in hexin's default format becomes tool calls; other text stays text."""
    content, calls = tools.parse(REPLY)
    assert content == "Let me check.\n\n then <tool_call>not json</tool_call> <tool_c"
    assert [c.name for c in calls] == ["get_time", "b"]
    # the arguments as the model wrote them
    assert calls[0].arguments == '{"city": "Oslo", "at": {"h": [1, 2]}}'
    assert calls[1].arguments == "{}" and calls[0].id != calls[1].id
    assert tools.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])


@pytest.mark.parametrize("seed", range(12))
def test_a_stream_gives_what_parse_gives_in_any_pieces(seed):
    content, calls = streamed(REPLY, seed=seed)
    whole_content, whole_calls = tools.parse(REPLY)
    assert " ".join(content.split()) == " ".join(whole_content.split())
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c.name, c.arguments) for c in whole_calls
    ]
    assert all(c["id"].startswith("call_") for c in calls)


@pytest.mark.parametrize(
    "arguments", ['{"q": "}}"}', '{\n  "a": 1,\n  "b": [ {} ]\n}', "{}", '{"s": "a } b"}']
)
def test_a_held_call_streams_its_arguments_exactly(arguments):
    """A reply held to one call (``whole``): braces inside the arguments, blanks
    between them and the call's own closing brace."""
    text = f'{{"name": "f", "arguments": {arguments} \n}}'
    for seed in range(8):
        content, (call,) = streamed(text, whole=True, seed=seed)
        assert (content, call["name"], call["arguments"]) == ("", "f", arguments)
    (parsed,) = tools.parse(text, whole=True)[1]
    assert parsed.arguments == arguments


def test_a_stream_keeps_what_is_no_call_as_text():
    assert streamed("<tool_call>not json</tool_call>x") == ("<tool_call>not json</tool_call>x", [])
    assert streamed("a < b <tool") == ("a < b <tool", [])
    assert streamed("not a call", whole=True) == ("not a call", [])
    # a call cut off by max_tokens: what was written of it
    content, (call,) = streamed('<tool_call>{"name": "f", "arguments": {"q": 1')
    assert content == "" and (call["name"], call["arguments"]) == ("f", '{"q": 1')
