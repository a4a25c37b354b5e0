"""tta-runtime: the serving side (CLI, model loading, engine, gRPC servicers, metrics)."""

__version__ = "0.1.0"
