"""inference.GRPCInferenceService (Open Inference Protocol, Triton flavour) over the engine."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

from runtime.engine import Engine, EngineError
from runtime.model_config import LoadedModel
from runtime.preprocess import DecodeBudget, InputError
from runtime.protocol import INPUT_NAME, OUTPUT_NAME, VERSION
from runtime.serving import wire
from runtime.serving.errors import Malformed, Outcomes, Request, trailers_of, unary
from runtime.serving.wire import mc, pb, pb_grpc

EXTENSIONS = ["classification", "model_configuration", "parameters", "sequence", "sequence(string_id)",
              "statistics", "tta"]
STREAM_WINDOW = 16  # requests of one ModelStreamInfer call read ahead and queued


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, model: LoadedModel, engine: Engine, max_batch: int, decodes: DecodeBudget | None = None):
        self.model, self.engine, self.max_batch = model, engine, max_batch
        self.decodes = decodes or DecodeBudget()  # pixels decoded per request and by all requests at once
        self.metrics = engine.metrics
        self.ready = True
        self.outcomes = Outcomes()

    # --- health and metadata --------------------------------------------------------------
    @unary("ServerLive", quiet=True)
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @unary("ServerReady", quiet=True)
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    @unary("ModelReady")
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.ready and request.name == self.model.name
                                     and request.version in ("", "1"))

    @unary("ServerMetadata", quiet=True)
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="tta-runtime", version=VERSION, extensions=EXTENSIONS)

    @unary("ModelMetadata")
    async def ModelMetadata(self, request, context):
        wire.check_model(self.model, request.name, request.version)
        m = self.model
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=m.name, versions=["1"], platform=m.platform,
            inputs=[tm(name=INPUT_NAME, datatype="FP32", shape=[-1, m.channels, m.height, m.width])],
            outputs=[tm(name=OUTPUT_NAME, datatype="FP32", shape=[-1, m.num_classes])])

    @unary("ModelConfig")
    async def ModelConfig(self, request, context):
        wire.check_model(self.model, request.name, request.version)
        m = self.model
        config = mc.ModelConfig(
            name=m.name, platform=m.platform, backend="tta-runtime", max_batch_size=self.max_batch,
            input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                                 dims=[m.channels, m.height, m.width])],
            output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[m.num_classes])])
        config.parameters["default_policy"].string_value = m.default_policy
        config.parameters["labels"].string_value = json.dumps(m.labels)
        return pb.ModelConfigResponse(config=config)

    @unary("RepositoryIndex", quiet=True)
    async def RepositoryIndex(self, request, context):
        # one model per server; listing it lets tools discover its name
        state = "READY" if self.ready else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=self.model.name, version="1", state=state)])

    @unary("ModelStatistics")
    async def ModelStatistics(self, request, context):
        if request.name:
            wire.check_model(self.model, request.name, request.version)
        t, o = self.engine.totals, self.outcomes
        duration = pb.StatisticDuration
        stats = pb.InferStatistics(
            success=duration(count=o.success[0], ns=o.success[1]), fail=duration(count=o.fail[0], ns=o.fail[1]),
            queue=duration(count=t["batches"], ns=t["queue_ns"]),
            compute_infer=duration(count=t["batches"], ns=t["compute_ns"]))
        return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
            name=self.model.name, version="1", last_inference=t["last_inference_ms"],
            inference_count=t["samples"], execution_count=t["batches"], inference_stats=stats)])

    # --- inference ----------------------------------------------------------------------
    async def _submit(self, request, context) -> tuple[wire.InferCall, asyncio.Future]:
        return await self.submit(request, context.invocation_metadata(), context.time_remaining)

    async def submit(self, request, metadata, time_remaining: Callable[[], float | None] = lambda: None,
                     ) -> tuple[wire.InferCall, asyncio.Future]:
        """Parse and decode a ModelInferRequest and queue it in the engine: (the call, its future).
        `metadata`: (key, value) pairs (gRPC metadata, or the REST front's headers); `time_remaining`:
        seconds to the client's deadline, None for none. Both transports come through here."""
        call = wire.parse_infer(request, metadata, self.model)
        if call.decodes_images:  # image decoding and resizing: off the event loop, within the decode budget
            with self.decodes.hold(request):
                x = await asyncio.get_running_loop().run_in_executor(
                    None, wire.decode_input, request, self.model, self.max_batch)
        else:
            x = wire.decode_input(request, self.model, self.max_batch)
        remaining = time_remaining()  # the client's deadline: past it, the batch is not run
        deadline = time.monotonic() + remaining if remaining is not None else None
        await self.engine.claim(call.stream_id, deadline)  # replicas: held here, or handed over first
        return call, self.engine.enqueue_infer(call.stream_id, x, call.request_id, call.start, call.end, deadline)

    async def infer(self, request, metadata, time_remaining: Callable[[], float | None] = lambda: None):
        """One ModelInferRequest to its ModelInferResponse (EngineError / InputError if refused)."""
        call, future = await self.submit(request, metadata, time_remaining)
        return wire.infer_response(await future, call.outputs, self.model)

    @unary("ModelInfer", inference=True)
    async def ModelInfer(self, request, context):
        return await self.infer(request, context.invocation_metadata(), context.time_remaining)

    async def ModelStreamInfer(self, request_iterator, context):
        """One reply per request, in order; a bad request gets error_message and the stream goes on
        (with header `triton_grpc_error: true` at stream start, it ends the stream with its status).
        Requests are read ahead (up to STREAM_WINDOW) and queued in the engine in arrival order,
        so a client that does not wait for each reply keeps the engine busy."""
        window: asyncio.Queue = asyncio.Queue(maxsize=STREAM_WINDOW)
        grpc_errors = any(k == "triton_grpc_error" and str(v).lower() == "true"
                          for k, v in (context.invocation_metadata() or ()))

        async def read_ahead():
            try:
                async for request in request_iterator:
                    account = Request(self.metrics, "ModelStreamInfer", self.outcomes)
                    try:
                        if isinstance(request, Malformed):  # bytes that do not parse: this message fails alone
                            raise request.error()
                        call, future = await self._submit(request, context)  # one at a time: keeps order
                        item = (request, account, call, future, None)
                    except (EngineError, InputError) as e:
                        item = (request, account, None, None, e)
                    await window.put(item)
            finally:
                await window.put(None)

        reader = asyncio.create_task(read_ahead())
        try:
            while (item := await window.get()) is not None:
                request, account, call, future, error = item
                if error is None:
                    try:
                        response = pb.ModelStreamInferResponse(
                            infer_response=wire.infer_response(await future, call.outputs, self.model))
                        account.ok()
                    except EngineError as e:
                        error = e
                if error is not None:
                    code, message = account.failed(error)
                    if grpc_errors:  # Triton's opt-in: a real status, and the stream ends
                        await context.abort(code, message, trailers_of(error))
                    response = pb.ModelStreamInferResponse(
                        error_message=f"{code.name}: {message}",
                        infer_response=pb.ModelInferResponse(model_name=getattr(request, "model_name", ""),
                                                             id=getattr(request, "id", "")))
                yield response
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            while not window.empty():  # the client left: batches not yet run are dropped
                item = window.get_nowait()
                if item is not None and item[3] is not None:
                    item[3].cancel()
