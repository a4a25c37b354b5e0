"""`bn-ema`: BN recalibration that keeps per-stream statistics (the benchmark's EMABatchNorm).

Per batch: (1) forward in train mode and discard the output; this moves every BN's running
statistics towards the batch (momentum m, unbiased variance); (2) forward again in eval mode:
that output, which already includes the current batch, is the prediction."""
from .base import Hyperparameter
from .common import BATCH_NORMS, share_copy
from .normalisation import NormalisationAdapter

MOMENTUM = Hyperparameter(
    "momentum", None, float, "None or (0, 1]",
    "running-statistics momentum; None keeps each BN layer's own momentum (PyTorch default 0.1)",
    lambda v: v is None or 0.0 < v <= 1.0)


class BatchNormEMA(NormalisationAdapter):
    name = "bn-ema"
    batch_statistics = False
    running_statistics = True
    summary = ("BN-EMA: keep per-stream BN running statistics updated by an exponential moving "
               "average of the stream's batches; predict with them (current batch included).")
    HYPERPARAMETERS = (MOMENTUM,)

    def _build(self, model):
        net = share_copy(model).eval()  # own statistics, shared weights
        momentum = self.hyperparameters["momentum"]
        if momentum is not None:
            for m in net.modules():
                if isinstance(m, BATCH_NORMS):
                    m.momentum = momentum
        return net

    def _predict(self, x):
        self.net.train()
        self.net(x)  # updates the running statistics; output discarded
        self.net.eval()
        return self._observe(self.net, x)
