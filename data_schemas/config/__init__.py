"""Typed configuration of every stage, one module per stage (common.py: what they share; gates.py: the gate
policies; pipeline.py: `align run` and `align sweep`), all re-exported here.

Each model forbids unknown keys (they are usually typos) and describes every field; defaults live here and
nowhere else. The CLI loads YAML, applies dotted ``key=value`` overrides, and validates through these models,
so a bad config gets one message per problem naming the key and what is allowed.
"""

from data_schemas.config.annotate import SessionSettings
from data_schemas.config.common import (
    OPERATIONAL_FIELDS,
    VIRTUAL_TOKEN_METHODS,
    WEIGHT_ADAPTER_METHODS,
    InstructionDataSettings,
    LoraSettings,
    ModelConfig,
    PartialSettings,
    PeftSettings,
    Precision,
    RunSettings,
    TrainerSettings,
    UnfreezeSchedule,
    _default,
    _Strict,
    adapter_peft_field,
    check_adapter_peft,
    key_config,
    precision_field,
)
from data_schemas.config.data import DataBuildConfig, DedupSettings, PreferencesConfig
from data_schemas.config.dpo import DPOConfig, DPODataSettings, DPOTrainSettings, PolicyEvalSettings
from data_schemas.config.gates import (
    BiasGateSettings,
    GatesConfig,
    PerplexityGateSettings,
    PolicyGateSettings,
    TaskGateSettings,
)
from data_schemas.config.pipeline import (
    PipelineAnnotation,
    PipelineConfig,
    PipelineStage,
    PipelineStages,
    SweepConfig,
    SweepParam,
)
from data_schemas.config.ppo import (
    PPOConfig,
    PPOPromptSettings,
    PPORewardSettings,
    PPOTrainSettings,
    RolloutSettings,
    RuleReward,
)
from data_schemas.config.reward import (
    RewardConfig,
    RewardDataSettings,
    RewardGateSettings,
    RewardTrainSettings,
)
from data_schemas.config.sft import SFTConfig, SFTTrainSettings

__all__ = [
    "_Strict",
    "ModelConfig",
    "LoraSettings",
    "VIRTUAL_TOKEN_METHODS",
    "PeftSettings",
    "WEIGHT_ADAPTER_METHODS",
    "adapter_peft_field",
    "check_adapter_peft",
    "UnfreezeSchedule",
    "PartialSettings",
    "InstructionDataSettings",
    "Precision",
    "precision_field",
    "OPERATIONAL_FIELDS",
    "key_config",
    "RunSettings",
    "TrainerSettings",
    "_default",
    "SFTTrainSettings",
    "SFTConfig",
    "PerplexityGateSettings",
    "TaskGateSettings",
    "BiasGateSettings",
    "PolicyGateSettings",
    "GatesConfig",
    "DedupSettings",
    "DataBuildConfig",
    "PreferencesConfig",
    "RewardDataSettings",
    "RewardTrainSettings",
    "RewardGateSettings",
    "RewardConfig",
    "DPODataSettings",
    "DPOTrainSettings",
    "PolicyEvalSettings",
    "DPOConfig",
    "PPOPromptSettings",
    "RuleReward",
    "PPORewardSettings",
    "RolloutSettings",
    "PPOTrainSettings",
    "PPOConfig",
    "SessionSettings",
    "PipelineStage",
    "PipelineAnnotation",
    "PipelineStages",
    "PipelineConfig",
    "SweepParam",
    "SweepConfig",
]
