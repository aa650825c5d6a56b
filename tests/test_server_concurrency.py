"""Eight clients at once against a real ``hexin serve`` process: four WebSocket chat
sessions and four OpenAI streaming requests, batched together by the engine. Every one
finishes, and greedy results equal the same requests run alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_util import Server, check_done, recv_session, sse_events, turn

WS_PROMPTS = [
    "Name three colors.",
    "What is two plus two?",
    "Say hello in French.",
    "What is the largest planet?",
]
OAI_PROMPTS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
    "Write one sentence about cats.",
]
MAX_TOKENS = 12
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    srv = Server(default_gguf, tmp_path_factory.mktemp("concurrency")).start()
    yield srv
    srv.stop()


def chat_body(prompt: str) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream_options": {"include_usage": True},
    }


def run_openai_stream(server: Server, prompt: str, barrier: threading.Barrier | None) -> dict:
    with server.http(timeout=TIMEOUT_S) as http:
        if barrier is not None:
            barrier.wait(TIMEOUT_S)
        t0 = time.monotonic()
        events = sse_events(http, "/v1/chat/completions", chat_body(prompt))
        t1 = time.monotonic()
    assert events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]["usage"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert usage["completion_tokens"] >= 1
    result = {"text": text, "finish": finishes[-1], "completion_tokens": usage["completion_tokens"]}
    return result | {"span": (t0, t1)}


def run_ws(server: Server, sid: str, prompt: str, barrier: threading.Barrier) -> dict:
    with server.ws(sid) as ws:
        recv_session(ws)
        barrier.wait(TIMEOUT_S)
        t0 = time.monotonic()
        reply = turn(ws, prompt, {"temperature": 0, "max_tokens": MAX_TOKENS})
        t1 = time.monotonic()
    done = check_done(reply)  # text == the concatenated tokens, usage shape, ...
    assert done["usage"]["completion_tokens"] > 0
    assert done["stop_reason"] in ("eos", "length")
    return {"text": "".join(reply["tokens"]), "done": done, "span": (t0, t1)}


def test_eight_clients_at_once(server):
    # each request alone first (a WebSocket session with no system prompt renders the same
    # prompt as the OpenAI endpoint given the one user message)
    alone = {p: run_openai_stream(server, p, None) for p in OAI_PROMPTS + WS_PROMPTS}
    for result in alone.values():
        del result["span"]

    barrier = threading.Barrier(8)
    with ThreadPoolExecutor(8) as pool:
        ws_futures = [
            pool.submit(run_ws, server, f"conc-{i}", p, barrier) for i, p in enumerate(WS_PROMPTS)
        ]
        oai_futures = [pool.submit(run_openai_stream, server, p, barrier) for p in OAI_PROMPTS]
        ws_results = [f.result(timeout=TIMEOUT_S * 2) for f in ws_futures]
        oai_results = [f.result(timeout=TIMEOUT_S * 2) for f in oai_futures]

    # they really ran at the same time: every request started before any one finished
    spans = [r.pop("span") for r in ws_results + oai_results]
    assert max(t0 for t0, _ in spans) < min(t1 for _, t1 in spans)

    for prompt, got in zip(OAI_PROMPTS, oai_results, strict=True):
        assert got == alone[prompt], prompt
    for prompt, got in zip(WS_PROMPTS, ws_results, strict=True):
        assert got["text"] == alone[prompt]["text"], prompt
        assert got["done"]["usage"]["completion_tokens"] == alone[prompt]["completion_tokens"]


def run_openai_plain(server: Server, prompt: str, barrier: threading.Barrier) -> dict:
    with server.http(timeout=TIMEOUT_S) as http:
        barrier.wait(TIMEOUT_S)
        body = chat_body(prompt)
        del body["stream_options"]
        r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    return {"text": choice["message"]["content"], "finish": choice["finish_reason"]}


def run_poisoned(server: Server, barrier: threading.Barrier) -> dict:
    """A completion valid by the schema whose temperature once made sampling raise and
    the engine fail every request batched with it."""
    with server.http(timeout=TIMEOUT_S) as http:
        barrier.wait(TIMEOUT_S)
        body = {"prompt": "x", "max_tokens": MAX_TOKENS, "temperature": 1e-40, "seed": 3}
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_poisoned_request_leaves_its_batch_intact(server):
    """SSE, plain and WebSocket requests batched with the degenerate one all finish as
    usual ([DONE], a finish reason, ``done``) with the text each gives alone."""
    sse_prompt, plain_prompt, ws_prompt = OAI_PROMPTS[0], OAI_PROMPTS[1], WS_PROMPTS[0]
    alone = {p: run_openai_stream(server, p, None) for p in (sse_prompt, plain_prompt, ws_prompt)}
    barrier = threading.Barrier(4)
    with ThreadPoolExecutor(4) as pool:
        sse = pool.submit(run_openai_stream, server, sse_prompt, barrier)
        plain = pool.submit(run_openai_plain, server, plain_prompt, barrier)
        ws = pool.submit(run_ws, server, "poison-neighbour", ws_prompt, barrier)
        poisoned = pool.submit(run_poisoned, server, barrier)
        results = [f.result(timeout=TIMEOUT_S * 2) for f in (sse, plain, ws, poisoned)]
    got_sse, got_plain, got_ws, got_poisoned = results
    assert got_sse["text"] == alone[sse_prompt]["text"]
    assert got_plain["text"] == alone[plain_prompt]["text"]
    assert got_ws["text"] == alone[ws_prompt]["text"]
    assert got_poisoned["choices"][0]["finish_reason"] in ("stop", "length")
    assert got_poisoned["usage"]["completion_tokens"] >= 1
    with server.http() as http:
        assert http.get("/health").status_code == 200
