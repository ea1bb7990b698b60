"""Message ids of the route and ticket stages as their senders wrote them.

The address parser (``stagetx.address``) splits ``stage:id=reply`` at the first ``=``: the
receiver sees ``id`` and a reply address ending in ``reply``. The route and ticket grammars use
``=`` inside their ids (``route:sub=return_cb!fail_cb``, ``ticket:cat=cb?fb``), so both stages
put the split part back before parsing. ``brief`` bounds what the two stages log and remember of
an id.
"""

from __future__ import annotations

from stagetx.address import AddressError, ReplyTo, parse_target


def as_written(msgid: str, reply: str | None) -> str:
    """``msgid`` with ``=`` and the reply address's message id appended, when there is one."""
    if reply is None:
        return msgid
    try:
        address = parse_target(reply)
    except AddressError:
        return msgid
    return f"{msgid}={address.msgid}" if isinstance(address, ReplyTo) else msgid


#: Characters of an id (or a problem quoting one) kept in a log line and in a "logged once" set:
#: an id may be as long as a frame allows, and such a set holds up to 10,000 of them.
BRIEF_CHARS = 200


def brief(text: str) -> str:
    """``text`` cut to ``BRIEF_CHARS``, saying how long it was, for logs and "logged once" sets."""
    if len(text) <= BRIEF_CHARS:
        return text
    return f"{text[:BRIEF_CHARS]}... ({len(text)} characters)"
