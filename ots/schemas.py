"""Request and response schemas; the same classes validate input and describe the API.

Validation messages are fixed strings: they never quote the input, because
the input is a secret or a passphrase.
"""

from __future__ import annotations

from typing import Any, Final

import precis_i18n
from marshmallow import INCLUDE, RAISE, Schema, ValidationError, fields, validates

from ots.crypto import Sensitive

MAX_PASSPHRASE_CHARS: Final = 1024
MIN_TTL_SECONDS: Final = 60
SECRET_KEY_PATTERN: Final = "^[A-Za-z0-9_-]{43}$"  # noqa: S105 - a regular expression
# The part of the passphrase rules that a JSON Schema pattern can state: no
# control characters (C0, DEL, C1) and at least one character that is not a
# space. NOTE: OpaqueString also rejects unassigned and default-ignorable code
# points (U+200B, U+FEFF), which the pattern does not describe.
_NOT_CONTROL: Final = r"[^\u0000-\u001F\u007F-\u009F]"
_NOT_CONTROL_OR_SPACE: Final = r"[^\s\u0000-\u001F\u007F-\u009F]"
PASSPHRASE_PATTERN: Final = f"^{_NOT_CONTROL}*{_NOT_CONTROL_OR_SPACE}{_NOT_CONTROL}*$"

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
        metadata={
            "type": "string",
            "minLength": 1,
            "description": (
                "Text to share, returned byte for byte. At most MAX_SECRET_BYTES bytes "
                "of UTF-8 (413 above that)."
            ),
        },
    )
    passphrase = PassphraseField(
        required=True,
        metadata={
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_PASSPHRASE_CHARS,
            "pattern": PASSPHRASE_PATTERN,
            "description": (
                "Needed to read the secret: 1 to 1024 characters after RFC 8265 "
                "OpaqueString preparation, not only spaces, no control characters."
            ),
        },
    )
    ttl = StrictInteger(
        metadata={
            "minimum": MIN_TTL_SECONDS,
            "description": "Lifetime in seconds; absent means SECRET_TTL_DEFAULT.",
        }
    )

    def __init__(self, *, ttl_max: int = 30 * 24 * 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ttl_max = ttl_max
        # The API description reads the ceiling from the field. The metadata
        # dict is shared with the class's field, so it is replaced, not changed.
        ttl = self.fields["ttl"]
        ttl.metadata = {**ttl.metadata, "maximum": ttl_max}

    @validates("ttl")
    def _check_ttl(self, value: int, **kwargs: Any) -> None:
        if not MIN_TTL_SECONDS <= value <= self.ttl_max:
            raise ValidationError(f"Must be between {MIN_TTL_SECONDS} and {self.ttl_max} seconds.")


class ReadRequest(_StrictSchema):
    """Body of `POST /secrets/{secret_key}`."""

    passphrase = PassphraseField(
        required=True,
        metadata={
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_PASSPHRASE_CHARS,
            "pattern": PASSPHRASE_PATTERN,
            "description": "The passphrase given when the secret was stored.",
        },
    )


class GenerateResponse(Schema):
    """Body of a `201 Created` from `POST /generate`."""

    secret_key = fields.String(
        required=True,
        metadata={
            "pattern": SECRET_KEY_PATTERN,
            "description": (
                "256 random bits in URL-safe base64: the key for POST /secrets/{secret_key}."
            ),
        },
    )
    expires_at = fields.String(
        required=True,
        metadata={
            "format": "date-time",
            "description": "RFC 3339 UTC time after which the secret is gone.",
        },
    )
    ttl = fields.Integer(
        required=True,
        metadata={"minimum": MIN_TTL_SECONDS, "description": "Lifetime in seconds."},
    )


class ReadResponse(Schema):
    """Body of a `200 OK` from `POST /secrets/{secret_key}`."""

    secret = fields.String(
        required=True, metadata={"description": "The secret, exactly as stored."}
    )


class ProblemResponse(Schema):
    """Body of every error: RFC 9457 problem details with this service's extensions."""

    class Meta:
        """RFC 9457 lets problem types add members, so clients must accept more."""

        unknown = INCLUDE

    type = fields.String(
        required=True,
        metadata={
            "format": "uri-reference",
            "description": "Stable URI of the problem type; clients match on it.",
        },
    )
    title = fields.String(
        required=True, metadata={"description": "Short summary of the problem type."}
    )
    status = fields.Integer(
        required=True,
        metadata={"minimum": 400, "maximum": 599, "description": "The HTTP status code."},
    )
    detail = fields.String(
        required=True,
        metadata={"description": "What went wrong with this request; never quotes the input."},
    )
    attempts_left = fields.Integer(
        metadata={
            "minimum": 0,
            "description": (
                "403 only: passphrases that may still be tried before the secret is gone."
            ),
        }
    )
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "422 only: messages per field name."},
    )


class ProblemTypeResponse(Schema):
    """Body of `GET /problems/{name}`: the description of one problem type."""

    type = fields.String(required=True, metadata={"format": "uri-reference"})
    title = fields.String(required=True)
    status = fields.Integer(required=True, metadata={"minimum": 400, "maximum": 599})
    description = fields.String(required=True)


class StatusResponse(Schema):
    """Body of `GET /healthz` and `GET /readyz`."""

    status = fields.String(required=True, metadata={"enum": ["ok", "ready", "unavailable"]})
