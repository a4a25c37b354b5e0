"""`tta serve`: the gRPC server.

Services on one port (default 8001, as Triton):
  inference.GRPCInferenceService   Open Inference Protocol, Triton flavour (tritonclient.grpc works)
  tta.v1.AdaptationService         policies, streams, reset, snapshot, rollback, feedback
  grpc.health.v1.Health            SERVING once the model is loaded and warmed up
  grpc.reflection.v1alpha          so grpcurl can list and describe the services
Prometheus metrics over HTTP on --metrics-port (default 8002).

SIGTERM / SIGINT: health NOT_SERVING and ServerReady false, new inference answered UNAVAILABLE,
in-flight RPCs get --grace seconds, pending updates are applied, stream state is checkpointed
to --state-dir, then the process exits 0.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import time

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import adapters
from runtime import protos
from runtime.ctl import CONTROL_TOKEN_ENV as TOKEN_ENV
from runtime.ctl import INFERENCE_TOKEN_ENV
from runtime.engine import WIRE_FORBIDDEN, Engine, EngineError, check_snapshot_name
from runtime.guard import GuardConfig
from runtime.metrics import Metrics
from runtime.model_config import ConfigError, LoadedModel, load
from runtime.preprocess import InputError, decode, has_typed_contents, serialize_bytes

pb = protos.load("inference.grpc_service_pb2")
pb_grpc = protos.load("inference.grpc_service_pb2_grpc")
mc = protos.load("inference.model_config_pb2")
tta_pb = protos.load("tta.v1.adaptation_pb2")
tta_grpc = protos.load("tta.v1.adaptation_pb2_grpc")

log = logging.getLogger("tta.serve")

VERSION = "0.1.0"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
STREAM_HEADER = "x-tta-stream-id"
STREAM_PARAMETER = "stream_id"
EXTENSIONS = ["classification", "model_configuration", "parameters", "sequence", "sequence(string_id)",
              "statistics", "tta"]
STREAM_WINDOW = 16  # requests of one ModelStreamInfer call read ahead and queued
CONTROL_SERVICE = "/tta.v1.AdaptationService/"
READ_ONLY_CONTROL = {"ListPolicies", "GetStream", "ListStreams"}
INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
OPEN_INFERENCE = {"ServerLive", "ServerReady"}  # probes; everything else needs the inference token when set

EXAMPLES = """examples:
  tta serve                                   # the built-in demo model on 127.0.0.1:8001, metrics :8002
  tta serve --model my_model.toml --host 0.0.0.0 --state-dir /var/lib/tta
  tta serve --policy bn-ema --track cam-1 --track cam-2
  tta serve --port 0 --metrics-port 0         # free ports, printed on the ready line
"""


def add_arguments(p) -> None:
    p.add_argument("--model", help="model config TOML, or a directory holding model.toml "
                                   "(default: the built-in demo model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=8001, help="gRPC port (0: a free port)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (0: a free port, -1: off)")
    p.add_argument("--policy", help="default policy of new streams (default: the model config's)")
    p.add_argument("--track", action="append", default=[], metavar="STREAM",
                   help="give this stream its own metric labels (repeatable)")
    p.add_argument("--state-dir", help="keep stream state here: evicted streams, snapshots, checkpoint at shutdown, "
                                       "restored at start (default: a temporary directory, nothing kept)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--frozen-backend", choices=("torch", "onnx", "auto"), default="torch",
                   help="what runs unadapted `source` streams of a PyTorch model: torch, ONNX Runtime (the model "
                        "exported at start, BN kept, logits checked against torch), or auto: ONNX Runtime when "
                        "it measures faster at start. ONNX streams report no BN-shift drift figure "
                        "(default: torch; a config's own onnx file is always used)")
    p.add_argument("--max-message-mb", type=float, default=64.0,
                   help="largest gRPC message accepted (grpcio's default is 4 MiB); larger: RESOURCE_EXHAUSTED")
    p.add_argument("--max-streams", type=int, default=1024, help="most streams kept; more: RESOURCE_EXHAUSTED")
    p.add_argument("--memory-budget-mb", type=float, default=2048.0,
                   help="adapted state kept in memory; least recently used streams beyond it go to disk")
    p.add_argument("--max-queue", type=int, default=256, help="batches waiting for the engine; more: RESOURCE_EXHAUSTED")
    p.add_argument("--max-stream-queue", type=int, default=64,
                   help="batches of one stream waiting for the engine; more: RESOURCE_EXHAUSTED (one busy "
                        "stream cannot fill the whole queue)")
    p.add_argument("--max-group", type=int, default=None, metavar="STREAMS",
                   help="cross-stream batching: queued batches of up to this many streams on source, bn or bn-alpha "
                        "(equal settings and batch shape) share one forward pass, each normalised with its own "
                        "statistics (1: off; default: 64 on CUDA, off on the CPU, where it measured no faster)")
    p.add_argument("--checkpoint-interval", type=float, default=30.0, metavar="SECONDS",
                   help="with --state-dir: every this many seconds, checkpoint the streams that changed "
                        "(0: only at eviction and shutdown; default: 30)")
    p.add_argument("--max-batch", type=int, default=256, help="largest batch per request")
    p.add_argument("--guard", choices=("rollback", "reset", "off"), default="rollback",
                   help="collapse guard for weight-updating policies (runtime/guard.py): on non-finite values, a "
                        "collapsed class marginal, runaway weights or a lasting BN-shift jump, roll the stream back "
                        "to its last good state (kept every --guard-snapshot-every healthy updates; reset when "
                        "there is none), or always reset it; label-correlated and small batches are answered with "
                        "the source prediction and not learned from; off: none of it (default: rollback)")
    p.add_argument("--guard-patience", type=int, default=GuardConfig.patience, metavar="BATCHES",
                   help=f"batches in a row a collapse or runaway must last before the guard acts "
                        f"(default: {GuardConfig.patience})")
    p.add_argument("--guard-snapshot-every", type=int, default=GuardConfig.snapshot_every, metavar="UPDATES",
                   help=f"keep a stream's state as its last good snapshot every this many healthy updates "
                        f"(default: {GuardConfig.snapshot_every})")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight RPCs get at shutdown")
    p.add_argument("--shutdown-delay", type=float, default=0.0,
                   help="seconds to keep serving after SIGTERM with health NOT_SERVING, so load balancers "
                        "stop routing here before requests are refused")
    p.add_argument("--no-reflection", action="store_true", help="do not enable gRPC server reflection")
    p.add_argument("--tls-cert", help="serve TLS with this PEM certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates signed by it (mutual TLS)")
    p.add_argument("--control-token-file", help=f"require 'authorization: Bearer <token>' on control RPCs that change "
                                               f"state (token read from this file, or from ${TOKEN_ENV}); "
                                               f"inference and read-only control RPCs stay open")
    p.add_argument("--inference-token-file", help=f"require 'authorization: Bearer <token>' on inference RPCs too "
                                                 f"(token read from this file, or from ${INFERENCE_TOKEN_ENV}); "
                                                 f"ServerLive, ServerReady and grpc.health.v1 stay open for probes")
    p.add_argument("--log-level", default="INFO")


def _status(code: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code, grpc.StatusCode.INTERNAL)


def _set_parameter(params, key: str, value) -> None:
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    else:
        params[key].string_param = str(value)


def _parameter_value(p):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService on top of the engine."""

    def __init__(self, model: LoadedModel, engine: Engine, max_batch: int):
        self.model, self.engine, self.max_batch = model, engine, max_batch
        self.ready = True
        self.outcomes = {"success": [0, 0], "fail": [0, 0]}  # count, ns of inference requests

    # --- health and metadata --------------------------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.ready)

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model.name:
            raise EngineError("NOT_FOUND", f"unknown model {name!r}; this server serves {self.model.name!r}")
        if version not in ("", "1"):
            raise EngineError("NOT_FOUND", f"model {name!r} has no version {version!r}; it has version '1'")

    async def _unary(self, method: str, context, fn):
        self.engine.metrics.request(method)
        try:
            return await fn()
        except EngineError as e:
            self.engine.metrics.failure(method, e.code)
            await context.abort(_status(e.code), e.message)

    async def ModelReady(self, request, context):
        async def answer():
            return pb.ModelReadyResponse(ready=self.ready and request.name == self.model.name
                                         and request.version in ("", "1"))
        return await self._unary("ModelReady", context, answer)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="tta-runtime", version=VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request, context):
        async def answer():
            self._check_model(request.name, request.version)
            m = self.model
            tm = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=m.name, versions=["1"], platform=m.platform,
                inputs=[tm(name=INPUT_NAME, datatype="FP32", shape=[-1, m.channels, m.height, m.width])],
                outputs=[tm(name=OUTPUT_NAME, datatype="FP32", shape=[-1, m.num_classes])])
        return await self._unary("ModelMetadata", context, answer)

    async def ModelConfig(self, request, context):
        async def answer():
            self._check_model(request.name, request.version)
            m = self.model
            config = mc.ModelConfig(
                name=m.name, platform=m.platform, backend="tta-runtime", max_batch_size=self.max_batch,
                input=[mc.ModelInput(name=INPUT_NAME, data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NCHW,
                                     dims=[m.channels, m.height, m.width])],
                output=[mc.ModelOutput(name=OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[m.num_classes])])
            config.parameters["default_policy"].string_value = m.default_policy
            config.parameters["labels"].string_value = json.dumps(m.labels)
            return pb.ModelConfigResponse(config=config)
        return await self._unary("ModelConfig", context, answer)

    async def RepositoryIndex(self, request, context):
        # one model per server; listing it lets tools discover its name
        state = "READY" if self.ready else "UNAVAILABLE"
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(
            name=self.model.name, version="1", state=state)])

    async def ModelStatistics(self, request, context):
        async def answer():
            if request.name:
                self._check_model(request.name, request.version)
            t = self.engine.totals
            duration = pb.StatisticDuration
            stats = pb.InferStatistics(
                success=duration(count=self.outcomes["success"][0], ns=self.outcomes["success"][1]),
                fail=duration(count=self.outcomes["fail"][0], ns=self.outcomes["fail"][1]),
                queue=duration(count=t["batches"], ns=t["queue_ns"]),
                compute_infer=duration(count=t["batches"], ns=t["compute_ns"]))
            return pb.ModelStatisticsResponse(model_stats=[pb.ModelStatistics(
                name=self.model.name, version="1", last_inference=t["last_inference_ms"],
                inference_count=t["samples"], execution_count=t["batches"], inference_stats=stats)])
        return await self._unary("ModelStatistics", context, answer)

    def _outcome(self, ok: bool, started: float) -> None:
        entry = self.outcomes["success" if ok else "fail"]
        entry[0] += 1
        entry[1] += int((time.monotonic() - started) * 1e9)

    # --- inference ----------------------------------------------------------------------
    def _stream_id(self, request, context) -> str | None:
        from_parameter = None
        if STREAM_PARAMETER in request.parameters:
            from_parameter = _parameter_value(request.parameters[STREAM_PARAMETER])
            if not isinstance(from_parameter, str):
                raise EngineError("INVALID_ARGUMENT", f"request parameter {STREAM_PARAMETER!r} must be a string")
        from_header = next((v for k, v in (context.invocation_metadata() or ()) if k == STREAM_HEADER), None)
        if from_parameter and from_header and from_parameter != from_header:
            raise EngineError("INVALID_ARGUMENT", f"stream named twice and differently: parameter {STREAM_PARAMETER}="
                                                  f"{from_parameter!r}, header {STREAM_HEADER}={from_header!r}")
        if not (from_parameter or from_header) and "sequence_id" in request.parameters:
            sequence = _parameter_value(request.parameters["sequence_id"])  # Triton's sequence extension
            if isinstance(sequence, (bool, float)):
                raise EngineError("INVALID_ARGUMENT", "request parameter 'sequence_id' must be an integer or a string")
            if sequence not in (None, 0, ""):
                return str(sequence)
        return from_parameter or from_header

    @staticmethod
    def _sequence_flags(request) -> tuple[bool, bool]:
        def flag(key: str) -> bool:
            value = _parameter_value(request.parameters[key]) if key in request.parameters else False
            if not isinstance(value, bool):  # a string "false" must not reset a stream
                raise EngineError("INVALID_ARGUMENT", f"request parameter {key!r} must be a bool")
            return value
        return flag("sequence_start"), flag("sequence_end")

    def _decode(self, request) -> np.ndarray:
        if len(request.inputs) != 1:
            names = ", ".join(repr(i.name) for i in request.inputs) or "none"
            raise InputError(f"expected exactly one input named {INPUT_NAME!r}, got {len(request.inputs)} ({names})")
        tensor = request.inputs[0]
        if tensor.name != INPUT_NAME:
            raise InputError(f"unknown input {tensor.name!r}; the model's input is named {INPUT_NAME!r}")
        typed = has_typed_contents(tensor.contents)
        if request.raw_input_contents:
            if typed:
                raise InputError("input carries both raw_input_contents and typed contents; use one form")
            if len(request.raw_input_contents) != 1:
                raise InputError(f"{len(request.raw_input_contents)} raw_input_contents entries for 1 input")
            raw = request.raw_input_contents[0]
        else:
            raw = None
            if not typed:
                raise InputError(f"input {INPUT_NAME!r} has no data: send raw_input_contents or typed contents")
        m = self.model
        return decode(tensor.datatype, tensor.shape, raw, tensor.contents, m.channels, m.height, m.width, self.max_batch)

    def _requested_outputs(self, request) -> list[tuple[str, int]]:
        """(name, class_count) per requested output; class_count 0 means logits."""
        if not request.outputs:
            return [(OUTPUT_NAME, 0)]
        wanted = []
        for out in request.outputs:
            if out.name != OUTPUT_NAME:
                raise InputError(f"unknown output {out.name!r}; the model's output is named {OUTPUT_NAME!r}")
            k = 0
            if "classification" in out.parameters:
                k = _parameter_value(out.parameters["classification"])
                if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                    raise InputError("output parameter 'classification' must be a positive integer (top-k)")
                k = min(k, self.model.num_classes)
            wanted.append((out.name, k))
        return wanted

    async def _prepare(self, request, context) -> tuple[str | None, np.ndarray, list[tuple[str, int]]]:
        """Validate and decode a request: (stream id, model input, requested outputs)."""
        self._check_model(request.model_name, request.model_version)
        stream_id = self.engine.check_stream_id(self._stream_id(request, context))
        self._sequence_flags(request)  # validated here, before any work
        try:
            outputs = self._requested_outputs(request)
            if request.inputs and request.inputs[0].datatype in ("BYTES", "UINT8"):
                # image decoding and resizing: off the event loop
                x = await asyncio.get_running_loop().run_in_executor(None, self._decode, request)
            else:
                x = self._decode(request)
        except InputError as e:
            raise EngineError("INVALID_ARGUMENT", str(e)) from None
        return stream_id, x, outputs

    def _respond(self, result, outputs):
        response = pb.ModelInferResponse(model_name=self.model.name, model_version="1", id=result.request_id)
        for name, k in outputs:
            if k == 0:
                response.outputs.add(name=name, datatype="FP32", shape=list(result.logits.shape))
                response.raw_output_contents.append(np.ascontiguousarray(result.logits, dtype="<f4").tobytes())
            else:
                top = np.argsort(-result.logits, axis=1, kind="stable")[:, :k]
                items = [f"{result.logits[i, j]:f}:{j}:{self.model.labels[j]}".encode()
                         for i in range(len(top)) for j in top[i]]
                response.outputs.add(name=name, datatype="BYTES", shape=[len(top), k])
                response.raw_output_contents.append(serialize_bytes(items))
        params = response.parameters
        _set_parameter(params, "stream_id", result.stream_id)
        _set_parameter(params, "policy", result.policy)
        _set_parameter(params, "tta_step", int(result.step))
        _set_parameter(params, "tta_entropy", float(result.entropy))
        _set_parameter(params, "tta_confidence", float(result.confidence))
        _set_parameter(params, "tta_class_marginal_entropy", float(result.class_marginal_entropy))
        if result.bn_shift is not None:
            _set_parameter(params, "tta_bn_shift", float(result.bn_shift))
        if result.guard:
            _set_parameter(params, "tta_guard", result.guard)
        return response

    async def ModelInfer(self, request, context):
        started = time.monotonic()
        self.engine.metrics.request("ModelInfer")
        try:
            stream_id, x, outputs = await self._prepare(request, context)
            start, end = self._sequence_flags(request)
            response = self._respond(await self.engine.infer(stream_id, x, request.id, start, end), outputs)
            self._outcome(True, started)
            return response
        except EngineError as e:
            self._outcome(False, started)
            self.engine.metrics.failure("ModelInfer", e.code)
            await context.abort(_status(e.code), e.message)
        finally:
            self.engine.metrics.request_duration.labels(self.model.name, "ModelInfer").observe(time.monotonic() - started)

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
                    started = time.monotonic()
                    self.engine.metrics.request("ModelStreamInfer")
                    try:
                        stream_id, x, outputs = await self._prepare(request, context)  # one at a time: keeps order
                        future = self.engine.enqueue_infer(stream_id, x, request.id, *self._sequence_flags(request))
                        item = (request, started, outputs, future, None)
                    except EngineError as e:
                        item = (request, started, None, None, e)
                    await window.put(item)
            finally:
                await window.put(None)

        reader = asyncio.create_task(read_ahead())
        try:
            while (item := await window.get()) is not None:
                request, started, outputs, future, error = item
                if error is None:
                    try:
                        response = pb.ModelStreamInferResponse(infer_response=self._respond(await future, outputs))
                    except EngineError as e:
                        error = e
                self._outcome(error is None, started)
                if error is not None:
                    self.engine.metrics.failure("ModelStreamInfer", error.code)
                    if grpc_errors:  # Triton's opt-in: a real status, and the stream ends
                        await context.abort(_status(error.code), error.message)
                    response = pb.ModelStreamInferResponse(
                        error_message=f"{error.code}: {error.message}",
                        infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id))
                self.engine.metrics.request_duration.labels(self.model.name, "ModelStreamInfer").observe(
                    time.monotonic() - started)
                yield response
            await reader  # surfaces a failure of the request stream itself
        finally:
            reader.cancel()
            while not window.empty():  # the client left: batches not yet run are dropped
                item = window.get_nowait()
                if item is not None and item[3] is not None:
                    item[3].cancel()


def _stream_info(d: dict):
    return tta_pb.StreamInfo(**d)


class AdaptationService(tta_grpc.AdaptationServiceServicer):
    """tta.v1.AdaptationService: control operations, run by the engine between batches."""

    def __init__(self, model: LoadedModel, engine: Engine):
        self.model, self.engine = model, engine

    async def _run(self, method: str, request, context, fn):
        self.engine.metrics.request(method)
        try:
            if getattr(request, "model", "") not in ("", self.model.name):
                raise EngineError("NOT_FOUND", f"unknown model {request.model!r}; this server serves {self.model.name!r}")
            return await fn()
        except EngineError as e:
            self.engine.metrics.failure(method, e.code)
            await context.abort(_status(e.code), e.message)

    def _stream_id(self, request) -> str:
        return self.engine.check_stream_id(request.stream_id)

    async def ListPolicies(self, request, context):
        async def answer():
            policies = []
            for name in adapters.available():
                d = adapters.describe(name)
                policies.append(tta_pb.PolicyDescription(
                    name=d["name"], summary=d["summary"], updates_weights=d["updates_weights"],
                    hyperparameters=[tta_pb.Hyperparameter(name=h["name"], default_value=json.dumps(h["default"], default=str),
                                                           range=h["range"], meaning=h["meaning"])
                                     for h in d["hyperparameters"] if h["name"] not in WIRE_FORBIDDEN]))
            supported = adapters.available() if self.model.can_adapt() else ["source"]
            return tta_pb.ListPoliciesResponse(policies=policies, supported=supported)
        return await self._run("ListPolicies", request, context, answer)

    async def SetPolicy(self, request, context):
        async def answer():
            info = await self.engine.call("set_policy", self._stream_id(request), request.policy,
                                          dict(request.hyperparameters))
            return _stream_info(info)
        return await self._run("SetPolicy", request, context, answer)

    async def GetStream(self, request, context):
        async def answer():
            return _stream_info(await self.engine.call("get", self._stream_id(request)))
        return await self._run("GetStream", request, context, answer)

    async def ListStreams(self, request, context):
        async def answer():
            infos = await self.engine.call("list")
            return tta_pb.ListStreamsResponse(streams=[_stream_info(i) for i in infos],
                                              stream_limit=self.engine.max_streams,
                                              memory_budget_bytes=int(self.engine.memory_budget))
        return await self._run("ListStreams", request, context, answer)

    async def ResetStream(self, request, context):
        async def answer():
            return _stream_info(await self.engine.call("reset", self._stream_id(request)))
        return await self._run("ResetStream", request, context, answer)

    async def DeleteStream(self, request, context):
        async def answer():
            return _stream_info(await self.engine.call("delete", self._stream_id(request)))
        return await self._run("DeleteStream", request, context, answer)

    async def Snapshot(self, request, context):
        async def answer():
            name, info = await self.engine.call("snapshot", self._stream_id(request),
                                                check_snapshot_name(request.name))
            return tta_pb.SnapshotResponse(name=name, stream=_stream_info(info))
        return await self._run("Snapshot", request, context, answer)

    async def Rollback(self, request, context):
        async def answer():
            return _stream_info(await self.engine.call("rollback", self._stream_id(request),
                                                       check_snapshot_name(request.name)))
        return await self._run("Rollback", request, context, answer)

    async def Feedback(self, request, context):
        async def answer():
            if not request.request_id:
                raise EngineError("INVALID_ARGUMENT", "request_id is required (the id of the inference response)")
            return tta_pb.FeedbackResponse(**await self.engine.call("feedback", request.request_id, list(request.labels)))
        return await self._run("Feedback", request, context, answer)


class BearerAuth(grpc.aio.ServerInterceptor):
    """Bearer tokens, compared in constant time. The control token guards the control RPCs that
    change state; the inference token guards the inference service except ServerLive/ServerReady
    (liveness and readiness reveal nothing and probes cannot send tokens). grpc.health.v1 and
    reflection stay open."""

    def __init__(self, control_token: str | None, inference_token: str | None):
        self.control = control_token.encode() if control_token else None
        self.inference = inference_token.encode() if inference_token else None

    def _required(self, method: str) -> tuple[bytes, str, str] | None:
        """(token, which token, how a client sends it) that this method needs, or None."""
        if self.control and method.startswith(CONTROL_SERVICE) and \
                method[len(CONTROL_SERVICE):] not in READ_ONLY_CONTROL:
            return self.control, "control", f"tta ctl: --token or ${TOKEN_ENV}"
        if self.inference and method.startswith(INFERENCE_SERVICE) and \
                method[len(INFERENCE_SERVICE):] not in OPEN_INFERENCE:
            return self.inference, "inference", "tritonclient: headers={'authorization': 'Bearer <token>'}"
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        required = self._required(details.method)
        if required is None or handler is None:
            return handler
        expected, which, how = required
        given = next((v for k, v in (details.invocation_metadata or ()) if k == "authorization"), None)
        scheme, _, token = str(given or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _denied(handler, grpc.StatusCode.UNAUTHENTICATED,
                           f"{'missing' if given is None else 'malformed'} authorization: this RPC needs metadata "
                           f"'authorization: Bearer <{which} token>' ({how})")
        if not hmac.compare_digest(token.strip().encode(), expected):
            return _denied(handler, grpc.StatusCode.PERMISSION_DENIED, f"wrong {which} token")
        return handler


def _denied(handler, code: grpc.StatusCode, message: str):
    """A handler of the same kind (unary or streaming) as `handler` that only fails."""
    async def deny(request, context):
        await context.abort(code, message)
    make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return make[handler.request_streaming, handler.response_streaming](
        deny, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _tls_credentials(args):
    """Server credentials from --tls-cert/--tls-key (and --tls-client-ca for mutual TLS), or None."""
    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    with open(args.tls_cert, "rb") as f:
        cert = f.read()
    with open(args.tls_key, "rb") as f:
        key = f.read()
    ca = None
    if args.tls_client_ca:
        with open(args.tls_client_ca, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _token(path: str | None, env: str) -> str | None:
    """A bearer token from a file (stripped), else from the environment variable."""
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return os.environ.get(env, "").strip() or None


async def serve(args) -> int:
    try:
        model = load(args.model, device=args.device, default_policy=args.policy, tracked=args.track,
                     frozen_backend=args.frozen_backend)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    metrics = Metrics(model.name, model.tracked_streams)
    try:
        guard = GuardConfig(action=args.guard, patience=args.guard_patience, snapshot_every=args.guard_snapshot_every)
    except ValueError as e:
        log.error("%s", e)
        return 2
    engine = Engine(model, metrics, state_dir=args.state_dir, max_streams=args.max_streams,
                    memory_budget_bytes=int(args.memory_budget_mb * 2**20), max_queue=args.max_queue,
                    max_batch=args.max_batch, guard=guard, max_stream_queue=args.max_stream_queue,
                    checkpoint_interval=args.checkpoint_interval, max_group=args.max_group)
    log.info("model %r loaded: %s on %s, input [N, %d, %d, %d], %d classes%s", model.name, model.platform,
             model.device, model.channels, model.height, model.width, model.num_classes,
             "" if model.can_adapt() else " (frozen: source policy only)")
    try:
        engine.check_policy(model.default_policy, model.default_hyperparameters)  # before we say SERVING
    except EngineError as e:
        log.error("default policy: %s", e.message)
        engine.close()
        return 2

    max_bytes = int(args.max_message_mb * 2**20)
    token = _token(args.control_token_file, TOKEN_ENV)
    inference_token = _token(args.inference_token_file, INFERENCE_TOKEN_ENV)
    auth = [BearerAuth(token, inference_token)] if token or inference_token else []
    server = grpc.aio.server(interceptors=auth, options=[
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ])
    inference = InferenceService(model, engine, args.max_batch)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)
    tta_grpc.add_AdaptationServiceServicer_to_server(AdaptationService(model, engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = ["inference.GRPCInferenceService", "tta.v1.AdaptationService"]
    if not args.no_reflection:
        reflection.enable_server_reflection(
            services + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host  # IPv6
    address = f"{host}:{args.port}"
    try:
        credentials = _tls_credentials(args)
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except (OSError, ValueError) as e:
        log.error("TLS: %s", e)
        engine.close()
        return 2
    except RuntimeError as e:
        port, why = 0, str(e)
    else:
        why = "port in use or address not available"
    if not port:
        log.error("cannot listen on %s (%s); is another server running? choose another --port", address, why)
        engine.close()
        return 1

    metrics_http, metrics_port = None, -1
    if args.metrics_port >= 0:
        try:
            metrics_http = metrics.serve_http(args.metrics_port, args.host)
            metrics_port = metrics_http.server_port
        except OSError as e:
            log.error("cannot serve metrics on %s:%d (%s); choose another --metrics-port or -1", args.host,
                      args.metrics_port, e)
            engine.close()
            return 1

    await server.start()
    for name in ["", *services]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if token:
        log.info("control RPCs that change state require the control bearer token")
    if inference_token:
        log.info("inference RPCs (but ServerLive/ServerReady) require the inference bearer token")
    policy_note = f"default policy {model.default_policy}" + (f"; {'; '.join(model.notes)}" if model.notes else "")
    # One parseable line for scripts and tests (ports may have been chosen by the OS).
    tls_note = "; TLS" + (" with client certificates" if args.tls_client_ca else "") if args.tls_cert else ""
    print(f"tta serve: model {model.name!r} ready on {host}:{port} metrics {metrics_port} ({policy_note}{tls_note})",
          flush=True)

    await stop.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: stop now, without the checkpoint
        loop.add_signal_handler(sig, _exit_now)
    log.info("shutting down: NOT_SERVING, draining for up to %.0f s (signal again to exit at once)", args.grace)
    inference.ready = False
    await health_servicer.enter_graceful_shutdown()
    if args.shutdown_delay > 0:
        await asyncio.sleep(args.shutdown_delay)
    engine.stop_accepting()  # new batches: UNAVAILABLE; queued ones still complete
    # Answer what is queued while the transport still takes calls (late arrivals get our
    # UNAVAILABLE, which clients retry, instead of gRPC's CANCELLED), then close it.
    started = time.monotonic()
    await engine.wait_idle(args.grace)
    await server.stop(max(args.grace - (time.monotonic() - started), 1.0))
    saved = await engine.drain_and_checkpoint()
    if engine.persistent:
        log.info("checkpointed %d streams to %s", saved, engine.store.root)
    engine.close()
    if metrics_http is not None:
        metrics_http.shutdown()
    log.info("stopped")
    return 0


def _exit_now() -> None:
    log.warning("second signal: exiting without draining or checkpointing")
    logging.shutdown()
    os._exit(1)


def run(args) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return asyncio.run(serve(args))


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m runtime.server", epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
