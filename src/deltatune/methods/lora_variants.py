"""Which ``LoraConfig`` field selects which LoRA variant (``methods/lora_<variant>.py``, each a
:class:`~deltatune.methods._lora_variant.LoraVariant`), and the rules peft 0.21 applies to them: at most one variant per
adapter, on Linear-like layers, not with ``target_parameters``. ``lora.py`` calls these from its config checks,
``check_target`` and delta factory.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import ConfigError, TargetError
from ._lora_variant import LoraVariant
from .lora_arrow import ArrowVariant
from .lora_bdlora import BdloraVariant
from .lora_kasa import KasaVariant
from .lora_monteclora import MontecloraVariant
from .lora_qalora import QaloraVariant
from .lora_velora import VeloraVariant

# config field -> variant, in peft's declaration order (which messages follow)
VARIANTS: dict[str, type[LoraVariant]] = {
    v.field: v for v in (VeloraVariant, QaloraVariant, MontecloraVariant, BdloraVariant, ArrowVariant, KasaVariant)
}
# Other LoraConfig options peft treats as variants of the same kind: at most one of all of them per adapter.
_OTHER_VARIANT_OPTIONS = ("use_dora", "alora_invocation_tokens")


def _is_on(value: Any) -> bool:
    return value is not None and value is not False


def selected(config: Any) -> type[LoraVariant] | None:
    """The variant ``config`` switches on (after :func:`check_config`), or ``None`` for plain LoRA (or DoRA)."""
    return next((v for f, v in VARIANTS.items() if _is_on(getattr(config, f, None))), None)


def check_config(config: Any) -> None:
    """Turn the variant sub-configs read from JSON (dicts) into their classes and refuse what peft refuses: two
    variants in one adapter, a variant with ``target_parameters`` (no layer input to work on). Called from
    ``LoraConfig.__post_init__``; also refuses ``lora_bias`` with a variant (the variants' updates have no bias).

    Raises:
        ConfigError: naming both options of a refused combination, or the sub-config's bad field.
    """
    for field, variant in VARIANTS.items():
        setattr(config, field, variant.config_from(getattr(config, field)))
    on = [f for f in VARIANTS if _is_on(getattr(config, f))]
    on += [f for f in _OTHER_VARIANT_OPTIONS if getattr(config, f, None) not in (None, False, [])]
    if len(on) > 1:
        raise ConfigError(f"{on[0]} cannot be combined with {on[1]} (nor in peft): a LoRA adapter uses at most one "
                          f"variant; use two adapters instead")
    variant = selected(config)
    if variant is None:
        return
    if config.target_parameters:
        raise ConfigError(f"{variant.field} cannot be combined with target_parameters (nor in peft): a parameter "
                          f"target has no layer input for the variant's update")
    if config.lora_bias:
        raise ConfigError(f"{variant.field} cannot be combined with lora_bias=True: the variant's update has no bias")


def check_target(config: Any, base_layer: nn.Module, name: str, linear_like: bool) -> None:
    """Refuse a variant on a layer other than Linear / Conv1D (peft dispatches the variants on its Linear layer
    only), then let the variant check the layer.

    Raises:
        TargetError: naming the field and the layer.
    """
    variant = selected(config)
    if variant is None:
        return
    if not linear_like:
        raise TargetError(f"{name}: {variant.field} supports Linear (and Conv1D) layers only, not "
                          f"{type(base_layer).__name__} (nor in peft); leave the layer out of target_modules")
    variant.check_target(config, base_layer, name)
