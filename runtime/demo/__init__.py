"""The demo and its pieces: the demo model and its training, `tta demo`, the bench ResNet-50, a `tta serve` launcher."""
