"""Quoting of command words, shared by the CLI (which writes commands) and the dispatcher
(which splits them as ``shlex.split`` does, in linear time: ``page_service.split_words``)."""

from __future__ import annotations

import shlex


def command_text(*words: str) -> str:
    """A command line for the pageserver, each word quoted so it cannot split or inject."""
    return " ".join(shlex.quote(w) for w in words)
