"""How a tool tells the model it made a mistake: a reply, never an exception, so the rollout goes on."""

ERROR_PREFIX = "Error:"
"""How a tool reply that reports a mistake begins; counted as an error (as TRL's own `{'error': ...}` replies are)."""


def error_reply(message: str) -> str:
    """`message` as a one-line error reply."""
    return f"{ERROR_PREFIX} {' '.join(message.split())}"
