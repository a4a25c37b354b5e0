"""Calls to other replicas: ReleaseStream at a holder's advertised address, with the control
token when one is set (replicas share it), over TLS when this server serves TLS."""
from __future__ import annotations

import logging
import threading

import grpc

from runtime import protos
from runtime.protocol import bearer_headers

log = logging.getLogger("tta.coordination")
tta_pb = protos.load("tta.v1.adaptation_pb2")
tta_grpc = protos.load("tta.v1.adaptation_pb2_grpc")


class Peers:
    def __init__(self, model: str, token: str | None = None, root_certificates: bytes | None = None):
        self.model = model
        self.metadata = tuple((bearer_headers(token) or {}).items())
        self.credentials = grpc.ssl_channel_credentials(root_certificates) if root_certificates else None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _stub(self, address: str):
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = (grpc.secure_channel(address, self.credentials) if self.credentials
                           else grpc.insecure_channel(address))
                self._channels[address] = channel
        return tta_grpc.AdaptationServiceStub(channel)

    def ask_release(self, address: str, stream_id: str, timeout: float) -> bool:
        """Ask the holder at `address` to hand the stream over; True when it answered that it did."""
        if not address:
            return False
        try:
            self._stub(address).ReleaseStream(tta_pb.StreamRequest(model=self.model, stream_id=stream_id),
                                              timeout=max(timeout, 0.05), metadata=self.metadata)
            return True
        except grpc.RpcError as e:
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                log.warning("replica at %s did not release stream %r: %s %s", address, stream_id, e.code().name,
                            e.details())
            return False

    def close(self) -> None:
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
