"""Config: typed tree, presets, YAML + overrides, errors that name the field and suggest the fix."""

from pathlib import Path

import pytest
import yaml

from tether.config import ConfigError, describe, load_yaml, parse_overrides, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_preset_then_overrides_win():
    cfg = resolve_config({"algorithm": {"name": "ppo"}}, ["algorithm.epochs=3", "optim.lr=2e-5"])
    assert cfg.algorithm.advantage == "gae" and cfg.algorithm.use_critic  # from the preset
    assert cfg.algorithm.epochs == 3 and cfg.optim.lr == 2e-5            # overrides win
    assert resolve_config({"algorithm": {"name": "dapo"}}).algorithm.eps_high == 0.28


def test_unknown_key_suggests_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm.bet'.*Did you mean 'algorithm.beta'"):
        resolve_config({"algorithm": {"bet": 0.1}})
    with pytest.raises(ConfigError, match=r"'rollout.group_sise'.*Did you mean 'rollout.group_size'"):
        resolve_config({}, ["rollout.group_sise=4"])
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'.*Did you mean 'optim'"):
        resolve_config({"optimizer": {"lr": 1}})


@pytest.mark.parametrize("override, message", [
    ("algorithm.beta=-0.1", r"algorithm.beta: -0.1 is out of range; it must be >= 0"),
    ("algorithm.eps_low=0", r"algorithm.eps_low: 0.0 is out of range; it must be > 0 and < 1"),
    ("algorithm.eps_high=-1", r"algorithm.eps_high: -1.0 is out of range; it must be > 0"),
    ("rollout.temperature=0", r"rollout.temperature: 0.0 is out of range; it must be > 0"),
    ("rollout.group_size=two", r"rollout.group_size: expected an integer, got 'two'"),
    ("algorithm.aggregation=token_means", r"algorithm.aggregation: 'token_means' is not allowed.*Did you mean 'token_mean'"),
])
def test_invalid_values_name_field_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({}, [override])


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match=r"unknown preset 'grop'.*Did you mean 'grpo'.*ppo, grpo, dr_grpo"):
        resolve_config({"algorithm": {"name": "grop"}})


def test_batch_invariant_names_every_setting_it_does_not_work_with():
    for overrides, names in ((["model.autocast=bfloat16"], ["model.autocast=bfloat16"]),
                             (["model.dtype=bfloat16", "rollout.compile=true"],
                              ["model.dtype=bfloat16", "rollout.compile"]),
                             (["rollout.backend=vllm", "rollout.decode_attention=matmul"],
                              ["rollout.backend=vllm", "rollout.decode_attention=matmul"])):
        with pytest.raises(ConfigError, match="model.batch_invariant") as err:
            resolve_config({}, ["model.batch_invariant=true", *overrides])
        assert all(n in str(err.value) for n in names), err.value
    cfg = resolve_config({}, ["model.batch_invariant=true"])  # the defaults (packed linears on) are fine
    assert cfg.model.batch_invariant and cfg.rollout.packed_linears


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="needs a critic"):
        resolve_config({"algorithm": {"name": "grpo", "advantage": "gae"}})
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_config({}, ["algorithm.minibatches=3"])


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=true", "d=null", "e=[1, 2]", "f=x=y"]) == {
        "a": {"b": 1, "c": True}, "d": None, "e": [1, 2], "f": "x=y"}
    with pytest.raises(ConfigError, match="not of the form"):
        parse_overrides(["novalue"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_every_field_is_documented():
    rows = describe()
    assert len(rows) > 60
    assert all(help_.strip() for _, _, help_ in rows), [k for k, _, h in rows if not h.strip()]


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_resolve(path):
    resolve_config(load_yaml(path))


def test_tiny_default_example_matches_builtin_default():
    from tether.pipeline import DEFAULT_JOB

    assert yaml.safe_load((ROOT / "examples" / "tiny_default.yaml").read_text()) == DEFAULT_JOB
