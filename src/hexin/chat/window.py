"""The sliding context window: which turns of a conversation go into the prompt.

When the system prompt, the history, the new message and the reply budget together exceed
the context limit, whole turns (a user message with its reply) are dropped oldest first,
never the system prompt and never the new message, so the chat keeps going instead of
failing. The prompt is always the model's own chat template rendered over what is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hexin import tools as hexin_tools
from hexin.chat.tree import Message
from hexin.output import ContextOverflow
from hexin.tokenizer import Tokenizer


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    dropped_turns: int
    #: tokens left for the reply: max_tokens, or less when the message nearly fills the window
    reply_budget: int


def turns_of(history: Sequence[Message]) -> list[list[Message]]:
    """Group a path into turns: each user message with the replies (and tool results)
    that follow it."""
    turns: list[list[Message]] = []
    for m in history:
        if m.role == "user" or not turns:
            turns.append([m])
        else:
            turns[-1].append(m)
    return turns


def build_prompt(
    tokenizer: Tokenizer,
    system_prompt: str | None,
    messages: Sequence[Message],
    *,
    tools: Sequence[dict[str, Any]] = (),
    max_tokens: int,
    limit: int,
    reply_so_far: str = "",
) -> Prompt:
    """Token ids of the templated conversation that fits ``limit`` with room to reply.
    ``messages`` is the path up to the message being answered; its last turn (the new
    user message, or the turn whose tool results are being answered) is always kept.
    ``reply_so_far``: the start of the reply, written after the template's generation
    prompt, for the model to continue."""
    turns = turns_of(messages)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for dropped in range(len(turns)):
        kept = [m.chat_entry() for t in turns[dropped:] for m in t]
        text = hexin_tools.prompt(tokenizer, head + kept, tools) + reply_so_far
        ids = tokenizer.encode_chat(text)
        if len(ids) + max_tokens <= limit:
            return Prompt(ids, dropped, max_tokens)
    if len(ids) < limit:  # the last turn alone fits; shorten the reply rather than refuse
        return Prompt(ids, len(turns) - 1, limit - len(ids))
    raise ContextOverflow(
        f"message too long: with the system prompt it takes {len(ids)} tokens, "
        f"and the context limit is {limit} tokens"
    )
