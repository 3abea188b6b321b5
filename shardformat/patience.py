"""Waiting out an unreachable object store: an outage pauses the work, it never changes the data.

Every request to a store goes through ``Patience.call``. A failure is one of:

- *unreachable* (connection refused or reset, DNS, a timeout (every request has one, so a stalled
  connection that never answers is a timeout, not a hang), HTTP 5xx / 429 / throttling, and in
  training an object the manifest lists that is not there right now): retried with capped
  exponential backoff and jitter for as long as ``patience_s``, counted from when the store was
  first found unreachable; past it, ``RemoteUnreachable``;
- *denied* (access denied, no credentials): ``RemoteError`` at once, no retry helps;
- *missing*, where the caller says a missing object is an answer (``FileNotFoundError``);
- a full local disk (``OSError`` ENOSPC) and our own errors: raised as they are.

The processes of a node (ranks, DataLoader workers, the download-ahead thread) share the outage
through a file in the cache folder (``.outage.json``: since when, the last error, a heartbeat): the
first to find the store unreachable says so once ("waiting for URL since HH:MM:SS ..."), whoever
finds it back says so once with how long it took, and a line at most every minute in between;
each ended outage is appended to ``.outages.jsonl`` (what the trainer's ``store_unreachable_s``
metric sums). A record whose heartbeat is older than ``stale_s`` is from a process that died: it
is ignored.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .fsutil import RedactFilter

log = logging.getLogger("maskdm.data")
log.addFilter(RedactFilter())  # its lines name stores by URL, never with their credentials

REPORT_EVERY_S = 60.0
OUTAGE, OUTAGES = ".outage.json", ".outages.jsonl"
# errors of our own code, never of the network: raised at once, never retried
_BUGS = (TypeError, AttributeError, NameError, KeyError, IndexError, AssertionError,
         NotImplementedError, ImportError)


class RemoteError(RuntimeError):
    """A remote file could not be had: access denied, no credentials (base class)."""


class RemoteUnreachable(RemoteError):
    """The store stayed unreachable for longer than the patience: stop, resume later."""


class RemoteDamaged(RemoteError):
    """The store answers, but an object is not what the manifest says (size, sha256)."""


class CacheFull(RuntimeError):
    """The cache's disk is full: the message names the folder and the limit."""


@dataclass
class StoreOptions:
    """How long to wait for a store and how to pace the attempts."""

    patience_s: float = 1800.0  # data.remote_patience_s: an outage is waited out this long
    timeout_s: float = 60.0  # data.remote_timeout_s: per request (connect, and each read)
    backoff: float = 0.5  # the first wait between attempts; doubles up to backoff_cap
    backoff_cap: float = 30.0

    @property
    def stale_s(self) -> float:
        """An outage record not refreshed for this long belongs to a process that died."""
        return 3 * (self.backoff_cap + self.timeout_s) + 10


def kind_of(e: BaseException) -> str:
    """``unreachable`` | ``missing`` | ``denied`` | ``credentials`` | ``full`` | ``bug``."""
    if isinstance(e, (RemoteError, CacheFull)) or isinstance(e, _BUGS):
        return "bug"  # ours: raised as it is
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, PermissionError) or getattr(e, "status", None) in (401, 403):
        return "denied"  # (an http(s) server's 401/403 comes as aiohttp's ClientResponseError)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "full"
    if "Credentials" in type(e).__name__ or "credentials" in str(e).lower()[:200]:
        return "credentials"
    return "unreachable"


def short(e: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an exception, cut at a word boundary."""
    text = (str(e).strip().splitlines() or [""])[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def duration(s: float) -> str:
    s = int(round(s))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min" + (f" {s % 60:02d} s" if s % 60 else "")
    return f"{s // 3600} h" + (f" {s % 3600 // 60:02d} min" if s % 3600 // 60 else "")


class Patience:
    """Requests to one store (``url``), with the node's shared outage record in ``state_dir``
    (None: this process only)."""

    def __init__(self, url: str, options: StoreOptions | None = None,
                 state_dir: str | os.PathLike | None = None, what_pauses: str = "training"):
        self.url = url
        self.options = options or StoreOptions()
        self.state = Path(state_dir) if state_dir is not None else None
        self.what_pauses = what_pauses
        self.retries = 0  # attempts after a failure, this process
        self._local_since: float | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["retries"], state["_local_since"] = 0, None
        return state

    # ------------------------------------------------------------------ the shared record
    def _record_path(self) -> Path | None:
        return self.state / OUTAGE if self.state is not None else None

    def _read_record(self) -> dict | None:
        path = self._record_path()
        if path is None:
            return None
        try:
            if time.time() - path.stat().st_mtime > self.options.stale_s:
                return None  # left by a process that died mid-outage
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def _begin(self, now: float, e: BaseException, what: str) -> tuple[float, bool]:
        """-> (since when the store is unreachable, whether this process said so first)."""
        path = self._record_path()
        if path is None:
            if self._local_since is None:
                self._local_since = now
                return now, True
            return self._local_since, False
        record = self._read_record()
        if record is not None:
            self._heartbeat(record, e, what)
            return float(record["since"]), False
        record = {"url": self.url, "since": now, "host": socket.gethostname(),
                  "pid": os.getpid(), "error": short(e), "what": what}
        tmp = self._tmp(path)
        try:
            tmp.write_text(json.dumps(record))
            try:
                os.link(tmp, path)  # atomic "create if absent"; a stale record is replaced
                first = True
            except FileExistsError:
                theirs = self._read_record()
                if theirs is not None:  # another process was first
                    return float(theirs["since"]), False
                os.replace(tmp, path)
                first = True
        except OSError:
            first = self._local_since is None
            self._local_since = self._local_since or now
            return self._local_since, first
        finally:
            tmp.unlink(missing_ok=True)
        return now, first

    @staticmethod
    def _tmp(path: Path) -> Path:
        """A temporary name of this process and thread (uploads run requests in 8 threads)."""
        return path.with_name(f".{OUTAGE}.{os.getpid()}.{threading.get_ident()}.tmp")

    def _heartbeat(self, record: dict, e: BaseException, what: str) -> None:
        path = self._record_path()
        if path is None:
            return
        try:
            record.update(error=short(e), what=what)
            tmp = self._tmp(path)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            pass

    def _end(self, since: float) -> None:
        """The store answered: the process that removes the record says so and logs it."""
        now = time.time()
        path = self._record_path()
        if path is None:
            self._local_since = None
            log.warning("%s reachable again after %s (unreachable since %s); %s continues",
                        self.url, duration(now - since), clock(since), self.what_pauses)
            return
        try:
            beat = path.stat().st_mtime
            record = json.loads(path.read_text())
            os.unlink(path)
        except (OSError, ValueError):
            return  # another process ended it (and said so)
        since = float(record.get("since", since))
        # a record nobody refreshed for long was left by a process that died: it ended unseen
        until = now if now - beat <= self.options.stale_s else beat
        if until == now:
            log.warning("%s reachable again after %s (unreachable since %s); %s continues",
                        self.url, duration(now - since), clock(since), self.what_pauses)
        try:
            with open(self.state / OUTAGES, "a") as f:
                f.write(json.dumps({"url": self.url, "since": since, "until": until}) + "\n")
        except OSError:
            pass

    def unreachable_seconds(self, start: float, end: float | None = None) -> tuple[float, int]:
        """(seconds the store was unreachable within [start, end], outages) from the node's
        records: the ended ones and the one going on."""
        end = time.time() if end is None else end
        spans = []
        if self.state is not None:
            try:
                for line in (self.state / OUTAGES).read_text().splitlines():
                    try:
                        r = json.loads(line)
                        spans.append((float(r["since"]), float(r["until"])))
                    except (ValueError, KeyError):
                        continue  # a torn line
            except OSError:
                pass
        ongoing = self._read_record()
        if ongoing is not None:
            spans.append((float(ongoing["since"]), end))
        elif self._local_since is not None:
            spans.append((self._local_since, end))
        inside = [(max(a, start), min(b, end)) for a, b in spans if b > start and a < end]
        return sum(b - a for a, b in inside), len(inside)

    # ------------------------------------------------------------------ requests
    def call(self, fn, what: str, *, wait_for_missing: bool = False, on_retry=None):
        """``fn()``; an unreachable store is waited out (see the module). -> fn's result."""
        o = self.options
        since = None
        attempt, last_report = 0, 0.0
        while True:
            try:
                result = fn()
            except BaseException as e:
                kind = kind_of(e)
                if kind == "missing" and wait_for_missing:
                    kind = "unreachable"
                if kind in ("bug", "missing", "full") or not isinstance(e, Exception):
                    raise
                if kind == "denied":
                    raise RemoteError(f"{what}: access to {self.url} denied ({short(e)}); check "
                                      f"the credentials this machine uses for it") from None
                if kind == "credentials":
                    raise RemoteError(
                        f"{what}: no usable credentials for {self.url} ({short(e)}); set them the "
                        f"store's usual way (e.g. AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                        f"~/.aws for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://)") from None
                now = time.time()
                if since is None:
                    since, first = self._begin(now, e, what)
                    if first:
                        log.warning("waiting for %s since %s (%s: %s); retrying for up to %s "
                                    "(data.remote_patience_s); %s pauses whenever it needs what "
                                    "is not in the cache", self.url, clock(since), what, short(e),
                                    duration(o.patience_s), self.what_pauses)
                    last_report = now
                else:
                    record = self._read_record()
                    if record is not None:
                        self._heartbeat(record, e, what)
                waited = now - since
                if waited >= o.patience_s:
                    raise RemoteUnreachable(
                        f"{self.url} unreachable since {clock(since)} ({duration(waited)}, longer "
                        f"than data.remote_patience_s={o.patience_s:g}); last error: {what}: "
                        f"{short(e)}") from None
                if now - last_report >= REPORT_EVERY_S:
                    log.warning("still waiting for %s: unreachable for %s (%s: %s); giving up at "
                                "%s", self.url, duration(waited), what, short(e),
                                clock(since + o.patience_s))
                    last_report = now
                self.retries += 1
                if on_retry is not None:
                    on_retry()
                delay = min(o.backoff_cap, o.backoff * 2 ** min(attempt, 30))
                delay *= random.uniform(0.5, 1.0)  # jitter: a node's processes spread out
                time.sleep(max(0.0, min(delay, since + o.patience_s - now)))
                attempt += 1
                continue
            if since is not None or self._record_open():
                self._end(since if since is not None else time.time())
            return result

    def _record_open(self) -> bool:
        """An outage record is open (another process, or one that died, left it): the store
        answered us, so the outage is over."""
        path = self._record_path()
        return path is not None and path.exists()
