"""peftkit: parameter-efficient fine-tuning of pretrained models.

Wrap a model in two lines, train only the adapter, save a file of megabytes that
Hugging Face PEFT also reads::

    from peftkit import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["query", "value"]))
"""

import importlib.metadata as _metadata

from peftkit.analysis import RelevanceReport, interpolate, relevance_scores
from peftkit.core.config import PeftConfig, PeftType, TargetedConfig, TaskType
from peftkit.core.layer import AdapterLayer
from peftkit.core.modules_to_save import ModulesToSaveWrapper
from peftkit.core.registry import Method, get_method, list_methods, register_method
from peftkit.core.state import AdapterStateError, LoadResult, get_peft_model_state_dict, set_peft_model_state_dict
from peftkit.core.status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftkit.core.targeting import TargetError
from peftkit.core.tuner import AdaptedModel
from peftkit.lm_loss import chunked_causal_lm_loss
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.full import FullFineTuningConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.layernorm import LNTuningConfig
from peftkit.methods.layerwise import GradualUnfreezer, LayerwiseConfig, layerwise_param_groups
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrConfig
from peftkit.methods.lora import LoraConfig, LoraLayer, convert_to_lora
from peftkit.methods.lora.adaptive import RankAllocator
from peftkit.methods.oft import OFTConfig
from peftkit.methods.prompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from peftkit.methods.sparse import SparseConfig
from peftkit.methods.vera import VeraConfig
from peftkit.peft_model import PeftModel, get_peft_model, inject_adapter_in_model
from peftkit.quantization import memory_report, prepare_model_for_kbit_training, quantize_model, save_quantized
from peftkit.task_models import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

# PEFT's names for the classes ported code checks with isinstance (docs/porting.md).
BaseTunerLayer = AdapterLayer
BaseTuner = AdaptedModel

# The version is written once, in pyproject.toml; an install (editable too) records it.
try:
    __version__ = _metadata.version("peftkit")
except _metadata.PackageNotFoundError:  # a source tree put on sys.path, never installed
    __version__ = "0+unknown"

__all__ = [
    "AdaLoraConfig",
    "AdaptedModel",
    "AdapterLayer",
    "AdapterStateError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BaseTuner",
    "BaseTunerLayer",
    "BitFitConfig",
    "BottleneckConfig",
    "FullFineTuningConfig",
    "GradualUnfreezer",
    "IA3Config",
    "LNTuningConfig",
    "LayerwiseConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoadResult",
    "LoraConfig",
    "LoraLayer",
    "Method",
    "ModulesToSaveWrapper",
    "OFTConfig",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "RankAllocator",
    "RelevanceReport",
    "SparseConfig",
    "TargetError",
    "TargetedConfig",
    "TaskType",
    "TunerLayerStatus",
    "TunerModelStatus",
    "VeraConfig",
    "chunked_causal_lm_loss",
    "convert_to_lora",
    "get_layer_status",
    "get_method",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "interpolate",
    "layerwise_param_groups",
    "list_methods",
    "memory_report",
    "prepare_model_for_kbit_training",
    "quantize_model",
    "register_method",
    "relevance_scores",
    "save_quantized",
    "set_peft_model_state_dict",
]
