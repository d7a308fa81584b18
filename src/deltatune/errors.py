"""The exceptions deltatune raises on bad input.

Every one subclasses ``ValueError`` so code written against peft (which raises ``ValueError``) keeps working, and
peft's own base classes (``PeftError``; ``NoMatchingPeftModuleError`` for targets that match nothing; ``PeftWarning``
for warnings), so code that catches peft's catches ours. Every message says what was wrong and what to do about it.
"""

from __future__ import annotations


class PeftError(Exception):
    """peft's base error class (``peft.PeftError``), above :class:`DeltatuneError`."""


class PeftWarning(UserWarning):
    """peft's base warning class (``peft.PeftWarning``); deltatune's own warning categories subclass it."""


class DeltatuneError(PeftError, ValueError):
    """Base class of every error deltatune raises on bad input."""


class ConfigError(DeltatuneError):
    """An adapter config is missing, malformed, or asks for something this version cannot compute."""


class TargetError(DeltatuneError):
    """``target_modules`` / ``modules_to_save`` select nothing, or select a module the method cannot wrap."""


class NoMatchingPeftModuleError(TargetError):
    """``target_modules`` / ``target_parameters`` match no module or parameter of the model (peft's class of the same
    name: a ``PeftError`` and a ``ValueError``)."""


class AdapterLoadError(DeltatuneError):
    """Adapter weights are missing, corrupt, unsafe, or do not fit the model they are loaded onto."""


class AdapterStateError(DeltatuneError):
    """An operation does not fit the wrapper's adapters (unknown name, duplicate name, deleting the active one...)."""


class NotMergeableError(AdapterStateError, NotImplementedError):
    """The adapter cannot be folded into the base weights at all (its change is not a weight update); also a
    ``NotImplementedError``, which is what peft raises for such methods."""


class RemoteCodeError(ConfigError):
    """Loading a base model would execute custom code (``trust_remote_code``) that the caller has not opted in to."""


class QuantizationError(TargetError):
    """A quantized base layer that the adapters cannot work on, or an option that cannot work on a quantized layer."""
