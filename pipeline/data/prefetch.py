"""Download ahead: a background thread that keeps the next shards of the order in the node's cache.

The sample order is a pure function of the loader's state and each partition visits its shards a
window at a time (``order.py``), so from the loader's stream position the prefetcher knows the
shards its rank is reading (the current window of each partition the rank reads) and the ones
after them. It keeps those (plus ``lookahead`` shards per partition) downloaded and verified,
marking them recently used so that making room (``RemoteShards.fetch``, bounded by
``data.cache_limit_gb``) evicts shards outside it first. Readers never wait on it: a shard that is
not there yet is fetched by whoever needs it first (the node's download slot makes the other one
wait for that download instead of starting a second). An unreachable store is waited out inside
the fetch; past the patience the error stops the loader at its next batch. A damaged shard is left
to the reader, which reports it. A resumed loader starts its window at the resumed position, so
the cache refills from where training stopped.
"""

from __future__ import annotations

import threading

from maskdm.shardformat.remote import RemoteDamaged, _touch

from .order import StreamOrder


class Prefetcher:
    def __init__(self, reader, order: StreamOrder, rank: int, world_size: int, lookahead: int,
                 position: int):
        self.reader, self.remote = reader, reader.remote
        self.order = order
        self.partitions = order.rank_partitions(rank, world_size)
        self.lookahead = max(0, int(lookahead))
        self.error: BaseException | None = None
        self.stats = {"shards": 0, "hits": 0, "downloads": 0, "damaged": 0}
        self._pos = int(position)
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="maskdm-prefetch", daemon=True)
        self._thread.start()

    def advance(self, position: int) -> None:
        """The loader reached stream ``position``; raises what stopped the prefetcher, if any."""
        if self.error is not None:
            raise self.error
        with self._cv:
            self._pos = int(position)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def hit_rate(self) -> float | None:
        """Share of the shards that were already in the cache when they entered the window (a
        warm cache: 1; the first epoch of a cold one: 0 even when every download came in
        time; the data-wait share says whether they did)."""
        n = self.stats["shards"]
        return self.stats["hits"] / n if n else None

    # ------------------------------------------------------------------ the window
    def window(self, position: int) -> list[int]:
        """The shards this rank reads from stream ``position`` on: the current window of each of
        its partitions, then ``lookahead`` more per partition, in the order they are needed."""
        return self.order.needed_at(self.partitions, position, self.lookahead)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        seen: set[int] = set()  # shards counted for the hit rate (each once per visit)
        damaged: set[int] = set()  # not what the manifest says: the reader reports them
        done = None
        while True:
            with self._cv:
                while not self._stop and self._pos == done:
                    self._cv.wait(timeout=1.0)
                if self._stop:
                    return
                position = self._pos
            try:
                window = self.window(position)
                keep = {self.reader.shard_entry(s).name for s in window}
                seen &= set(window)
                for s in window:
                    e = self.reader.shard_entry(s)
                    path = self.remote.cached(e.name, e.bytes, e.sha256)
                    if s not in seen:
                        seen.add(s)
                        self.stats["shards"] += 1
                        self.stats["hits"] += path is not None
                    if path is not None:
                        _touch(path)  # in the window: evicted last
                        continue
                    if s in damaged:
                        continue
                    try:
                        self.remote.fetch(e.name, e.bytes, e.sha256, keep=keep)
                        self.stats["downloads"] += 1
                    except RemoteDamaged:
                        damaged.add(s)
                        self.stats["damaged"] += 1
                    with self._cv:
                        if self._stop:
                            return
                done = position
            except BaseException as e:  # never die silently: the loader raises it
                self.error = e
                return
