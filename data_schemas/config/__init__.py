"""Typed configuration of every stage, one module per stage (common.py: what they share; gates.py: the gate
policies; pipeline.py: `align run` and `align sweep`), all re-exported here.

Each model forbids unknown keys (they are usually typos) and describes every field; defaults live here and
nowhere else. The CLI loads YAML, applies dotted ``key=value`` overrides, and validates through these models,
so a bad config gets one message per problem naming the key and what is allowed.
"""

from data_schemas.config import annotate, common, data, dpo, gates, pipeline, ppo, reward, sft  # noqa: E402 (each module's __all__)
from data_schemas.config.annotate import *  # noqa: F403
from data_schemas.config.common import *  # noqa: F403
from data_schemas.config.data import *  # noqa: F403
from data_schemas.config.dpo import *  # noqa: F403
from data_schemas.config.gates import *  # noqa: F403
from data_schemas.config.pipeline import *  # noqa: F403
from data_schemas.config.ppo import *  # noqa: F403
from data_schemas.config.reward import *  # noqa: F403
from data_schemas.config.sft import *  # noqa: F403

__all__ = [
    name
    for module in (common, sft, gates, data, reward, dpo, ppo, annotate, pipeline)
    for name in module.__all__
]
