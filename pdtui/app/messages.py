"""App-level messages: dataclasses named NounVerbed."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message


@dataclass
class EventsFolded(Message):
    """The view model changed. High rate (every log line, every scrape): a newer one replaces an
    older one still in the queue, so the app takes one snapshot per batch, not one per event."""

    version: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsFolded)


@dataclass
class RequestSelected(Message):
    """The transfers table's cursor landed on a request (keys, mouse, following the newest), or
    enter was pressed on it."""

    request_id: str


@dataclass
class LoadFinished(Message):
    """A load-generator run ended."""

    name: str
    ok: int
    errors: int
    detail: str = ""
    """The prompt sizes sent, by the model's tokenizer ("prompts 3,000 tokens")."""
    error: str = ""
    """The first error's words (an HTTP status and body, an SSE error event)."""


@dataclass
class StreamEnded(Message):
    """The event stream ended (runtime closed, or the replay reached its end)."""

    replay: bool
