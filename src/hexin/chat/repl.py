"""``hexin chat``: the terminal front end of ChatService."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, TextIO

from hexin.chat.service import ChatService, Reply
from hexin.chat.tree import ChatError, Session
from hexin.errors import HexinError

HELP = """commands:
  /new                 start a new session
  /sessions [TEXT]     list sessions (or search them)
  /open ID             continue a session
  /undo                roll back the last message
  /regen               regenerate the last reply
  /versions [N]        list the versions of the last reply, or switch to version N
  /edit [N] TEXT       edit user message N (default: the last) into a new branch
  /system TEXT         set the system prompt ("/system" alone clears it)
  /set k=v ...         sampling: temperature top_k top_p max_tokens seed
  /export FILE         save the session as JSON
  /help, /quit
Ctrl-C stops a reply in progress; Ctrl-D or /quit leaves."""


def stream_reply(reply: Reply, out: TextIO = sys.stdout) -> None:
    """Print a reply as it streams; Ctrl-C stops the reply, not the program."""

    def on_sigint(signum: int, frame: Any) -> None:
        reply.stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        for text in reply:
            out.write(text)
            out.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    out.write("\n")


def usage_line(reply: Reply) -> str:
    u = reply.usage
    parts = [
        f"{u.get('completion_tokens', 0)} tokens",
        f"{u.get('tokens_per_s', 0):.1f} tok/s",
        f"TTFT {u.get('ttft_ms', 0):.0f} ms",
        f"cached {u.get('cached_tokens', 0)}/{u.get('prompt_tokens', 0)} prompt tokens",
    ]
    if u.get("dropped_turns"):
        parts.append(f"{u['dropped_turns']} old turns left out of the context window")
    if u.get("stop_reason") == "cancelled":
        parts.append("stopped")
    return "[" + ", ".join(parts) + "]"


def open_or_create(service: ChatService, session_id: str | None, system: str | None) -> Session:
    if session_id is not None and service.store.exists(session_id):
        return service.get(session_id)
    return service.create(session_id=session_id, system_prompt=system)


def run_once(
    service: ChatService,
    text: str,
    session_id: str | None,
    params: dict[str, Any],
    *,
    system: str | None = None,
) -> int:
    """Send one message, print the reply, exit. The session id goes to stderr so a script
    can continue the conversation with ``--session``."""
    session = open_or_create(service, session_id, system)
    stream_reply(service.send(session.id, text, params))
    print(f"[session {session.id}]", file=sys.stderr)
    return 0


def parse_settings(args: list[str]) -> dict[str, Any]:
    """``temperature=0.7 top_k=40`` -> typed values (JSON numbers, else strings)."""
    out: dict[str, Any] = {}
    for item in args:
        key, sep, value = item.partition("=")
        if not sep:
            raise ChatError(f"expected key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class Repl:
    def __init__(self, service: ChatService, session: Session, params: dict[str, Any]) -> None:
        self.service, self.session, self.params = service, session, params

    def reload(self) -> None:
        self.session = self.service.get(self.session.id)

    def show_path(self) -> None:
        path = self.session.path()
        for m, (i, n) in zip(path, self.session.versions(path), strict=True):
            pager = f" <{i}/{n}>" if n > 1 else ""
            print(f"{m.role}{pager}: {m.content}")

    def user_messages(self) -> list[str]:
        return [m.id for m in self.session.path() if m.role == "user"]

    def reply(self, reply: Reply) -> None:
        stream_reply(reply)
        print(usage_line(reply), file=sys.stderr)
        self.reload()

    def command(self, line: str) -> bool:
        """Run one slash command; False means quit."""
        name, _, rest = line[1:].partition(" ")
        args, svc, sid = rest.strip(), self.service, self.session.id
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            print(HELP)
        elif name == "new":
            self.session = svc.create(params=self.params)
            print(f"[new session {self.session.id}]")
        elif name == "sessions":
            for s in svc.list(args or None):
                print(f"{s['id']}  {s['title'] or '(untitled)'}  ({s['message_count']} messages)")
        elif name == "open":
            self.session = svc.get(args)
            print(f"[session {self.session.id}: {self.session.title}]")
            self.show_path()
        elif name == "undo":
            self.session = svc.rollback(sid)
            print("[removed the last message]")
        elif name == "regen":
            self.reply(svc.regenerate(sid, self.params))
        elif name == "versions":
            self.versions(args)
        elif name == "edit":
            self.edit(args)
        elif name == "system":
            self.session = svc.update(sid, system_prompt=args)
            print("[system prompt set]" if args else "[system prompt cleared]")
        elif name == "set":
            self.session = svc.update(sid, params=parse_settings(shlex.split(args)))
            print(f"[{self.session.params}]")
        elif name == "export":
            if not args:
                raise ChatError("usage: /export FILE")
            Path(args).write_text(json.dumps(svc.export(sid), indent=2, ensure_ascii=False))
            print(f"[saved {args}]")
        else:
            print(f"unknown command /{name}; /help lists them")
        return True

    def versions(self, args: str) -> None:
        path = self.session.path()
        last = next((m for m in reversed(path) if m.role == "assistant"), None)
        if last is None:
            raise ChatError("no reply yet")
        siblings = self.session.siblings(last.id)
        if args:
            if not args.isdigit() or not 1 <= int(args) <= len(siblings):
                raise ChatError(f"choose a version from 1 to {len(siblings)}")
            self.session = self.service.switch(self.session.id, siblings[int(args) - 1].id)
            self.show_path()
            return
        for i, m in enumerate(siblings, 1):
            mark = "*" if m.id == last.id else " "
            print(f"{mark} <{i}/{len(siblings)}> {m.content}")

    def edit(self, args: str) -> None:
        users = self.user_messages()
        if not users:
            raise ChatError("no user message to edit")
        first, _, rest = args.partition(" ")
        if first.isdigit() and rest:
            index, text = int(first), rest
        else:
            index, text = len(users), args
        if not 1 <= index <= len(users):
            raise ChatError(f"choose a user message from 1 to {len(users)}")
        self.reply(self.service.edit(self.session.id, users[index - 1], text, self.params))


def run_repl(
    service: ChatService,
    session_id: str | None,
    params: dict[str, Any],
    *,
    system: str | None = None,
) -> int:
    repl = Repl(service, open_or_create(service, session_id, system), params)
    print(f"hexin chat, session {repl.session.id}. /help for commands.", file=sys.stderr)
    repl.show_path()
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/quit or Ctrl-D to leave)")
            continue
        if not line.strip():
            continue
        try:
            if line.startswith("/"):
                if not repl.command(line.strip()):
                    return 0
            else:
                repl.reply(service.send(repl.session.id, line, params))
        except HexinError as e:
            print(f"error: {e}", file=sys.stderr)
