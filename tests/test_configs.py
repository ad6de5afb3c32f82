"""Configs: every file loads locked and passes the train program's checks; overrides by name; a
misspelled field fails with its name; docstrings hold the exact command."""

import importlib
import math
import os
import re
import subprocess
import sys

import pytest

from d2am_jax import config_check
from d2am_jax.configs import default
from d2am_jax.data.protocols import PAPER_PROTOCOLS
from d2am_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("synthetic", "smoke", "manifest", "protocols")


def _module(name):
    return importlib.import_module(f"d2am_jax.configs.{name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_locked_valid_and_documented(name):
    module = _module(name)
    config = module.get_config()
    config_check.check(config)
    with pytest.raises(AttributeError, match="nope"):
        config.nope = 1
    with pytest.raises(AttributeError, match="inner_lrr"):
        config.meta.inner_lrr = 1.0
    doc = module.__doc__
    assert f"python -m d2am_jax.main --config d2am_jax/configs/{name}.py" in doc
    assert "Expected run time" in doc


def test_top_level_fields_scripts_rely_on():
    config = default.get_config()
    for field in ("method", "domain_labels", "second_order", "num_epochs", "seed"):
        assert field in config
    assert config.data.resolution == 256 and config.model.width == 1.0


def test_second_order_has_one_value_under_two_names():
    config = default.get_config()
    config.second_order = False
    assert config.meta.second_order is False
    config.meta.second_order = True
    assert config.second_order is True
    resolved = config.copy_and_resolve_references()
    assert resolved.second_order is True and resolved.meta.second_order is True


@pytest.mark.parametrize("protocol", PAPER_PROTOCOLS)
def test_paper_protocols_at_paper_scale(protocol):
    config = _module("protocols").get_config(protocol)
    config_check.check(config)
    assert config.data.protocol == protocol and config.data.name == "protocol"
    assert config.data.resolution == 256 and config.model.width == 1.0
    assert (config.meta.inner_lr, config.meta.outer_lr) == (1e-3, 1e-4)
    assert (config.meta.lambda_p, config.meta.lambda_m) == (0.1, 0.05)
    assert config.meta.num_domains == 3
    assert config.meta.per_domain_batch == 20  # RFM's 10 live + 10 spoof per domain


def test_unknown_protocol_names_the_choices():
    with pytest.raises(ValueError, match="OCI_M"):
        _module("protocols").get_config("XYZ")


@pytest.mark.parametrize("field,value,match", [
    ("method", "maml", "config.method"),
    ("domain_labels", "oracle", "config.domain_labels"),
    ("num_epochs", 0, "config.num_epochs"),
])
def test_bad_values_name_the_field(field, value, match):
    config = _module("smoke").get_config()
    config[field] = value
    with pytest.raises(ValueError, match=match):
        config_check.check(config)


def test_bad_nested_value_names_the_field():
    config = _module("smoke").get_config()
    config.eval.threshold_mode = "oracle"
    with pytest.raises(ValueError, match="config.eval.threshold_mode"):
        config_check.check(config)
    config = _module("smoke").get_config()
    config.data.source_val_fraction = 0.0
    with pytest.raises(ValueError, match="config.data.source_val_fraction"):
        config_check.check(config)
    config = _module("smoke").get_config()
    config.checkpoint.keep = 0
    with pytest.raises(ValueError, match="config.checkpoint.keep"):
        config_check.check(config)


@pytest.mark.parametrize("field,value", [
    ("meta.outer_lr", -1e-4),             # Adam would climb the loss
    ("meta.inner_lr", -1e-3),
    ("meta.inner_lr", math.nan),
    ("meta.outer_lr", math.inf),
    ("domains.fraction", 0.0),            # no channel left to cluster
    ("domains.fraction", 1.5),
    ("domains.algorithm", "kmeans++"),    # failed after the ImageNet pass
    ("model.bn_epsilon", math.inf),       # every normalised activation 0
    ("eval.threshold", 1.5),              # threshold_mode='fixed' would call everything spoof
    ("eval.threshold", math.nan),
])
def test_out_of_range_values_name_the_field(field, value):
    config = _module("smoke").get_config()
    *parents, leaf = field.split(".")
    target = config
    for part in parents:
        target = target[part]
    target[leaf] = value
    with pytest.raises(UserError, match=f"^config.{re.escape(field)}: expected"):
        config_check.check(config)


@pytest.mark.parametrize("field,value,match", [
    ("model.entropy_head", "gradient_reversal", "config.model.entropy_head"),
    ("model.pool_window", 4, "config.model.pool_window"),
    ("domains.min_class_size", -1, "config.domains.min_class_size"),
])
def test_bad_fidelity_fields_name_the_field(field, value, match):
    config = _module("smoke").get_config()
    group, name = field.split(".")
    config[group][name] = value
    with pytest.raises(ValueError, match=match):
        config_check.check(config)


def test_rfm_pool_needs_a_resolution_divisible_by_8():
    config = _module("smoke").get_config()
    config.model.pool_window = 2
    config.data.resolution = 36
    with pytest.raises(ValueError, match="config.data.resolution"):
        config_check.check(config)
    config.data.resolution = 32
    config_check.check(config)


def test_cli_misspelled_field_fails_with_its_name(tmp_path):
    cmd = [sys.executable, "-m", "d2am_jax.main", "--config", "d2am_jax/configs/smoke.py",
           "--workdir", str(tmp_path / "run"), "--config.meta.inner_lrr=0.1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --config.meta.inner_lrr: the config has no field 'inner_lrr' "
        "(Did you mean \"inner_lr\" instead of \"inner_lrr\"?)"]
    assert not (tmp_path / "run").exists()


def test_a_run_saved_before_a_field_existed_resumes_at_that_fields_default():
    """A field added later counts as its default in an older run's config (the default keeps the
    old behaviour), so the run resumes; a value other than the default is still refused."""
    import pytest

    from d2am_jax import config_check
    from d2am_jax.configs import synthetic
    from d2am_jax.errors import UserError

    config = synthetic.get_config()
    saved = config_check.as_dict(config)
    del saved["meta"]["batch_norm"]
    assert config_check.resumable_changes(saved, config, "w") == []
    config.meta.batch_norm = "pooled"
    with pytest.raises(UserError, match=r"meta\.batch_norm"):
        config_check.resumable_changes(saved, config, "w")


def test_a_resume_may_change_how_e_is_rematerialised_and_not_the_model():
    saved = config_check.as_dict(default.get_config())
    del saved["model"]["remat"]            # a run saved before model.remat existed
    config = default.get_config()
    config.model.remat, config.model.remat_policy = "blocks", "nothing_saveable"
    assert config_check.resumable_changes(saved, config, "workdir") == [
        "model.remat", "model.remat_policy"]
    config.model.width = 0.5
    with pytest.raises(UserError, match=r"fields \['model.width'\]"):
        config_check.resumable_changes(saved, config, "workdir")
