"""Training stages built from the library's pieces: `sft`, `reward`, `preference`, and the pipelines
that chain them, `rso` and `inpo`.

Each stage is `run(stage_config, workdir) -> results` over a frozen `config.StageConfig`, in a directory
keyed by its fingerprint (`fingerprints`); the launcher (`python -m launch.train`) builds the configs
from an experiment's ConfigDict.
"""
