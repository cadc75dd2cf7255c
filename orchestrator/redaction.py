"""Credentials never reach logs, params or artifacts (no Ray, no MLflow imported here)."""
from __future__ import annotations

import re
from typing import Any

SECRET = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/@\s]+)@", re.I)
SECRET_QUERY = re.compile(r"(?i)((?:access_key|secret_key|secret|token|password|aws_secret_access_key|"
                          r"aws_access_key_id|sig|signature)=)[^&\s]+")


def redact(text: Any) -> str:
    """Credentials never reach logs, params or artifacts: `s3://KEY:SECRET@b` -> `s3://***@b`."""
    text = SECRET.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    return SECRET_QUERY.sub(r"\1***", text)
