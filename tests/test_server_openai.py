"""The OpenAI-compatible API of a real ``hexin serve`` process, driven by the official
``openai`` Python package: chat and text completions, streaming, usage, prefix caching,
sampling options, and errors in OpenAI's shape."""

from __future__ import annotations

import secrets

import httpx
import openai
import pytest
from server_util import FRANCE, Server, sse_events

#: ``--max-tokens-default`` here: a chat completion naming no max_tokens stops there
DEFAULT_CAP = 24


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    extra = ("--max-tokens-default", str(DEFAULT_CAP))
    srv = Server(default_gguf, tmp_path_factory.mktemp("openai"), extra=extra).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with server.openai() as c:
        yield c


def chatml(system: str, user: str) -> str:
    """SmolLM2's chat template, rendered by hand (checked against the server's counts)."""
    return (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def tokenize(server: Server, text: str) -> list[int]:
    r = httpx.post(f"{server.url}/tokenize", json={"content": text}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_health_went_through_loading(server):
    codes = [code for code, _ in server.health_seen]
    assert codes[-1] == 200 and set(codes) <= {200, 503}


def test_models(client, server):
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert len(ids) == 1 and "SmolLM2" in ids[0]
    assert models.data[0].owned_by == "hexin"
    assert ids[0] == httpx.get(f"{server.url}/health", timeout=10).json()["model"]


def test_chat_completion(client):
    r = client.chat.completions.create(
        model="anything",
        messages=[{"role": "user", "content": FRANCE}],
        temperature=0,
        max_tokens=16,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert "SmolLM2" in r.model
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 0 and 0 < u.completion_tokens <= 16
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens % 16 == 0


def test_chat_stream_matches_non_stream(client):
    kw = dict(messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=16)
    whole = client.chat.completions.create(model="m", **kw)
    stream = client.chat.completions.create(
        model="m", stream=True, stream_options={"include_usage": True}, **kw
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert "Paris" in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and not any(finishes[:-1])
    # include_usage: the last chunk carries the usage and no choices
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_without_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": FRANCE}],
            temperature=0,
            max_tokens=4,
            stream=True,
        )
    )
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_stream_raw_sse_ends_with_done(server):
    with server.http() as http:
        events = sse_events(
            http,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": FRANCE}], "temperature": 0, "max_tokens": 4},
        )
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_completions(client):
    prompt = "The capital of France is"
    whole = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=8)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    (choice,) = whole.choices
    assert "Paris" in choice.text
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 0 and 0 < whole.usage.completion_tokens <= 8
    chunks = list(
        client.completions.create(
            model="m",
            prompt=prompt,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_completions_default_max_tokens_is_16(client):
    r = client.completions.create(model="m", prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 16


def test_chat_without_max_tokens_stops_at_the_default_cap(client):
    msgs = [{"role": "user", "content": "Write a long story about a dragon and a knight."}]
    r = client.chat.completions.create(model="m", messages=msgs, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == DEFAULT_CAP
    # streamed, the same cap
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=msgs,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == DEFAULT_CAP
    # a max_tokens given is not capped by it
    r = client.chat.completions.create(
        model="m", messages=msgs, temperature=0, max_tokens=DEFAULT_CAP + 8
    )
    assert r.usage.completion_tokens == DEFAULT_CAP + 8


def test_max_tokens_default_flag():
    from hexin.cli import build_parser
    from hexin.options import MAX_TOKENS_DEFAULT
    from hexin.server.state import ServerConfig

    args = build_parser().parse_args(["serve"])
    assert args.max_tokens_default == ServerConfig().max_tokens_default == MAX_TOKENS_DEFAULT
    assert MAX_TOKENS_DEFAULT == 2048
    args = build_parser().parse_args(["serve", "--max-tokens-default", "64"])
    assert args.max_tokens_default == 64
    for bad in ("0", "-3", "lots"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--max-tokens-default", bad])


def test_shared_prefix_is_cached(client, server):
    # a fresh, ~150-token system prompt: nothing before this test shares its blocks
    nonce = secrets.token_hex(4)
    system = f"Session {nonce}. " + " ".join(
        f"Rule {i}: answer briefly, politely and truthfully." for i in range(1, 16)
    )
    users = [FRANCE, "What is the capital of Spain?"]
    ids = [tokenize(server, chatml(system, u)) for u in users]
    shared = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
    assert shared >= 100, "the test needs a long shared prefix"

    usages = []
    for u in users:
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": u}],
            temperature=0,
            max_tokens=8,
        )
        usages.append(r.usage)
    # the server renders exactly the template above
    assert [u.prompt_tokens for u in usages] == [len(i) for i in ids]
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    cached = usages[1].prompt_tokens_details.cached_tokens
    assert cached % 16 == 0
    assert shared // 16 * 16 <= cached <= shared
    assert cached >= 64

    # the same again, streamed: the usage chunk reports the cache too
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": users[1]}],
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= cached


def test_max_tokens_gives_length(client):
    for create in (
        lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=3
        ),
        lambda: client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_completion_tokens=3,
        ),
    ):
        r = create()
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 3


def test_stop_strings(client):
    msgs = [{"role": "user", "content": FRANCE}]
    full = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=16)
    text = full.choices[0].message.content
    assert "Paris" in text
    r = client.chat.completions.create(
        model="m", messages=msgs, temperature=0, max_tokens=16, stop=["Paris", "zzz"]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index("Paris")]
    # streamed: the stop string is never sent
    chunks = list(
        client.chat.completions.create(
            model="m", messages=msgs, temperature=0, max_tokens=16, stop="Paris", stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[: text.index("Paris")]
    # and on the completions endpoint
    c = client.completions.create(
        model="m", prompt="One, two, three, four,", temperature=0, max_tokens=16, stop=[" six"]
    )
    assert "six" not in c.choices[0].text


def test_seed_reproducible(client):
    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Write a short poem about the sea."}],
            temperature=1.0,
            top_p=1.0,
            max_tokens=12,
            seed=seed,
        )
        return r.choices[0].message.content

    a, b = sample(1234), sample(1234)
    assert a == b
    others = {sample(s) for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same sample"


def test_top_k_via_extra_body(client):
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    greedy = client.chat.completions.create(model="m", messages=msgs, temperature=0, max_tokens=10)
    for seed in (1, 2):
        r = client.chat.completions.create(
            model="m",
            messages=msgs,
            temperature=1.5,
            max_tokens=10,
            seed=seed,
            extra_body={"top_k": 1},
        )
        assert r.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 2}, "n"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        # a stop that is no string nor list of strings is refused, never coerced
        ({"extra_body": {"stop": {"a": 1}}}, "stop"),
        ({"extra_body": {"stop": [1, "a"]}}, "stop"),
        ({"extra_body": {"stop": 7}}, "stop"),
        # JSON types only: "1" is no number, 1 no boolean
        ({"extra_body": {"temperature": "1"}}, "temperature"),
        ({"extra_body": {"stream": 1}}, "stream"),
        ({"extra_body": {"top_k": -1}}, "top_k"),
    ],
)
def test_chat_errors_in_openai_shape(client, changes, param):
    kw = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**(kw | changes))
    e = info.value
    assert e.status_code == 400
    assert isinstance(e.body, dict) and set(e.body) == {"message", "type", "param", "code"}
    assert e.body["type"] == "invalid_request_error"
    assert e.param == e.body["param"] == param
    assert param.split(".")[0] in e.body["message"]


def test_completion_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt=["a", "b"], max_tokens=2)
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="a", temperature=-1)
    assert info.value.body["param"] == "temperature"


def test_prompt_over_context_is_an_error(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="hello " * 9000, max_tokens=2)
    assert info.value.status_code == 400
    assert "context" in info.value.body["message"] or "token" in info.value.body["message"]


def test_unknown_route_is_404_in_error_shape(client, server):
    """An endpoint hexin does not implement (embeddings, audio, ...) is "not found", as
    OpenAI answers, whatever the method; not 405 from the web UI's static files."""
    for method, path in (("POST", "/v1/embeddings"), ("GET", "/v1/files"), ("POST", "/v1/x")):
        r = httpx.request(method, f"{server.url}{path}", json={}, timeout=10)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as info:
        client.embeddings.create(model="m", input="hi")
    assert info.value.status_code == 404
