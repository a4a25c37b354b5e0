"""Policies a stream can run on this model: validating a policy and its wire hyperparameters,
building its adapter, and describing them for ListPolicies."""
from __future__ import annotations

import adapters
from runtime.engine.errors import EngineError, shown
from runtime.model_config import LoadedModel

WIRE_FORBIDDEN = {"generator", "augment", "prototypes", "fisher_data"}  # objects, not settable over the wire


class Policies:
    def __init__(self, model: LoadedModel):
        self.model = model

    def build(self, policy: str, hyperparameters: dict[str, str]):
        """Validate a policy and build its adapter; None means the frozen (ONNX/TorchScript) path."""
        if policy not in adapters.available():
            raise EngineError("INVALID_ARGUMENT", f"unknown policy {shown(policy)}; available: "
                                                  f"{', '.join(adapters.available())}")
        forbidden = sorted(set(hyperparameters) & WIRE_FORBIDDEN)
        if forbidden:
            raise EngineError("INVALID_ARGUMENT", f"hyperparameter {forbidden[0]!r} cannot be set over the wire "
                                                  f"(it is set by the server or in-process only)")
        model = self.model
        if not model.can_adapt():
            if policy != "source":
                raise EngineError("FAILED_PRECONDITION", f"model {model.name!r} is a frozen graph "
                                  f"({model.platform}); it serves only the 'source' policy. To adapt, give the "
                                  f"model config a [model] factory for the same network")
            if hyperparameters:
                raise EngineError("INVALID_ARGUMENT", "policy 'source' takes no hyperparameters")
            return None
        if policy == "source" and model.frozen is not None and not hyperparameters:
            return None  # the fast frozen path (ONNX Runtime) for unadapted streams
        try:
            typed = adapters.coerce(policy, hyperparameters)
            if policy == "mean-teacher" and model.prototypes is not None:
                typed["prototypes"] = model.prototypes
            if policy == "eata" and model.fisher_data is not None:  # the same tensor: one Fisher for all streams
                typed["fisher_data"] = model.fisher_data
            return adapters.create(policy, model.module, **typed)
        except ValueError as e:
            raise EngineError("INVALID_ARGUMENT", f"policy {shown(policy)}: {e}") from None

    def describe(self) -> tuple[list[dict], list[str]]:
        """Every policy (hyperparameters settable over the wire only) and those this model supports."""
        described = []
        for name in adapters.available():
            d = adapters.describe(name)
            d["hyperparameters"] = [h for h in d["hyperparameters"] if h["name"] not in WIRE_FORBIDDEN]
            described.append(d)
        return described, adapters.available() if self.model.can_adapt() else ["source"]
