"""tta-runtime: the server (serving/, engine/), its model loading, guard, metrics and state, and
its clients (ctl, lab/, demo/). The version is the package's (pyproject.toml; runtime.protocol.VERSION)."""
