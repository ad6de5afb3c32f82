"""Experiment configs (ml_collections): `default.get_config()` holds the paper's hyperparameters.

Each config file's docstring gives the exact command that runs it.
"""
