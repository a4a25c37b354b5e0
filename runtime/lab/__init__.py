"""The offline benchmark lab: corrupted data, benchmark streams, `tta replay` and `tta bench`."""
