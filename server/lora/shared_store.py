"""One adapter store shared by several replicas: the cross-process lock, the retention of retired
versions, and the sweeper thread that keeps each replica's cache in step with the others.

Replicas mount one directory (a ReadWriteMany volume: NFS, CephFS, EFS, Filestore, ...) as
`LORAPLEX_ADAPTER_STORE` and set `LORAPLEX_ADAPTER_STORE_SHARED=1`. The store's layout and its
atomic puts (server/lora/store.py) are unchanged; what sharing adds:

- Reads need nothing new. Every request resolves the customer's `current` file when it
  arrives, so an upload, replacement or delete made through any replica is seen by all of them
  on their next request (bounded by the file system's attribute cache: mount NFS with
  `lookupcache=positive` or a short `actimeo`). A version directory appears whole (rename of a
  fsynced temp dir) and never changes, so no replica can read a half-written adapter.

- Writes of one customer (put, delete, prune) hold `lock_customer`: the in-process lock and an
  exclusive `flock` on `<root>/.locks/<customer_id>`, so two replicas uploading at once get
  distinct version numbers and `current` always names the newest. (On Linux NFS clients flock is
  carried out as a POSIX lock, which is per process; the in-process lock covers the threads.)

- Who deletes which files, and when. A version that is no longer current (replaced or deleted)
  may still be in use by a request on any replica: requests carry `(customer_id, version)` and
  may need the files until they end (a queued request loads its adapter later; an evicted one is
  read again). A replica cannot see the others' requests, but it knows how long they can live:
  every request ends within `LORAPLEX_MAX_REQUEST_SECONDS` of its arrival, and it resolved its
  version before that version was retired. So the first replica that sees a version retired
  stamps it (`v<N>/.retired`, the time in seconds since the epoch; versions never become
  current again, so the stamp only records a fact), and any replica may remove it once the
  stamp is older than the retention (`retention_seconds`: the deadline plus a margin for clock
  skew and the deadline's own check) and none of its own requests, pins or loads use it. The
  removal is a rename to a temp name then a delete, under the customer's lock.

- Temp dirs (`.tmp-*`: a put or a prune in progress) belong to whichever replica made them; a
  replica starting up removes only those older than the retention, never one another replica
  may still be writing. Versions are not pruned at start beyond the retention rule either.

`StoreSweeper` runs in every replica: every `poll_seconds` it walks the customers whose
directory holds a non-current version, or whose older versions this replica still caches, and
asks the service to retire them: the cache drops its copies of versions no local request uses,
and the store prunes what the retention allows.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
RETIRED_FILE = ".retired"
RETENTION_MARGIN_S = 60.0  # clock skew between replicas, and a deadline noticed one step late


def retention_seconds(max_request_seconds: float, configured: float = 0.0) -> float:
    """How long a retired version stays on disk: `configured`, or the request deadline plus
    RETENTION_MARGIN_S. Raises ValueError where neither bounds a request's life."""
    if configured > 0:
        if max_request_seconds <= 0 or configured < max_request_seconds:
            raise ValueError(
                f"adapter_store_retention_seconds ({configured:g}) must be at least max_request_seconds "
                f"({max_request_seconds:g}, and that above 0): a replica may still run a request on a retired "
                "version until its deadline")
        return configured
    if max_request_seconds <= 0:
        raise ValueError("a shared adapter store (LORAPLEX_ADAPTER_STORE_SHARED=1) needs a request deadline: set "
                         "LORAPLEX_MAX_REQUEST_SECONDS above 0, so that replicas know when nobody can still use a "
                         "replaced or deleted version")
    return max_request_seconds + RETENTION_MARGIN_S


@contextmanager
def lock_customer(root: Path, customer_id: str, thread_lock: threading.Lock) -> Iterator[None]:
    """The customer's write lock across threads (thread_lock) and processes (flock)."""
    locks = root / LOCKS_DIR
    with thread_lock:
        locks.mkdir(exist_ok=True)
        fd = os.open(locks / customer_id, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


def retired_long_enough(version_dir: Path, retention_s: float, now: float | None = None) -> bool:
    """True once the version was first seen retired more than `retention_s` ago; stamps it (now)
    when it has no stamp yet. Call only for versions that are not current, under the lock."""
    now = time.time() if now is None else now
    stamp = version_dir / RETIRED_FILE
    try:
        retired_at = float(stamp.read_text())
    except FileNotFoundError:
        _write_stamp(stamp, now)
        return False
    except (OSError, ValueError):  # unreadable: count from now, the safe side
        _write_stamp(stamp, now)
        return False
    return now - retired_at >= retention_s


def _write_stamp(path: Path, now: float) -> None:
    temp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    temp.write_text(f"{now:.3f}\n")
    os.replace(temp, path)


def is_stale_temp(path: Path, retention_s: float, now: float | None = None) -> bool:
    """A `.tmp-` entry old enough that no replica can still be writing it."""
    now = time.time() if now is None else now
    try:
        return now - path.lstat().st_mtime >= retention_s
    except FileNotFoundError:
        return False


class StoreSweeper:
    """A daemon thread that calls `sweep()` every `poll_seconds` until `stop()`.

    `customers_to_check()` names the customers worth a look; `retire(customer_id)` drops this
    replica's copies of their non-current versions and prunes what the retention allows."""

    def __init__(self, customers_to_check: Callable[[], Iterable[str]], retire: Callable[[str], None],
                 poll_seconds: float):
        self.customers_to_check, self.retire, self.poll_seconds = customers_to_check, retire, poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-store-sweeper", daemon=True)
        self.sweeps = 0

    def start(self) -> "StoreSweeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def sweep(self) -> None:
        for customer_id in self.customers_to_check():
            try:
                self.retire(customer_id)
            except Exception as e:  # a damaged customer dir must not stop the others' sweep
                log.warning("adapter store sweep of customer %r failed: %s", customer_id, e)
        self.sweeps += 1

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.sweep()
            except Exception:
                log.exception("adapter store sweep failed")
