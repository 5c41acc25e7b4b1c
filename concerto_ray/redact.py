"""Credentials out of everything a run logs: configs become MLflow params and a config.yaml artifact, which anyone
with access to the tracking server can read.

`redact` returns a copy of a plain config tree (dicts, lists, scalars) in which
- a URL's password (``scheme://user:PASSWORD@host``) and secret query parameters (``?token=...``) are masked,
- AWS access key ids (``AKIA...``/``ASIA...``) are masked wherever they appear in a string,
- the value of every key whose name says it is a secret (``password``, ``secret``, ``token``, ``access_key``,
  ``api_key``, ``credentials``, ...) is masked whole.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Whole words at the end of a key name ("aws_secret_access_key", "authToken" read as "auth_token"); a bare "token"
# only with a word that makes it a credential, so that model fields such as `mask_token` or `passes` stay readable.
_SECRET_NAME = re.compile(
    r"(^|_)(password|passwd|pwd|secret|access_key|api_key|private_key|credentials?|"
    r"(auth|access|session|api|bearer|refresh|hf|github)_token)$|^token$",
    re.IGNORECASE,
)
# scheme://user:password@host -> the password (up to the last "@" before the host, as it may hold a "/", e.g. an AWS
# secret key in s3://KEY:SECRET@bucket); a URL without a password (user@host) keeps its user.
_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@]*:)(?P<secret>[^\s@]+)(?=@)")
_QUERY_SECRET = re.compile(r"(?P<head>[?&](?P<name>[^=&#\s]+)=)(?P<secret>[^&#\s]+)")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def redact(value: Any, key: str = "") -> Any:
    """`value` with credentials masked; `key` is the name it is stored under (a secret name masks it whole)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if key and value is not None and _is_secret_name(key):
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """`text` with URL passwords, secret query parameters and AWS access key ids masked."""
    text = _URL_PASSWORD.sub(lambda m: m["head"] + MASK, text)
    text = _QUERY_SECRET.sub(lambda m: m["head"] + MASK if _is_secret_name(m["name"]) else m[0], text)
    return _AWS_KEY_ID.sub(MASK, text)


def _is_secret_name(name: str) -> bool:
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).replace("-", "_")  # camelCase / kebab-case -> snake_case
    return bool(_SECRET_NAME.search(snake))
