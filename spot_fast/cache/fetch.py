"""Reading one streamed shard whole: an overall deadline per try, a bounded number of tries, and
the manifest's checksum before a single sample is used.

    data = fetch_shard(url, expected_xxh3, timeout=60.0, tries=3)      # bytes, or CacheError

URLs: http(s)://..., file://..., or a local path. A server that accepts the connection and never
answers, answers slowly, refuses, or serves other bytes costs at most `tries` x `timeout` seconds
(plus a short pause between tries), then stops with the URL and the fix.
"""
from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import xxhash

from spot_fast.cache.manifest import CacheError

CHUNK = 1 << 20


def _read(url: str, timeout: float) -> bytes:
    """The bytes at `url`, read within `timeout` seconds overall (TimeoutError otherwise)."""
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://")).read_bytes()
    deadline = time.monotonic() + timeout
    parts = []
    with urllib.request.urlopen(url, timeout=timeout) as r:      # per socket operation
        while chunk := r.read(CHUNK):
            parts.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not read within {timeout:g} s")
    if time.monotonic() > deadline:
        raise TimeoutError(f"not read within {timeout:g} s")
    return b"".join(parts)


def _why(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError) or "timed out" in str(reason).lower():
        return f"no answer in time ({reason})"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({reason})"
    return f"{type(e).__name__}: {e}"


def fetch_shard(url: str, expected: str | None, *, timeout: float = 60.0, tries: int = 3,
                pause: float = 0.5) -> bytes:
    """The bytes of the shard at `url`, checked against `expected` (xxh3-64 hex; None: unchecked)."""
    if timeout <= 0 or tries < 1:
        raise ValueError(f"timeout must be > 0 and tries >= 1, got {timeout} and {tries}")
    problem = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(pause * attempt)
        try:
            data = _read(url, timeout)
        except FileNotFoundError:
            raise CacheError(f"streamed shard {url} does not exist: check the URL pattern (--stream) against "
                             f"the cache's shards") from None
        except Exception as e:     # noqa: BLE001 -- every transport failure is retried, then named
            problem = _why(e)
            continue
        if expected is None or xxhash.xxh3_64(data).hexdigest() == expected:
            return data
        problem = (f"its {len(data)} bytes do not match the manifest's checksum (corrupt on the server or in "
                   f"transit, or a shard of another cache)")
    raise CacheError(f"streamed shard {url}: {problem}, {tries} tries: check the server (and run `spot-fast "
                     f"cache verify` on its copy of the cache), or train from a local copy with --train-cache")
