"""Object storage through fsspec: open a URL, commit objects atomically, keep credentials out of logs.

Why atomic commits: an interrupted upload must never look like data. s3fs uploads the partial
object even when the ``with fs.open(..., "wb")`` block raises, so every object is first written to a
temporary key under ``{prefix}/_tmp/``, its size (and optionally its sha256) is verified, and only
then is it moved to its final key: ``os.replace`` on a local disk, a server-side copy plus delete on
S3. A reader therefore sees either the complete object or none. ``_tmp/`` is scratch space that a
re-run deletes before it starts.

Listing caches are disabled (``use_listings_cache=False``) because a stale listing would hide a
shard that another process committed a moment ago.

Retries (``RetryPolicy``, storage option ``retries``): a flaky store (500/503, a stalled socket, a
connection cut mid-transfer) must cost time, not data. On S3 the policy becomes botocore's
``standard`` retry mode (500/502/503/504, throttling, connection errors and timeouts are retried
with exponential backoff and full jitter) and s3fs's own retry of a response body cut short.
Objects are only ever created through ``atomic_writer``, so a retried or abandoned upload can
leave a temporary object under ``_tmp/`` but never a partial object under its final key.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import PipelineError

TMP_DIR = "_tmp"
_SECRET_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "auth", "signature")
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
READ_BLOCK = 8 << 20


class StorageError(PipelineError):
    """An object could not be written, verified or committed."""


RETRY_OPTION = "retries"  # the storage option that holds a RetryPolicy (a mapping of its fields)


@dataclass(frozen=True)
class RetryPolicy:
    """How a storage request is retried; set per dataset with ``storage_options["retries"]``.

    ``attempts`` counts tries of one HTTP request, the first included; botocore waits between them
    with exponential backoff and full jitter (``uniform(0, 1) * 2**n`` seconds, at most 20 s). A
    response body cut short is re-requested by s3fs up to ``attempts`` times as well. With the
    store down for good a request therefore fails after roughly ``attempts**2`` connection tries
    and ``attempts`` backoff rounds, and the job stops with the error (nothing is committed).
    """

    attempts: int = 6  # tries per request, first included
    timeout_s: float = 30.0  # connect and read timeout of one request; a stall longer than this is retried

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or isinstance(self.attempts, bool) or not 1 <= self.attempts <= 100:
            raise ValueError(f"retries.attempts={self.attempts!r}: must be an int in 1..100")
        if not isinstance(self.timeout_s, int | float) or not 0 < self.timeout_s <= 3600:
            raise ValueError(f"retries.timeout_s={self.timeout_s!r}: must be in (0, 3600] seconds")


def retry_policy(storage_options: Mapping[str, Any] | None) -> RetryPolicy:
    """The ``RetryPolicy`` of ``storage_options["retries"]`` (a mapping of its fields), else the default.

    Raises:
        ValueError: an unknown field or a bad value, named.
    """
    given = (storage_options or {}).get(RETRY_OPTION)
    if given is None:
        return RetryPolicy()
    if not isinstance(given, Mapping):
        raise ValueError(f"storage_options.retries={given!r}: expected a mapping like {{attempts: 6, timeout_s: 30}}")
    known = {f.name for f in fields(RetryPolicy)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"storage_options.retries: unknown field(s) {unknown}; known: {sorted(known)}")
    return RetryPolicy(**dict(given))


def _s3_retry_options(options: dict[str, Any], policy: RetryPolicy) -> dict[str, Any]:
    """``options`` with botocore's retry mode, attempts and timeouts set where the user set none."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("retries", {"mode": "standard", "max_attempts": policy.attempts})
    config.setdefault("connect_timeout", policy.timeout_s)
    config.setdefault("read_timeout", policy.timeout_s)
    return {**options, "config_kwargs": config}


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URL or ``s3://`` (any fsspec) URL.

    Local paths are made absolute, so Ray workers whose working directory differs from the
    driver's see the same files. For S3, credentials and endpoint come from ``storage_options``
    (``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}``) or, when absent, from the
    standard AWS environment variables and config files, which s3fs/botocore read themselves.
    ``storage_options["retries"]`` (see ``RetryPolicy``) is ours and is not passed to fsspec.

    Raises:
        ValueError: when ``url`` is empty or the retry policy is invalid.
    """
    if not url:
        raise ValueError("url='': empty storage URL")
    policy = retry_policy(storage_options)
    options = {k: v for k, v in (storage_options or {}).items() if k != RETRY_OPTION}
    if "://" not in url:
        url = os.path.abspath(os.path.expanduser(url))
    elif url.startswith("file://"):
        url = "file://" + os.path.abspath(url[len("file://") :])
    else:
        options.setdefault("use_listings_cache", False)
        if url.startswith(("s3://", "s3a://")):
            options = _s3_retry_options(options, policy)
    fs, path = fsspec.core.url_to_fs(url, **options)
    if hasattr(fs, "retries"):  # s3fs: re-requests of a body cut short (instance attribute, per options)
        fs.retries = policy.attempts
    return fs, path.rstrip("/") or path


@contextmanager
def storage_errors(where: str) -> Iterator[None]:
    """Turn a failure of the store (after its retries) into a ``StorageError`` that names ``where``.

    Our own errors, ``FileNotFoundError`` (callers act on it) and interrupts pass unchanged; the
    message is redacted, so a credential inside a botocore message never reaches a log.
    """
    try:
        yield
    except (PipelineError, FileNotFoundError, ValueError):
        raise
    except Exception as exc:
        raise StorageError(f"{redact(where)}: storage request failed after retries "
                           f"({type(exc).__name__}: {redact(str(exc))[:500]}); re-run to resume") from exc


def is_local(fs: Any) -> bool:
    """True for the local disk, where ``os.replace`` gives a truly atomic rename."""
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Join storage paths with ``/`` on every platform and protocol."""
    return posixpath.join(base, *parts)


def redact(options: Any) -> Any:
    """Copy of ``options`` with every credential-like value replaced by ``"***"``.

    Keys are matched by name (anything containing key, secret, token, password, credential, auth,
    signature), nested mappings and lists are followed, and ``user:password@`` in URL strings is
    removed. Use it on everything that reaches logs, exceptions, dataset.json or MLflow.
    """
    if isinstance(options, Mapping):
        out = {}
        for name, value in options.items():
            if isinstance(name, str) and any(w in name.lower() for w in _SECRET_WORDS) and not isinstance(
                value, Mapping
            ):
                out[name] = "***" if value not in (None, "") else value
            else:
                out[name] = redact(value)
        return out
    if isinstance(options, list | tuple):
        return type(options)(redact(v) for v in options)
    if isinstance(options, str):
        return _URL_USERINFO.sub(r"\g<scheme>***@", options)
    return options


class HashingWriter:
    """A write-only file wrapper that counts bytes and hashes them on the way through.

    ``tell()`` is the number of bytes written so far, which is all ``tarfile``-like writers need,
    and works on S3 streams that cannot seek.
    """

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self._sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        with storage_errors(str(getattr(self._raw, "path", "upload"))):
            self._raw.write(data)
        self._sha.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


@dataclass(frozen=True)
class Committed:
    """What ``atomic_writer`` committed: the final path, its size and sha256."""

    path: str
    size: int
    sha256: str


class _Commit:
    """Filled in by ``atomic_writer`` after the object is committed."""

    result: Committed | None = None


def tmp_path(fs: Any, root: str, final_path: str) -> str:
    """A unique temporary key under ``{root}/_tmp/`` for ``final_path``."""
    name = final_path[len(root) :].strip("/").replace("/", "-") if final_path.startswith(root) else final_path
    return join(root, TMP_DIR, f"{posixpath.basename(name)}.{uuid.uuid4().hex}")


@contextmanager
def atomic_writer(
    fs: Any, path: str, root: str, verify_sha256: bool = False
) -> Iterator[tuple[HashingWriter, _Commit]]:
    """Write an object to a temporary key under ``root`` and commit it to ``path`` on success.

    Yields ``(writer, commit)``; after the ``with`` block ``commit.result`` holds the ``Committed``
    size and sha256. On an exception the temporary object is deleted and nothing appears at
    ``path``. ``verify_sha256`` re-reads the temporary object before committing (costs one read).

    Raises:
        StorageError: when the stored object's size or checksum differs from what was written.
    """
    tmp = tmp_path(fs, root, path)
    if is_local(fs):
        fs.makedirs(posixpath.dirname(tmp), exist_ok=True)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    commit = _Commit()
    try:
        with storage_errors(tmp):
            raw = fs.open(tmp, "wb")
        writer = HashingWriter(raw)
        try:
            yield writer, commit
        except BaseException:
            _discard(fs, raw)
            raise
        with storage_errors(tmp):
            raw.close()  # on S3: the upload (or its last part) happens here
            _verify(fs, tmp, writer.size, writer.hexdigest() if verify_sha256 else None)
        with storage_errors(path):
            _move(fs, tmp, path)
            fs.invalidate_cache(path)
            stored = fs.info(path)["size"]
        if stored != writer.size:
            raise StorageError(f"{path}: committed object has {stored} bytes, wrote {writer.size}")
        commit.result = Committed(path, writer.size, writer.hexdigest())
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def write_atomic(fs: Any, path: str, data: bytes, root: str, verify_sha256: bool = True) -> Committed:
    """Commit ``data`` to ``path`` atomically (see ``atomic_writer``); small objects only."""
    with atomic_writer(fs, path, root, verify_sha256=verify_sha256) as (writer, commit):
        writer.write(data)
    assert commit.result is not None  # set by atomic_writer on success
    return commit.result


def file_sha256(fs: Any, path: str) -> str:
    """sha256 of a stored object, read in blocks (streaming, constant memory)."""
    sha = hashlib.sha256()
    with storage_errors(path), fs.open(path, "rb", block_size=READ_BLOCK, cache_type="none") as f:
        while chunk := f.read(READ_BLOCK):
            sha.update(chunk)
    return sha.hexdigest()


def read_range(fs: Any, path: str, offset: int, size: int) -> bytes:
    """Bytes ``[offset, offset + size)`` of an object, one ranged request on S3.

    Raises:
        StorageError: when the object is shorter than the requested range.
    """
    if offset < 0 or size < 0:
        raise ValueError(f"{path}: bad range offset={offset} size={size}")
    with storage_errors(path):
        data = fs.cat_file(path, start=offset, end=offset + size)
    if len(data) != size:
        raise StorageError(f"{path}: range [{offset}, {offset + size}) returned {len(data)} bytes")
    return data


def exists(fs: Any, path: str) -> bool:
    """``fs.exists`` without trusting any cached listing.

    Raises:
        StorageError: the store did not answer (s3fs's own ``exists`` would say False).
    """
    fs.invalidate_cache(path)
    with storage_errors(path):
        if is_local(fs):
            return fs.exists(path)
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True


def clean_tmp(fs: Any, root: str) -> int:
    """Delete the temporary area ``{root}/_tmp`` left by interrupted writes; returns objects removed."""
    tmp = join(root, TMP_DIR)
    if not exists(fs, tmp):
        return 0
    with storage_errors(tmp):
        files = [p for p in fs.find(tmp) if p.rstrip("/") != tmp]
    for p in files:
        _remove_quietly(fs, p)
    if is_local(fs):
        fs.rm(tmp, recursive=True)
    fs.invalidate_cache(tmp)
    return len(files)


def _verify(fs: Any, tmp: str, size: int, sha256: str | None) -> None:
    fs.invalidate_cache(tmp)
    stored = fs.info(tmp)["size"]
    if stored != size:
        raise StorageError(f"{tmp}: stored {stored} bytes, wrote {size}")
    if sha256 is not None and file_sha256(fs, tmp) != sha256:
        raise StorageError(f"{tmp}: stored object's sha256 differs from the bytes written")


def _move(fs: Any, tmp: str, path: str) -> None:
    if is_local(fs):
        os.replace(tmp, path)
        return
    fs.copy(tmp, path)  # server-side copy on S3: no bytes go through this process
    fs.rm(tmp)


def _discard(fs: Any, raw: Any) -> None:
    """Abandon an upload without committing it: nothing, not even a partial ``_tmp`` object, is sent.

    s3fs's ``discard`` aborts a multipart upload that began; marking the file closed stops the
    buffered remainder from being uploaded when the file object is garbage-collected.
    """
    try:
        if is_local(fs):
            raw.close()
        else:
            raw.discard()
            raw.closed = True
    except Exception:  # noqa: BLE001 - best-effort; the temporary key is removed next
        pass


def _remove_quietly(fs: Any, path: str) -> None:
    try:
        fs.invalidate_cache(path)
        if fs.exists(path):
            fs.rm(path)
    except Exception:  # noqa: BLE001 - best-effort cleanup; clean_tmp catches leftovers on re-run
        pass
