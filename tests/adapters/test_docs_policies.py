"""docs/POLICIES.md documents every adapter and every hyperparameter that describe() lists."""
from pathlib import Path

import adapters

DOC = (Path(__file__).resolve().parents[2] / "docs" / "POLICIES.md").read_text()


def test_every_policy_and_hyperparameter_is_documented_with_its_default():
    for name in adapters.available():
        section = DOC.split(f"### `{name}`", 1)
        assert len(section) == 2, f"docs/POLICIES.md has no section for {name}"
        body = section[1].split("### ", 1)[0]
        for h in adapters.describe(name)["hyperparameters"]:
            assert f"| `{h['name']}` | `{h['default']}` |" in body, (name, h["name"])
