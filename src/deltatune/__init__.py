"""deltatune: parameter-efficient fine-tuning for transformers and PyTorch models, peft-compatible on disk.

Besides the core names imported below, every registered method's public names (its module's ``__all__``: ``LoraConfig``,
``PromptEncoder``, ...) and its tuner class (``LoraModel``, ...: :mod:`deltatune.tuners`) are exported too, imported on
first use (PEP 562), so a new method needs no line here and ``import deltatune`` imports no method.
"""

from types import ModuleType
from typing import Any

from . import registry as _registry
from .arrow import create_arrow_model
from .auto import (
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
)
from .conversion import convert_to_lora, save_as_lora
from .config import LayerConfig, PeftConfig, PeftType, PromptLearningConfig, TaskType
from .errors import (
    AdapterLoadError,
    AdapterStateError,
    ConfigError,
    DeltatuneError,
    NoMatchingPeftModuleError,
    PeftError,
    PeftWarning,
    QuantizationError,
    RemoteCodeError,
    TargetError,
)
from .files import atomic_write_files
from .fingerprint import BaseModelMismatchWarning
from .functional import (
    cast_mixed_precision_params,
    get_base_model_state_dict,
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    set_base_model_state_dict,
    set_peft_model_state_dict,
)
from .kappa import find_kappa_target_modules
from .hotswap import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper
from .model import (
    PeftMixedModel,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .prefix import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING, bloom_model_postprocess_past_key_value
from .prompt import shift_tokens_right
from .quant import QuantizedMergeWarning, prepare_model_for_kbit_training
from . import tuners as _tuners
from .tuners import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
    get_peft_config,
)
from .integrations import install as _install_integrations

__version__ = "0.1.0"
# transformers' Trainer, accelerate and TRL treat deltatune models as peft models (see deltatune.integrations).
_install_integrations()

_CORE_NAMES = [
    "AdapterLayer",
    "AdapterLoadError",
    "AdapterStateError",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "BaseModelMismatchWarning",
    "ConfigError",
    "Delta",
    "DeltatuneError",
    "LayerConfig",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "ModulesToSaveWrapper",
    "NoMatchingPeftModuleError",
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PeftWarning",
    "PromptLearningConfig",
    "QuantizationError",
    "QuantizedMergeWarning",
    "RemoteCodeError",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING",
    "TargetError",
    "TaskType",
    "atomic_write_files",
    "bloom_model_postprocess_past_key_value",
    "cast_mixed_precision_params",
    "convert_to_lora",
    "create_arrow_model",
    "find_kappa_target_modules",
    "get_base_model_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "inject_adapter_in_model",
    "load_peft_weights",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "save_as_lora",
    "set_base_model_state_dict",
    "set_peft_model_state_dict",
    "shift_tokens_right",
]


def _method_exports() -> dict[str, Any]:
    """Each registered method's public name -> its module (imports every method module), and each tuner class name
    (``LoraModel``) -> the tuner module."""
    names: dict[str, Any] = {name: module for module in _registry.method_modules() for name in module.__all__}
    return names | dict.fromkeys(_tuners.tuner_names(), _tuners)


def __getattr__(name: str) -> Any:
    """A method's public name, found in the registered modules' ``__all__`` (imported in order until one has it), or
    its tuner class (``LoraModel``: :func:`deltatune.tuners.find_tuner`), kept as an attribute from then on;
    ``__all__`` itself is the core names plus every method's."""
    if name == "__all__":
        return sorted([*_CORE_NAMES, *_method_exports()])
    if not name.startswith("__"):  # never import methods for the dunder probes of pickle, doctest, IDEs...
        for module in _registry.method_modules():
            if name in module.__all__:
                value = globals()[name] = getattr(module, name)
                return value
        tuner = _tuners.find_tuner(name)
        if tuner is not None:
            globals()[name] = tuner
            return tuner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_method_exports()})
