"""`tent`: TENT (Wang et al., ICLR 2021), entropy minimisation of the normalisation layers'
affine parameters, BN with batch statistics; a baseline users expect.

Per batch: logits = net(x) (the prediction); loss = mean entropy of softmax(logits); Adam step on
the BN/LN/GN affine parameters. With steps > 1 the first steps−1 updates happen before the
returned forward pass, as in the reference loop. Only the affine parameters are per-stream;
the other weights are shared with the source model."""
from .base import Hyperparameter, in_range
from .common import entropy, norm_affine_parameters, own_parameters
from .gradient import NORM, NORM_OPTIONS, GradientAdapter

HYPERPARAMETERS = (
    Hyperparameter("lr", 1e-3, float, "(0, 1]", "Adam learning rate", in_range(0, 1, low_open=True)),
    Hyperparameter("steps", 1, int, "integer in [1, 10]", "optimisation steps per batch", in_range(1, 10)),
    NORM, NORM_OPTIONS,
)


class Tent(GradientAdapter):
    name = "tent"
    student_replies = True
    summary = "TENT: minimise prediction entropy by updating the normalisation layers' affine parameters."
    HYPERPARAMETERS = HYPERPARAMETERS

    def __init__(self, model, **hyperparameters):
        super().__init__(model, **hyperparameters)
        self.net = self._norm_network(model, own_weights=False)
        names = [name for name, _ in norm_affine_parameters(self.net)]
        own_parameters(self.net, names)
        self._setup_optimizer([(n, self.net.get_parameter(n)) for n in names], self.hyperparameters["lr"])
        self._finish_init({"net": self.net})

    def _observed_network(self):
        return self.net

    def _forward_loss(self, x):
        for _ in range(self.hyperparameters["steps"] - 1):
            entropy(self.net(x)).mean(0).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        logits = self._observe(self.net, x)
        return logits, entropy(logits).mean(0)
