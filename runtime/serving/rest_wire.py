"""The REST front's wire format: a v2 REST infer body (JSON, then Triton's binary tensors) as the
ModelInferRequest the gRPC path takes (binary chunks -> raw_input_contents, JSON data -> typed
contents), and a ModelInferResponse as the JSON (+ binary outputs) reply. Only the spelling: what
the request means is wire.parse_infer's and decode_input's to decide, as for gRPC."""
from __future__ import annotations

import json

import numpy as np

from runtime.engine.errors import EngineError, shown
from runtime.preprocess import deserialize_bytes
from runtime.serving.wire import parameter_value, pb

# JSON "data" of an input goes into this InferTensorContents field, by datatype, and must be of these numpy kinds
TYPED = {"BOOL": ("bool_contents", "b"), "INT8": ("int_contents", "iu"), "INT16": ("int_contents", "iu"),
         "INT32": ("int_contents", "iu"), "INT64": ("int64_contents", "iu"), "UINT8": ("uint_contents", "iu"),
         "UINT16": ("uint_contents", "iu"), "UINT32": ("uint_contents", "iu"), "UINT64": ("uint64_contents", "iu"),
         "FP32": ("fp32_contents", "iuf"), "FP64": ("fp64_contents", "iuf"), "BYTES": ("bytes_contents", "")}
OUTPUT_DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT32": "<i4", "INT64": "<i8", "UINT8": "u1", "BOOL": "?"}


def dumps(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _bad(message: str) -> EngineError:
    return EngineError("INVALID_ARGUMENT", message)


def to_infer_request(body: bytes, header_length: bytes | None, name: str, version: str):
    """The ModelInferRequest a v2 REST infer body stands for, and which outputs to send binary:
    (request, {output name: binary?} with key None for outputs not named)."""
    if header_length is None:
        text, binary = body, b""
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise _bad(f"header Inference-Header-Content-Length must be the byte length of the JSON part "
                       f"(0..{len(body)}), got {shown(header_length.decode('latin-1'), 24)}")
        text, binary = body[:int(header_length)], body[int(header_length):]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:  # binary tensors, most likely
        raise _bad("the request body is not UTF-8 JSON; a body with binary tensors needs header "
                   "Inference-Header-Content-Length: <bytes of its JSON part>") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise _bad(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise _bad("the request body's JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(f"the request body must be a JSON object (an $inference_request), got {type(doc).__name__}")
    try:
        return _to_request(doc, binary, name, version)
    except (ValueError, TypeError, OverflowError) as e:  # what protobuf refuses to hold, e.g. a lone surrogate
        raise _bad(f"the request holds a value the protocol cannot carry: {shown(str(e), 120)}") from None


def _to_request(doc: dict, binary: bytes, name: str, version: str):
    request = pb.ModelInferRequest(model_name=name, model_version=version, id=_str(doc.get("id", ""), "id"))
    parameters = dict(_obj(doc.get("parameters"), "request parameters"))
    binary_default = parameters.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise _bad("request parameter 'binary_data_output' must be a bool")
    _set_parameters(request.parameters, parameters, "request")

    offset, forms = 0, set()
    for i, tensor in enumerate(_list(doc.get("inputs", []), "inputs")):
        tensor = _obj(tensor, f"inputs[{i}]")
        tname = _str(tensor.get("name"), f"inputs[{i}].name")
        shape = _list(tensor.get("shape"), f"input {shown(tname)} shape")
        if not all(isinstance(s, int) and not isinstance(s, bool) and -2**63 <= s < 2**63 for s in shape):
            raise _bad(f"input {shown(tname)} shape must be a list of integers")
        entry = request.inputs.add(name=tname, datatype=_str(tensor.get("datatype"), f"input {shown(tname)} datatype"),
                                   shape=shape)
        tparams = dict(_obj(tensor.get("parameters"), f"input {shown(tname)} parameters"))
        size = tparams.pop("binary_data_size", None)
        _set_parameters(entry.parameters, tparams, f"input {shown(tname)}")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise _bad(f"input {shown(tname)} parameter 'binary_data_size' must be a byte count")
            if "data" in tensor:
                raise _bad(f"input {shown(tname)} has both 'data' and binary_data_size; send one")
            if offset + size > len(binary):
                raise _bad(f"input {shown(tname)} claims {size} binary bytes but the body holds only "
                           f"{len(binary) - offset} more after its JSON part")
            request.raw_input_contents.append(binary[offset:offset + size])
            offset, forms = offset + size, forms | {"binary"}
        elif "data" in tensor:
            _fill_contents(entry, tensor["data"])
            forms.add("json")
        else:
            raise _bad(f"input {shown(tname)} has no data: give 'data' or parameters.binary_data_size")
    if len(forms) > 1:
        raise _bad("inputs mix JSON 'data' and binary data; send all inputs in one form")
    if offset != len(binary):
        raise _bad(f"the body holds {len(binary) - offset} bytes past its inputs' binary_data_size")

    binary_outputs = {None: binary_default}
    for i, out in enumerate(_list(doc.get("outputs", []), "outputs")):
        out = _obj(out, f"outputs[{i}]")
        oname = _str(out.get("name"), f"outputs[{i}].name")
        oparams = dict(_obj(out.get("parameters"), f"output {shown(oname)} parameters"))
        binary_outputs[oname] = oparams.pop("binary_data", binary_default)
        if not isinstance(binary_outputs[oname], bool):
            raise _bad(f"output {shown(oname)} parameter 'binary_data' must be a bool")
        _set_parameters(request.outputs.add(name=oname).parameters, oparams, f"output {shown(oname)}")
    return request, binary_outputs


def from_infer_response(response, binary_outputs: dict) -> tuple[int, list, bytes]:
    """The HTTP reply (status, headers, body) of a ModelInferResponse: JSON, then binary outputs."""
    outputs, blobs = [], []
    for out, raw in zip(response.outputs, response.raw_output_contents):
        entry = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if binary_outputs.get(out.name, binary_outputs[None]):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif out.datatype == "BYTES":
            entry["data"] = [item.decode("utf-8", "replace") for item in deserialize_bytes(raw)]
        else:
            entry["data"] = np.frombuffer(raw, dtype=OUTPUT_DTYPES[out.datatype]).tolist()
        outputs.append(entry)
    doc = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["parameters"] = {k: parameter_value(v) for k, v in response.parameters.items()}
    doc["outputs"] = outputs
    header = dumps(doc)
    if not blobs:
        return 200, [], header
    return 200, [("content-type", "application/octet-stream"),
                 ("inference-header-content-length", str(len(header)))], header + b"".join(blobs)


def _fill_contents(tensor, data) -> None:
    """JSON `data` (flat or nested row-major) into the tensor's typed contents field."""
    name = shown(tensor.name)
    if tensor.datatype not in TYPED:
        raise _bad(f"input {name}: datatype {shown(tensor.datatype, 32)} has no JSON form; send it binary "
                   f"(parameters.binary_data_size)")
    field, kinds = TYPED[tensor.datatype]
    target = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        flat, todo = [], [data]
        while todo:  # iterative: a deeply nested list cannot exhaust the stack
            item = todo.pop()
            if isinstance(item, list):
                todo.extend(reversed(item))
            elif isinstance(item, str):
                flat.append(item.encode())
            else:
                raise _bad(f"input {name}: BYTES data must be strings")
        target.extend(flat)
        return
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise _bad(f"input {name}: 'data' is not a regular (non-ragged) array of numbers") from None
    if values.dtype.kind not in kinds:
        raise _bad(f"input {name}: {tensor.datatype} data must be {'bools' if kinds == 'b' else 'numbers'}")
    try:
        target.extend(values.ravel().tolist())
    except (ValueError, TypeError, OverflowError):
        raise _bad(f"input {name}: 'data' holds values that do not fit {tensor.datatype}") from None


def _set_parameters(params, values: dict, where: str) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            params[key].bool_param = value
        elif isinstance(value, int) and -2**63 <= value < 2**63:
            params[key].int64_param = value
        elif isinstance(value, int) and 0 <= value < 2**64:
            params[key].uint64_param = value
        elif isinstance(value, float):
            params[key].double_param = value
        elif isinstance(value, str):
            params[key].string_param = value
        else:
            raise _bad(f"{where} parameter {shown(key)} must be a bool, an integer, a number or a string")


def _obj(value, what: str) -> dict:
    return _typed({} if value is None else value, dict, what, "a JSON object")


def _list(value, what: str) -> list:
    return _typed(value, list, what, "a JSON array")


def _str(value, what: str) -> str:
    return _typed(value, str, what, "a string")


def _typed(value, kind: type, what: str, name: str):
    if not isinstance(value, kind):
        raise _bad(f"{what} must be {name}")
    return value
