"""The on-SSD adapter store: one directory per customer and version, written atomically.

Layout under `root` (one server process owns it, or several replicas share it: see
server/lora/shared_store.py for what sharing changes):

    <customer_id>/v<N>/adapter_config.json         the uploaded bytes, unchanged
    <customer_id>/v<N>/adapter_model.safetensors   the uploaded bytes, unchanged
    <customer_id>/v<N>/metadata.json               AdapterRecord.to_dict()
    <customer_id>/current                          "N": the version `get` serves
    <customer_id>/last_version                     highest N ever assigned (never reused)
    <customer_id>/.tmp-<random>                    a put or prune in progress
    .locks/<customer_id>                           flock'd by puts, deletes and prunes of the customer

Crash safety. A put validates first, then writes all files into a `.tmp-` dir and fsyncs each
file and the dir, renames it to `v<N>` and fsyncs the parent, and only then replaces `current`
(temp file, fsync, os.replace, fsync dir). A crash at any point leaves `current` naming a
complete version, or absent. At start the store removes `.tmp-` leftovers and every version
that is not current (a crashed put's orphan, versions replaced or deleted before the restart):
no reader exists yet.

A put that fails part-way (a full disk: AdapterStoreFull) removes what it wrote, and `current`
stays as it was; only `last_version` may have moved on (numbers are never reused anyway).

Version numbers rise per customer and are never reused, also across delete and re-upload and
across a crash: `last_version` is raised (atomically) before a new version dir can appear and
survives delete, and the next number is 1 + max(last_version, highest v<N> dir).

Retention. A replaced or deleted version stays on disk, readable with `get_version`, because
requests in flight may still be loading it; `prune(customer_id, keep)` removes the versions
that are neither current nor in `keep` (the adapter cache calls it once no request uses them),
and the next start removes the rest. `delete` only removes `current`, so the adapter is
invisible at once. Puts, deletes and prunes of one customer are serialised by a per-customer
lock, also across processes (flock); reads take no lock (they read `current`, then its version
directory). A shared store (`shared_retention_s` set) keeps retired versions for that long and
removes only stale temp dirs at start (server/lora/shared_store.py).

Checksums. `put` records the sha256 of the uploaded weights. `open_verified` (the cache's
loads) checks sizes every time but hashes the weights file only the first time this store
object reads it, and again whenever the file's stamp (device, inode, size, mtime, ctime) is not
the one it had when last hashed: after a restart each file is hashed once, on its first load,
and a file changed on disk since is hashed again (and fails if it no longer matches). A stamp
is trusted only if the file was last changed a second or more before the hash (`_RACY_NS`), as
a file rewritten within one tick of the filesystem's clock can keep its mtime and ctime.
`read_files` always hashes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from server.lora.adapter import LoRAAdapter
from server.lora.shared_store import is_stale_temp, lock_customer, retired_long_enough

CUSTOMER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "metadata.json"
CURRENT_FILE = "current"
LAST_VERSION_FILE = "last_version"
TEMP_PREFIX = ".tmp-"
_CUSTOMER_ID = re.compile(CUSTOMER_ID_PATTERN, re.ASCII)
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")
_RACY_NS = 1_000_000_000  # a stamp younger than this at hashing time is not trusted (see above)
_HASH_CHUNK = 8 << 20

log = logging.getLogger(__name__)


class InvalidCustomerId(ValueError):
    """The customer id is not a safe directory name (see CUSTOMER_ID_PATTERN)."""


class AdapterNotFound(KeyError):
    def __str__(self) -> str:  # KeyError would print the repr of its message
        return str(self.args[0]) if self.args else ""


class AdapterStoreFull(OSError):
    """The disk (or the quota) filled up during a put; the put left nothing behind."""

    def __init__(self, customer_id: str, cause: OSError):
        super().__init__(cause.errno, f"no space left in the adapter store for customer {customer_id!r}'s upload "
                                      f"({os.strerror(cause.errno)}); nothing was changed")


_STORE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class AdapterStoreCorrupt(RuntimeError):
    """A file of a stored adapter is missing or unreadable; `path` names it."""

    def __init__(self, customer_id: str, path: Path, problem: str):
        super().__init__(f"adapter store is corrupt for customer {customer_id!r}: {path}: {problem}")
        self.customer_id, self.path = customer_id, path


@dataclass(frozen=True)
class AdapterRecord:
    customer_id: str
    version: int
    sha256: str  # of adapter_model.safetensors
    bytes: int  # adapter_config.json + adapter_model.safetensors
    rank: int
    alpha: float
    target_modules: list[str]
    use_rslora: bool
    created_at: str  # ISO 8601, UTC
    path: Path  # the version directory
    use_dora: bool = False
    recipe: dict | None = None  # a composition's provenance (server/lora/compose.py); None for uploads

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["path"]
        if out["recipe"] is None:
            del out["recipe"]
        return out


@dataclass(frozen=True)
class StoredFiles:
    """An adapter's files as uploaded (see `AdapterStore.open_verified`)."""

    config: bytes  # adapter_config.json
    weights_fd: int  # adapter_model.safetensors, open for reading (os.pread / os.preadv)
    weights_size: int


def _is_valid_id(name: object) -> bool:
    return isinstance(name, str) and name not in (".", "..") and _CUSTOMER_ID.fullmatch(name) is not None


def check_customer_id(customer_id: object) -> str:
    """The id itself if it is safe as a directory name; never a path of the client's making."""
    if not _is_valid_id(customer_id):
        raise InvalidCustomerId(f"invalid customer id {customer_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -, "
                                "starting with a letter or digit")
    return customer_id


class AdapterStore:
    def __init__(self, root: Path, *, shared_retention_s: float | None = None):
        """`shared_retention_s`: None when this process owns the store; for a store shared by
        replicas, how long a retired version stays on disk (shared_store.retention_seconds)."""
        self.root = Path(root)
        self.shared_retention_s = shared_retention_s
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._verified: dict[Path, tuple[int, ...]] = {}  # weights file -> its stamp when its sha256 matched
        self._recover()

    # --- reads (no lock)
    def get(self, customer_id: str) -> AdapterRecord:
        """The current version; AdapterNotFound if none, AdapterStoreCorrupt if it is damaged."""
        check_customer_id(customer_id)
        version = self._current_version(customer_id)
        if version is not None and not self._version_dir(customer_id, version).is_dir():
            version = self._current_version(customer_id)  # a put moved `current` on, a prune removed ours
        if version is None:
            raise AdapterNotFound(f"no adapter for customer {customer_id!r}")
        return self._read_record(customer_id, version)

    def get_version(self, customer_id: str, version: int) -> AdapterRecord:
        """A version by number, current or not, until it is pruned (the cache loads by version)."""
        check_customer_id(customer_id)
        version = int(version)
        if not self._version_dir(customer_id, version).is_dir():
            raise AdapterNotFound(f"no version {version} of the adapter of customer {customer_id!r}")
        return self._read_record(customer_id, version)

    def current_version(self, customer_id: str) -> int | None:
        """The number `current` names (None: no adapter), without reading its record."""
        return self._current_version(check_customer_id(customer_id))

    def list(self) -> list[AdapterRecord]:
        """Current versions sorted by customer id; a damaged one raises AdapterStoreCorrupt."""
        records = []
        for customer_dir in sorted(self.root.iterdir()):
            if customer_dir.is_dir() and _is_valid_id(customer_dir.name):
                try:
                    records.append(self.get(customer_dir.name))
                except AdapterNotFound:
                    continue  # deleted, or never completed a put
        return records

    def read_files(self, record: AdapterRecord) -> tuple[bytes, bytes]:
        """The stored (config, weights) bytes, checked against the record's size and sha256."""
        try:
            config, weights = record.config_path.read_bytes(), record.weights_path.read_bytes()
        except FileNotFoundError as e:
            raise AdapterStoreCorrupt(record.customer_id, Path(e.filename), "missing") from None
        if len(config) + len(weights) != record.bytes or hashlib.sha256(weights).hexdigest() != record.sha256:
            raise AdapterStoreCorrupt(record.customer_id, record.weights_path, "size or sha256 differs from metadata")
        return config, weights

    @contextmanager
    def open_verified(self, record: AdapterRecord) -> Iterator[StoredFiles]:
        """The record's config bytes and weights file (open), as uploaded: sizes are checked every
        time, the sha256 when this store has not hashed the file in its present state (see the
        module docstring). Raises AdapterStoreCorrupt when a file is missing, differs from the
        metadata, or changed while it was being read (checked when the block exits)."""
        try:
            config = record.config_path.read_bytes()
            fd = os.open(record.weights_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise AdapterStoreCorrupt(record.customer_id, Path(e.filename), "missing") from None
        try:
            stamp = _stamp(os.fstat(fd))
            size = stamp[2]
            if len(config) + size != record.bytes:
                raise AdapterStoreCorrupt(record.customer_id, record.weights_path,
                                          "size or sha256 differs from metadata")
            if self._verified.get(record.weights_path) != stamp:
                hashed_at = time.time_ns()
                if _sha256_of(fd, size) != record.sha256:
                    self._verified.pop(record.weights_path, None)
                    raise AdapterStoreCorrupt(record.customer_id, record.weights_path,
                                              "size or sha256 differs from metadata")
                if _stamp(os.fstat(fd)) == stamp and hashed_at - max(stamp[3], stamp[4]) >= _RACY_NS:
                    self._verified[record.weights_path] = stamp
            yield StoredFiles(config, fd, size)
            if _stamp(os.fstat(fd)) != stamp:
                self._verified.pop(record.weights_path, None)
                raise AdapterStoreCorrupt(record.customer_id, record.weights_path, "changed while being read")
        finally:
            os.close(fd)

    # --- writes (per-customer lock)
    def put(self, customer_id: str, config_bytes: bytes, weights_bytes: bytes,
            validate: Callable[[bytes, bytes], LoRAAdapter], recipe: dict | None = None) -> AdapterRecord:
        """Validate, store as a new version and make it current; validate's errors propagate as they are.
        `recipe`: how a composed adapter was made, kept in its metadata."""
        check_customer_id(customer_id)
        adapter = validate(config_bytes, weights_bytes)  # before anything touches the disk
        customer_dir = self.root / customer_id
        with self._lock(customer_id):
            if not customer_dir.is_dir():
                customer_dir.mkdir()
                _fsync_dir(self.root)
            version = self._next_version(customer_id)
            record = AdapterRecord(
                customer_id=customer_id, version=version, sha256=hashlib.sha256(weights_bytes).hexdigest(),
                bytes=len(config_bytes) + len(weights_bytes), rank=adapter.rank, alpha=float(adapter.alpha),
                target_modules=list(adapter.target_modules), use_rslora=adapter.use_rslora,
                created_at=datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                path=self._version_dir(customer_id, version), use_dora=adapter.use_dora, recipe=recipe,
            )
            try:
                _write_atomic(customer_dir / LAST_VERSION_FILE, f"{version}\n".encode())
                self._write_version(customer_dir, record, config_bytes, weights_bytes)
            except OSError as e:
                if e.errno in _STORE_FULL_ERRNOS:
                    raise AdapterStoreFull(customer_id, e) from e
                raise
        return record

    def _write_version(self, customer_dir: Path, record: AdapterRecord, config_bytes: bytes,
                       weights_bytes: bytes) -> None:
        """The version's files into a temp dir, renamed to v<N>, then `current`; on an error
        (a full disk) every file it wrote is removed again and `current` is as it was."""
        temp_dir = customer_dir / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
        temp_dir.mkdir()
        renamed = False
        try:
            for name, data in ((CONFIG_FILE, config_bytes), (WEIGHTS_FILE, weights_bytes),
                               (METADATA_FILE, json.dumps(record.to_dict(), indent=1).encode())):
                _write_synced(temp_dir / name, data)
            _fsync_dir(temp_dir)
            os.rename(temp_dir, record.path)
            renamed = True
            _fsync_dir(customer_dir)
            _write_atomic(customer_dir / CURRENT_FILE, f"{record.version}\n".encode())
        except BaseException:
            shutil.rmtree(record.path if renamed else temp_dir, ignore_errors=True)
            raise

    def delete(self, customer_id: str) -> AdapterRecord:
        """Hide the customer's adapter at once (removes `current`); its files wait for `prune`.

        A damaged adapter is deleted too, and then its AdapterStoreCorrupt is raised."""
        check_customer_id(customer_id)
        with self._lock(customer_id):
            try:
                record, error = self.get(customer_id), None
            except AdapterStoreCorrupt as e:
                record, error = None, e
            (self.root / customer_id / CURRENT_FILE).unlink()
            _fsync_dir(self.root / customer_id)
        if error is not None:
            raise AdapterStoreCorrupt(error.customer_id, error.path, "unreadable; the adapter was deleted") from error
        return record

    def prune(self, customer_id: str, keep: set[int]) -> list[int]:
        """Remove the versions that are neither current nor in `keep`; returns those removed."""
        check_customer_id(customer_id)
        with self._lock(customer_id):
            return self._prune(customer_id, keep)

    # --- internals
    def _lock(self, customer_id: str):
        with self._locks_guard:
            thread_lock = self._locks.setdefault(customer_id, threading.Lock())
        return lock_customer(self.root, customer_id, thread_lock)

    def customers_with_old_versions(self) -> list[str]:
        """Customers whose directory holds a version that is not current (retired, not yet pruned)."""
        found = []
        for customer_dir in sorted(self.root.iterdir()):
            if customer_dir.is_dir() and _is_valid_id(customer_dir.name):
                try:
                    current = self._current_version(customer_dir.name)
                except AdapterStoreCorrupt:
                    continue
                if any(v != current for v in self._stored_versions(customer_dir.name)):
                    found.append(customer_dir.name)
        return found

    def _version_dir(self, customer_id: str, version: int) -> Path:
        return self.root / customer_id / f"v{int(version)}"

    def _current_version(self, customer_id: str) -> int | None:
        return _read_int(customer_id, self.root / customer_id / CURRENT_FILE)

    def _stored_versions(self, customer_id: str) -> list[int]:
        customer_dir = self.root / customer_id
        if not customer_dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in customer_dir.iterdir() if (m := _VERSION_DIR.fullmatch(p.name)))

    def _next_version(self, customer_id: str) -> int:
        last = _read_int(customer_id, self.root / customer_id / LAST_VERSION_FILE) or 0
        return max([last, *self._stored_versions(customer_id)]) + 1

    def _prune(self, customer_id: str, keep: set[int]) -> list[int]:
        current = self._current_version(customer_id)
        removed = [v for v in self._stored_versions(customer_id) if v != current and v not in keep]
        if self.shared_retention_s is not None:  # other replicas' requests may still use it
            removed = [v for v in removed
                       if retired_long_enough(self._version_dir(customer_id, v), self.shared_retention_s)]
        for version in removed:
            self._verified.pop(self._version_dir(customer_id, version) / WEIGHTS_FILE, None)
            # Renamed first, so a crash mid-removal leaves a temp dir, never a half version.
            doomed = self.root / customer_id / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
            os.rename(self._version_dir(customer_id, version), doomed)
            shutil.rmtree(doomed)
        if removed:
            _fsync_dir(self.root / customer_id)
        return removed

    def _recover(self) -> None:
        for customer_dir in self.root.iterdir():
            if not (customer_dir.is_dir() and _is_valid_id(customer_dir.name)):
                continue
            for entry in customer_dir.iterdir():
                if entry.name.startswith(TEMP_PREFIX) and (
                        self.shared_retention_s is None or is_stale_temp(entry, self.shared_retention_s)):
                    log.info("removing %s, left over from an interrupted write", entry)
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
            try:
                # Locked: in a shared store another replica's put may have a new version
                # renamed into place but not yet current.
                with self._lock(customer_dir.name):
                    self._prune(customer_dir.name, keep=set())
            except AdapterStoreCorrupt as e:
                log.error("%s; not pruning its versions", e)

    def _read_record(self, customer_id: str, version: int) -> AdapterRecord:
        version_dir = self._version_dir(customer_id, version)
        metadata_path = version_dir / METADATA_FILE
        try:
            meta = json.loads(metadata_path.read_bytes())
            record = AdapterRecord(**meta, path=version_dir)
            types = {"customer_id": str, "version": int, "sha256": str, "bytes": int, "rank": int,
                     "alpha": (int, float), "target_modules": list, "use_rslora": bool, "created_at": str,
                     "use_dora": bool, "recipe": (dict, type(None))}
            bad = [k for k, t in types.items() if not isinstance(getattr(record, k), t)]
        except FileNotFoundError:
            raise AdapterStoreCorrupt(customer_id, metadata_path, "missing") from None
        except (ValueError, TypeError) as e:  # bad JSON, missing or unknown keys
            raise AdapterStoreCorrupt(customer_id, metadata_path, f"unreadable ({e})") from None
        if bad or (record.customer_id, record.version) != (customer_id, version):
            raise AdapterStoreCorrupt(customer_id, metadata_path, f"bad fields {bad or ['customer_id/version']}")
        try:
            size = record.config_path.stat().st_size + record.weights_path.stat().st_size
        except FileNotFoundError as e:
            raise AdapterStoreCorrupt(customer_id, Path(e.filename), "missing") from None
        if size != record.bytes:
            raise AdapterStoreCorrupt(customer_id, version_dir, f"files hold {size} bytes, metadata says {record.bytes}")
        return record


def _read_int(customer_id: str, path: Path) -> int | None:
    """A small counter file: None when absent, AdapterStoreCorrupt when not a positive integer."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise AdapterStoreCorrupt(customer_id, path, f"unreadable ({e})") from None
    if not re.fullmatch(r"[1-9][0-9]*\n?", text):
        raise AdapterStoreCorrupt(customer_id, path, f"expected a version number, found {text[:32]!r}")
    return int(text)


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file is replaced or rewritten: (device, inode, size, mtime, ctime)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sha256_of(fd: int, size: int) -> str:
    digest, chunk = hashlib.sha256(), bytearray(min(size, _HASH_CHUNK))
    view, offset = memoryview(chunk), 0
    while offset < size:
        n = os.preadv(fd, [view[: size - offset]], offset)
        if n == 0:
            break  # truncated meanwhile: the digest will not match
        digest.update(view[:n])
        offset += n
    return digest.hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}")
    try:
        _write_synced(temp, data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
