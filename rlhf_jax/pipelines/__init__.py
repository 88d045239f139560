"""Training stages and the pipelines that chain them, built from the library's pieces.

Stages: `sft`, `reward` and `preference` (each `run(stage_config, workdir) -> results` over a frozen
`config.StageConfig`, in a directory keyed by its fingerprint, `fingerprints`). Pipelines, one per
module, each with `plan(config)` (the experiment's ConfigDict validated into its frozen stage configs)
and `run_pipeline(plan, workdir)`: `sft`, `reward`, `preference`, and the algorithms with their own
loop, `rso`, `inpo`, `grpo`, `gencls`, `rft`, `direct_advantage_po` (arXiv 2412.18279's offline
step-level rounds) and `tool_sft` (token-weighted SFT on tool calls). The launcher
(`python -m launch.train`) holds the table of pipelines.
Shared pieces: `training` (a stage's optimizer, state, step, restore and loop from its config),
`tasks` (examples, tokenizer, layouts), `workdir` (a stage directory's files), `candidates` (online
samples into pairs), `evaluation` (win rates against the SFT policy).
"""
