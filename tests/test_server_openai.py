"""The OpenAI-compatible API of a real ``hexin serve`` process, driven by the official
``openai`` Python package: chat and text completions, streaming, usage, prefix caching,
sampling options, and errors in OpenAI's shape."""

from __future__ import annotations

import json
import secrets

import httpx
import openai
import pytest
from server_util import FRANCE, Server, sse_events
from tool_specs import TOOLS

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
            model="m",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=3,
            seed=1,  # a sampled end of sequence in 3 tokens is rare, not impossible
        ),
        lambda: client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_completion_tokens=3,
            seed=1,
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
        ({"n": 17}, "n"),
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
        client.completions.create(model="m", prompt=[], max_tokens=2)
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


# -- what real clients send: logprobs, echo, bias, penalties, inputs -----------------------

SKY = "The sky is blue because"


def test_top_logprob_is_the_greedy_token(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": FRANCE}],
        temperature=0,
        max_tokens=8,
        logprobs=True,
        top_logprobs=5,
    )
    (choice,) = r.choices
    content = choice.logprobs.content
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert len(e.top_logprobs) == 5
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob
        assert [t.logprob for t in e.top_logprobs] == sorted(
            (t.logprob for t in e.top_logprobs), reverse=True
        )
        assert e.logprob <= 0 and bytes(e.bytes).decode() == e.token


def test_streamed_logprobs_match_the_whole_reply(client):
    kw = dict(messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=8)
    whole = client.chat.completions.create(model="m", logprobs=True, top_logprobs=2, **kw)
    streamed = []
    for chunk in client.chat.completions.create(
        model="m", logprobs=True, top_logprobs=2, stream=True, **kw
    ):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [
        (e.token, e.logprob) for e in whole.choices[0].logprobs.content
    ]


def test_echo_scores_the_prompt(client, server):
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0."""
    r = client.completions.create(model="m", prompt=SKY, max_tokens=0, echo=True, logprobs=1)
    (choice,) = r.choices
    lp = choice.logprobs
    assert choice.text == SKY and "".join(lp.tokens) == SKY
    assert len(lp.tokens) == len(tokenize(server, SKY)) == r.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:]) and r.usage.completion_tokens == 0
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    # the same scores with a reply after them, and a cached prefix does not skip them
    again = client.completions.create(model="m", prompt=SKY, max_tokens=3, echo=True, logprobs=1)
    assert again.choices[0].logprobs.token_logprobs[: len(lp.tokens)] == lp.token_logprobs
    assert again.choices[0].text.startswith(SKY) and len(again.choices[0].text) > len(SKY)


def test_token_id_and_list_prompts(client, server):
    ids = tokenize(server, SKY)
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0)
    by_text = client.completions.create(model="m", prompt=SKY, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    both = client.completions.create(
        model="m", prompt=[SKY, "Once upon a time"], max_tokens=4, temperature=0
    )
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == by_text.choices[0].text
    assert both.usage.prompt_tokens == len(ids) + len(tokenize(server, "Once upon a time"))


def test_logit_bias_excludes_a_greedy_token(client, server):
    kw = dict(
        messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=12, logprobs=True
    )

    def tokens(r) -> list[str]:
        return [e.token for e in r.choices[0].logprobs.content]

    plain = tokens(client.chat.completions.create(model="m", **kw))
    assert " Paris" in plain
    (paris,) = tokenize(server, " Paris")[-1:]
    biased = tokens(client.chat.completions.create(model="m", logit_bias={str(paris): -100}, **kw))
    assert " Paris" not in biased and biased != plain


def test_penalties_change_a_repetitive_reply(client):
    kw = dict(
        messages=[{"role": "user", "content": "Write the word cat ten times."}],
        temperature=0,
        max_tokens=30,
    )
    plain = client.chat.completions.create(model="m", **kw).choices[0].message.content
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        other = client.chat.completions.create(model="m", **kw, **extra)
        assert other.choices[0].message.content != plain, extra
    for extra in ({"repetition_penalty": 1.5}, {"min_p": 0.5}):
        r = client.chat.completions.create(model="m", extra_body=extra, **kw)
        assert r.choices[0].message.content, extra


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"extra_body": {"functions": []}}, "functions"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_unsupported_or_bad_parameters_are_refused_by_name(client, changes, param):
    kw = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**(kw | changes))
    assert info.value.body["param"] == param, info.value.body
    assert param.split(".")[0] in info.value.body["message"]


def test_completion_parameters_refused_by_name(client):
    for extra, param in (({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="m", prompt="a", max_tokens=2, **extra)
        assert info.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="a", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"  # 0 only with echo


def test_text_content_parts(client):
    kw = dict(temperature=0, max_tokens=8)
    parts = [{"type": "text", "text": FRANCE}]
    a = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": parts}], **kw
    )
    b = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": FRANCE}], **kw
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_context_overflow_has_openais_code(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="hello " * 9000, max_tokens=2)
    assert info.value.body["code"] == "context_length_exceeded"


def test_models_retrieve(client):
    (model,) = client.models.list().data
    assert client.models.retrieve(model.id).id == model.id
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_vllm_tokenizer_endpoints(server):
    r = httpx.post(
        f"{server.url}/tokenize", json={"prompt": SKY, "add_special_tokens": False}, timeout=30
    )
    assert r.status_code == 200 and r.json()["tokens"] == tokenize(server, SKY)
    assert r.json()["count"] == len(r.json()["tokens"])
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["model_max_length"] > 0 and "im_start" in info["chat_template"]
    assert info["eos_token"]


@pytest.fixture(scope="module")
def fp32_server(default_gguf, tmp_path_factory):
    srv = Server(default_gguf, tmp_path_factory.mktemp("fp32"), extra=("--quant", "none")).start()
    yield srv
    srv.stop()


def test_forced_continuation_logprobs_equal_the_models_log_softmax(fp32_server, default_model):
    """In fp32, the scores echo returns for a given text are the model's own log-softmax
    at each position (within 1e-4), computed here in-process on the same weights."""
    import torch

    from hexin.model import Llama

    text = SKY + " of Rayleigh scattering."
    with fp32_server.openai() as c:
        r = c.completions.create(model="m", prompt=text, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    ids = default_model.tokenizer.encode(text)
    model = Llama.from_loaded(default_model, quant="none")
    logits = model.forward(torch.tensor([ids]), model.new_cache(), all_logits=True)[0]
    expected = torch.log_softmax(logits.float(), -1)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - float(expected[i - 1, ids[i]])) < 1e-4
        best = expected[i - 1].topk(3)
        got = list(lp.top_logprobs[i].values())
        assert all(abs(a - float(b)) < 1e-4 for a, b in zip(got, best.values, strict=True))


# -- structured output -----------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
            "required": ["name", "country"],
            "additionalProperties": False,
        },
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PEOPLE = [
    "Describe a person named Alice.",
    "Tell me about Bob, 42, from Paris.",
    "Invent a character for a story.",
    "Who is your favourite scientist?",
    "Describe a farmer.",
    "Describe a teacher from Japan.",
    "Make up a pirate.",
    "Describe a child who likes trains.",
    "Tell me about an astronaut.",
    "Describe your neighbour.",
]


def test_json_schema_replies_validate_on_10_prompts(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for prompt in PEOPLE:
        r = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=300,
            temperature=0,
            response_format=fmt,
        )
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_sdk_parse_returns_the_model(client):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    class Person(BaseModel):
        name: str
        age: int
        city: City

    r = client.chat.completions.parse(
        model="m",
        messages=[{"role": "user", "content": "Tell me about a person."}],
        response_format=Person,
        max_tokens=200,
        temperature=0,
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and isinstance(person.city, City)


def test_grammar_and_regex_hold_a_completion(client):
    r = client.completions.create(
        model="m",
        prompt="Is the sky green? Answer:",
        max_tokens=10,
        extra_body={"regex": " (yes|no)"},
    )
    assert r.choices[0].text in (" yes", " no")
    gbnf = 'root ::= " " color\ncolor ::= "red" | "green" | "blue"'
    for seed in (1, 2, 3):
        r = client.completions.create(
            model="m", prompt="Color:", max_tokens=10, seed=seed, extra_body={"grammar": gbnf}
        )
        assert r.choices[0].text in (" red", " green", " blue")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            "response_format",
        ),
        ({"grammar": "root ::= ("}, "grammar"),
        ({"grammar": 'root ::= "a"', "regex": "a"}, "regex"),
    ],
)
def test_bad_grammars_are_refused(client, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="x", max_tokens=4, extra_body=body)
    assert info.value.body["param"] == param, info.value.body


def engine_counter(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    (value,) = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def test_n_choices_share_one_prefill_and_reproduce(client, server):
    kw = dict(
        model="m",
        messages=[
            {"role": "user", "content": "Write one sentence about a " + secrets.token_hex(4)}
        ],
        temperature=1.0,
        max_tokens=16,
        seed=11,
        n=3,
    )
    before = engine_counter(server, "hexin_engine_prefill_tokens")
    r = client.chat.completions.create(**kw)
    prefilled = engine_counter(server, "hexin_engine_prefill_tokens") - before
    texts = [c.message.content for c in r.choices]
    assert [c.index for c in r.choices] == [0, 1, 2] and len(set(texts)) == 3
    # the prompt computed once for all three (less what an earlier request left cached):
    # the other two start from its cache, all of it counted as cached for them
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert 0 < prefilled == r.usage.prompt_tokens - cached <= r.usage.prompt_tokens / 3
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == texts
    single = client.chat.completions.create(**(kw | {"n": 1, "seed": 12}))
    assert single.choices[0].message.content == texts[1]  # choice i samples with seed + i
    streamed = ["", "", ""]
    finished = set()
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}


def test_streamed_completions_of_several_prompts(client):
    prompts = [SKY, "Once upon a time"]
    whole = client.completions.create(model="m", prompt=prompts, max_tokens=6, temperature=0)
    texts = ["", ""]
    for chunk in client.completions.create(
        model="m", prompt=prompts, max_tokens=6, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in whole.choices]


# -- tools -------------------------------------------------------------------------------------

WEATHER = [{"role": "user", "content": "What's the weather in Paris?"}]


def check_call(call, name: str) -> None:
    import jsonschema

    (tool,) = [t for t in TOOLS if t["function"]["name"] == name]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == name
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


@pytest.mark.parametrize(
    ("tool_choice", "name"),
    [("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")],
)
def test_an_enforced_tool_call_is_a_valid_call(client, tool_choice, name):
    kw = dict(model="m", messages=WEATHER, tools=TOOLS, tool_choice=tool_choice, max_tokens=120)
    r = client.chat.completions.create(temperature=0, **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    check_call(call, name or call.function.name)
    assert call.function.name in ("get_weather", "get_time")
    streamed, finish = [], None
    for chunk in client.chat.completions.create(temperature=0, stream=True, **kw):
        if chunk.choices:
            streamed += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    # the id and name first, then the arguments in pieces as they are written
    first, *rest = streamed
    assert finish == "tool_calls" and {d.index for d in streamed} == {0}
    assert first.id.startswith("call_") and first.function.name == call.function.name
    assert len(rest) > 1 and all(d.id is None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments for d in streamed)
    assert arguments == call.function.arguments


def test_a_reply_with_tools_given_still_streams_token_by_token(client):
    question = [{"role": "user", "content": FRANCE}]
    kw = dict(model="m", messages=question, tools=TOOLS, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kw)
    chunks = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(stream=True, **kw)
        if c.choices and c.choices[0].delta.content
    ]
    assert len(chunks) > 3 and "".join(chunks) == whole.choices[0].message.content


def test_several_choices_with_tools_stream_each_call(client):
    kw = dict(model="m", messages=WEATHER, tools=TOOLS, tool_choice="required", max_tokens=80)
    kw |= dict(n=2, temperature=0.8, seed=3)
    whole = client.chat.completions.create(**kw)
    arguments: dict[int, str] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                arguments[c.index] = arguments.get(c.index, "") + d.function.arguments
    assert arguments == {c.index: c.message.tool_calls[0].function.arguments for c in whole.choices}


def test_a_tool_result_goes_back_into_the_conversation(client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    r = client.chat.completions.create(
        model="m",
        tools=TOOLS,
        temperature=0,
        max_tokens=30,
        messages=[
            *WEATHER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny", "c": 21}'},
        ],
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools.0.function.name",
        ),
    ],
)
def test_bad_tool_requests_are_refused(client, changes, param):
    kw = {"model": "m", "messages": WEATHER, "tools": TOOLS, "max_tokens": 4}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**(kw | changes))
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(server, method):
    """LangChain's ``with_structured_output`` by each of its methods: a JSON schema
    response format, a forced tool call, and JSON mode (whose schema only the prompt
    states)."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1", api_key="unused", model="m", temperature=0, max_tokens=100
    )
    ask = "Tell me about a person named Ann who is 31."
    if method == "json_mode":
        ask = 'Reply with a JSON object with the keys "name" (a string) and "age" (an integer) '
        ask += "for a person named Ann who is 31."
    person = llm.with_structured_output(Person, method=method).invoke(ask)
    assert isinstance(person, Person) and person.age == 31
