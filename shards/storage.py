"""Every path is an fsspec URL: plain paths, file://, s3:// (s3fs), http(s)://, gs://, ...

S3-compatible servers come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
or from storage options. `pipe:` URLs run shell commands, so they are refused unless the caller opts in.
"""
from __future__ import annotations

import posixpath
import time
from typing import Callable, TypeVar

import fsspec

from .errors import BadInput

T = TypeVar("T")
_KNOWN = {"file", "s3", "s3a", "gs", "gcs", "http", "https", "memory", "az", "abfs"}


def check_url(url: str, allow_pipe: bool = False) -> str:
    if not isinstance(url, str) or not url.strip():
        raise BadInput("URL is empty")
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise BadInput(f"{url}: pipe: URLs run shell commands; set data.allow_pipe=true to allow them")
        return url
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if scheme not in _KNOWN:
        raise BadInput(f"{url}: unsupported URL scheme {scheme!r}")
    if scheme in ("s3", "s3a", "gs", "gcs") and not url.split("://", 1)[1].strip("/"):
        raise BadInput(f"{url}: no bucket in URL")
    return url


def join(base: str, *names: str) -> str:
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *names)
    return posixpath.join(base, *names)


def filesystem(url: str, storage_options: dict | None = None):
    """(fs, path) for a URL; credentials problems surface on first use, see `describe_error`."""
    check_url(url)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs, path


def describe_error(url: str, err: BaseException) -> str:
    """A one-line description of a storage failure that names the URL and never a secret."""
    name = type(err).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return f"{url}: no credentials for object storage (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or data.storage_options)"
    if isinstance(err, FileNotFoundError):
        return f"{url}: not found"
    if isinstance(err, PermissionError):
        return f"{url}: permission denied"
    text = str(err).splitlines()[0] if str(err) else name
    return f"{url}: {name}: {text[:200]}"


_TRANSIENT = (OSError, TimeoutError, ConnectionError)


def with_retries(fn: Callable[[], T], url: str, retries: int, base_delay: float = 0.5) -> T:
    """Run `fn`, retrying transient storage errors with exponential backoff; missing files fail fast."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except _TRANSIENT:
            if attempt == retries:
                raise
            time.sleep(min(base_delay * 2**attempt, 10.0))
    raise AssertionError("unreachable")
