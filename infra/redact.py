"""Credentials never leave in what mimdex writes or prints.

Applied at the edges: every JSON document written (reports, manifests, commit markers,
LATEST), every error line the CLI prints, log records, reject details, and the image_uri
metadata copied into id maps. It removes the values of URL signing parameters (AWS SigV2
and SigV4, GCS, Azure SAS: a signed URL is a credential until it expires), AWS access key
ids, and the values of the credential variables of this process's environment.
"""
from __future__ import annotations

import logging
import os
import re

MASK = "REDACTED"
_SIGNING_PARAMS = ("X-Amz-Credential", "X-Amz-Signature", "X-Amz-Security-Token", "Signature", "AWSAccessKeyId",
                   "x-amz-security-token", "X-Goog-Credential", "X-Goog-Signature", "sig", "se", "skoid", "sktid")
_PARAM = re.compile(r"(?i)([?&](?:" + "|".join(re.escape(p) for p in _SIGNING_PARAMS) + r")=)[^&#\s\"']*")
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b")
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID",
                "GOOGLE_APPLICATION_CREDENTIALS_JSON", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")


def _secrets() -> list[str]:
    # values too short to be secrets ("testing" in local tests) would mask ordinary words
    return [v for v in (os.environ.get(k) for k in _SECRET_VARS) if v and len(v) >= 16]


def redact(text: str) -> str:
    if not text:
        return text
    text = _PARAM.sub(lambda m: m.group(1) + MASK, text)
    text = _KEY_ID.sub(MASK, text)
    for secret in _secrets():
        text = text.replace(secret, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Redacts log records before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        return True
