"""Request and response schemas; the same classes validate input and describe the API.

Validation messages are fixed strings: they never quote the input, because
the input is a secret or a passphrase.
"""

from __future__ import annotations

from typing import Any, Final

import precis_i18n
from marshmallow import RAISE, Schema, ValidationError, fields, validates

from ots.crypto import Sensitive

MAX_PASSPHRASE_CHARS: Final = 1024
MIN_TTL_SECONDS: Final = 60

_OPAQUE_STRING = precis_i18n.get_profile("OpaqueString")


def normalize_passphrase(text: str) -> str:
    """Prepare a passphrase as an RFC 8265 OpaqueString.

    Non-ASCII spaces become U+0020 and the result is NFC. The passphrase is
    never trimmed or case-folded.

    Raises:
        ValidationError: empty, over 1024 characters, only spaces, or
            containing control or other disallowed characters.

    """
    try:
        prepared: str = _OPAQUE_STRING.enforce(text)
    except UnicodeEncodeError as error:
        raise ValidationError(_precis_message(error.reason)) from None
    if len(prepared) > MAX_PASSPHRASE_CHARS:
        raise ValidationError(f"Must be at most {MAX_PASSPHRASE_CHARS} characters.")
    if not prepared.strip(" "):
        raise ValidationError("Must contain a character that is not a space.")
    return prepared


def _precis_message(reason: str) -> str:
    if reason.endswith("/empty"):
        return "Must not be empty."
    if reason.endswith("/controls"):
        return "Must not contain control characters."
    return "Contains characters that are not allowed in a passphrase (RFC 8265 OpaqueString)."


class PassphraseField(fields.Field[Sensitive[str]]):
    """A JSON string prepared as an RFC 8265 OpaqueString, wrapped so it cannot be logged."""

    default_error_messages = {"invalid": "Must be a string."}  # noqa: RUF012

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> Sensitive[str]:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        if not _is_encodable(value):
            raise ValidationError("Must be valid Unicode text.")
        return Sensitive(normalize_passphrase(value))


class SecretField(fields.Field[Sensitive[str]]):
    """The secret text, returned byte for byte; its size is checked by the handler."""

    default_error_messages = {"invalid": "Must be a string."}  # noqa: RUF012

    def _deserialize(
        self, value: Any, attr: str | None, data: Any, **kwargs: Any
    ) -> Sensitive[str]:
        if not isinstance(value, str):
            raise self.make_error("invalid")
        if not value:
            raise ValidationError("Must not be empty.")
        if not _is_encodable(value):
            raise ValidationError("Must be valid Unicode text.")
        return Sensitive(value)


class StrictInteger(fields.Integer):
    """A JSON integer; strings, floats and booleans are rejected."""

    default_error_messages = {"invalid": "Must be an integer."}  # noqa: RUF012

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        result: int = super()._deserialize(value, attr, data, **kwargs)
        return result


def _is_encodable(text: str) -> bool:
    """Return False for strings with lone surrogates, which have no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _StrictSchema(Schema):
    """Rejects unknown fields: a misspelt `ttl` must not silently keep a secret for a week."""

    class Meta:
        unknown = RAISE


class GenerateRequest(_StrictSchema):
    """Body of `POST /generate`; `ttl_max` is the configured TTL ceiling."""

    secret = SecretField(
        required=True,
        metadata={"description": "Text to share, 1 byte to the size limit of UTF-8."},
    )
    passphrase = PassphraseField(
        required=True,
        metadata={"description": "Needed to read the secret; 1 to 1024 characters."},
    )
    ttl = StrictInteger(
        metadata={
            "description": "Lifetime in seconds, at least 60; absent means the server default."
        }
    )

    def __init__(self, *, ttl_max: int = 30 * 24 * 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ttl_max = ttl_max

    @validates("ttl")
    def _check_ttl(self, value: int, **kwargs: Any) -> None:
        if not MIN_TTL_SECONDS <= value <= self.ttl_max:
            raise ValidationError(f"Must be between {MIN_TTL_SECONDS} and {self.ttl_max} seconds.")


class ReadRequest(_StrictSchema):
    """Body of `POST /secrets/{secret_key}`."""

    passphrase = PassphraseField(
        required=True, metadata={"description": "The passphrase given when the secret was stored."}
    )


class GenerateResponse(Schema):
    """Body of a `201 Created` from `POST /generate`."""

    secret_key = fields.String(
        required=True, metadata={"description": "Key for POST /secrets/{secret_key}."}
    )
    expires_at = fields.String(
        required=True,
        metadata={"description": "RFC 3339 UTC time after which the secret is gone."},
    )
    ttl = fields.Integer(required=True, metadata={"description": "Lifetime in seconds."})


class ReadResponse(Schema):
    """Body of a `200 OK` from `POST /secrets/{secret_key}`."""

    secret = fields.String(
        required=True, metadata={"description": "The secret, exactly as stored."}
    )
