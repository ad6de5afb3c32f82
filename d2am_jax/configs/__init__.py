"""Experiment configs (ml_collections): `default.get_config()` holds the paper's hyperparameters.

Each config file's docstring gives the exact command that runs it: synthetic.py (the main job),
smoke.py (tests), manifest.py (a user's frames), protocols.py:NAME (the paper's six protocols).
"""
