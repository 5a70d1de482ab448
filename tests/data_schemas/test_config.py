from pathlib import Path

import pytest

from core.config import UserError, apply_overrides, load_config
from data_schemas.config import (
    DataBuildConfig,
    DPOConfig,
    GatesConfig,
    PipelineConfig,
    PPOConfig,
    PreferencesConfig,
    RewardConfig,
    SFTConfig,
    SweepConfig,
)

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_every_shipped_config_validates():
    models = {
        "sft": SFTConfig,
        "gates": GatesConfig,
        "data": DataBuildConfig,
        "preferences": PreferencesConfig,
        "reward": RewardConfig,
        "dpo": DPOConfig,
        "ppo": PPOConfig,
        "pipeline": PipelineConfig,
        "quickstart": PipelineConfig,
        "sweep": SweepConfig,
    }
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        model = models.get(path.stem.split("_")[0])
        assert model is not None, f"{path.name}: no schema registered for this config in the test"
        cfg = load_config(model, path)
        if isinstance(cfg, PipelineConfig):  # every stage's config, with the pipeline's overrides, validates
            from align.pipeline import ORDER, _gate_settings, stage_config

            for name in ORDER:
                if (st := getattr(cfg.stages, name)) is not None:
                    stage_config(name, st, Path("runs/check"))
                    for gate, over in st.gates.items():
                        _gate_settings(cfg.gate_policy, gate, over, Path("runs/check"))
        if isinstance(cfg, SweepConfig):  # every searched field's ends make a valid config of its stage
            from align.sweep import trial_config

            for name, p in cfg.params.items():
                for value in p.choices or [p.low, p.high]:
                    trial_config(cfg, {name: value})
        assert path.read_text().startswith("#"), f"{path.name} must open with a comment showing its command"


def test_overrides_are_dotted_and_typed(tmp_path):
    p = write(tmp_path, "output_dir: out\ndata:\n  train_file: x.jsonl\n")
    cfg = load_config(SFTConfig, p, ["train.learning_rate=1e-4", "lora.r=4", "lora.target_modules=[q_proj]"])
    assert cfg.train.learning_rate == 1e-4 and cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj"]
    # defaults live in the schema only
    assert cfg.train.per_device_train_batch_size == 8


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "output_dir: out\ndata:\n  train_file: x.jsonl\ntrain:\n  learnig_rate: 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, p)
    msg = str(e.value)
    assert f"{p}: train.learnig_rate: unknown key" in msg and e.value.exit_code == 2


def test_one_message_per_problem(tmp_path):
    p = write(tmp_path, "output_dir: out\ndata:\n  train_file: x.jsonl\n  shape: yaml\nlora:\n  r: 0\n")
    with pytest.raises(UserError) as e:
        load_config(SFTConfig, p)
    lines = str(e.value).splitlines()
    assert len(lines) == 2
    assert any("data.shape" in x and "'alpaca'" in x and "'yaml'" in x for x in lines)
    assert any("lora.r" in x and "greater than or equal to 1" in x for x in lines)


def test_missing_required_key(tmp_path):
    with pytest.raises(UserError, match=r"data: required key is missing"):
        load_config(SFTConfig, write(tmp_path, "output_dir: out\n"))


def test_bad_yaml_gets_line_and_column(tmp_path):
    p = write(tmp_path, "output_dir: out\ndata: [unclosed\n")
    with pytest.raises(UserError, match=rf"{p}:\d+:\d+: invalid YAML"):
        load_config(SFTConfig, p)


def test_top_level_must_be_mapping(tmp_path):
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(SFTConfig, write(tmp_path, "- a\n- b\n"))


def test_cross_field_check(tmp_path):
    p = write(
        tmp_path,
        "output_dir: o\ndata: {train_file: x, validation_fraction: 0}\ntrain: {early_stopping_patience: 2}\n",
    )
    with pytest.raises(UserError, match="early_stopping_patience needs validation data"):
        load_config(SFTConfig, p)


def test_override_without_equals_is_rejected():
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides({}, ["train.learning_rate"])


def test_every_field_is_described():
    def walk(model):
        for name, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)

    for model in (SFTConfig, GatesConfig, DataBuildConfig, PreferencesConfig, RewardConfig, DPOConfig):
        walk(model)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_a_number_that_is_not_finite_is_refused(value):
    """`train.learning_rate=.inf` once trained an adapter of NaN weights and marked it complete: every config
    refuses infinite and NaN numbers, naming the key."""
    with pytest.raises(UserError, match="train.learning_rate"):
        load_config(SFTConfig, Path("configs/sft.yaml"), [f"train.learning_rate={value}"])
    with pytest.raises(UserError, match="policy_gate.max_kl"):
        load_config(PPOConfig, Path("configs/ppo.yaml"), [f"policy_gate.max_kl={value}"])
