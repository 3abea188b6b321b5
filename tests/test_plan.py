"""``maskdm plan``: the replayed order's figures (downloads per node, cache need, batch mixing),
checked by hand here and against real multi-process runs in test_partitioned_streaming.py."""

from __future__ import annotations

import pytest

from maskdm.pipeline.data.order import StreamOrder
from maskdm.pipeline.data.plan import replay

SIZES, BYTES = [40] * 16, [1000] * 16


def test_each_node_downloads_only_its_partitions_once():
    order = StreamOrder(SIZES, 0, partitions=16, window=8, global_batch=16)
    for nodes in (1, 2, 4):
        r = replay(order, BYTES, nodes, 1, lookahead=8, cache_limit=None)
        assert r.total_downloads == 16  # every shard once over all nodes
        assert r.first_epoch_bytes == 1000 * 16 // nodes and r.later_epoch_bytes == 0
        for node, got in enumerate(r.first_epoch_shards):
            assert got == order.shards_of(order.rank_partitions(node, nodes))
        assert r.partitions_per_node == 16 // nodes


def test_the_order_of_0_2_makes_every_node_download_everything():
    """What the issue measured: one partition, window 1: 32 downloads for 16 shards on 2 nodes."""
    order = StreamOrder(SIZES, 0, global_batch=16)
    r = replay(order, BYTES, 2, 1, lookahead=2, cache_limit=None)
    assert r.total_downloads == 32 and r.first_epoch_bytes == 16000


def test_a_cache_below_the_share_downloads_again_every_epoch_and_the_need_is_the_window():
    order = StreamOrder([10] * 40, 0, partitions=2, window=2, global_batch=4)
    r = replay(order, [100] * 40, 1, 1, lookahead=1, cache_limit=800)
    assert r.need_bytes <= 2 * (2 + 1) * 100  # two partitions x (window + lookahead)
    assert r.later_epoch_bytes >= 0.9 * 40 * 100  # the cache holds 8 of 40: nearly all again
    roomy = replay(order, [100] * 40, 1, 1, lookahead=1, cache_limit=None)
    assert roomy.later_epoch_bytes == 0


def test_the_command_prints_the_table_and_refuses_bad_input(capsys):
    from maskdm.pipeline.cli import main
    assert main(["plan", "--dataset", "16x40x0.5", "--global-batch", "16", "--nodes", "1", "2",
                 "4", "--ranks-per-node", "1"]) == 0
    out = capsys.readouterr().out
    assert "16 partitions x window 8 shards" in out and "(154%)" in out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(" ") and ln.split()[0].isdigit()]
    assert [(int(r[0]), int(r[1]), int(r[4])) for r in rows] == [(1, 16, 16), (2, 8, 16),
                                                                  (4, 4, 16)]
    with pytest.raises(SystemExit, match="expected SHARDSxSAMPLESxMB"):
        main(["plan", "--dataset", "lots"])
    assert main(["plan", "--dataset", "16x40x0.5", "--global-batch", "16", "--partitions",
                 "3"]) == 2
    assert "data.partitions=3 must divide" in capsys.readouterr().out


def test_the_command_reads_a_config_and_a_real_manifest(demo_shards, capsys):
    from maskdm.pipeline.cli import main
    from tests.conftest import ROOT
    config = str(ROOT / "configs" / "test_tiny.yaml")
    assert main(["plan", "--config", config]) == 2  # the config names no shards
    assert "give --shards" in capsys.readouterr().out
    assert main(["plan", "--config", config, "--shards", str(demo_shards), "--nodes", "1", "2",
                 "--ranks-per-node", "1"]) == 0
    out = capsys.readouterr().out
    # test_tiny: global batch 8; 3 shards -> 2 partitions (the largest power of two <= 3)
    assert "3 shards, 150 samples" in out and "global batch 8, 2 partitions x window 8" in out
