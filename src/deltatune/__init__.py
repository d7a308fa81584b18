"""deltatune: parameter-efficient fine-tuning for transformers and PyTorch models, peft-compatible on disk.

Besides the core names imported below, every registered method's public names (its module's ``__all__``: ``LoraConfig``,
``PromptEncoder``, ...) are exported too, imported on first use (PEP 562), so a new method needs no line here and
``import deltatune`` imports no method.
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
    QuantizationError,
    RemoteCodeError,
    TargetError,
)
from .files import atomic_write_files
from .fingerprint import BaseModelMismatchWarning
from .functional import (
    get_layer_status,
    get_model_status,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from .hotswap import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
from .layers import AdapterLayer, Delta, ModulesToSaveWrapper
from .model import (
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
)
from .quant import QuantizedMergeWarning, prepare_model_for_kbit_training
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
    "ModulesToSaveWrapper",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PromptLearningConfig",
    "QuantizationError",
    "QuantizedMergeWarning",
    "RemoteCodeError",
    "TargetError",
    "TaskType",
    "atomic_write_files",
    "convert_to_lora",
    "create_arrow_model",
    "get_layer_status",
    "get_model_status",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "hotswap_adapter_from_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "save_as_lora",
    "set_peft_model_state_dict",
]


def _method_exports() -> dict[str, ModuleType]:
    """Each registered method's public name -> its module (imports every method module)."""
    return {name: module for module in _registry.method_modules() for name in module.__all__}


def __getattr__(name: str) -> Any:
    """A method's public name, found in the registered modules' ``__all__`` (imported in order until one has it)
    and kept as an attribute from then on; ``__all__`` itself is the core names plus every method's."""
    if name == "__all__":
        return sorted([*_CORE_NAMES, *_method_exports()])
    if not name.startswith("__"):  # never import methods for the dunder probes of pickle, doctest, IDEs...
        for module in _registry.method_modules():
            if name in module.__all__:
                value = globals()[name] = getattr(module, name)
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_method_exports()})
