"""ChatService end to end on real models: sessions, streaming turns, versions and branches,
the per-session KV cache, the sliding context window, errors, export and import.

Most tests run on the tiny story model given a ChatML-like template (its context limit is
512 tokens, which makes window tests cheap); the cache-equivalence tests use the default
SmolLM2 model in fp32.
"""

from __future__ import annotations

import gc
import itertools
import json
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch

from hexin.chat import ChatError, ChatService, SessionExists, open_store
from hexin.chat.tree import Message, new_id
from hexin.chat.window import build_prompt
from hexin.engine import Engine, EngineBusy
from hexin.engine.blocks import BlockPool, PagedBatch
from hexin.errors import HexinError
from hexin.model import Llama
from hexin.options import EngineConfig
from hexin.output import ContextOverflow
from hexin.sampling import InvalidParams, SamplingParams
from hexin.tokenizer import Tokenizer

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FRANCE = "What is the capital of France?"


def with_template(tok: Tokenizer, template: str) -> Tokenizer:
    """A copy of ``tok`` with a chat template (the story model ships none)."""
    return Tokenizer(
        tok.inner,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=tok.eos_token_ids,
        add_bos=tok.add_bos,
        chat_template=template,
    )


@pytest.fixture(scope="module")
def story_chat(story_model):
    return Llama(story_model.config, story_model.weights), with_template(
        story_model.tokenizer, CHATML
    )


@pytest.fixture(scope="module")
def default_chat(default_model):
    return Llama(default_model.config, default_model.weights), default_model.tokenizer


def make_service(
    chat, db, *, temperature=0.0, max_tokens=16, context_limit=None, kv_memory=64 << 20
) -> ChatService:
    model, tok = chat
    engine = Engine(
        model, tok, EngineConfig(context_limit=context_limit, kv_memory=kv_memory)
    ).start()
    return ChatService(
        engine,
        open_store(db),
        model_name="test-model",
        default_params=SamplingParams(temperature=temperature, max_tokens=max_tokens),
    )


@pytest.fixture
def svc(story_chat, store_db):
    """A service on each store backend (conftest's ``store_db``): SQLite and PostgreSQL."""
    service = make_service(story_chat, store_db)
    yield service
    service.engine.shutdown()
    service.close()
    service.store.close()


def snapshot(service: ChatService) -> list[dict]:
    """Everything the store holds, for 'nothing changed' checks."""
    return [service.export(s["id"]) for s in service.list()]


def roles(service: ChatService, sid: str) -> list[str]:
    return [m.role for m in service.get(sid).path()]


# -- sessions ------------------------------------------------------------------------------------


def test_create_rename_delete_and_list_newest_first(svc):
    a = svc.create(title="  first  ")
    b = svc.create(session_id="my-session_2")
    assert a.title == "first" and b.id == "my-session_2"
    assert a.model == "test-model"
    assert [s["id"] for s in svc.list()] == [b.id, a.id]

    renamed = svc.rename(a.id, "Renamed")
    assert renamed.title == "Renamed" and svc.get(a.id).title == "Renamed"
    assert [s["id"] for s in svc.list()] == [a.id, b.id]  # a change makes a session newest

    c = svc.create()
    assert [s["id"] for s in svc.list()] == [c.id, a.id, b.id]
    assert svc.list()[0]["message_count"] == 0

    svc.delete(a.id)
    assert [s["id"] for s in svc.list()] == [c.id, b.id]
    with pytest.raises(ChatError):
        svc.get(a.id)
    with pytest.raises(ChatError):
        svc.delete(a.id)


def test_create_with_an_existing_id_is_refused(svc):
    svc.create(session_id="dup", title="original")
    with pytest.raises(SessionExists, match="already exists"):
        svc.create(session_id="dup", title="other")
    assert svc.get("dup").title == "original"


def test_racing_creators_of_one_id_one_wins_and_the_rest_are_told(svc):
    """The id is claimed by the insert itself: a creator that checked first and wrote
    after would overwrite the winner's session (its title, its first message)."""
    start, outcomes = threading.Barrier(8), []

    def create(i: int) -> None:
        start.wait()
        try:
            svc.create(session_id="raced", title=f"creator {i}")
            outcomes.append(f"creator {i}")
        except SessionExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o != "exists"]
    assert len(outcomes) == 8 and len(winners) == 1, outcomes
    assert svc.get("raced").title == winners[0]


def test_search_matches_titles_and_message_text_case_insensitively(svc):
    percent = svc.create(title="100% Pure")
    plain = svc.create(title="100 x Pure")
    under = svc.create(title="snake_case")
    other = svc.create(title="snakeXcase")
    chat = svc.create(title="untitled chat")
    reply = svc.send(chat.id, "Tell me about the Zebra named Quux.", {"max_tokens": 4})
    reply.text()

    def found(q):
        return {s["id"] for s in svc.list(q)}

    assert found("pure") == {percent.id, plain.id}
    assert found("PURE") == {percent.id, plain.id}
    assert found("%") == {percent.id}  # literal, not "anything"
    assert found("0%") == {percent.id}
    assert found("_") == {under.id}  # literal, not "any one character"
    assert found("e_c") == {under.id}
    assert found("zebra NAMED quux") == {chat.id}  # user message text
    words = [w for w in reply.message.content.split() if w.isalpha() and len(w) > 2]
    if words:  # assistant message text is searchable too
        assert chat.id in found(words[0].upper())
    assert found("no such text anywhere") == set()
    assert other.id not in found("_")
    assert len(svc.list()) == 5 and len(svc.list("")) == 5


# -- sending -------------------------------------------------------------------------------------


def test_send_streams_deltas_that_join_into_the_saved_reply(svc):
    s = svc.create()
    text = "Tell me a story about a cat.\nSecond line is not part of the title."
    reply = svc.send(s.id, text, {"max_tokens": 24})
    deltas = list(reply)
    assert deltas and all(isinstance(d, str) and d for d in deltas)
    saved = svc.get(s.id)
    user, assistant = saved.path()
    assert (user.role, user.content) == ("user", text)
    assert assistant.role == "assistant" and assistant.content == "".join(deltas)
    assert assistant.status == "complete" and reply.message.id == assistant.id
    usage = assistant.meta
    for key in ("prompt_tokens", "cached_tokens", "completion_tokens", "stop_reason"):
        assert key in usage
    assert usage["prompt_tokens"] > 0 and usage["cached_tokens"] == 0
    assert 1 <= usage["completion_tokens"] <= 24
    assert usage["stop_reason"] in ("eos", "length")
    assert reply.usage == usage
    assert saved.title == "Tell me a story about a cat."
    assert saved.active_id == assistant.id


def test_a_finished_replys_text_can_be_read_again(svc):
    """The stream is read once; a second ``text()`` gives the same text, not a hang."""
    svc.create(session_id="again")
    reply = svc.send("again", "Once upon a time")
    first = reply.text()
    assert first and reply.text() == first == reply.wait().content


def test_first_message_title_is_its_first_line_truncated_and_kept_afterwards(svc):
    s = svc.create()
    svc.send(s.id, "   " + "x" * 100 + "\nmore", {"max_tokens": 2}).text()
    assert svc.get(s.id).title == "x" * 60
    svc.send(s.id, "another message", {"max_tokens": 2}).text()
    assert svc.get(s.id).title == "x" * 60
    named = svc.create(title="Chosen")
    svc.send(named.id, "hello", {"max_tokens": 2}).text()
    assert svc.get(named.id).title == "Chosen"


class SlowLlama(Llama):
    """The story model at a human pace, so a test can act while a reply is in flight."""

    def forward(self, *args, **kw):
        time.sleep(0.01)
        return super().forward(*args, **kw)


@pytest.fixture
def slow_svc(story_chat, story_model, tmp_path):
    model = SlowLlama(story_model.config, story_model.weights)
    return make_service((model, story_chat[1]), tmp_path / "slow.db")


def test_stop_after_first_delta_saves_partial_reply_as_stopped(slow_svc):
    svc = slow_svc
    s = svc.create()
    reply = svc.send(s.id, "Tell me a very long story.", {"max_tokens": 200})
    deltas = []
    for delta in reply:
        deltas.append(delta)
        if len(deltas) == 1:
            # while the reply is in flight the session refuses other turns
            with pytest.raises(ChatError, match="busy"):
                svc.send(s.id, "interrupting")
            with pytest.raises(ChatError, match="busy"):
                svc.rollback(s.id)
            reply.stop()
    msg = svc.get(s.id).path()[-1]
    assert msg.role == "assistant" and msg.status == "stopped"
    assert msg.meta["stop_reason"] == "cancelled"
    assert msg.content == "".join(deltas) and msg.content.startswith(deltas[0])
    assert msg.meta["completion_tokens"] < 200
    assert roles(svc, s.id) == ["user", "assistant"]  # "interrupting" never got saved
    follow = svc.send(s.id, "go on", {"max_tokens": 4}).text()  # the session is free again
    last = svc.get(s.id).path()[-1]
    assert last.status == "complete" and last.content == follow
    assert roles(svc, s.id) == ["user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("how", ["break", "close"])
def test_abandoned_stream_is_saved_as_stopped_and_frees_the_session(slow_svc, how):
    svc = slow_svc
    s = svc.create()
    reply = svc.send(s.id, "Tell me a very long story.", {"max_tokens": 200})
    if how == "break":
        for delta in reply:
            first = delta
            break
    else:
        it = iter(reply)
        first = next(it)
        it.close()
        del it
    gc.collect()
    msg = svc.get(s.id).path()[-1]
    assert msg.role == "assistant" and msg.status == "stopped"
    assert msg.meta["stop_reason"] == "cancelled"
    assert msg.content.startswith(first)  # plus what was decoded before the cancel landed
    nxt = svc.send(s.id, "And then?", {"max_tokens": 4})
    nxt.text()
    assert nxt.message.status == "complete"
    assert roles(svc, s.id) == ["user", "assistant", "user", "assistant"]


def test_reply_dropped_before_its_first_delta_frees_the_session(svc):
    """A consumer that goes away before reading anything (a client that disconnects right
    after sending) must not leave the session busy forever."""
    s = svc.create()
    reply = svc.send(s.id, "hello", {"max_tokens": 4})
    del reply
    gc.collect()
    again = svc.send(s.id, "hello again", {"max_tokens": 4})
    again.text()
    assert svc.get(s.id).path()[-1].content == again.message.content


def test_deleting_a_session_with_a_reply_in_flight_is_clean(svc):
    """Either delete refuses while busy, or the reply ends quietly: never a raw sqlite
    error out of the stream."""
    s = svc.create()
    it = iter(svc.send(s.id, "Tell me a long story.", {"max_tokens": 50}))
    next(it)
    try:
        svc.delete(s.id)
        deleted = True
    except ChatError:
        deleted = False
    list(it)  # must not raise
    if deleted:
        assert not svc.store.exists(s.id)
    else:
        svc.delete(s.id)
        assert not svc.store.exists(s.id)
    assert svc.create(title="next").title == "next"


# -- versions, rollback, edits ------------------------------------------------------------------


def test_regenerate_adds_a_sibling_version_and_switch_goes_back(svc):
    s = svc.create(params={"temperature": 0.8})
    first = svc.send(s.id, "Tell me a story.", {"seed": 1, "max_tokens": 12})
    first.text()
    second = svc.regenerate(s.id, {"seed": 2})
    second.text()
    a, b = first.message, second.message
    sess = svc.get(s.id)
    assert a.id != b.id and a.parent_id == b.parent_id
    assert sess.version(b.id) == (2, 2) and sess.version(a.id) == (1, 2)
    assert sess.active_id == b.id
    assert [m.role for m in sess.path()] == ["user", "assistant"]

    back = svc.switch_version(s.id, b.id, -1)
    assert back.active_id == a.id and svc.get(s.id).active_id == a.id
    again = svc.get(s.id)
    assert again.message(a.id).content == a.content
    assert again.message(b.id).content == b.content
    assert svc.switch_version(s.id, a.id, +1).active_id == b.id
    with pytest.raises(ChatError):
        svc.switch_version(s.id, b.id, +1)
    with pytest.raises(ChatError):
        svc.switch_version(s.id, a.id, -1)


def test_rollback_removes_reply_then_user_message_then_refuses(svc):
    s = svc.create()
    svc.send(s.id, "one", {"max_tokens": 4}).text()
    svc.send(s.id, "two", {"max_tokens": 4}).text()
    after = svc.rollback(s.id)
    assert [m.role for m in after.path()] == ["user", "assistant", "user"]
    assert after.path()[-1].content == "two"
    assert roles(svc, s.id) == ["user", "assistant", "user"]
    svc.rollback(s.id)
    assert svc.get(s.id).path()[0].content == "one"
    assert roles(svc, s.id) == ["user", "assistant"]
    svc.rollback(s.id)
    svc.rollback(s.id)
    empty = svc.get(s.id)
    assert empty.path() == [] and empty.messages == {} and empty.active_id is None
    with pytest.raises(ChatError, match="empty"):
        svc.rollback(s.id)
    with pytest.raises(ChatError):
        svc.regenerate(s.id)


def test_rollback_removes_the_active_version_and_shows_the_one_before(svc):
    s = svc.create()
    first = svc.send(s.id, "one", {"max_tokens": 4}).wait()
    svc.regenerate(s.id, {"temperature": 0.9, "seed": 1}).wait()
    third = svc.regenerate(s.id, {"temperature": 0.9, "seed": 2}).wait()
    svc.switch(s.id, first.id)
    svc.switch(s.id, third.id)
    svc.rollback(s.id)  # the active version only: the newest one left takes its place
    sess = svc.get(s.id)
    assert len(sess.messages) == 3 and third.id not in sess.messages
    assert sess.path()[-1].role == "assistant" and sess.version(sess.active_id) == (2, 2)
    svc.rollback(s.id)
    assert svc.get(s.id).active_id == first.id
    svc.rollback(s.id)  # no version left: the path ends at the question
    assert roles(svc, s.id) == ["user"]
    svc.rollback(s.id)  # the user message and what is left below it
    assert svc.get(s.id).messages == {}


def test_edit_branches_and_matches_a_fresh_session_with_the_edited_history(
    story_chat, svc, tmp_path
):
    s = svc.create()
    for text in ("The cat sat.", "The dog ran.", "The bird sang."):
        svc.send(s.id, text, {"max_tokens": 12}).text()
    old_path = svc.get(s.id).path()
    old_contents = [m.content for m in old_path]
    u2 = old_path[2]

    edited = svc.edit(s.id, u2.id, "The fox jumped.", {"max_tokens": 12})
    edited_text = edited.text()
    sess = svc.get(s.id)
    new_path = sess.path()
    assert [m.content for m in new_path[:2]] == old_contents[:2]
    assert [m.content for m in new_path[2:]] == ["The fox jumped.", edited_text]
    assert new_path[2].parent_id == u2.parent_id
    assert sess.version(new_path[2].id) == (2, 2) and sess.version(u2.id) == (1, 2)
    assert len(sess.messages) == 8

    # the old branch is reachable and intact
    old = svc.switch(s.id, u2.id)
    assert [m.content for m in old.path()] == old_contents
    assert [m.id for m in old.path()] == [m.id for m in old_path]

    # the edited reply equals a fresh session's reply to the same history (no cache)
    history = {
        "id": "fresh",
        "messages": [m.to_dict() for m in old_path[:2]],
        "active_id": old_path[1].id,
        "params": svc.get(s.id).params.to_dict(),
    }
    fresh_svc = make_service(story_chat, tmp_path / "fresh.db")
    fresh_svc.import_(history)
    fresh = fresh_svc.send("fresh", "The fox jumped.", {"max_tokens": 12})
    assert fresh.text() == edited_text
    assert fresh.usage["cached_tokens"] == 0
    assert fresh.usage["prompt_tokens"] == edited.usage["prompt_tokens"]


def test_edit_of_first_message_equals_fresh_first_message(svc):
    s = svc.create()
    svc.send(s.id, "The cat sat.", {"max_tokens": 12}).text()
    svc.send(s.id, "The dog ran.", {"max_tokens": 12}).text()
    first_user = svc.get(s.id).path()[0]
    edited = svc.edit(s.id, first_user.id, "A mouse hid.", {"max_tokens": 12}).text()
    sess = svc.get(s.id)
    assert [m.content for m in sess.path()] == ["A mouse hid.", edited]
    assert sess.version(sess.path()[0].id) == (2, 2)
    other = svc.create()
    assert svc.send(other.id, "A mouse hid.", {"max_tokens": 12}).text() == edited


def test_edit_refuses_assistant_messages_and_unknown_ids(svc):
    s = svc.create()
    svc.send(s.id, "hi", {"max_tokens": 3}).text()
    before = snapshot(svc)
    reply_id = svc.get(s.id).active_id
    with pytest.raises(ChatError):
        svc.edit(s.id, reply_id, "new text")
    with pytest.raises(ChatError):
        svc.edit(s.id, "no-such-message", "new text")
    with pytest.raises(ChatError):
        svc.switch(s.id, "no-such-message")
    assert snapshot(svc) == before


def test_rollback_then_regenerate_with_same_seed_reproduces_the_reply(svc):
    s = svc.create()
    params = {"temperature": 0.8, "seed": 7, "max_tokens": 24}
    original = svc.send(s.id, "Tell me a story about a frog.", params)
    original_text = original.text()
    svc.rollback(s.id)
    assert roles(svc, s.id) == ["user"]
    again = svc.regenerate(s.id, params)
    assert again.text() == original_text
    assert again.usage["completion_tokens"] == original.usage["completion_tokens"]
    sess = svc.get(s.id)
    assert [m.role for m in sess.path()] == ["user", "assistant"]
    assert len(sess.messages) == 2  # the rolled-back reply is gone, not a version


# -- the KV cache --------------------------------------------------------------------------------


def test_cached_turn_logits_equal_logits_from_scratch(default_chat, tmp_path):
    """The next turn run on the session's cached blocks gives the logits of a full pass."""
    model, tok = default_chat
    service = make_service(default_chat, tmp_path / "c.db", max_tokens=16)
    s = service.create()
    first = service.send(s.id, FRANCE)
    first.text()
    assert first.usage["stop_reason"] == "eos"
    sess = service.get(s.id)
    question = Message(new_id(), sess.active_id, "user", "And of Germany?")
    prompt = build_prompt(
        tok, None, [*sess.path(), question], max_tokens=16, limit=service.context_limit
    ).ids
    pool = service.engine.pool  # the engine is idle between turns
    table, n = pool.match_prefix(prompt, s.id)
    u = first.usage
    assert n == u["prompt_tokens"] + u["completion_tokens"] + 1
    assert 0 < n < len(prompt)
    table += [pool.allocate() for _ in range(-(-len(prompt) // pool.block_size) - len(table))]
    view = PagedBatch.of(pool, [table], [n], [len(prompt) - n])
    cached = model.forward(torch.tensor([prompt[n:]]), view, all_logits=True)[0]
    scratch = model.forward(torch.tensor([prompt]), model.new_cache(), all_logits=True)[0]
    assert cached.dtype == scratch.dtype == torch.float32
    torch.testing.assert_close(cached, scratch[n:], atol=1e-4, rtol=0)
    assert torch.equal(cached.argmax(-1), scratch[n:].argmax(-1))


def test_second_turn_reuses_whole_context_and_regenerate_all_but_one_token(default_chat, tmp_path):
    service = make_service(default_chat, tmp_path / "c.db", max_tokens=16)
    s = service.create()
    first = service.send(s.id, FRANCE)
    assert "Paris" in first.text()
    u1 = first.usage
    assert u1["stop_reason"] == "eos" and u1["cached_tokens"] == 0

    second = service.send(s.id, "And of Germany?")
    second_text = second.text()
    u2 = second.usage
    assert u2["cached_tokens"] == u1["prompt_tokens"] + u1["completion_tokens"] + 1
    assert u2["prompt_tokens"] > u2["cached_tokens"]

    regen = service.regenerate(s.id)
    assert regen.text() == second_text  # greedy: the same reply from the cache
    assert regen.usage["prompt_tokens"] == u2["prompt_tokens"]
    assert regen.usage["cached_tokens"] == u2["prompt_tokens"] - 1


def test_evicted_cache_is_recomputed_with_the_same_reply(story_chat, tmp_path):
    other = (
        "The dog ran in the park with a big red ball and his friend Tom. They played all day"
        " and when the sun went down they walked home, ate their dinner and went to sleep."
    )
    question = "What did the cat see?"

    def alternate(service):
        a = service.create(session_id="a")
        b = service.create(session_id="b")
        usages = []
        for sid, message in ((a.id, "The cat sat on the mat."), (b.id, other), (a.id, question)):
            reply = service.send(sid, message)
            text = reply.text()  # one turn at a time
            usages.append(reply.usage)
        return text, usages

    big_text, (a1, b1, big_usage) = alternate(make_service(story_chat, tmp_path / "big.db"))
    bs = EngineConfig().block_size

    def blocks(u, pending=0):  # KV blocks of a turn (its last token is never run: pending=-1)
        return -(-(u["prompt_tokens"] + u["completion_tokens"] + pending) // bs)

    # a pool that holds any one turn, but not a's first turn and b's together: b's turn
    # evicts a's idle blocks, which a's second turn recomputes
    room = max(blocks(u) for u in (a1, b1, big_usage))
    assert blocks(a1, -1) + blocks(b1, -1) > room
    per_block = BlockPool.bytes_per_block(story_chat[0].config, bs)
    # room + 1 blocks: the pool never hands out its null block
    tiny = make_service(story_chat, tmp_path / "tiny.db", kv_memory=(room + 1) * per_block)
    tiny_text, (_, _, tiny_usage) = alternate(tiny)
    assert tiny.engine.pool.num_blocks == room + 1
    # with room, the whole first turn is reused; in the small pool it was recomputed
    assert big_usage["cached_tokens"] >= a1["prompt_tokens"]
    assert tiny_usage["cached_tokens"] < big_usage["cached_tokens"]
    assert tiny_text == big_text
    assert tiny_usage["prompt_tokens"] == big_usage["prompt_tokens"]


# -- the sliding context window ------------------------------------------------------------------


def test_chat_prompt_is_encoded_as_transformers_encodes_it_with_one_bos(
    story_chat, story_dir, tmp_path
):
    """The template writes the BOS itself: the prompt holds it once, at the start, as
    transformers' ``apply_chat_template(tokenize=True)`` gives on the same tokenizer.json
    and template (it adds no special tokens to a rendered chat)."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    _, tok = story_chat
    system = "You tell short stories."
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(story_dir)
    messages = [{"role": "system", "content": system}, {"role": "user", "content": FRANCE}]
    kwargs = {"chat_template": CHATML, "add_generation_prompt": True}
    expected_text = reference.apply_chat_template(messages, tokenize=False, **kwargs)
    expected = reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert tok.apply_chat_template(messages) == expected_text
    question = Message(new_id(), None, "user", FRANCE)
    service = make_service(story_chat, tmp_path / "chat.db")
    ids = build_prompt(tok, system, [question], max_tokens=16, limit=service.context_limit).ids
    assert ids == expected
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    s = service.create(system_prompt=system)
    reply = service.send(s.id, FRANCE, {"max_tokens": 1})
    reply.text()
    assert reply.usage["prompt_tokens"] == len(expected)


def test_long_conversation_slides_the_window_instead_of_failing(svc):
    limit, max_tokens = svc.context_limit, 24
    assert limit == 512  # the story model's own limit
    s = svc.create(system_prompt="You tell short stories.")
    usages = []
    for i in range(14):
        text = f"Turn {i}: tell me about the little dog who played in the park with a red ball."
        reply = svc.send(s.id, text, {"max_tokens": max_tokens})
        reply.text()
        u = reply.usage
        usages.append(u)
        assert u["prompt_tokens"] + max_tokens <= limit
        assert u["prompt_tokens"] + u["completion_tokens"] <= limit
        assert u["dropped_turns"] == reply.dropped_turns
    assert usages[0]["dropped_turns"] == 0
    assert usages[-1]["dropped_turns"] > 0
    assert all(a["dropped_turns"] <= b["dropped_turns"] for a, b in itertools.pairwise(usages))
    # the stored conversation keeps everything; only the prompt leaves old turns out
    assert len(svc.get(s.id).path()) == 28


def test_message_that_nearly_fills_the_window_gets_a_shorter_reply(story_chat, svc):
    _, tok = story_chat
    limit = svc.context_limit

    def size(n):
        prompt = tok.apply_chat_template([{"role": "user", "content": "dog " * n}])
        return len(tok.encode_chat(prompt))

    n = 1
    while size(n + 1) < limit - 2:
        n += 1
    assert limit - 16 < size(n) < limit
    s = svc.create()
    reply = svc.send(s.id, "dog " * n, {"max_tokens": 64})
    reply.text()
    u = reply.usage
    assert u["prompt_tokens"] == size(n)
    assert 1 <= u["completion_tokens"] <= limit - size(n)


def test_oversize_message_raises_context_overflow_naming_the_limit_and_changes_nothing(svc):
    s = svc.create()
    svc.send(s.id, "A short hello.", {"max_tokens": 4}).text()
    before = svc.get(s.id)
    before_all = snapshot(svc)
    with pytest.raises(ContextOverflow) as err:
        svc.send(s.id, "dog " * 600)
    assert isinstance(err.value, HexinError)
    assert "512" in str(err.value)
    after = svc.get(s.id)
    assert len(after.messages) == len(before.messages) == 2
    assert after.active_id == before.active_id
    assert snapshot(svc) == before_all
    # and the session is not left busy
    svc.send(s.id, "Another short one.", {"max_tokens": 4}).text()
    assert len(svc.get(s.id).messages) == 4


def test_small_context_limit_on_the_default_model(default_chat, tmp_path):
    service = make_service(default_chat, tmp_path / "w.db", max_tokens=8, context_limit=120)
    assert service.context_limit == 120
    s = service.create()
    dropped = []
    for i in range(5):
        reply = service.send(s.id, f"Question {i}: name a colour of the rainbow, please.")
        reply.text()
        assert reply.usage["prompt_tokens"] + 8 <= 120
        dropped.append(reply.usage["dropped_turns"])
    assert dropped[0] == 0 and dropped[-1] > 0
    with pytest.raises(ContextOverflow, match="120"):
        service.send(s.id, "word " * 200)
    assert len(service.get(s.id).messages) == 10


# -- errors --------------------------------------------------------------------------------------


def test_unknown_session_is_a_chat_error_everywhere(svc):
    svc.create(session_id="known")
    before = snapshot(svc)
    calls = [
        lambda: svc.get("nope"),
        lambda: svc.send("nope", "hi"),
        lambda: svc.regenerate("nope"),
        lambda: svc.rollback("nope"),
        lambda: svc.rename("nope", "x"),
        lambda: svc.update("nope", params={"temperature": 0.5}),
        lambda: svc.delete("nope"),
        lambda: svc.export("nope"),
        lambda: svc.switch("nope", "m"),
        lambda: svc.edit("nope", "m", "hi"),
    ]
    for call in calls:
        with pytest.raises(ChatError):
            call()
    assert snapshot(svc) == before


@pytest.mark.parametrize("content", ["", "   ", "\n\t  \n"])
def test_empty_message_is_refused_and_changes_nothing(svc, content):
    s = svc.create()
    before = snapshot(svc)
    with pytest.raises(ChatError, match="empty"):
        svc.send(s.id, content)
    assert snapshot(svc) == before
    assert svc.get(s.id).title == ""
    svc.send(s.id, "now a real one", {"max_tokens": 2}).text()  # not left busy


@pytest.mark.parametrize(
    "params",
    [{"temperature": -1}, {"no_such_param": 1}, {"top_p": 2}, {"max_tokens": 0}],
)
def test_invalid_params_are_refused_and_change_nothing(svc, params):
    s = svc.create()
    svc.send(s.id, "hello", {"max_tokens": 2}).text()
    before = snapshot(svc)
    with pytest.raises(InvalidParams):
        svc.send(s.id, "hi", params)
    with pytest.raises(InvalidParams):
        svc.regenerate(s.id, params)
    with pytest.raises(InvalidParams):
        svc.update(s.id, params=params)
    with pytest.raises(InvalidParams):
        svc.edit(s.id, svc.get(s.id).path()[0].id, "edited", params)
    with pytest.raises(InvalidParams):
        svc.create(params=params)
    assert snapshot(svc) == before
    svc.send(s.id, "still works", {"max_tokens": 2}).text()


def test_unknown_param_error_names_it(svc):
    with pytest.raises(InvalidParams, match="no_such_param"):
        svc.create(params={"no_such_param": 1})


@pytest.mark.parametrize("bad", ["bad id!", "", "a" * 65, "../etc", "sp ace", "é", "a/b"])
def test_invalid_session_id_on_create_is_refused_and_changes_nothing(svc, bad):
    svc.create(session_id="ok-id_1")
    before = snapshot(svc)
    with pytest.raises(ChatError, match="session id"):
        svc.create(session_id=bad)
    assert snapshot(svc) == before


def test_session_params_persist_and_apply(svc):
    s = svc.create(system_prompt="Be brief.", params={"max_tokens": 3, "stop": "x"})
    got = svc.get(s.id)
    assert got.system_prompt == "Be brief."
    assert got.params.max_tokens == 3 and got.params.stop == ("x",)
    reply = svc.send(s.id, "Tell me a story.")
    reply.text()
    assert reply.usage["completion_tokens"] <= 3
    svc.update(s.id, system_prompt="", params={"max_tokens": 5})
    got = svc.get(s.id)
    assert got.system_prompt is None and got.params.max_tokens == 5
    assert got.params.stop == ("x",)


# -- export / import -----------------------------------------------------------------------------


def build_branchy_session(service: ChatService) -> str:
    s = service.create(
        title="Branchy", system_prompt="You tell stories.", params={"temperature": 0.7, "seed": 3}
    )
    service.send(s.id, "The cat sat.", {"max_tokens": 6}).text()
    service.regenerate(s.id, {"seed": 4, "max_tokens": 6}).text()
    service.send(s.id, "The dog ran.", {"max_tokens": 6}).text()
    first_user = service.get(s.id).path()[0]
    service.edit(s.id, first_user.id, "The bird sang.", {"max_tokens": 6}).text()
    service.switch(s.id, first_user.id)
    return s.id


def shape(d: dict) -> dict:
    """An export with message ids replaced by their position, to compare trees whose ids
    may have been renamed."""
    d = json.loads(json.dumps(d))
    index = {m["id"]: i for i, m in enumerate(d["messages"])}
    for m in d["messages"]:
        m["id"] = index[m["id"]]
        m["parent_id"] = index.get(m["parent_id"])
    d["active_id"] = index.get(d["active_id"])
    del d["id"]
    return d


def test_export_import_round_trip_is_exact(story_chat, svc, tmp_path):
    sid = build_branchy_session(svc)
    exported = svc.export(sid)
    sess = svc.get(sid)
    assert len(exported["messages"]) == 7
    assert any(sess.version(m["id"])[1] > 1 for m in exported["messages"])
    assert exported["params"]["temperature"] == 0.7 and exported["params"]["seed"] == 3
    as_file = json.loads(json.dumps(exported))

    other = make_service(story_chat, tmp_path / "other.db")
    imported = other.import_(as_file)
    assert imported.id == sid
    assert other.export(sid) == exported
    assert other.get(sid).to_dict() == sess.to_dict()
    # the imported session carries on where the original stopped
    other.send(sid, "And then?", {"max_tokens": 3}).text()
    assert len(other.get(sid).messages) == 9


def test_import_with_an_existing_id_gets_a_new_id(svc):
    sid = build_branchy_session(svc)
    exported = svc.export(sid)
    copy = svc.import_(json.loads(json.dumps(exported)))
    assert copy.id != sid
    assert svc.get(sid).to_dict() == exported  # the original is untouched
    copied = svc.export(copy.id)
    assert shape(copied) == shape(exported)
    assert {s["id"] for s in svc.list()} == {sid, copy.id}
    # both sessions live on independently
    svc.send(copy.id, "More?", {"max_tokens": 2}).text()
    assert svc.get(sid).to_dict() == exported
    svc.rollback(sid)
    assert len(svc.get(copy.id).messages) == 9


@pytest.mark.parametrize(
    "garbage",
    [
        "garbage",
        None,
        [],
        42,
        {},
        {"title": "no id"},
        {"id": "x", "messages": "nope"},
        {"id": "x", "messages": [{"id": "a"}]},
        {"id": "x", "messages": [{"id": "a", "role": "system", "content": "hi"}]},
        {"id": "x", "messages": [{"id": "a", "parent_id": "z", "role": "user", "content": "h"}]},
        {"id": "x", "active_id": "missing", "messages": []},
        {"id": "x", "params": {"no_such_param": 1}},
        {"id": "x", "params": {"temperature": "hot"}},
        {"id": "bad id!"},
    ],
    ids=lambda g: json.dumps(g)[:40],
)
def test_import_of_garbage_is_a_chat_error_and_changes_nothing(svc, garbage):
    svc.create(session_id="keep")
    before = snapshot(svc)
    with pytest.raises(ChatError):
        svc.import_(garbage)
    assert snapshot(svc) == before


CYCLE_SCRIPT = """
import json, resource, sys, types
from hexin.chat import ChatError, ChatService, SessionExists, open_store

stub = types.SimpleNamespace(tokenizer=None, context_limit=64)  # no model needed to import
service = ChatService(stub, open_store(sys.argv[1]))
# a tree walked forever must fail fast (MemoryError), not eat the machine
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
cases = {
    "two-cycle": [
        {"id": "a", "parent_id": "b", "role": "user", "content": "h"},
        {"id": "b", "parent_id": "a", "role": "assistant", "content": "h"},
    ],
    "self-parent": [{"id": "a", "parent_id": "a", "role": "user", "content": "h"}],
}
for name, messages in cases.items():
    try:
        service.import_({"id": "x", "messages": messages})
        result = "imported"
    except ChatError:
        result = "ChatError"
    except BaseException as e:
        result = type(e).__name__
    print(json.dumps([name, result, len(service.list())]), flush=True)
"""


def test_import_of_a_cyclic_message_tree_is_a_chat_error(tmp_path):
    """Parent links that loop are not a tree: refused, never walked forever. Run in a
    child process so that an endless walk fails this test instead of hanging the suite."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", CYCLE_SCRIPT, str(tmp_path / "c.db")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("importing a cyclic tree did not finish in 60 s")
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert results == [["two-cycle", "ChatError", 0], ["self-parent", "ChatError", 0]], out.stderr[
        -2000:
    ]


# -- persistence off the engine thread ---------------------------------------------------------


def test_a_stalled_store_does_not_pause_other_sessions_streams(story_model, tmp_path):
    """Replies are saved off the engine thread: while the database is locked for 2 s by
    another writer and one session's finished reply waits to be saved, another session's
    reply keeps streaming; the waiting reply is saved once the lock is gone."""
    model = Llama(story_model.config, story_model.weights)
    forward = model.forward

    def slowed(*args, **kw):  # ~50 steps/s, so a reply outlasts the stall
        time.sleep(0.02)
        return forward(*args, **kw)

    model.forward = slowed
    tok = story_model.tokenizer
    no_eos = Tokenizer(tok.inner, bos_token_id=tok.bos_token_id, eos_token_ids=(),
                       add_bos=tok.add_bos, chat_template=CHATML)  # fmt: skip
    db = tmp_path / "chat.db"
    service = make_service((model, no_eos), db, max_tokens=450)
    saving = threading.Event()
    add_message = service.store.add_message

    def watched_add(session_id, message, **kw):
        if message.role == "assistant":
            saving.set()
        return add_message(session_id, message, **kw)

    service.store.add_message = watched_add
    try:
        first, second = service.create(), service.create()
        stopped = service.send(first.id, "Once upon a time")
        streaming = service.send(second.id, "Once upon a time")
        stamps: list[float] = []
        started = threading.Event()

        def read() -> None:
            for _ in streaming:
                stamps.append(time.monotonic())
                started.set()

        reader = threading.Thread(target=read)
        reader.start()
        assert started.wait(30)
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # the store is stalled: no writer gets in
        try:
            stopped.stop()
            assert saving.wait(10), "the stopped reply was never handed to the store"
            t0 = time.monotonic()
            time.sleep(2.0)
            t1 = time.monotonic()
            assert not stopped.outcome.saved.is_set()  # still waiting for the lock
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        during = [t for t in stamps if t0 <= t < t1]
        assert len(during) >= 10, f"{len(during)} tokens streamed while the store was stalled"
        assert stopped.wait().status == "stopped"
        streaming.stop()
        reader.join(30)
        assert streaming.wait().status == "stopped"
        assert [m.role for m in service.get(first.id).path()] == ["user", "assistant"]
    finally:
        service.engine.shutdown()
        service.close()


def slowed_story_service(story_model, db, step_s: float = 0.02, **kw) -> ChatService:
    """A chat service on the story model whose steps take ``step_s`` longer and which
    never meets an EOS, so a reply streams for as long as a test needs."""
    model = Llama(story_model.config, story_model.weights)
    forward = model.forward

    def slowed(*args, **kwargs):
        time.sleep(step_s)
        return forward(*args, **kwargs)

    model.forward = slowed
    tok = story_model.tokenizer
    no_eos = Tokenizer(tok.inner, bos_token_id=tok.bos_token_id, eos_token_ids=(),
                       add_bos=tok.add_bos, chat_template=CHATML)  # fmt: skip
    return make_service((model, no_eos), db, **kw)


def test_rename_and_new_system_prompt_during_a_reply_survive_its_save(story_model, tmp_path):
    service = slowed_story_service(story_model, tmp_path / "chat.db", max_tokens=40)
    try:
        s = service.create(title="before")
        reply = service.send(s.id, "Once upon a time")
        next(iter(reply.handle))  # streaming
        service.update(s.id, title="renamed", system_prompt="Be brief.")
        message = reply.wait()
        after = service.get(s.id)
        assert (after.title, after.system_prompt) == ("renamed", "Be brief.")
        assert after.active_id == message.id  # and the reply took its place
        assert [m.role for m in after.path()] == ["user", "assistant"]
    finally:
        service.engine.shutdown()
        service.close()


@pytest.mark.parametrize(
    "params", [{"seed": 2**64}, {"temperature": -1}, {"max_tokens": 0}], ids=repr
)
def test_a_rejected_message_stores_nothing(svc, params):
    s = svc.create()
    before = snapshot(svc)
    with pytest.raises(InvalidParams):
        svc.send(s.id, "Once upon a time", params)
    assert snapshot(svc) == before
    assert svc.send(s.id, "Once upon a time").text()  # and the session is not left busy


def test_a_message_the_engine_refuses_stores_nothing(story_chat, tmp_path):
    """A full queue refuses the turn before its message is written."""
    model, tok = story_chat
    engine = Engine(model, tok, EngineConfig(max_waiting=1))  # not started: nothing leaves
    service = ChatService(engine, open_store(tmp_path / "chat.db"), default_params=SamplingParams())
    try:
        a, b = service.create(), service.create()
        service.send(a.id, "Once upon a time")  # fills the queue
        before = snapshot(service)
        with pytest.raises(EngineBusy):
            service.send(b.id, "Once upon a time")
        assert snapshot(service) == before
        assert service.get(b.id).title == ""
    finally:
        engine.shutdown()
        service.close()


def test_continue_goes_on_in_the_same_message_as_one_longer_reply(svc):
    """A reply cut at its token limit, continued, is the same message with the text a
    reply twice as long has (greedy), and no new version."""
    whole = svc.create()
    long = svc.send(whole.id, "Tell me a story.", {"max_tokens": 24}).wait()
    s = svc.create()
    cut = svc.send(s.id, "Tell me a story.", {"max_tokens": 12}).wait()
    assert cut.meta["stop_reason"] == "length" and cut.meta["completion_tokens"] == 12
    reply = svc.continue_(s.id, {"max_tokens": 12})
    assert reply.message_id == cut.id
    streamed = reply.text()
    more = reply.wait()
    assert more.id == cut.id and more.content == cut.content + streamed
    assert more.content == long.content
    assert more.meta["completion_tokens"] == 24 and more.meta["continued"] == 1
    # most of the prompt came from the cache: the reply so far was computed before
    assert more.meta["cached_tokens"] >= cut.meta["prompt_tokens"]
    stored = svc.get(s.id)
    assert len(stored.messages) == 2 and stored.version(cut.id) == (1, 1)
    assert stored.message(cut.id).content == more.content  # saved, not only returned
    with pytest.raises(ChatError, match="nothing to continue"):
        empty = svc.create()
        svc.continue_(empty.id)
