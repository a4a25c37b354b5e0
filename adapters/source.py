"""`source`: no adaptation; the frozen source model in eval mode (BN-0)."""
from .common import share_copy
from .normalisation import NormalisationAdapter


class Source(NormalisationAdapter):
    name = "source"
    summary = "No adaptation: the deployed model as trained, BN with source statistics (eval mode)."
    adapts = False

    def _build(self, model):
        return share_copy(model, share_buffers=True).eval()  # nothing is mutated: share it all
