"""core/config.py: the keys of a config model (TRL's names, a field named once, suggestions, help), YAML numbers,
and where a bad key came from. Values are checked against hand-written expectations, on align's real configs."""

import pytest

from core.config import (
    TRL_NAMES,
    UserError,
    config_fields,
    config_help,
    load_config,
    resolve_key,
    strict_yaml,
    suggestions,
)
from data_schemas.config import DPOConfig, PipelineConfig, PPOConfig, SFTConfig, SweepConfig


def test_exponent_numbers_are_numbers_in_yaml_and_quoted_ones_stay_text():
    got = strict_yaml(
        "a: 1e-4\nb: 3e5\nc: 1.0e-3\nd: '1e-4'\ne: 12e\nf: -2E+2\ng: 1_000\nh: .5e3\ni: 1.5\nj: e5"
    )
    assert got == {"a": 1e-4, "b": 3e5, "c": 1e-3, "d": "1e-4", "e": "12e", "f": -200.0, "g": 1000, "h": 500.0,
                   "i": 1.5, "j": "e5"}  # fmt: skip


@pytest.mark.parametrize(
    "model, typed, meant",
    [
        (SFTConfig, "learning_rate", "train.learning_rate"),  # a field named once in the config
        (SFTConfig, "lora_r", "lora.r"),  # TRL's name
        (SFTConfig, "model_name_or_path", "model.name_or_path"),
        (DPOConfig, "model_name_or_path", "init_from"),  # the first of TRL_NAMES' keys the config has
        (DPOConfig, "beta", "train.beta"),
        (PPOConfig, "beta", "train.kl_coef"),  # GRPO's beta is its KL coefficient
        (PPOConfig, "num_generations", "train.group_size"),
        (PPOConfig, "max_completion_length", "rollout.max_new_tokens"),
        (PPOConfig, "cliprange", "train.clip_range"),
        (PPOConfig, "num_ppo_epochs", "train.ppo_epochs"),
        (PPOConfig, "train.learning_rate", "train.learning_rate"),  # the config's own key, as it is
        (PPOConfig, "max_length", "max_length"),  # only a gate's (perplexity_gate.max_length): not resolved
        (SFTConfig, "nonsense", "nonsense"),
        (PipelineConfig, "stages.sft.config", "stages.sft.config"),  # a config's own extra keys
        (SweepConfig, "params.train.learning_rate.low", "params.train.learning_rate.low"),  # inside a mapping
    ],
)
def test_a_key_resolves_to_what_a_trl_user_means(model, typed, meant):
    assert resolve_key(model, typed) == meant


def test_every_trl_name_resolves_in_some_stage_config():
    models = (SFTConfig, DPOConfig, PPOConfig)
    for name in TRL_NAMES:
        assert any(resolve_key(m, name) != name for m in models), name


def test_an_unknown_key_names_its_source_and_the_nearest_real_key(tmp_path):
    assert suggestions(SFTConfig, "train.learnig_rate") == ["train.learning_rate"]
    assert suggestions(SFTConfig, "lora.rr") == ["lora.r"]
    assert suggestions(SFTConfig, "zzzz") == []
    f = tmp_path / "c.yaml"
    f.write_text("output_dir: o\ndata:\n  train_file: t.jsonl\ntrain:\n  learnig_rate: 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, f, ["lora.rr=4", "--train.max_step=3"])
    lines = str(e.value).splitlines()
    assert f"{f}: train.learnig_rate: unknown key; did you mean train.learning_rate?" in lines
    assert "command line: lora.rr: unknown key; did you mean lora.r?" in lines
    assert "command line: train.max_step: unknown key; did you mean train.max_steps?" in lines
    with pytest.raises(UserError, match="command line: train.learning_rate: Input should be a valid number"):
        load_config(SFTConfig, None, ["output_dir=o", "data.train_file=t", "learning_rate=fast"])


def test_overrides_in_trl_names_and_numbers_set_the_config():
    c = load_config(
        SFTConfig, None,
        ["output_dir=o", "data.train_file=t", "learning_rate=1e-4", "lora_r=4", "gradient_checkpointing=true"],
    )  # fmt: skip
    assert (c.train.learning_rate, c.lora.r, c.train.gradient_checkpointing) == (1e-4, 4, True)


def test_help_lists_every_key_with_its_default_and_description():
    text = config_help(PPOConfig)
    for key, _ in config_fields(PPOConfig):
        assert f"\n  {key} (" in text, key
    assert "\n  train.learning_rate (" in text and "\n  lora.r (16)" in text
    assert "\n  output_dir (required)" in text
    sweep = config_help(SweepConfig)
    assert "\n  params.<name>.low (null)" in sweep  # a mapping's entries, under a name of the user's
