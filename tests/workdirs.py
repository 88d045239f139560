"""Finding a run's stage directories in tests (WORKDIR/{stage}/{fingerprint}/, listed in stages.json)."""

import json
import os


def stage_dir(workdir, name: str) -> str:
    """The directory of stage `name` used by the last run in `workdir` (e.g. "sft", "iter_2/policy")."""
    with open(os.path.join(str(workdir), "stages.json"), encoding="utf-8") as f:
        stages = json.load(f)["stages"]
    if name not in stages:
        raise KeyError(f"{workdir}: no stage {name!r} in stages.json (stages: {sorted(stages)})")
    return os.path.join(str(workdir), stages[name]["dir"])
