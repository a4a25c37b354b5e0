"""tta.v1.AdaptationService: the control RPCs, each one typed engine call."""
from __future__ import annotations

import hashlib
import json

from runtime.engine import Engine, EngineError
from runtime.engine.errors import shown
from runtime.model_config import LoadedModel
from runtime.serving.errors import Malformed, Request, trailers_of, unary
from runtime.serving.wire import stream_info, tta_grpc, tta_pb

EXPORT_CHUNK = 2**20 - 2**16  # bytes of a file per ExportChunk: with the first chunk's fields, under 1 MiB


class AdaptationService(tta_grpc.AdaptationServiceServicer):
    def __init__(self, model: LoadedModel, engine: Engine):
        self.model, self.engine, self.metrics = model, engine, engine.metrics

    def _check_model(self, request) -> None:
        if getattr(request, "model", "") not in ("", self.model.name):
            raise EngineError("NOT_FOUND", f"unknown model {shown(request.model)}; this server serves {self.model.name!r}")

    @unary("ListPolicies")
    async def ListPolicies(self, request, context):
        self._check_model(request)
        described, supported = self.engine.describe_policies()
        return tta_pb.ListPoliciesResponse(policies=[tta_pb.PolicyDescription(
            name=d["name"], summary=d["summary"], updates_weights=d["updates_weights"],
            hyperparameters=[tta_pb.Hyperparameter(name=h["name"], default_value=json.dumps(h["default"], default=str),
                                                   range=h["range"], meaning=h["meaning"])
                             for h in d["hyperparameters"]]) for d in described], supported=supported)

    @unary("SetPolicy")
    async def SetPolicy(self, request, context):
        self._check_model(request)
        return stream_info(await self.engine.set_policy(request.stream_id, request.policy,
                                                        dict(request.hyperparameters)))

    @unary("GetStream")
    async def GetStream(self, request, context):
        self._check_model(request)
        return stream_info(await self.engine.get_stream(request.stream_id))

    @unary("ListStreams")
    async def ListStreams(self, request, context):
        self._check_model(request)
        infos = await self.engine.list_streams()
        return tta_pb.ListStreamsResponse(streams=[stream_info(i) for i in infos],
                                          stream_limit=self.engine.max_streams,
                                          memory_budget_bytes=int(self.engine.memory_budget))

    @unary("ResetStream")
    async def ResetStream(self, request, context):
        self._check_model(request)
        return stream_info(await self.engine.reset_stream(request.stream_id))

    @unary("DeleteStream")
    async def DeleteStream(self, request, context):
        self._check_model(request)
        return stream_info(await self.engine.delete_stream(request.stream_id))

    @unary("ReleaseStream")
    async def ReleaseStream(self, request, context):
        self._check_model(request)
        return stream_info(await self.engine.hand_over(request.stream_id))

    @unary("Snapshot")
    async def Snapshot(self, request, context):
        self._check_model(request)
        name, info = await self.engine.snapshot(request.stream_id, request.name)
        return tta_pb.SnapshotResponse(name=name, stream=stream_info(info))

    @unary("Rollback")
    async def Rollback(self, request, context):
        self._check_model(request)
        return stream_info(await self.engine.rollback(request.stream_id, request.name))

    @unary("Feedback")
    async def Feedback(self, request, context):
        self._check_model(request)
        return tta_pb.FeedbackResponse(**await self.engine.feedback(request.request_id, list(request.labels)))

    async def ExportStream(self, request, context):
        """Server streaming: errors are counted and mapped as @unary does (serving/errors.py), before
        the first chunk; the file is built on the worker, then sent in EXPORT_CHUNK pieces."""
        account = Request(self.metrics, "ExportStream")
        try:
            if isinstance(request, Malformed):
                raise request.error()
            self._check_model(request)
            exported = await self.engine.export_stream(request.stream_id, request.format)
        except EngineError as e:
            await context.abort(*account.failed(e), trailers_of(e))
        account.ok()
        data = exported["data"]
        yield tta_pb.ExportChunk(data=data[:EXPORT_CHUNK], file_name=exported["file_name"], format=exported["format"],
                                 note=exported["note"], total_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                 policy=exported["policy"], step=exported["step"])
        for start in range(EXPORT_CHUNK, len(data), EXPORT_CHUNK):
            yield tta_pb.ExportChunk(data=data[start:start + EXPORT_CHUNK])
