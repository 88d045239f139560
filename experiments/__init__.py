"""Experiment configs: one file per experiment, `get_config(arg)` returning an ml_collections ConfigDict.

Run one with `python -m launch.train --experiment=NAME[:VARIANT]`; each file's docstring gives its
command line and the paper its hyperparameters come from. Study files define `get_study(arg)` returning a
`Study` of `Method`s (`experiments/_study.py`, re-exported here) and run with `python -m launch.study`.
"""

from experiments._study import Method, Study

__all__ = ["Method", "Study"]
