"""Strict decoding of JSON request bodies.

`json.loads` alone accepts too much for an API that stores secrets: duplicate
member names (which one wins?), NaN and Infinity, and nesting deep enough to
exhaust the stack. This module rejects all of them with `BadRequest`.
"""

from __future__ import annotations

import json
from typing import Any, Final, NoReturn

from ots.errors import BadRequest

MAX_DEPTH: Final = 32


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode a UTF-8 JSON body whose top level is an object.

    CPU time grows with the body size: callers run large bodies in a thread.

    Raises:
        BadRequest: empty body, invalid UTF-8 or JSON, a duplicate member
            name, NaN or Infinity, nesting deeper than `MAX_DEPTH`, or a top
            level that is not an object. The detail never quotes the body.

    """
    if not body:
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("The request body is not valid UTF-8.") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except RecursionError:
        _too_deep()
    except json.JSONDecodeError as error:
        # The position is safe to show; the message text of JSONDecodeError
        # never includes the document itself.
        raise BadRequest(
            f"The request body is not valid JSON (at character {error.pos})."
        ) from None
    except ValueError:
        # json.loads raises a plain ValueError for an integer of more than
        # 4300 digits, the limit of Python's int conversion (CVE-2020-10735).
        raise BadRequest("The request body contains a number with too many digits.") from None
    if _depth(value) > MAX_DEPTH:
        _too_deep()
    if not isinstance(value, dict):
        raise BadRequest("The top level of the request body must be a JSON object.")
    return value


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise BadRequest("The request body has a duplicate member name.")
    return result


def _reject_constant(name: str) -> NoReturn:
    raise BadRequest("The request body contains NaN or Infinity, which JSON does not allow.")


def _too_deep() -> NoReturn:
    raise BadRequest(f"The request body is nested deeper than {MAX_DEPTH} levels.")


def _depth(value: Any) -> int:
    """Nesting depth of a decoded value, computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest
