"""Credentials never reach logs, params or artifacts (no Ray, no MLflow imported here)."""
from __future__ import annotations

import re
from typing import Any

# user:password@ in a URI's authority; greedy up to the last "@" before the path, so a
# password that itself holds "@" is hidden whole
SECRET = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/\s]*)@", re.I)
SECRET_QUERY = re.compile(r"(?i)((?:api[_-]?key|access[_-]?key|secret[_-]?key|secret|[a-z_]*token|password|passwd|"
                          r"aws_secret_access_key|aws_access_key_id|sig|signature|x-amz-signature|"
                          r"x-amz-credential|x-amz-security-token|auth|authorization)=)[^&\s]+")


def redact(text: Any) -> str:
    """Credentials never reach logs, params or artifacts: `s3://KEY:SECRET@b` -> `s3://***@b`."""
    text = SECRET.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    return SECRET_QUERY.sub(r"\1***", text)
