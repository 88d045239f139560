"""Experiment configs: one file per experiment, `get_config(arg)` returning an ml_collections ConfigDict.

Run one with `python -m launch.train --experiment=NAME[:VARIANT]`; each file's docstring gives its
command line and the paper its hyperparameters come from.
"""
