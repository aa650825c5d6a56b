"""The Ollama-compatible API of a real ``hexin serve`` process, driven by the official
``ollama`` Python client: list, show, chat and generate (streamed and not), JSON format,
and errors in Ollama's shape."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest
from server_util import FRANCE, Server
from tool_specs import WEATHER_TOOL


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    srv = Server(default_gguf, tmp_path_factory.mktemp("ollama")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def model(client):
    (only,) = client.list().models
    return only.model


GREEDY = {"temperature": 0, "num_predict": 16}


def test_list_and_show(client, model, server):
    assert "SmolLM2" in model
    assert model == httpx.get(f"{server.url}/health", timeout=10).json()["model"]
    (listed,) = client.list().models
    assert listed.details.family == "llama" and listed.details.quantization_level == "q4"
    shown = client.show(model)
    assert shown.details.parameter_size == "135M" and "im_start" in shown.template
    assert httpx.get(f"{server.url}/api/version", timeout=10).json()["version"]


def test_chat_streamed_and_not(client, model):
    messages = [{"role": "user", "content": FRANCE}]
    whole = client.chat(model=model, messages=messages, options=GREEDY)
    assert "Paris" in whole.message.content and whole.message.role == "assistant"
    assert whole.done and whole.done_reason in ("stop", "length")
    assert 0 < whole.eval_count <= 16 and whole.prompt_eval_count > 0
    parts = list(client.chat(model=model, messages=messages, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_streamed_and_not(client, model):
    whole = client.generate(model=model, prompt=FRANCE, options=GREEDY)
    assert "Paris" in whole.response
    parts = list(client.generate(model=model, prompt=FRANCE, options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model=model, prompt="Once upon a time", raw=True, options=GREEDY)
    assert raw.response and raw.prompt_eval_count < whole.prompt_eval_count  # no template


def test_num_predict_and_json_format(client, model):
    r = client.chat(
        model=model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        options={"temperature": 0, "num_predict": 3},
    )
    assert r.eval_count == 3 and r.done_reason == "length"
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    r = client.chat(
        model=model,
        messages=[{"role": "user", "content": "Name a city and its country."}],
        format=schema,
        options={"temperature": 0, "num_predict": 80},
    )
    reply = json.loads(r.message.content)
    assert isinstance(reply["city"], str) and isinstance(reply["country"], str)


def test_errors_in_ollamas_shape(client, model, server):
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and "not found" in info.value.error
    r = httpx.post(
        f"{server.url}/api/chat",
        json={"model": model, "messages": [{"role": "user", "content": "hi", "images": ["x"]}]},
        timeout=30,
    )
    assert r.status_code == 400 and "images" in r.json()["error"]
    r = httpx.post(
        f"{server.url}/api/generate",
        json={"model": model, "prompt": "hi", "options": {"temperature": -1}},
        timeout=30,
    )
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    assert "temperature" in r.json()["error"]


def test_tools_and_tool_messages_reach_the_model(client, model):
    """The tools are in the prompt (it grows by their JSON), and a conversation with a
    call and its result is taken back, as the ``ollama`` client sends them."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    plain = client.chat(model=model, messages=ask, options={"temperature": 0, "num_predict": 1})
    told = client.chat(
        model=model,
        messages=ask,
        tools=[WEATHER_TOOL],
        options={"temperature": 0, "num_predict": 1},
    )
    assert told.prompt_eval_count > plain.prompt_eval_count + 30
    history = [
        *ask,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_name": "get_weather", "content": "sunny, 21 C"},
    ]
    r = client.chat(model=model, messages=history, tools=[WEATHER_TOOL], options=GREEDY)
    assert r.done and (r.message.content or r.message.tool_calls)
    parts = list(
        client.chat(
            model=model, messages=history, tools=[WEATHER_TOOL], options=GREEDY, stream=True
        )
    )
    assert "".join(p.message.content for p in parts) == r.message.content


def test_a_reply_with_a_call_gives_ollamas_tool_calls():
    """Text in hexin's call format becomes the message's tool_calls, arguments as an
    object; streamed, the text outside the call goes out as it comes."""
    from types import SimpleNamespace

    from hexin.server.ollama_api import ChatReply

    call = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    text = f"Let me look.\n<tool_call>\n{call}\n</tool_call>"
    done = SimpleNamespace(text=text)
    whole = ChatReply(calling=True).final(done, streamed=False)["message"]
    assert whole["content"] == "Let me look."
    assert whole["tool_calls"] == [
        {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    reply = ChatReply(calling=True)
    pieces = [reply.delta(text[i : i + 4]) for i in range(0, len(text), 4)]
    streamed = "".join(p["message"]["content"] for p in pieces if p is not None)
    last = reply.final(done, streamed=True)["message"]
    assert (streamed + last["content"]).strip() == "Let me look."
    assert last["tool_calls"] == whole["tool_calls"]


@pytest.mark.parametrize(
    ("path", "extra", "name"),
    [
        ("/api/generate", {"suffix": "x"}, "suffix"),
        ("/api/generate", {"template": "{{ .Prompt }}"}, "template"),
        ("/api/chat", {"think": True}, "think"),
    ],
)
def test_fields_hexin_does_not_implement_are_refused_by_name(server, model, path, extra, name):
    body = {"model": model, "stream": False, "options": GREEDY}
    body |= (
        {"prompt": "hi"}
        if path.endswith("generate")
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    r = httpx.post(f"{server.url}{path}", json=body | extra, timeout=30)
    assert r.status_code == 400 and name in r.json()["error"], r.text
