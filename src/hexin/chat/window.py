"""The sliding context window: which turns of a conversation go into the prompt.

When the system prompt, the history, the new message and the reply budget together exceed
the context limit, whole turns (a user message with its reply) are dropped oldest first,
never the system prompt and never the new message, so the chat keeps going instead of
failing. The prompt is always the model's own chat template rendered over what is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
    """Group a path into turns: each user message with the replies that follow it."""
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
    history: Sequence[Message],
    new_message: str,
    *,
    max_tokens: int,
    limit: int,
) -> Prompt:
    """Token ids of the templated conversation that fits ``limit`` with room to reply."""
    turns = turns_of(history)
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    tail = [{"role": "user", "content": new_message}]
    for dropped in range(len(turns) + 1):
        kept = [{"role": m.role, "content": m.content} for t in turns[dropped:] for m in t]
        ids = tokenizer.encode(tokenizer.apply_chat_template(head + kept + tail))
        if len(ids) + max_tokens <= limit:
            return Prompt(ids, dropped, max_tokens)
    if len(ids) < limit:  # the message alone fits; shorten the reply rather than refuse
        return Prompt(ids, len(turns), limit - len(ids))
    raise ContextOverflow(
        f"message too long: with the system prompt it takes {len(ids)} tokens, "
        f"and the context limit is {limit} tokens"
    )
