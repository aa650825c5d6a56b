"""ChatService: the operations on sessions that the terminal, the server and the web UI share.

It owns text and ids (through the store) and asks the serving engine for replies, with the
session id as the cache key: the engine keeps each session's KV blocks between turns
(while memory allows), so a turn prefills only what is not already cached. After a
rollback, regenerate, edit or branch switch, the longest common prefix with the new
prompt is reused instead of being recomputed.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from hexin import tools
from hexin.chat.store import Store
from hexin.chat.tree import (
    ChatError,
    Message,
    Session,
    SessionBusy,
    SessionNotFound,
    check_id,
    check_tools,
    new_id,
    now,
)
from hexin.chat.window import Prompt, build_prompt
from hexin.chat.writer import Writer
from hexin.engine import Engine, RequestHandle
from hexin.sampling import InvalidParams, SamplingParams

MAX_TITLE = 60
PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def merge_params(base: SamplingParams, changes: dict[str, Any] | None) -> SamplingParams:
    """``base`` with ``changes`` applied; unknown names and bad values are refused."""
    if not changes:
        return base
    unknown = set(changes) - PARAM_NAMES
    if unknown:
        raise InvalidParams(
            f"unknown parameter {sorted(unknown)[0]!r}; known: {', '.join(sorted(PARAM_NAMES))}"
        )
    changes = dict(changes)
    if "stop" in changes:
        stop = changes["stop"]
        changes["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return base.with_(**changes)


@dataclass(eq=False)
class Outcome:
    """A reply's request and what became of it once it ended: the saved message, or why
    it could not be saved. Filled in by the service's writer thread; ``saved`` is set
    when it is final. (``handle`` is None only while the request is being queued.)"""

    handle: RequestHandle | None = None
    #: the id the reply is saved under (its calls' ids derive from it: ``tools.CallIds``)
    message_id: str = field(default_factory=new_id)
    saved: threading.Event = field(default_factory=threading.Event)
    message: Message | None = None
    error: BaseException | None = None


class Reply:
    """A reply being generated: iterate for text deltas, ``stop()`` to interrupt it.

    The engine generates whether or not anyone reads; when the reply ends (complete,
    stopped, or abandoned by a consumer that went away) the assistant message is saved,
    off the engine thread, before ``wait()`` returns.
    """

    def __init__(
        self,
        outcome: Outcome,
        handle: RequestHandle,
        user_message: Message,
        dropped_turns: int,
        calls_tools: bool = False,
    ) -> None:
        """``user_message``: the message replied to (a user message, or the last of the
        tool results being answered)."""
        self.outcome, self.handle, self.user_message = outcome, handle, user_message
        self.dropped_turns = dropped_turns
        #: the model was told of tools: its text may hold calls (``tools.CallStream``)
        self.calls_tools = calls_tools
        self._text: str | None = None

    @property
    def message_id(self) -> str:
        """The id the reply is saved under, known from its start."""
        return self.outcome.message_id

    @property
    def message(self) -> Message | None:
        """The saved reply, once finished."""
        return self.outcome.message

    def stop(self) -> None:
        """Ask the reply to end after the current token; safe from any thread."""
        self.handle.cancel()

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.handle  # leaving the loop early stops the reply
        finally:
            self.outcome.saved.wait()  # saved (complete or stopped) before control returns

    async def stream(self) -> AsyncIterator[str]:
        async for text in self.handle.stream():
            yield text

    def wait(self) -> Message:
        """Block until the reply is saved; return it."""
        self.outcome.saved.wait()
        if self.outcome.message is None:
            error = self.outcome.error or self.handle.error
            raise ChatError(f"the reply could not be saved: {error}")
        return self.outcome.message

    def text(self) -> str:
        """Run to the end and return the whole reply (again on a later call: the stream
        is read once)."""
        if self._text is None:
            self._text = "".join(self)
        return self._text

    @property
    def usage(self) -> dict[str, Any]:
        return dict(self.message.meta) if self.message else {}

    def __del__(self) -> None:
        self.handle.cancel()  # nobody can read this reply any more


class ChatService:
    def __init__(
        self,
        engine: Engine,
        store: Store,
        *,
        model_name: str = "",
        default_params: SamplingParams | None = None,
    ) -> None:
        self.engine, self.store = engine, store
        self.tokenizer = engine.tokenizer
        self.context_limit = engine.context_limit
        self.model_name = model_name
        self.default_params = default_params or SamplingParams()
        #: session id -> its reply in flight (None while the request is being set up);
        #: a session stays busy until its reply is saved
        self._active: dict[str, Outcome | None] = {}
        self._lock = threading.Lock()
        self._writer = Writer()

    def close(self) -> None:
        """Save every reply that has ended (call after the engine has shut down)."""
        self._writer.close()

    # -- sessions -----------------------------------------------------------------------
    def create(
        self,
        *,
        title: str = "",
        system_prompt: str | None = None,
        params: dict[str, Any] | None = None,
        session_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Session:
        """A new session; ``tools``: the functions its model may call (OpenAI's form)."""
        session = Session(
            id=check_id(session_id) if session_id is not None else new_id(),
            title=title.strip(),
            model=self.model_name,
            system_prompt=system_prompt or None,
            params=merge_params(self.default_params, params),
            tools=check_tools(tools or []),
        )
        self.store.create_session(session)
        return session

    def get(self, session_id: str) -> Session:
        return self.store.load(session_id)

    def list(self, query: str | None = None) -> list[dict[str, Any]]:
        return self.store.list_sessions(query)

    def update(
        self,
        session_id: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        params: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> Session:
        """Rename, change the system prompt (``""`` clears it), the sampling defaults or
        the tools (``[]`` clears them)."""
        session = self.get(session_id)
        changes: dict[str, Any] = {}
        if tools is not None:
            changes["tools"] = session.tools = check_tools(tools)
        if title is not None:
            changes["title"] = session.title = title.strip()
        if system_prompt is not None:
            changes["system_prompt"] = session.system_prompt = system_prompt or None
        if params:
            changes["params"] = session.params = merge_params(session.params, params)
        changes["updated_at"] = session.updated_at = now()
        # only what changed: a reply being saved meanwhile keeps its place in the tree
        self.store.update_session(session_id, **changes)
        return session

    def rename(self, session_id: str, title: str) -> Session:
        return self.update(session_id, title=title)

    def delete(self, session_id: str) -> None:
        with self._holding(session_id):
            if not self.store.delete_session(session_id):
                raise SessionNotFound(f"unknown session {session_id!r}")

    # -- turns --------------------------------------------------------------------------
    def send(self, session_id: str, content: str, params: dict[str, Any] | None = None) -> Reply:
        """Add a user message after the active one and start the reply to it."""
        with self._turn(session_id) as session:
            return self._ask(session, [self._user(session.active_id, content)], params)

    def edit(
        self, session_id: str, message_id: str, content: str, params: dict[str, Any] | None = None
    ) -> Reply:
        """A new version of an earlier user message: a branch from its parent, answered;
        the old branch stays reachable through ``switch``."""
        with self._turn(session_id) as session:
            old = session.message(message_id)
            if old.role != "user":
                raise ChatError("only user messages can be edited; regenerate a reply instead")
            return self._ask(session, [self._user(old.parent_id, content)], params)

    def regenerate(self, session_id: str, params: dict[str, Any] | None = None) -> Reply:
        """A new version of the last reply (or a first reply to a trailing user message
        or tool result)."""
        with self._turn(session_id) as session:
            if session.active_id is None:
                raise ChatError("nothing to regenerate: the conversation is empty")
            last = session.message(session.active_id)
            asked = session.message(last.parent_id) if last.role == "assistant" else last
            if asked.role == "assistant":
                raise ChatError("nothing to regenerate")
            return self._reply(session, asked, self._params(session, params))

    def tool_results(
        self,
        session_id: str,
        results: list[dict[str, Any]],
        params: dict[str, Any] | None = None,
    ) -> Reply:
        """Answer the active reply's tool calls: ``results`` holds one
        ``{"tool_call_id", "content"}`` per call. They are stored as tool messages after
        the reply, and the model replies to them."""
        with self._turn(session_id) as session:
            last = session.message(session.active_id) if session.active_id else None
            calls = (last.meta.get("tool_calls") or []) if last and last.role == "assistant" else []
            if not calls:
                raise ChatError("no tool calls to answer: the last message is no reply with calls")
            ids = [c["id"] for c in calls]
            if not isinstance(results, list) or not all(
                isinstance(r, dict)
                and isinstance(r.get("tool_call_id"), str)
                and isinstance(r.get("content"), str)
                for r in results
            ):
                raise ChatError('results: a list of {"tool_call_id", "content"} strings')
            if sorted(r["tool_call_id"] for r in results) != sorted(ids):
                raise ChatError(f"results: answer each call exactly once: {', '.join(ids)}")
            name = {c["id"]: c["function"]["name"] for c in calls}
            added, parent = [], last
            for r in sorted(results, key=lambda r: ids.index(r["tool_call_id"])):
                meta = {"tool_call_id": r["tool_call_id"], "name": name[r["tool_call_id"]]}
                message = Message(new_id(), parent.id, "tool", r["content"], meta=meta)
                added.append(message)
                parent = message
            return self._ask(session, added, params)

    def continue_(self, session_id: str, params: dict[str, Any] | None = None) -> Reply:
        """Go on with the last reply (one cut at its token limit, or stopped): the model
        continues its text, which is added to the same message (no new version)."""
        with self._turn(session_id) as session:
            last = session.message(session.active_id) if session.active_id else None
            if last is None or last.role != "assistant" or last.meta.get("tool_calls"):
                raise ChatError("nothing to continue: the last message is no reply")
            asked = session.message(last.parent_id or "")
            return self._reply(session, asked, self._params(session, params), continuing=last)

    def rollback(self, session_id: str) -> Session:
        """Remove the last message of the active path with everything below it: the
        last reply, or, called again, the user message before it. Its other versions
        stay: the path then continues down the newest of them (so a rolled-back
        regeneration shows the version before it), else it ends at the parent."""
        with self._holding(session_id):
            session = self.get(session_id)
            if session.active_id is None:
                raise ChatError("nothing to roll back: the conversation is empty")
            last = session.message(session.active_id)
            removed = session.subtree(last.id)
            others = [m for m in session.siblings(last.id) if m.id != last.id]
            for mid in removed:
                del session.messages[mid]
            session.active_id = session.latest_leaf(others[-1].id) if others else last.parent_id
            session.updated_at = now()
            self.store.delete_messages(session_id, removed, active_id=session.active_id)
            return session

    def switch(self, session_id: str, message_id: str) -> Session:
        """Make a message (a version, a branch) part of the active path; the path
        continues down its newest replies."""
        with self._holding(session_id):
            session = self.get(session_id)
            session.active_id = session.latest_leaf(session.message(message_id).id)
            session.updated_at = now()
            self.store.update_session(
                session_id, active_id=session.active_id, updated_at=session.updated_at
            )
            return session

    def switch_version(self, session_id: str, message_id: str, step: int) -> Session:
        """Move ``step`` versions (e.g. -1, +1) from a message among its siblings."""
        session = self.get(session_id)
        siblings = session.siblings(message_id)
        i = [m.id for m in siblings].index(message_id) + step
        if not 0 <= i < len(siblings):
            raise ChatError(f"no version {i + 1} of {len(siblings)}")
        return self.switch(session_id, siblings[i].id)

    # -- export / import ----------------------------------------------------------------
    def export(self, session_id: str) -> dict[str, Any]:
        return self.get(session_id).to_dict()

    def import_(self, data: dict[str, Any], *, keep_id: bool = True) -> Session:
        """Add a session from its export. The whole export is checked before anything is
        written (``Session.from_dict``: any fault is a ChatError and changes nothing); it
        is written in one transaction. An id already in use (or ``keep_id`` False) makes a
        copy with a new id; message ids used elsewhere in the store get fresh ones."""
        session = Session.from_dict(data)
        self.store.import_session(session, keep_id=keep_id)
        return session

    # -- internals ----------------------------------------------------------------------
    def _claim(self, session_id: str) -> None:
        """Mark a session busy, before anything is read for or saved by the change: here
        (one reply or change per session in this process) and in the store (one across
        every process that shares it: a replica elsewhere may hold it)."""
        outcome = self._active.get(session_id)
        if outcome is not None and outcome.handle is not None and outcome.handle.cancelled:
            outcome.saved.wait(10)  # a stopped reply is saved within a step
        with self._lock:
            if session_id in self._active:
                raise SessionBusy(f"session {session_id!r} is busy with a reply; stop it first")
            self._active[session_id] = None
        try:
            held = self.store.try_lock(session_id)
        except BaseException:
            self._active.pop(session_id, None)
            raise
        if not held:
            self._active.pop(session_id, None)
            raise SessionBusy(
                f"session {session_id!r} is busy with a reply on another replica; stop it first"
            )

    def _release(self, session_id: str) -> None:
        """Free a session ``_claim`` took (its reply saved, or no reply started)."""
        try:
            self.store.unlock(session_id)
        finally:
            self._active.pop(session_id, None)

    @contextmanager
    def _holding(self, session_id: str) -> Iterator[None]:
        """The session claimed for a change that starts no reply (rollback, switch, delete)."""
        self._claim(session_id)
        try:
            yield
        finally:
            self._release(session_id)

    @contextmanager
    def _turn(self, session_id: str) -> Iterator[Session]:
        """The session claimed and loaded as stored now, for a new reply. The block either
        starts the reply, which then holds the claim until it is saved, or raises, and the
        claim is given back."""
        self._claim(session_id)
        try:
            yield self.get(session_id)
        except BaseException:
            self._release(session_id)
            raise

    @staticmethod
    def _params(session: Session, changes: dict[str, Any] | None) -> SamplingParams:
        """The session's sampling parameters with one turn's ``changes``; among them
        ``tool_choice``: "auto" (the default), "required" or a function's name, the
        last two holding the reply to one call of the session's tools."""
        changes = dict(changes or {})
        choice = changes.pop("tool_choice", "auto")
        if choice != "auto":
            names = [t["function"]["name"] for t in session.tools]
            if choice != "required" and choice not in names:
                known = ", ".join(names) or "none"
                raise InvalidParams(
                    f"tool_choice: 'auto', 'required' or a tool's name (tools: {known})"
                )
            name = None if choice == "required" else choice
            changes["grammar"] = ("grammar", tools.call_grammar(session.tools, name))
        return merge_params(session.params, changes)

    @staticmethod
    def _user(parent_id: str | None, content: str) -> Message:
        if not content.strip():
            raise ChatError("empty message")
        return Message(id=new_id(), parent_id=parent_id, role="user", content=content)

    def _prompt(
        self,
        session: Session,
        path: list[Message],
        params: SamplingParams,
        reply_so_far: str = "",
    ) -> Prompt:
        """The prompt for a reply to the last of ``path`` (the conversation up to it):
        the context window over it."""
        return build_prompt(
            self.tokenizer,
            session.system_prompt,
            path,
            tools=session.tools,
            max_tokens=params.max_tokens,
            limit=self.context_limit,
            reply_so_far=reply_so_far,
        )

    def _ask(self, session: Session, added: list[Message], params: dict[str, Any] | None) -> Reply:
        """Store ``added`` (a user message, or tool results: each the child of the one
        before) and start the reply to the last of them."""
        merged = self._params(session, params)
        first, last = added[0], added[-1]
        before = session.path(first.parent_id) if first.parent_id else []
        # the window is checked before anything is saved: an oversize message changes nothing
        prompt = self._prompt(session, before + added, merged)
        # everything the engine could refuse is refused before anything is stored
        self.engine.check(prompt.ids)
        title = None
        if not session.title and first.role == "user":
            title = first.content.strip().splitlines()[0][:MAX_TITLE]
        self.store.add_message(session.id, *added, title=title)
        for m in added:
            session.messages[m.id] = m
        session.active_id, session.updated_at = last.id, last.created_at
        session.title = session.title or title or ""
        try:
            return self._submit(session, last, merged, prompt)
        except BaseException:  # refused after all (e.g. the queue filled meanwhile)
            ids = [m.id for m in added]
            self.store.delete_messages(session.id, ids, active_id=first.parent_id)
            raise

    def _reply(
        self,
        session: Session,
        asked: Message,
        params: SamplingParams,
        continuing: Message | None = None,
    ) -> Reply:
        so_far = continuing.content if continuing is not None else ""
        prompt = self._prompt(session, session.path(asked.id), params, so_far)
        return self._submit(session, asked, params, prompt, continuing)

    def _submit(
        self,
        session: Session,
        user: Message,
        params: SamplingParams,
        prompt: Prompt,
        continuing: Message | None = None,
    ) -> Reply:
        dropped = prompt.dropped_turns
        outcome = Outcome()
        if continuing is not None:
            outcome.message_id = continuing.id
        self._active[session.id] = outcome  # before the request can end

        def ended(handle: RequestHandle) -> None:  # engine thread: hand over, never wait
            self._writer.submit(
                lambda: self._finish(handle, outcome, session, user, dropped, continuing)
            )

        outcome.handle = self.engine.submit(
            prompt.ids,
            params.with_(max_tokens=prompt.reply_budget),
            cache_key=session.id,
            cache_tail=True,
            on_close=ended,
        )
        session.active_id = user.id
        return Reply(outcome, outcome.handle, user, dropped, bool(session.tools))

    def _finish(
        self,
        handle: RequestHandle,
        outcome: Outcome,
        session: Session,
        user: Message,
        dropped_turns: int,
        continuing: Message | None = None,
    ) -> None:
        """Save the reply (complete or stopped; a continued one with its new text added),
        release the session, then tell the waiters. Runs on the writer thread."""
        c = handle.completion
        stopped = c.stop_reason in ("", "cancelled")
        key = outcome.message_id
        content, calls = tools.parse(c.text, ids_key=key) if session.tools else (c.text, [])
        message = Message(
            id=outcome.message_id,
            parent_id=user.id,
            role="assistant",
            content=content,
            status="stopped" if stopped else "complete",
            meta={
                "prompt_tokens": c.prompt_tokens,
                "cached_tokens": c.cached_tokens,
                "completion_tokens": c.completion_tokens,
                "stop_reason": c.stop_reason or "cancelled",
                "dropped_turns": dropped_turns,
                "ttft_ms": round(c.ttft_s * 1000, 2),
                "tokens_per_s": round(c.decode_tokens_per_s, 2),
            },
        )
        if calls:
            message.meta["tool_calls"] = [call.to_openai() for call in calls]
        if continuing is not None:  # the same message, its text and counts extended
            message.content = continuing.content + message.content
            message.created_at = continuing.created_at
            done = continuing.meta.get("completion_tokens", 0)
            message.meta["completion_tokens"] += done
            message.meta["continued"] = continuing.meta.get("continued", 0) + 1
        session.messages[message.id] = message
        session.active_id = message.id
        session.updated_at = message.created_at
        try:
            if continuing is not None:
                self.store.update_message(session.id, message)
            else:
                self.store.add_message(session.id, message)
            outcome.message = message
        except Exception as e:
            outcome.error = e
        finally:
            self._release(session.id)
            outcome.saved.set()
