"""Credentials never reach logs, params or artifacts (no Ray, no MLflow imported here)."""
from __future__ import annotations

import re
from typing import Any

# user:password@ in a URI's authority; greedy up to the last "@" before the path, so a
# password that itself holds "@" is hidden whole
SECRET = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<cred>[^/\s]*)@", re.I)
SECRET_QUERY = re.compile(r"(?i)((?:api[_-]?key|access[_-]?key|secret[_-]?key|secret|[a-z_]*token|password|passwd|pwd|key|"
                          r"aws_secret_access_key|aws_access_key_id|sig|signature|x-amz-signature|"
                          r"x-amz-credential|x-amz-security-token|auth|authorization)=)[^&\s]+")


# user:password@host without a scheme (a host list, an scp-like address): `***@host`
SECRET_BARE = re.compile(r"(?<![\w/:@*])[\w.%+-]+:[^@\s/:]+@(?=[\w.-])")
SECRET_BEARER = re.compile(r"(?i)\b(bearer\s+)[\w\-.~+/]+=*")


def redact(text: Any) -> str:
    """Credentials never reach logs, params or artifacts: `s3://KEY:SECRET@b` -> `s3://***@b`,
    `key=...`, `pwd=...`, `alice:pw@host`, `Bearer ...` likewise."""
    text = SECRET.sub(lambda m: f"{m.group('scheme')}***@", str(text))
    text = SECRET_BARE.sub("***@", text)
    text = SECRET_BEARER.sub(r"\1***", text)
    return SECRET_QUERY.sub(r"\1***", text)
