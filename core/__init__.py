"""arbor: grow transformer language models while they train.

Importing ``arbor`` registers ``ArborConfig`` and ``ArborForCausalLM`` with the
transformers Auto classes, so ``AutoModelForCausalLM.from_pretrained(dir)``
loads an arbor checkpoint.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from arbor.growth.growable import ArborForCausalLM
from arbor.model.config import PRESETS, ArborConfig, ArborConfigError
from arbor.model.modeling import ArborModel, ArborPreTrainedModel, count_parameters

__version__ = "0.1.0"

AutoConfig.register(ArborConfig.model_type, ArborConfig, exist_ok=True)
AutoModel.register(ArborConfig, ArborModel, exist_ok=True)
AutoModelForCausalLM.register(ArborConfig, ArborForCausalLM, exist_ok=True)

__all__ = [
    "PRESETS",
    "ArborConfig",
    "ArborConfigError",
    "ArborForCausalLM",
    "ArborModel",
    "ArborPreTrainedModel",
    "count_parameters",
]
