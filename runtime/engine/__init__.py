"""The engine: streams, their adapters and the one torch worker thread (see engine/engine.py)."""
from runtime.engine.batches import InferResult
from runtime.engine.engine import Engine
from runtime.engine.errors import EngineError, check_snapshot_name, check_stream_id

__all__ = ["Engine", "EngineError", "InferResult", "check_snapshot_name", "check_stream_id"]
