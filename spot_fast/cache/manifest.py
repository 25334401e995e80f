"""The cache manifest: one JSON file that says what a cache holds and how to check it.

Only a complete `manifest.json` makes a directory a cache. It is written last, atomically
(tmp file + `os.replace`), so a killed build never leaves something that looks finished.
The manifest is deterministic (no timestamps): two builds of the same content are byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from spot_fast.encoders import file_sha256
from spot_fast.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TAIL_FILE = "tail.safetensors"     # frozen blocks >= split_block + final norm (stage 2)
BUILD_STATE = ".build.json"      # present while a build is unfinished: its content key and spec
SHARD_MARKERS = ".shards"        # one JSON per finished shard (checksums); merged into the manifest

MASK_DTYPES = {"uint8": np.uint8, "int16": np.int16}


class CacheError(UserError):
    """A problem the user can fix (wrong cache for this model, bad path, incomplete build)."""


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to `path` via a tmp file + fsync + os.replace: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    with open(tmp, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


MANIFEST_HASH = "manifest_sha256"   # sha256 of the manifest's own JSON without this key


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_HASH}
    return hashlib.sha256(json.dumps(body, indent=1, sort_keys=True).encode()).hexdigest()


def write_manifest(path: Path, manifest: dict) -> None:
    """Write `path/manifest.json` with its own checksum (an edited manifest is then detected)."""
    write_json_atomic(path / MANIFEST, {**manifest, MANIFEST_HASH: manifest_digest(manifest)})


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the cache at `path`; CacheError if there is no complete, unmodified one."""
    manifest = _load_manifest(Path(path))
    problem = _manifest_problem(manifest)
    if problem:
        raise CacheError(f"{Path(path) / MANIFEST} {problem}: restore it, or rebuild the cache (delete it "
                         f"and rerun its build command)")
    return manifest


def _manifest_problem(manifest: dict) -> str | None:
    if MANIFEST_HASH in manifest and manifest[MANIFEST_HASH] != manifest_digest(manifest):
        return "was modified after the build (its checksum does not match its content)"
    return None


def _load_manifest(path: Path) -> dict:
    """The parsed manifest, checked for completeness and schema but not against its checksum."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}: the directory does not exist")
    file = path / MANIFEST
    if not file.is_file():
        if (path / BUILD_STATE).is_file():
            raise CacheError(f"{path} is an unfinished cache build (no {MANIFEST}): rerun the same "
                             f"`spot-fast cache ...` command to resume it")
        raise CacheError(f"{path} is not a spot-fast cache: it has no {MANIFEST} "
                         f"(build one with `spot-fast cache DATASET --root ... --out {path}`)")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CacheError(f"{file} is unreadable ({e}): rebuild the cache") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CacheError(f"{file} has schema version {manifest.get('schema_version')}, this spot-fast "
                         f"reads version {SCHEMA_VERSION}: rebuild the cache with this version")
    if not manifest.get("complete"):
        raise CacheError(f"{file} is not marked complete: rerun the build command to finish it")
    return manifest



def shard_owner(shard: dict) -> str:
    """How messages name a shard: "shard 3 (images 12..15)"."""
    return f"shard {shard['index']} (images {shard['start']}..{shard['stop'] - 1})"


def all_checksums(manifest: dict) -> dict[str, tuple[str, str]]:
    """relative path -> (sha256, owner) for every file the manifest covers; owner names the shard."""
    out = {rel: (sha, "cache metadata") for rel, sha in manifest["files"].items()}
    for shard in manifest["shards"]:
        for rel, sha in shard["files"].items():
            out[rel] = (sha, shard_owner(shard))
    return out


def verify(path: str | os.PathLike) -> list[str]:
    """Re-hash every file of the cache; a list of problems (empty: the cache is intact)."""
    path = Path(path)
    manifest = _load_manifest(path)
    problems = []
    if MANIFEST_HASH not in manifest:
        problems.append(f"cache metadata: {MANIFEST} has no checksum (built by an older spot-fast): "
                        f"it cannot be checked")
    elif _manifest_problem(manifest):
        problems.append(f"cache metadata: {MANIFEST} {_manifest_problem(manifest)}")
    for rel, (sha, owner) in sorted(all_checksums(manifest).items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{owner}: {rel} is missing")
        elif file_sha256(file) != sha:
            problems.append(f"{owner}: {rel} has a wrong sha256 (corrupt or modified)")
    return problems
