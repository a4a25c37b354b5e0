"""One holder per stream across replicas, on etcd.

Keys (under /tta/<model>/):
  replicas/<replica id>  -> {"replica", "advertise"}, on this replica's lease: who is alive
  owners/<stream>        -> {"replica", "advertise"}, on the holder's lease: who holds the stream
  state/<stream>         -> {"version", "file", "replica"}: the stream's committed checkpoint

A replica holds a stream only while its owner key is on this replica's lease (one lease per
replica, kept alive every TTL/3). Taking a stream is a transaction that creates the owner key
only if it does not exist; a checkpoint commit is a transaction that moves the state pointer
only if the owner key still is the one this replica created, on its lease (fencing): a replica
that lost its lease - paused, partitioned, slow to notice - can never move the pointer, and the
file it wrote under a new name is never read. This replica stops serving its streams once its
lease may have expired (TTL after the last keep-alive that succeeded), even before it hears so.

Hand-off: a replica asked for a stream that another live replica holds asks that holder (the
ReleaseStream RPC at its advertised address) to apply its owed update, checkpoint and release,
then takes the key and loads the committed checkpoint; a dead holder's key goes with its lease
after the TTL. A restarted replica revokes the lease of its own previous process (replica ids
must be unique, like StatefulSet pod names).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from runtime.checkpoints import file_name
from runtime.coordination import etcd
from runtime.coordination.etcd import Etcd, EtcdUnavailable

log = logging.getLogger("tta.coordination")


class NotHeld(Exception):
    """A commit refused by etcd: another replica holds the stream now (fencing)."""


class Unheld(Exception):
    """Not held now as far as this replica knows (its lease lapsed or was lost, or the stream was
    released): nothing was asked of etcd. The copy here may still continue the committed state
    (a pause that nobody used to take the stream): taking the stream again tells."""


class HandoffTimeout(Exception):
    def __init__(self, holder: str, advertise: str, waited: float):
        super().__init__(f"held by replica {holder} ({advertise})")
        self.holder, self.advertise, self.waited = holder, advertise, waited


class NoLease(Exception):
    """This replica's lease may have expired (etcd unreachable for longer than the TTL, or lost)."""


@dataclass
class Pointer:
    version: int = 0
    file: str = ""


class Ownership:
    def __init__(self, client: Etcd, model: str, replica_id: str, advertise: str, ttl: int, metrics,
                 ask_release: Callable[[str, str, float], bool]):
        self.etcd, self.replica_id, self.advertise, self.ttl = client, replica_id, advertise, max(2, int(ttl))
        self.metrics, self.model, self.ask_release = metrics, model, ask_release
        self.prefix = f"/tta/{file_name(model)}/".encode()
        self._me = json.dumps({"replica": replica_id, "advertise": advertise}).encode()
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}  # stream id -> create revision of our owner key
        self._pointers: dict[str, Pointer] = {}  # stream id -> committed checkpoint, as last read or written
        self.lease, self._lease_until = 0, 0.0
        self.up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- keys ------------------------------------------------------------------------------
    def _key(self, kind: str, stream_id: str) -> bytes:
        return self.prefix + kind.encode() + b"/" + file_name(stream_id).encode()

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Take a lease and register this replica (its previous process's lease is revoked)."""
        previous = self.etcd.get(self._key("replicas", self.replica_id))
        if previous is not None and previous.lease:
            log.warning("replica %s: revoking the lease of its previous process (its streams are free now)",
                        self.replica_id)
            self.etcd.revoke(previous.lease)
        self._new_lease()
        self._thread = threading.Thread(target=self._keep_alive, name="tta-lease", daemon=True)
        self._thread.start()

    def _new_lease(self) -> None:
        started = time.monotonic()
        lease, ttl = self.etcd.grant(self.ttl)
        self.etcd.txn([], [etcd.put(self._key("replicas", self.replica_id), self._me, lease)])
        with self._lock:
            self.lease, self._lease_until = lease, started + ttl
        self._set_up(True)

    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            started = time.monotonic()
            try:
                if self.lease == 0:
                    self._new_lease()
                    continue
                ttl = self.etcd.keep_alive(self.lease)
            except (EtcdUnavailable, OSError) as e:
                self._set_up(False)
                log.warning("etcd unreachable (%s): serving the %d streams held until the lease would expire, "
                            "taking no new ones", e, len(self._held))
                continue
            except Exception:  # noqa: BLE001 - the keep-alive must go on
                log.exception("lease keep-alive failed")
                continue
            if ttl > 0:
                with self._lock:
                    self._lease_until = started + ttl
                self._set_up(True)
            else:
                self._lost()

    def _lost(self) -> None:
        with self._lock:
            dropped = list(self._held)
            self._held.clear()
            self.lease = 0
        self.metrics.lease_losses.labels(self.model).inc()
        self.metrics.streams_held.labels(self.model).set(0)
        log.error("replica %s lost its etcd lease: it no longer holds %d streams (%s); their copies here are not "
                  "served until taken again", self.replica_id, len(dropped), ", ".join(dropped[:10]))
        try:
            self._new_lease()
        except (EtcdUnavailable, OSError):
            pass  # tried again at the next tick

    def _set_up(self, up: bool) -> None:
        self.up = up
        self.metrics.coordinator_up.labels(self.model).set(1 if up else 0)

    def close(self) -> None:
        """Release every stream at once (revoking the lease deletes their owner keys)."""
        self._stop.set()
        lease = self.lease
        with self._lock:
            self._held.clear()
            self.lease = 0
        if lease:
            try:
                self.etcd.revoke(lease)
            except (EtcdUnavailable, OSError) as e:
                log.warning("could not revoke the lease (%s): its streams are free after %d s", e, self.ttl)
        self.metrics.streams_held.labels(self.model).set(0)

    # --- holding ---------------------------------------------------------------------------
    def lease_valid(self) -> bool:
        return self.lease != 0 and time.monotonic() < self._lease_until

    def holds(self, stream_id: str) -> bool:
        return stream_id in self._held and self.lease_valid()

    def held(self) -> list[str]:
        return list(self._held)

    def pointer(self, stream_id: str) -> Pointer:
        return self._pointers.get(stream_id, Pointer())

    def acquire(self, stream_id: str, timeout: float) -> Pointer:
        """Hold the stream (asking its holder to hand it over if need be) within `timeout` s."""
        owner, state = self._key("owners", stream_id), self._key("state", stream_id)
        started = time.monotonic()
        asked_holder = False
        while True:
            if not self.lease_valid():
                raise NoLease()
            lease = self.lease
            ok, revision, responses = self.etcd.txn(
                [etcd.created_at(owner, 0)], [etcd.put(owner, self._me, lease), etcd.get(state)], [etcd.get(owner)])
            if ok:
                kvs = responses[1].response_range.kvs
                return self._took(stream_id, revision, kvs[0].value if kvs else None, asked_holder, started)
            kvs = responses[0].response_range.kvs
            if not kvs:
                continue  # released in between
            entry = kvs[0]
            if entry.lease == lease:  # ours already (another request took it a moment ago)
                current = self.etcd.get(state)
                return self._took(stream_id, entry.create_revision, current.value if current else None, False,
                                  started)
            holder = _json(entry.value)
            if holder.get("replica") == self.replica_id:  # our own previous process
                self.etcd.revoke(entry.lease)
                continue
            left = timeout - (time.monotonic() - started)
            if left <= 0:
                self.metrics.handoff_timeouts.labels(self.model).inc()
                raise HandoffTimeout(holder.get("replica", "?"), holder.get("advertise", "?"),
                                     time.monotonic() - started)
            asked_holder = True
            if not self.ask_release(holder.get("advertise", ""), stream_id, left):
                time.sleep(min(0.2, max(left, 0)))  # unreachable holder: its key goes with its lease

    def _took(self, stream_id: str, revision: int, state: bytes | None, handed_over: bool, started: float) -> Pointer:
        info = _json(state) if state else {}
        pointer = Pointer(int(info.get("version", 0)), str(info.get("file", "")))
        with self._lock:
            self._held[stream_id] = revision
            self._pointers[stream_id] = pointer
        self.metrics.streams_held.labels(self.model).set(len(self._held))
        if handed_over:
            self.metrics.handoffs.labels(self.model, "in").inc()
            self.metrics.handoff_seconds.labels(self.model, "in").observe(time.monotonic() - started)
        return pointer

    def release(self, stream_id: str, handed_over: bool = False) -> None:
        """Give the stream up (after its final checkpoint): its owner key goes."""
        revision = self._held.pop(stream_id, None)
        self.metrics.streams_held.labels(self.model).set(len(self._held))
        if revision is None:
            return
        owner = self._key("owners", stream_id)
        self.etcd.txn([etcd.created_at(owner, revision)], [etcd.delete(owner)])
        if handed_over:
            self.metrics.handoffs.labels(self.model, "out").inc()

    def _fence(self, stream_id: str) -> list:
        revision = self._held.get(stream_id)
        if revision is None or not self.lease_valid():
            raise Unheld(stream_id)
        owner = self._key("owners", stream_id)
        return [etcd.created_at(owner, revision), etcd.leased_by(owner, self.lease)]

    def commit(self, stream_id: str, version: int, file: str) -> None:
        """Point the stream's state at `file` (checkpoint `version`) if still held; else NotHeld."""
        record = json.dumps({"version": version, "file": file, "replica": self.replica_id}).encode()
        ok, _, _ = self.etcd.txn(self._fence(stream_id), [etcd.put(self._key("state", stream_id), record)])
        if not ok:
            self._refused(stream_id)
        self._pointers[stream_id] = Pointer(version, file)

    def forget(self, stream_id: str) -> None:
        """Delete the stream's state pointer (DeleteStream) if still held; else NotHeld."""
        ok, _, _ = self.etcd.txn(self._fence(stream_id), [etcd.delete(self._key("state", stream_id))])
        if not ok:
            self._refused(stream_id)
        self._pointers.pop(stream_id, None)

    def _refused(self, stream_id: str):
        self.metrics.fencing_refusals.labels(self.model).inc()
        with self._lock:
            self._held.pop(stream_id, None)
        self.metrics.streams_held.labels(self.model).set(len(self._held))
        raise NotHeld(stream_id)

    def holders(self) -> dict[str, str]:
        """Stream file names -> holding replica, for every held stream of this model (tta ctl streams)."""
        prefix = self.prefix + b"owners/"
        return {e.key[len(prefix):].decode(): _json(e.value).get("replica", "?") for e in self.etcd.get_prefix(prefix)}


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
