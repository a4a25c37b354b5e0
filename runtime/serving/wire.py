"""The wire format: the generated stubs and their registration (add_servicer), a ModelInferRequest
parsed once into an InferCall (model, stream, sequence flags, requested outputs; the input decoded
on demand), and the replies built from the engine's answers."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np

from runtime import protos
from runtime.engine.errors import EngineError, shown
from runtime.model_config import LoadedModel
from runtime.preprocess import InputError, decode, has_typed_contents, serialize_bytes
from runtime.protocol import INPUT_NAME, OUTPUT_NAME, STREAM_HEADER, STREAM_PARAMETER
from runtime.serving.errors import Malformed

pb = protos.load("inference.grpc_service_pb2")
pb_grpc = protos.load("inference.grpc_service_pb2_grpc")
mc = protos.load("inference.model_config_pb2")
tta_pb = protos.load("tta.v1.adaptation_pb2")
tta_grpc = protos.load("tta.v1.adaptation_pb2_grpc")


class _HandlerTable:
    """Stands in for a grpc server to catch the method handlers a generated add_*_to_server builds."""

    def __init__(self):
        self.service, self.handlers = None, None

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, handlers


def tolerant(parse):
    """A request deserializer that never raises: bytes that do not parse become a Malformed, which
    the handler answers INVALID_ARGUMENT (a raising deserializer makes grpc answer UNKNOWN and log
    a traceback, and the request is never counted)."""
    name = parse.__self__.DESCRIPTOR.full_name  # parse: the generated Message.FromString

    def deserialize(data: bytes):
        try:
            return parse(data)
        except Exception:  # noqa: BLE001 - DecodeError, or whatever else the parser makes of hostile bytes
            return Malformed(name, len(data))
    return deserialize


def add_servicer(add_to_server, servicer, server) -> None:
    """Register `servicer` on `server` as the generated `add_to_server(servicer, server)` does (its
    handler table, generic and pre-registered), with tolerant request deserializers."""
    table = _HandlerTable()
    add_to_server(servicer, table)
    if table.handlers is None:
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers; regenerate the stubs")
    handlers = {name: handler._replace(request_deserializer=tolerant(handler.request_deserializer))
                for name, handler in table.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(table.service, handlers),))
    server.add_registered_method_handlers(table.service, handlers)


def parameter_value(p):
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def set_parameter(params, key: str, value) -> None:
    if isinstance(value, bool):
        params[key].bool_param = value
    elif isinstance(value, int):
        params[key].int64_param = value
    elif isinstance(value, float):
        params[key].double_param = value
    else:
        params[key].string_param = str(value)


def check_model(model: LoadedModel, name: str, version: str) -> None:
    if name != model.name:
        raise EngineError("NOT_FOUND", f"unknown model {shown(name)}; this server serves {model.name!r}")
    if version not in ("", "1"):
        raise EngineError("NOT_FOUND", f"model {shown(name)} has no version {shown(version)}; it has version '1'")


@dataclass
class InferCall:
    """One inference request, parsed and checked (but its input, which decode() turns into pixels)."""
    request: object               # the ModelInferRequest
    stream_id: str | None         # as named by the request; None: the default stream
    start: bool                   # sequence_start: reset the stream first
    end: bool                     # sequence_end: checkpoint the stream and free its memory after
    outputs: list[tuple[str, int]]  # (name, class_count) per requested output; 0 means logits

    @property
    def request_id(self) -> str:
        return self.request.id

    @property
    def decodes_images(self) -> bool:
        """Image decoding and resizing (BYTES, UINT8) is worth running off the event loop."""
        inputs = self.request.inputs
        return bool(inputs) and inputs[0].datatype in ("BYTES", "UINT8")


def parse_infer(request, metadata, model: LoadedModel) -> InferCall:
    """Everything but the input, checked in the order a client would fix it."""
    check_model(model, request.model_name, request.model_version)
    stream_id = _stream_id(request, metadata)
    start, end = _flag(request, "sequence_start"), _flag(request, "sequence_end")
    try:
        outputs = _requested_outputs(request, model)
    except InputError as e:
        raise EngineError("INVALID_ARGUMENT", str(e)) from None
    return InferCall(request, stream_id, start, end, outputs)


def _stream_id(request, metadata) -> str | None:
    from_parameter = None
    if STREAM_PARAMETER in request.parameters:
        from_parameter = parameter_value(request.parameters[STREAM_PARAMETER])
        if not isinstance(from_parameter, str):
            raise EngineError("INVALID_ARGUMENT", f"request parameter {STREAM_PARAMETER!r} must be a string")
    from_header = next((v for k, v in (metadata or ()) if k == STREAM_HEADER), None)
    if from_parameter and from_header and from_parameter != from_header:
        raise EngineError("INVALID_ARGUMENT", f"stream named twice and differently: parameter {STREAM_PARAMETER}="
                                              f"{shown(from_parameter)}, header {STREAM_HEADER}={shown(from_header)}")
    if not (from_parameter or from_header) and "sequence_id" in request.parameters:
        sequence = parameter_value(request.parameters["sequence_id"])  # Triton's sequence extension
        if isinstance(sequence, (bool, float)):
            raise EngineError("INVALID_ARGUMENT", "request parameter 'sequence_id' must be an integer or a string")
        if sequence not in (None, 0, ""):
            return str(sequence)
    return from_parameter or from_header


def _flag(request, key: str) -> bool:
    value = parameter_value(request.parameters[key]) if key in request.parameters else False
    if not isinstance(value, bool):  # a string "false" must not reset a stream
        raise EngineError("INVALID_ARGUMENT", f"request parameter {key!r} must be a bool")
    return value


def _requested_outputs(request, model: LoadedModel) -> list[tuple[str, int]]:
    if not request.outputs:
        return [(OUTPUT_NAME, 0)]
    wanted = []
    for out in request.outputs:
        if out.name != OUTPUT_NAME:
            raise InputError(f"unknown output {shown(out.name)}; the model's output is named {OUTPUT_NAME!r}")
        k = 0
        if "classification" in out.parameters:
            k = parameter_value(out.parameters["classification"])
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise InputError("output parameter 'classification' must be a positive integer (top-k)")
            k = min(k, model.num_classes)
        wanted.append((out.name, k))
    return wanted


def decode_input(request, model: LoadedModel, max_batch: int) -> np.ndarray:
    """The request's one input as float32 NCHW in [0, 1] at the model's size (InputError if not)."""
    if len(request.inputs) != 1:
        names = ", ".join(shown(i.name, 32) for i in request.inputs[:4]) or "none"
        names += ", …" if len(request.inputs) > 4 else ""
        raise InputError(f"expected exactly one input named {INPUT_NAME!r}, got {len(request.inputs)} ({names})")
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise InputError(f"unknown input {shown(tensor.name)}; the model's input is named {INPUT_NAME!r}")
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
    return decode(tensor.datatype, tensor.shape, raw, tensor.contents, model.channels, model.height, model.width,
                  max_batch)


def infer_response(result, outputs: list[tuple[str, int]], model: LoadedModel):
    """A ModelInferResponse from the engine's InferResult."""
    response = pb.ModelInferResponse(model_name=model.name, model_version="1", id=result.request_id)
    for name, k in outputs:
        if k == 0:
            response.outputs.add(name=name, datatype="FP32", shape=list(result.logits.shape))
            response.raw_output_contents.append(np.ascontiguousarray(result.logits, dtype="<f4").tobytes())
        else:
            top = np.argsort(-result.logits, axis=1, kind="stable")[:, :k]
            items = [f"{result.logits[i, j]:f}:{j}:{model.labels[j]}".encode()
                     for i in range(len(top)) for j in top[i]]
            response.outputs.add(name=name, datatype="BYTES", shape=[len(top), k])
            response.raw_output_contents.append(serialize_bytes(items))
    params = response.parameters
    set_parameter(params, "stream_id", result.stream_id)
    set_parameter(params, "policy", result.policy)
    set_parameter(params, "tta_step", int(result.step))
    set_parameter(params, "tta_entropy", float(result.entropy))
    set_parameter(params, "tta_confidence", float(result.confidence))
    set_parameter(params, "tta_class_marginal_entropy", float(result.class_marginal_entropy))
    if result.bn_shift is not None:
        set_parameter(params, "tta_bn_shift", float(result.bn_shift))
    if result.guard:
        set_parameter(params, "tta_guard", result.guard)
    return response


def stream_info(info: dict):
    return tta_pb.StreamInfo(**info)
