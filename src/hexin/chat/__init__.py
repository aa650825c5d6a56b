"""Conversations: sessions with message trees, the context window, persistence."""

from hexin.chat.service import ChatService, Reply
from hexin.chat.store import Store, open_store
from hexin.chat.tree import ChatError, Message, Session, SessionBusy, SessionExists, SessionNotFound

__all__ = [
    "ChatError",
    "ChatService",
    "Message",
    "Reply",
    "Session",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "Store",
    "open_store",
]
