"""``maskdm plan``: replay the data order without training and say what it asks of each node.

For N nodes of R ranks, it walks the global batches of an epoch as the loaders do: at each batch a
node needs the current window of every partition its ranks read plus the lookahead
(``StreamOrder.needed_at``, what the prefetcher keeps), and its cache (least recently used first,
never evicting what is needed, like ``shardformat.remote``) downloads what it lacks. It prints, per
node count: the bytes each node downloads in the first epoch (cold cache) and in a later one (the
cache at its limit), the cache a node needs at once, the link rate each node needs at a target
img/s, and how many shards a global batch mixes against a uniform random draw. Only the
manifest is read (a shard folder or a bucket URL), or a dataset is described by its sizes.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict
from dataclasses import dataclass

from .order import (DEFAULT_WINDOW, StreamOrder, auto_partitions, batch_diversity,
                    uniform_diversity)

GIB = 2 ** 30


@dataclass
class NodePlan:
    nodes: int
    partitions_per_node: int  # the most any node reads
    first_epoch_bytes: int  # the most any node downloads in epoch 0 (cold cache)
    later_epoch_bytes: int  # ... in epoch 1 with the cache at the limit
    first_epoch_shards: list[set[int]]  # per node: the shards downloaded in epoch 0
    need_bytes: int  # the most a node's cache must hold at once
    total_downloads: int  # shard downloads of all nodes together in epoch 0


def replay(order: StreamOrder, shard_bytes: list[int], nodes: int, ranks_per_node: int,
           lookahead: int, cache_limit: int | None, epochs: int = 2) -> NodePlan:
    """Simulate every node's cache over ``epochs`` epochs of global batches (see the module)."""
    g = order.global_batch or 1
    steps = -(-order.num_samples // g)
    per_epoch: list[list[int]] = []  # [node][epoch] bytes
    first_sets, need_peak, total = [], 0, 0
    parts_max = 0
    for node in range(nodes):
        mine = order.ranks_partitions(range(node * ranks_per_node, (node + 1) * ranks_per_node),
                                      nodes * ranks_per_node)
        parts_max = max(parts_max, len(mine))
        cache: OrderedDict[int, None] = OrderedDict()
        used = 0
        got = [0] * epochs
        first: set[int] = set()
        for e in range(epochs):
            for k in range(steps):
                position = (e * steps + k) * g
                need = order.needed_at(mine, position, lookahead)  # what the prefetcher keeps
                need_peak = max(need_peak, sum(shard_bytes[s] for s in need))
                keep = set(need)
                for s in need:
                    if s in cache:
                        cache.move_to_end(s)
                        continue
                    size = shard_bytes[s]
                    if cache_limit is not None:
                        for victim in [v for v in cache if v not in keep]:
                            if used + size <= cache_limit:
                                break
                            del cache[victim]
                            used -= shard_bytes[victim]
                    cache[s] = None
                    used += size
                    got[e] += size
                    if e == 0:
                        first.add(s)
                        total += 1
        per_epoch.append(got)
        first_sets.append(first)
    return NodePlan(nodes, parts_max, max(x[0] for x in per_epoch),
                    max(x[-1] for x in per_epoch), first_sets, need_peak, total)


# ---------------------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="a shard folder or s3:// / gs:// / http(s):// URL (only its "
                     "manifest is read)")
    src.add_argument("--dataset", metavar="SHARDSxSAMPLESxMB",
                     help="a dataset described by its sizes, e.g. 3300x1000x395 (VGGFace2 at "
                     "256 px in dwt16 shards of 1000)")
    p.add_argument("--config", help="take the batch and the data.* order settings from a "
                   "training config (the flags below override it)")
    p.add_argument("--global-batch", type=int, help="global batch per micro-step (default 256, "
                   "or the config's)")
    p.add_argument("--partitions", type=int, help="data.partitions (default: automatic)")
    p.add_argument("--window", type=int, help=f"data.shuffle_window (default {DEFAULT_WINDOW})")
    p.add_argument("--lookahead", type=int, help="data.cache_lookahead (default: the window)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="node counts to plan for (default 1 2 4 8)")
    p.add_argument("--ranks-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--img-per-s", type=float, default=10000.0,
                   help="target img/s of the whole job, for the link rate (default 10000)")
    p.add_argument("--cache-gb", type=float, default=0.0,
                   help="data.cache_limit_gb per node (default 0: no limit)")
    p.add_argument("--seed", type=int, help="train.seed (default 0, or the config's)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON lines")


def _dataset(args) -> tuple[list[int], list[int], str]:
    if args.dataset:
        try:
            n, per, mb = args.dataset.lower().split("x")
            n, per, mb = int(n), int(per), float(mb)
        except ValueError:
            raise SystemExit(f"--dataset {args.dataset!r}: expected SHARDSxSAMPLESxMB, e.g. "
                             f"3300x1000x395") from None
        return [per] * n, [int(mb * 2 ** 20)] * n, args.dataset
    from maskdm.shardformat.manifest import DatasetError, load_manifest
    try:
        m = load_manifest(args.shards)
    except DatasetError as e:
        raise SystemExit(f"error: {e}") from None
    return [s.samples for s in m.shards], [s.bytes for s in m.shards], args.shards


def run(args) -> int:
    seed, batch, partitions, window, lookahead = 0, 256, None, None, None
    if args.config:
        from maskdm.pipeline.config import ConfigError, load_config
        try:
            cfg = load_config([args.config])
        except ConfigError as e:
            print(f"error: {e}")
            return 2
        seed, batch = cfg.train.seed, cfg.train.global_batch // cfg.train.grad_accum
        partitions, window = cfg.data.partitions, cfg.data.shuffle_window
        lookahead = cfg.data.cache_lookahead
        if not (args.shards or args.dataset):
            args.shards = cfg.data.shards
    seed = args.seed if args.seed is not None else seed
    batch = args.global_batch or batch
    partitions = args.partitions or partitions
    window = args.window or window or DEFAULT_WINDOW
    lookahead = args.lookahead if args.lookahead is not None else lookahead
    lookahead = window if lookahead is None else lookahead
    if not (args.shards or args.dataset):
        print("error: give --shards DIR|URL, --dataset SHARDSxSAMPLESxMB, or a --config whose "
              "data.shards is set")
        return 2
    sizes, nbytes, what = _dataset(args)
    partitions = partitions or auto_partitions(len(sizes), batch)
    from .order import OrderError
    try:
        order = StreamOrder(sizes, seed, partitions=partitions, window=window, global_batch=batch)
    except OrderError as e:
        print(f"error: {e}")
        return 2
    limit = int(args.cache_gb * GIB) if args.cache_gb > 0 else None
    mixed = batch_diversity(order, min(200, max(1, order.num_samples // batch))).mean()
    uniform = uniform_diversity(sizes, batch)
    total = sum(nbytes)
    epoch_s = order.num_samples / args.img_per_s
    head = (f"{what}: {len(sizes)} shards, {order.num_samples} samples, {total / GIB:.2f} GiB; "
            f"global batch {batch}, {partitions} partitions x window {window} shards, lookahead "
            f"{lookahead}, {args.ranks_per_node} rank(s) per node, cache limit "
            f"{f'{args.cache_gb:g} GiB' if limit else 'none'}, target {args.img_per_s:g} img/s "
            f"(an epoch every {epoch_s:.0f} s)")
    mix = (f"a global batch mixes {mixed:.1f} shards on average; a uniform random draw of {batch} "
           f"samples mixes {uniform:.1f} ({mixed / uniform:.0%})")
    rows = []
    for n in args.nodes:
        if (batch % (n * args.ranks_per_node)) != 0:
            rows.append((n, None))
            continue
        rows.append((n, replay(order, nbytes, n, args.ranks_per_node, lookahead, limit)))
    if args.json:
        for n, r in rows:
            if r is not None:
                print(json.dumps({"nodes": n, "partitions_per_node": r.partitions_per_node,
                                  "first_epoch_gib": r.first_epoch_bytes / GIB,
                                  "later_epoch_gib": r.later_epoch_bytes / GIB,
                                  "need_gib": r.need_bytes / GIB,
                                  "downloads_epoch0": r.total_downloads,
                                  "link_gbit_s": r.first_epoch_bytes * 8 / epoch_s / 1e9,
                                  "mixed": mixed, "uniform": uniform}))
        return 0
    unit, div = ("GiB", GIB) if total >= 10 * GIB else ("MiB", 2 ** 20)
    print(head)
    print(mix)
    print(f"{'nodes':>5} {'partitions':>10} {'epoch 0 ' + unit:>11} {'later ' + unit:>9} "
          f"{'downloads':>9} {'cache need ' + unit:>14} {'link Gbit/s':>11}")
    for n, r in rows:
        if r is None:
            print(f"{n:>5}  (the global batch {batch} is not a multiple of {n} x "
                  f"{args.ranks_per_node} ranks)")
            continue
        print(f"{n:>5} {r.partitions_per_node:>10} {r.first_epoch_bytes / div:>11.2f} "
              f"{r.later_epoch_bytes / div:>9.2f} {r.total_downloads:>9} "
              f"{r.need_bytes / div:>14.2f} {r.first_epoch_bytes * 8 / epoch_s / 1e9:>11.2f}"
              + ("  (over the cache limit: raise it or lower the window)"
                 if limit is not None and r.need_bytes > limit else ""))
    print("per node (the busiest): epoch 0 = a cold cache; later = an epoch after that with the "
          "cache limit; downloads = all nodes' shard downloads in epoch 0 (the dataset has "
          f"{len(sizes)}); link = epoch 0's bytes at the target rate")
    return 0
