"""A state record as one safetensors blob: its tensors under generated keys and everything else
as a typed JSON skeleton in the metadata (dict keys, tuples, NaN/inf, OrderedDict kept exactly),
read back strictly and without ever running code (no pickle, no torch.load). The file around it
(header, HMAC, binding checks) is runtime/checkpoints.py's."""
from __future__ import annotations

import collections
import json
import math
import struct

import numpy as np
import safetensors.torch
import torch

FORMAT = "tta-state-2"
MAX_DEPTH = 64
MAX_SKELETON_BYTES = 16 << 20
MAX_NODES = 1 << 20

# dtypes a record's tensors may have (safetensors stores them all); anything else is refused on write
DTYPES = frozenset((torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                    torch.int16, torch.int8, torch.uint8, torch.bool))

class Refused(Exception):
    """A state file's content is refused; `reason` as in checkpoints.REASONS."""

    def __init__(self, reason: str, why: str):
        super().__init__(why)
        self.reason, self.why = reason, why



# --- the record as tensors + a JSON skeleton -------------------------------------------------
def _pack(value, tensors: dict[str, torch.Tensor], shared: set[int], depth: int = 0):
    if depth > MAX_DEPTH:
        raise TypeError(f"a state record nested deeper than {MAX_DEPTH} levels cannot be saved")
    if isinstance(value, (np.bool_, np.integer, np.floating)):  # numpy scalars become Python numbers
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        value = float(value)
        return value if math.isfinite(value) else {"float": repr(value)}  # 'nan', 'inf', '-inf'
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.dtype not in DTYPES or value.is_quantized:
            raise TypeError(f"a {value.layout} {value.dtype} tensor cannot be saved in a state file")
        cpu = value.detach().cpu()
        storage = cpu.untyped_storage()
        # safetensors refuses views and tensors that share memory: those are copied (a state dict's
        # tensors own their storage, so usually nothing is)
        if (not cpu.is_contiguous() or cpu.storage_offset() or not cpu.numel()
                or storage.nbytes() != cpu.numel() * cpu.element_size() or storage.data_ptr() in shared):
            cpu = cpu.clone(memory_format=torch.contiguous_format)
        shared.add(cpu.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = cpu
        return {"tensor": key}
    if type(value) in (list, tuple):
        return {type(value).__name__: [_pack(v, tensors, shared, depth + 1) for v in value]}
    if type(value) in (dict, collections.OrderedDict):
        items = []
        for k, v in value.items():
            if type(k) not in (str, int):
                raise TypeError(f"a state record's dict key {k!r} ({type(k).__name__}) cannot be saved: str or int")
            items.append([k, _pack(v, tensors, shared, depth + 1)])
        if type(value) is dict:
            return {"dict": items}
        node = {"odict": items}
        if hasattr(value, "_metadata"):  # nn.Module.state_dict's module versions
            node["meta"] = _pack(value._metadata, tensors, shared, depth + 1)
        return node
    raise TypeError(f"a {type(value).__name__} cannot be saved in a state file")


class Unpacker:
    """The strict inverse of _pack: only the nodes _pack writes, each tensor used exactly once."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.used, self.nodes = tensors, set(), 0

    def __call__(self, node, depth: int = 0):
        self.nodes += 1
        if depth > MAX_DEPTH or self.nodes > MAX_NODES:
            raise Refused("format", f"the record is nested deeper than {MAX_DEPTH} or has over {MAX_NODES} values")
        if node is None or type(node) in (bool, str, int):
            return node
        if type(node) is float:
            if not math.isfinite(node):
                raise Refused("format", "a bare non-finite number in the record")
            return node
        if type(node) is not dict or not node:
            raise Refused("format", f"unexpected {type(node).__name__} in the record")
        tag = "odict" if set(node) == {"odict", "meta"} else next(iter(node))
        if len(node) != 1 and tag != "odict":
            raise Refused("format", f"unexpected node with keys {sorted(node)[:4]} in the record")
        body = node[tag]
        if tag == "float":
            if body not in ("nan", "inf", "-inf"):
                raise Refused("format", f"unexpected float {str(body)[:20]!r} in the record")
            return float(body)
        if tag == "tensor":
            if type(body) is not str or body not in self.tensors or body in self.used:
                raise Refused("format", f"tensor reference {str(body)[:20]!r} is missing or used twice")
            self.used.add(body)
            return self.tensors[body]
        if tag in ("list", "tuple"):
            if type(body) is not list:
                raise Refused("format", f"a {tag} that is not a JSON array")
            items = [self(v, depth + 1) for v in body]
            return items if tag == "list" else tuple(items)
        if tag in ("dict", "odict"):
            if type(body) is not list:
                raise Refused("format", f"a {tag} that is not a JSON array of pairs")
            out = {} if tag == "dict" else collections.OrderedDict()
            for pair in body:
                if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int) or pair[0] in out:
                    raise Refused("format", "a dict entry that is not a [str or int key, value] pair, or a "
                                             "duplicate key")
                out[pair[0]] = self(pair[1], depth + 1)
            if "meta" in node:
                out._metadata = self(node["meta"], depth + 1)
            return out
        raise Refused("format", f"unexpected node {tag[:20]!r} in the record")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _strict_object(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:20]!r}")
        out[k] = v
    return out


def strict_json(text: str | bytes):
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_strict_object)


def pack_body(record: dict, stream_id: str, fingerprint: str) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_pack(record, tensors, set()), allow_nan=False, separators=(",", ":"))
    if len(skeleton) > MAX_SKELETON_BYTES:
        raise ValueError(f"a state record's skeleton of {len(skeleton)} bytes exceeds {MAX_SKELETON_BYTES}")
    metadata = {"format": FORMAT, "stream_id": stream_id, "model": fingerprint, "record": skeleton}
    return safetensors.torch.save(tensors, metadata=metadata)


def read_body(body: bytes) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The safetensors blob's metadata (parsed here, strictly) and tensors (by safetensors)."""
    if len(body) < 8:
        raise Refused("format", "no safetensors header")
    (size,) = struct.unpack("<Q", body[:8])
    if size > min(len(body) - 8, MAX_SKELETON_BYTES + (1 << 20)):
        raise Refused("format", f"a safetensors header of {size} bytes")
    try:
        header = strict_json(body[8:8 + size])
    except (ValueError, RecursionError) as e:
        raise Refused("format", f"the safetensors header is not valid JSON ({type(e).__name__})") from None
    metadata = header.get("__metadata__") if type(header) is dict else None
    if (type(metadata) is not dict or set(metadata) != {"format", "stream_id", "model", "record"}
            or not all(type(v) is str for v in metadata.values())):
        raise Refused("format", "the safetensors metadata is not a tta-runtime record")
    try:
        tensors = safetensors.torch.load(body)
    except Exception as e:  # noqa: BLE001 - SafetensorError and whatever a malformed blob raises
        raise Refused("format", f"the tensors cannot be read ({type(e).__name__})") from None
    return metadata, tensors


