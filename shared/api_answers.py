"""What every HTTP API operation answers, free of Azure types: a status and a JSON body; an error says what is wrong
in `error`, with any extra fields the caller needs (a run id, an etag, the problems found)."""

from __future__ import annotations

Answer = tuple[int, dict]


def error(status: int, message: str, **extra) -> Answer:
    return status, {"error": message, **extra}
