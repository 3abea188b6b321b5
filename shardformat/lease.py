"""One writer per folder in a bucket: a lease object (``.maskdm-lease.json``) that the job writing
the folder renews while it runs.

A bucket has no locks, and nodes' clocks disagree, so the lease is judged by change, never by its
time stamps: a job that finds another job's lease watches it for ``ttl_s`` seconds (the
holder's, if longer); a lease renewed meanwhile (its ``beat`` moved) belongs to a live job and
the newcomer is refused, naming it; one left unchanged belongs to a job that died without releasing it (killed -9, a lost node)
and is taken over, said so. A job writes its lease, waits ``settle_s`` and reads it back: of two
jobs starting together the one whose write landed last holds it, the other sees a foreign token
and is refused. The holder renews every ``ttl_s / 3`` seconds; a renewal that finds another
token marks the lease lost, and ``check()`` (called before the holder commits anything) stops
the job. Leases are released (deleted) on every orderly exit, pre-emption included, so the
re-queued job starts at once.

The lease's fields are read from a bucket others can write: they are only shown (clipped,
credentials in URLs redacted), never used to pick a path.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from typing import Callable

from .fsutil import redact_url

NAME = ".maskdm-lease.json"


class LeaseHeld(RuntimeError):
    """Another live job writes the folder."""


class LeaseLost(RuntimeError):
    """Another job took the folder over while this one held it."""


def _shown(value: object, limit: int = 120) -> str:
    return redact_url(str(value))[:limit]


class Lease:
    """The lease on one folder. ``read() -> dict | None``, ``write(dict)`` and ``delete()`` are
    the folder's own calls (with its retries); ``where`` names the folder in messages."""

    def __init__(self, where: str, what: str, read: Callable[[], dict | None],
                 write: Callable[[dict], None], delete: Callable[[], None], *,
                 ttl_s: float = 90.0, settle_s: float | None = None):
        self.where, self.what = where, what
        self._read, self._write, self._delete = read, write, delete
        self.ttl_s = float(ttl_s)
        self.settle_s = min(2.0, self.ttl_s / 10) if settle_s is None else settle_s
        self.token = secrets.token_hex(16)
        self.record = {"token": self.token, "what": what, "host": socket.gethostname(),
                       "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "beat": 0, "ttl_s": self.ttl_s}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def holder(rec: dict) -> str:
        return (f"{_shown(rec.get('what', 'a job'), 40)} pid {_shown(rec.get('pid', '?'), 12)} "
                f"on {_shown(rec.get('host', '?'), 80)} since {_shown(rec.get('since', '?'), 40)}")

    def _foreign(self) -> dict | None:
        rec = self._read()
        if not isinstance(rec, dict):
            return {} if rec is not None else None  # not a lease: treated as a dead one
        return None if rec.get("token") == self.token else rec

    def acquire(self, log: Callable[[str], None] = print) -> None:
        """Hold the lease or raise LeaseHeld; then renew it in the background."""
        rec = self._foreign()
        if rec is not None:
            beat = rec.get("beat")
            # the holder renews every its ttl / 3: watched for the longer of both ttls (a
            # holder's claim of more than an hour is not believed)
            theirs = rec.get("ttl_s")
            theirs = float(theirs) if isinstance(theirs, (int, float)) and theirs > 0 else 0.0
            watch = max(self.ttl_s, min(theirs, 3600.0))
            log(f"{self.where} has a lease of {self.holder(rec)}; watching it for "
                f"{watch:.0f} s to see whether that job is alive")
            deadline = time.monotonic() + watch
            while time.monotonic() < deadline:
                time.sleep(min(watch / 6, max(0.0, deadline - time.monotonic())))
                now = self._foreign()
                if now is None:  # released (or gone): ours to take
                    break
                if now.get("token") != rec.get("token") or now.get("beat") != beat:
                    raise LeaseHeld(f"{self.where} is being written by another job "
                                    f"({self.holder(now)}): wait for it to finish, or choose "
                                    f"another folder")
            else:
                log(f"taking over the lease of {self.holder(rec)}: not renewed in "
                    f"{watch:.0f} s, so that job is gone")
        self._write(dict(self.record))
        time.sleep(self.settle_s)
        rec = self._foreign()
        if rec is not None:  # another job wrote after us: it holds the folder
            raise LeaseHeld(f"{self.where} was claimed at the same moment by another job "
                            f"({self.holder(rec)}); choose another folder, or wait for it")
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name=f"lease {self.where}")
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                rec = self._foreign()
                if rec is not None:
                    self.lost = self.holder(rec)
                    return
                self.record["beat"] += 1
                self._write(dict(self.record))
            except Exception:  # an outage longer than the store's patience: the next renewal
                continue       # tries again; check() decides only on a foreign token

    def check(self) -> None:
        """Raise LeaseLost if another job took the folder over."""
        if self.lost is not None:
            raise LeaseLost(f"{self.where} was taken over by another job ({self.lost}) while "
                            f"this one ran; stopping without writing more. Two jobs must not "
                            f"write one folder: see who started it")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (on every orderly exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ttl_s)
            self._thread = None
            try:
                if self._foreign() is None and self.lost is None:
                    self._delete()
            except Exception:  # unreachable: the next job waits ttl_s and takes it over
                pass


def bucket_lease(fs, key: str, where: str, what: str, call: Callable, *,
                 ttl_s: float) -> Lease:
    """A lease at ``key`` (a full path in ``fs``, an fsspec filesystem); ``call(what, fn)`` runs
    ``fn`` with the folder's retries."""
    def read():
        def cat():
            try:  # a lease is small: no more than 64 KiB of whatever is there is read
                return fs.cat_file(key, start=0, end=65536)
            except FileNotFoundError:
                return None
        data = call(NAME, cat)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return {}

    def write(rec):
        call(NAME, lambda: fs.pipe_file(key, json.dumps(rec).encode()))

    def delete():
        def rm():
            try:
                fs.rm_file(key)
            except FileNotFoundError:
                pass
        call(NAME, rm)
    return Lease(where, what, read, write, delete, ttl_s=ttl_s)
