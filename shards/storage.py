"""Every path is an fsspec URL: plain paths, file://, s3:// (s3fs), http(s)://, gs://, ...

S3-compatible servers come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)
or from storage options. `pipe:` URLs run shell commands, so they are refused unless the caller opts in.
"""
from __future__ import annotations

import dataclasses
import logging
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

import fsspec

from .errors import BadInput, StorageFailure

T = TypeVar("T")
log = logging.getLogger("guidedmix.storage")
_KNOWN = {"file", "s3", "s3a", "gs", "gcs", "http", "https", "memory", "az", "abfs"}


def check_url(url: str, allow_pipe: bool = False) -> str:
    if not isinstance(url, str) or not url.strip():
        raise BadInput("URL is empty")
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise BadInput(f"{url}: pipe: URLs run shell commands; set data.allow_pipe=true to allow them")
        return url
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if "@" in urlsplit(url).netloc:  # user:password@host; the message must not repeat it
        raise BadInput(f"{scheme}:// URL with credentials in it: URLs are logged and shown by Ray's dashboard; "
                       "give credentials through the environment or a credentials file")
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


def local_path(url: str) -> str | None:
    """The local path of a plain path or file:// URL; None for anything else (an object store, memory://)."""
    if "://" not in url:
        return url
    return url.removeprefix("file://") if url.startswith("file://") else None


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


def _transient_errors() -> tuple:
    """Errors worth retrying: the OS's, and the connection errors of the HTTP clients fsspec's object stores
    use (botocore's do not derive from OSError: s3fs raises them raw once its own retries are spent)."""
    errors: list = [OSError, TimeoutError, ConnectionError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError

        errors += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        errors.append(ClientError)
    except ImportError:
        pass
    return tuple(errors)


_TRANSIENT = _transient_errors()


def with_retries(fn: Callable[[], T], url: str, retries: int, base_delay: float = 0.5) -> T:
    """Run `fn`, retrying transient storage errors with exponential backoff (0.5 s doubling, at most 10 s
    apart). Missing files and refused permissions fail at once, as themselves; a store still failing after
    `retries` retries raises StorageFailure naming the URL."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except _TRANSIENT as e:
            if attempt == retries:
                raise StorageFailure(f"{describe_error(url, e)} (gave up after {retries} retries)") from e
            delay = min(base_delay * 2**attempt, 10.0)
            log.warning("%s: retry %d/%d in %.1fs", describe_error(url, e), attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Storage:
    """A place in storage and how to reach it: its URL, the fsspec options that go with it (credentials among
    them: left out of its repr, so out of every log line) and how many times a transient failure is retried.
    Built once from the config (`Config.storage`) and passed whole; `at(name)` names a place under it. The one
    place that builds a filesystem and retries calls on it."""

    url: str
    options: dict = field(default_factory=dict, repr=False)
    retries: int = 3

    def at(self, *names: str) -> "Storage":
        return self.for_url(join(self.url, *names))

    def for_url(self, url: str) -> "Storage":
        """Another place reached the same way (the same options and retries)."""
        return dataclasses.replace(self, url=url)

    def filesystem(self) -> tuple[Any, str]:
        return filesystem(self.url, self.options)

    def call(self, operation: Callable[[Any, str], T]) -> T:
        """`operation(fs, path)` on this place, transient failures retried (`with_retries`)."""
        fs, path = self.filesystem()
        return with_retries(lambda: operation(fs, path), self.url, self.retries)

    def read(self) -> bytes:
        return self.call(lambda fs, path: fs.cat_file(path))

    def write(self, data: bytes) -> None:
        """One object written whole (its folder made first, where the store has folders)."""
        def write(fs, path):
            parent = path.rsplit("/", 1)[0]
            if parent and parent != path:
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
        self.call(write)
