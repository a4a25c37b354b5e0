"""runtime/coordination against a real etcd (Debian's etcd-server, started here on loopback):
the owner key is taken once, commits are fenced, a restarted replica frees its predecessor's
streams, a hand-off that does not come in time names the holder, and state files written by a
replica that lost the stream are never read."""
from __future__ import annotations

import pytest
import torch
from test_replicas import Etcd

from runtime.checkpoints import file_name
from runtime.coordination.etcd import Etcd as Client
from runtime.coordination.etcd import parse_endpoints
from runtime.coordination.fenced_store import FencedStore
from runtime.coordination.ownership import HandoffTimeout, NotHeld, Ownership, Unheld
from runtime.metrics import Metrics


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = Etcd(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


def replica(etcd, name: str, model: str, release=lambda address, stream, timeout: False, ttl: int = 10):
    metrics = Metrics(model, [])
    owner = Ownership(Client(parse_endpoints(etcd.url)), model, name, f"127.0.0.1:1{len(name)}", ttl, metrics,
                      release)
    owner.start()
    return owner, metrics


def value(metrics, name: str) -> float:
    return metrics.registry.get_sample_value(name, {"model": metrics.model})


def test_endpoints_are_parsed_and_bad_ones_refused():
    assert parse_endpoints("etcd://a:1,b:2") == ["a:1", "b:2"]
    for bad in ("http://a:1", "etcd://", "etcd://a", "etcd://a:x"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_one_holder_and_fenced_commits(etcd):
    a, a_metrics = replica(etcd, "a", "fence")
    b, b_metrics = replica(etcd, "b", "fence")
    try:
        assert a.acquire("s", timeout=1).version == 0
        a.commit("s", 1, "s.v1.pt")
        with pytest.raises(HandoffTimeout) as timed_out:  # a holds it and does not hand it over
            b.acquire("s", timeout=0.5)
        assert timed_out.value.holder == "a" and timed_out.value.advertise == a.advertise
        assert value(b_metrics, "tta_handoff_timeouts_total") == 1

        # a's lease goes (as if it had paused past the TTL); b takes the stream and its state
        a.etcd.revoke(a.lease)
        assert b.acquire("s", timeout=1).version == 1
        assert a.holds("s")  # a has not noticed yet ...
        with pytest.raises(NotHeld):  # ... but its commit is refused by etcd
            a.commit("s", 2, "s.v2.pt")
        assert value(a_metrics, "tta_fencing_refusals_total") == 1
        assert not a.holds("s")
        b.commit("s", 2, "s.v2.pt")
        assert b.etcd.get(b"/tta/fence/state/s").value.startswith(b'{"version": 2')
        with pytest.raises(Unheld):  # a no longer claims it: nothing is even asked of etcd
            a.commit("s", 3, "s.v3.pt")
    finally:
        a.close()
        b.close()


def test_a_restarted_replica_frees_its_predecessors_streams(etcd):
    first, _ = replica(etcd, "r", "restart")
    first.acquire("s", timeout=1)
    first._stop.set()  # the process "dies": no more keep-alives, its lease still alive in etcd
    second, _ = replica(etcd, "r", "restart")  # same replica id: its predecessor's lease is revoked
    other, _ = replica(etcd, "o", "restart")
    try:
        assert other.acquire("s", timeout=1).version == 0  # at once, not after the TTL
    finally:
        second.close()
        other.close()


def test_a_hand_off_asks_the_holder_and_takes_over(etcd):
    holder, holder_metrics = replica(etcd, "h", "handoff")
    asked = []

    def release(address, stream, timeout):
        asked.append((address, stream))
        holder.release(stream, handed_over=True)
        return True

    taker, taker_metrics = replica(etcd, "t", "handoff", release=release)
    try:
        holder.acquire("cam", timeout=1)
        holder.commit("cam", 4, "cam.v4.pt")
        assert taker.acquire("cam", timeout=2).version == 4
        assert asked == [(holder.advertise, "cam")]
        assert not holder.holds("cam") and taker.holds("cam")
        assert taker.holders() == {"cam": "t"}
        assert value(taker_metrics, "tta_handoffs_total") is None  # labelled by direction:
        assert taker_metrics.registry.get_sample_value("tta_handoffs_total",
                                                       {"model": "handoff", "direction": "in"}) == 1
        assert holder_metrics.registry.get_sample_value("tta_handoffs_total",
                                                        {"model": "handoff", "direction": "out"}) == 1
    finally:
        holder.close()
        taker.close()


def test_a_fenced_checkpoint_file_is_removed_and_never_read(etcd, tmp_path):
    a, _ = replica(etcd, "a", "files")
    b, _ = replica(etcd, "b", "files")
    store_a, store_b = FencedStore(tmp_path, ownership=a), FencedStore(tmp_path, ownership=b)
    record = {"policy": "bn", "hyperparameters": {}, "step": 1, "adapter": {"w": torch.ones(3)}}
    try:
        a.acquire("s", timeout=1)
        store_a.save_stream("s", record)
        a.etcd.revoke(a.lease)
        assert b.acquire("s", timeout=1).version == 1
        with pytest.raises(NotHeld):
            store_a.save_stream("s", {**record, "step": 99})
        files = sorted(p.name for p in (tmp_path / "streams").iterdir())
        assert files == [f"{file_name('s')}.v1.pt"]  # the refused v2 is gone
        assert store_b.load_stream("s")["step"] == 1
        store_b.save_stream("s", {**record, "step": 2})
        store_b.save_stream("s", {**record, "step": 3})
        files = sorted(p.name for p in (tmp_path / "streams").iterdir())
        assert files == ["s.v2.pt", "s.v3.pt"]  # the previous one is kept, older ones go
        assert store_b.load_stream("s")["step"] == 3
        store_b.delete_stream("s")
        assert list((tmp_path / "streams").iterdir()) == [] and b.etcd.get(b"/tta/files/state/s") is None
    finally:
        a.close()
        b.close()
