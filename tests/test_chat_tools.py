"""Tool calls in the chat layer: a session's tools, calls parsed out of its replies, tool
results stored as messages and answered, all kept in the store, on the default model."""

from __future__ import annotations

import json

import jsonschema
import pytest
from tool_specs import TOOLS

from hexin.chat import ChatError, ChatService, open_store
from hexin.engine import Engine
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.sampling import InvalidParams, SamplingParams

PARIS = "What's the weather in Paris?"


@pytest.fixture(scope="module")
def engine(default_model):
    model = Llama(default_model.config, default_model.weights)
    engine = Engine(model, default_model.tokenizer, EngineConfig(kv_memory=64 << 20)).start()
    yield engine
    engine.shutdown()


@pytest.fixture
def svc(engine, tmp_path):
    params = SamplingParams(temperature=0.0, max_tokens=60)
    return ChatService(engine, open_store(tmp_path / "chat.db"), default_params=params)


def called(svc: ChatService, sid: str, **choice) -> dict:
    """Ask about Paris with a call required; the saved reply's one call."""
    reply = svc.send(sid, PARIS, {"tool_choice": "required"} | choice)
    message = reply.wait()
    assert message.content == "" and message.meta["stop_reason"] != "length"
    (call,) = message.meta["tool_calls"]
    return call


def test_a_required_call_is_parsed_stored_answered_and_survives_a_restart(svc, tmp_path):
    s = svc.create(tools=TOOLS)
    call = called(svc, s.id)
    (tool,) = [t for t in TOOLS if t["function"]["name"] == call["function"]["name"]]
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])
    assert call["type"] == "function" and call["id"].startswith("call_")

    result = {"tool_call_id": call["id"], "content": '{"sky": "sunny", "celsius": 21}'}
    reply = svc.tool_results(s.id, [result])
    text = reply.text()
    answer = reply.wait()
    assert text == answer.content and answer.content.strip()
    # the tool result's turn is the same conversation: its prefix was cached
    assert 0 < answer.meta["cached_tokens"] < answer.meta["prompt_tokens"]
    session = svc.get(s.id)
    path = session.path()
    assert [m.role for m in path] == ["user", "assistant", "tool", "assistant"]
    assert path[2].meta == {"tool_call_id": call["id"], "name": call["function"]["name"]}
    assert path[1].meta["tool_calls"] == [call]

    # a new store on the same file (a restart) holds the same tree and tools
    again = open_store(tmp_path / "chat.db").load(s.id)
    assert again.tools == TOOLS and again.to_dict() == session.to_dict()
    # an export imports back whole, tool messages and tools included
    copy = svc.import_(svc.export(s.id), keep_id=False)
    assert [m.role for m in svc.get(copy.id).path()] == [m.role for m in path]
    assert svc.get(copy.id).tools == TOOLS


def test_a_named_call_and_versions_of_the_answer(svc):
    s = svc.create(tools=TOOLS)
    call = called(svc, s.id, tool_choice="get_time")
    assert call["function"]["name"] == "get_time"
    svc.tool_results(s.id, [{"tool_call_id": call["id"], "content": "14:05"}]).wait()
    first = svc.get(s.id).path()[-1]
    second = svc.regenerate(s.id, {"temperature": 0.9, "seed": 4}).wait()
    # a regenerated answer is a second version of the reply to the tool result
    assert second.parent_id == first.parent_id and svc.get(s.id).version(second.id) == (2, 2)
    svc.rollback(s.id)  # the second answer: the first takes its place
    assert svc.get(s.id).active_id == first.id
    svc.rollback(s.id)  # the first answer, then the tool result
    svc.rollback(s.id)
    assert [m.role for m in svc.get(s.id).path()] == ["user", "assistant"]


def test_the_model_is_told_the_sessions_tools(svc, engine):
    s = svc.create(tools=TOOLS)
    plain = svc.create()
    prompt_of = {}
    for sid in (s.id, plain.id):
        reply = svc.send(sid, PARIS, {"max_tokens": 1})
        reply.wait()
        prompt_of[sid] = reply.message.meta["prompt_tokens"]
    assert prompt_of[s.id] > prompt_of[plain.id] + 50  # the functions' JSON is in it
    svc.update(s.id, tools=[])
    assert svc.get(s.id).tools == []


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ([], "answer each call exactly once"),
        ([{"tool_call_id": "call_nope", "content": "x"}], "answer each call exactly once"),
        ([{"tool_call_id": 1, "content": "x"}], "tool_call_id"),
        ("x", "tool_call_id"),
    ],
)
def test_bad_tool_results_are_refused_and_change_nothing(svc, results, match):
    s = svc.create(tools=TOOLS)
    called(svc, s.id)
    before = svc.export(s.id)
    with pytest.raises(ChatError, match=match):
        svc.tool_results(s.id, results)
    assert svc.export(s.id) == before


def test_tool_errors_are_clear(svc):
    s = svc.create(tools=TOOLS)
    with pytest.raises(ChatError, match="no tool calls to answer"):
        svc.tool_results(s.id, [{"tool_call_id": "call_1", "content": "x"}])
    with pytest.raises(InvalidParams, match="tool_choice"):
        svc.send(s.id, PARIS, {"tool_choice": "get_nothing"})
    with pytest.raises(ChatError, match=r"tools\.0\.function\.name"):
        svc.create(tools=[{"type": "function", "function": {"name": "bad name!"}}])
    with pytest.raises(ChatError, match="same name"):
        svc.create(tools=TOOLS + TOOLS[:1])
    assert len(svc.list()) == 1
