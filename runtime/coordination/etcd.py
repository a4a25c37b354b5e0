"""A small client of etcd's v3 API over gRPC: key reads, compare-and-swap transactions and
leases, with several endpoints tried in turn.

Why our own: the PyPI clients either pin protobuf and grpcio versions far behind ours
(`etcd3`, unmaintained since 2020) or go through the JSON gateway with another HTTP stack
(`etcd3gw`). etcd's API is gRPC, which the server already speaks: stubs generated from its
.proto (proto/etcd/rpc.proto, the part we use) and grpcio are all it takes.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc

from runtime import protos

pb = protos.load("etcd.rpc_pb2")
pb_grpc = protos.load("etcd.rpc_pb2_grpc")


class EtcdUnavailable(ConnectionError):
    """No endpoint answered (etcd down, partitioned, or too slow)."""


@dataclass
class Entry:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


def parse_endpoints(url: str) -> list[str]:
    """etcd://host:port[,host:port...] -> ["host:port", ...]."""
    parts = urlsplit(url)
    if parts.scheme != "etcd" or not parts.netloc:
        raise ValueError(f"--coordinator must look like etcd://HOST:PORT[,HOST:PORT...], got {url!r}")
    endpoints = [e.strip() for e in parts.netloc.split(",") if e.strip()]
    for e in endpoints:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {e!r} must be HOST:PORT")
    return endpoints


class Etcd:
    """Blocking calls with a timeout each; on a failed endpoint the next one is tried."""

    def __init__(self, endpoints: list[str], timeout: float = 2.0):
        self.endpoints, self.timeout = endpoints, timeout
        self._lock = threading.Lock()
        self._current = 0
        self._channels = [grpc.insecure_channel(e) for e in endpoints]

    def _call(self, service: str, method: str, request):
        last: Exception | None = None
        for attempt in range(len(self._channels)):
            with self._lock:
                index = (self._current + attempt) % len(self._channels)
            channel = self._channels[index]
            stub = pb_grpc.KVStub(channel) if service == "kv" else pb_grpc.LeaseStub(channel)
            try:
                response = getattr(stub, method)(request, timeout=self.timeout)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    last = e
                    continue
                if e.code() == grpc.StatusCode.NOT_FOUND and service == "lease":
                    raise LookupError(e.details()) from None  # the lease is gone
                raise
            with self._lock:
                self._current = index
            return response
        raise EtcdUnavailable(f"etcd at {', '.join(self.endpoints)} did not answer: "
                              f"{last.code().name if isinstance(last, grpc.RpcError) else last}")

    # --- keys -----------------------------------------------------------------------------
    def get(self, key: bytes) -> Entry | None:
        response = self._call("kv", "Range", pb.RangeRequest(key=key))
        return _entry(response.kvs[0]) if response.kvs else None

    def get_prefix(self, prefix: bytes) -> list[Entry]:
        response = self._call("kv", "Range", pb.RangeRequest(key=prefix, range_end=_prefix_end(prefix)))
        return [_entry(kv) for kv in response.kvs]

    def txn(self, compare: list, success: list, failure: list | None = None):
        """One transaction: (succeeded, header revision, responses)."""
        response = self._call("kv", "Txn", pb.TxnRequest(compare=compare, success=success, failure=failure or []))
        return response.succeeded, response.header.revision, response.responses

    # --- leases ---------------------------------------------------------------------------
    def grant(self, ttl: int) -> tuple[int, int]:
        response = self._call("lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=ttl))
        if response.error:
            raise EtcdUnavailable(f"etcd refused a lease: {response.error}")
        return response.ID, response.TTL

    def keep_alive(self, lease: int) -> int:
        """Refresh the lease once; its TTL in seconds (0: the lease is gone)."""
        for attempt in range(len(self._channels)):
            with self._lock:
                index = (self._current + attempt) % len(self._channels)
            stub = pb_grpc.LeaseStub(self._channels[index])
            try:
                replies = stub.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=lease)]), timeout=self.timeout)
                for reply in replies:
                    return reply.TTL
                return 0
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                raise
        raise EtcdUnavailable(f"etcd at {', '.join(self.endpoints)} did not answer a keep-alive")

    def revoke(self, lease: int) -> None:
        try:
            self._call("lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease))
        except LookupError:
            pass  # already gone

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


# --- transaction building blocks ------------------------------------------------------------
def created_at(key: bytes, revision: int):
    """Compare: the key exists with this create revision (0: the key does not exist)."""
    return pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.CREATE, key=key, create_revision=revision)


def leased_by(key: bytes, lease: int):
    return pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.LEASE, key=key, lease=lease)


def put(key: bytes, value: bytes, lease: int = 0):
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))


def get(key: bytes):
    return pb.RequestOp(request_range=pb.RangeRequest(key=key))


def delete(key: bytes):
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))


def _entry(kv) -> Entry:
    return Entry(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.lease)


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[:i + 1])
    return b"\0"
