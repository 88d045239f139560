"""Training stages built from the library's pieces: `sft`, `reward`, `preference` (and later RSO, INPO).

Each stage is `run(stage_config, workdir) -> results` over a frozen `config.StageConfig`; the launcher
(`python -m launch.train`) builds those from an experiment's ConfigDict.
"""
