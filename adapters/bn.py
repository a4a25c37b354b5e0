"""`bn`: test-time batch normalisation (BN-1, "BN Stats Adapt", Schneider et al. / Nado et al.).

Every BatchNorm2d/3d normalises with the current batch's mean and biased variance; nothing is
kept between batches. BatchNorm1d keeps the source statistics (the reference's BN1d branch
reads an undefined batch size and would crash on such a model)."""
from torch import nn

from .common import share_copy
from .normalisation import NormalisationAdapter


class BatchNormTest(NormalisationAdapter):
    name = "bn"
    summary = ("Test-time BN (BN-1): normalise with the current batch's statistics; stateless, "
               "depends on batch composition.")

    def batch_stats_affine(self):
        return {}  # the source's scales and biases

    def _build(self, model):
        net = share_copy(model, share_buffers=True).eval()
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                # Batch statistics in the forward pass. The running stats the reference updates
                # are never used for its predictions, so we do not track (or copy) them.
                m.train()
                m.track_running_stats = False
        return net
