"""Activated LoRA (aLoRA), a variant strategy of a LoRA delta: the update applies only from the invocation on.

Greenewald et al., 2025, "Activated LoRA: Fine-tuned LLMs for Intrinsics", arXiv:2504.12397, §3: an adapter
trained to be *invoked* by a fixed token sequence (``LoraConfig.alora_invocation_tokens``) changes the weights only
for the tokens from the start of the invocation's last occurrence on. Every token before it goes through the base
model, so in a causal LM the KV cache of the shared context is the base model's (and every such adapter's): an agent
switching between the base model and several adapters prefills the context once.

Per row, as peft computes it, the activation is an *offset counted from the end* of the input: ``offset = L - s``
for a row of length ``L`` whose last occurrence of the invocation starts at ``s``; ``0`` (not found) means the
adapter applies nowhere in that row. A layer whose input has ``T`` tokens applies the update to its last
``min(offset, T)`` positions. Counting from the end makes left padding irrelevant and carries over to cached
decoding: ``generate()`` finds the offsets in the prompt once, and every later step (``T = 1``) is adapted exactly
when the prompt held the invocation.

The model wrappers open an :func:`invocation_scope` per ``forward`` / ``generate`` call holding that call's
``input_ids`` (or peft's explicit ``alora_offsets``); each aLoRA delta reads the offsets for its own invocation
tokens from it (computed once per call and token sequence), so rows of a mixed-adapter batch use their adapter's
invocation. Gradient checkpointing recomputes layers during backward, outside the call: the scope of the last call
that built a graph stays available to that recomputation.

Only on ``nn.Linear`` / transformers ``Conv1D``; not with DoRA nor peft's other variants (both refuse); never
merged (the update depends on the token position).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..errors import AdapterStateError, ConfigError

__all__ = ["ActivatedLora", "check_invocation_tokens", "invocation_offsets", "invocation_scope"]

def check_invocation_tokens(config: Any, rewrites_base: bool) -> list[int] | None:
    """``config.alora_invocation_tokens`` as a list of token ids, after refusing what would break aLoRA's promise: a
    base-rewriting init (``rewrites_base``: the tokens before the invocation would no longer see the base model) and
    a task whose wrapper peft never activates aLoRA in. Returns ``None`` when aLoRA is off. (The other LoRA variants
    and DoRA, which peft does not combine with it, are refused with them in ``lora_variants.check_config``.)

    Raises:
        ConfigError: an empty or non-integer sequence, a clashing option (named), a task other than causal LM.
    """
    tokens = config.alora_invocation_tokens
    if tokens is None:
        return None
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or not tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
        raise ConfigError(f"alora_invocation_tokens must be a non-empty list of token ids, got {tokens!r}")
    if rewrites_base:
        raise ConfigError(
            f"alora_invocation_tokens cannot be combined with init_lora_weights={config.init_lora_weights!r}: that "
            f"init moves part of the base weights into the adapter, so the tokens before the invocation would no "
            f"longer see the base model (peft allows it and breaks that promise)"
        )
    task = getattr(config.task_type, "value", config.task_type)
    if task not in (None, "CAUSAL_LM"):
        raise ConfigError(f"alora_invocation_tokens needs task_type='CAUSAL_LM' (or none), got {task!r}: peft "
                          f"activates aLoRA only in causal LMs (elsewhere its adapter never applies)")
    return [int(t) for t in tokens]


def invocation_offsets(input_ids: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """``(B,)`` long: per row of ``input_ids`` ``(B, L)``, ``L`` minus the start of the last occurrence of ``tokens``
    (so ``>= len(tokens)``), or ``0`` where the row does not contain them."""
    batch, length = input_ids.shape
    n = len(tokens)
    if n > length:
        return torch.zeros(batch, dtype=torch.long, device=input_ids.device)
    pattern = torch.tensor(tokens, dtype=input_ids.dtype, device=input_ids.device)
    hits = (input_ids.unfold(1, n, 1) == pattern).all(dim=-1)  # (B, L - n + 1): an occurrence starts here
    starts = torch.arange(length - n + 1, device=input_ids.device)
    last = torch.where(hits, starts, -1).amax(dim=1)  # (B,)
    return torch.where(last >= 0, length - last, 0)


class _Scope:
    """What one ``forward`` / ``generate`` call tells aLoRA deltas: its token ids or explicit offsets, with the
    offsets of each invocation sequence computed once."""

    def __init__(self, input_ids: torch.Tensor | None, offsets: Sequence[int | None] | None) -> None:
        if input_ids is not None and input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        self.input_ids = input_ids
        self.explicit = None if offsets is None else torch.tensor([0 if o is None else int(o) for o in offsets])
        self._found: dict[tuple[tuple[int, ...], torch.device], torch.Tensor | None] = {}

    def offsets(self, tokens: tuple[int, ...], device: torch.device) -> torch.Tensor | None:
        """``(B,)`` offsets for ``tokens`` on ``device``, or ``None`` (with one warning per call) where the call had
        neither token ids nor explicit offsets: the adapter then applies nowhere, as in peft."""
        key = (tokens, device)
        if key not in self._found:
            if self.explicit is not None:
                found = self.explicit.to(device)
            elif self.input_ids is not None:
                found = invocation_offsets(self.input_ids.to(device), tokens)
            else:
                if not self._found:
                    warnings.warn("an aLoRA adapter is active but this call has no input_ids to find its invocation "
                                  "tokens in (only inputs_embeds): the adapter is not applied; pass input_ids or "
                                  "alora_offsets", stacklevel=2)
                found = None
            self._found[key] = found
        return self._found[key]


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("alora_scope", default=None)
_graph_scope: _Scope | None = None  # the scope of the last call that built an autograd graph (see module docstring)


@contextlib.contextmanager
def invocation_scope(input_ids: torch.Tensor | None, alora_offsets: Sequence[int | None] | None = None
                     ) -> Iterator[None]:
    """Within the block, aLoRA deltas find their invocation in ``input_ids`` ``(B, L)``, or use ``alora_offsets``
    (peft's forward argument: one offset counted from the end per row, ``None`` for not invoked) when given."""
    global _graph_scope
    scope = _Scope(input_ids, alora_offsets)
    if torch.is_grad_enabled():
        _graph_scope = scope
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def _current_scope() -> _Scope | None:
    scope = _scope.get()
    if scope is None and torch._C._current_graph_task_id() != -1:  # a checkpointed layer recomputed in backward
        return _graph_scope
    return scope


class ActivatedLora:
    """The aLoRA strategy a LoRA delta holds (``LoraDelta.alora``): which tokens invoke it, and the masked update.

    Args:
        tokens: The invocation token ids.
    """

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tuple(tokens)

    def mask(self, total: int, length: int, device: torch.device, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, length)`` bool: where the update applies, for ``rows`` of the layer's batch of ``total`` rows (all
        rows when ``None``). A batch that is a whole multiple of the call's rows (beams, ``num_return_sequences``)
        repeats each row's offset for its consecutive copies, as ``generate()`` expands its inputs."""
        scope = _current_scope()
        offsets = None if scope is None else scope.offsets(self.tokens, device)
        if offsets is None:  # no invocation to find: nowhere
            offsets = torch.zeros(total, dtype=torch.long, device=device)
        if total % offsets.shape[0]:
            raise AdapterStateError(f"aLoRA: the call has offsets for {offsets.shape[0]} rows but a layer sees a "
                                    f"batch of {total}; give one alora_offsets entry per row")
        offsets = offsets.repeat_interleave(total // offsets.shape[0])
        if rows is not None:
            offsets = offsets.index_select(0, rows)
        positions = torch.arange(length, device=device)  # (T,)
        return positions >= (length - offsets.clamp(max=length)).unsqueeze(1)  # (B, T)

    def apply(self, out: torch.Tensor, update: torch.Tensor, total: int | None = None,
              rows: torch.Tensor | None = None) -> torch.Tensor:
        """``out`` with ``update`` (same shape, ``(B, T, out)`` or ``(B, out)``, already scaled) added at the
        activated positions only; elsewhere ``out`` is kept bit for bit (and the adapter gets a zero gradient there,
        as in peft). ``rows``: which rows of the layer's batch of ``total`` these are (a mixed-adapter group)."""
        if out.dim() not in (2, 3):
            raise AdapterStateError(f"aLoRA needs layer inputs shaped (batch, tokens, features) or (batch, features), "
                                    f"got an output of shape {list(out.shape)}")
        length = out.shape[1] if out.dim() == 3 else 1
        mask = self.mask(out.shape[0] if total is None else total, length, out.device, rows)  # (B, T)
        if out.dim() == 3:
            mask = mask.unsqueeze(-1)
        return torch.where(mask, out + update.to(out.dtype), out)

    @staticmethod
    def check_mergeable() -> None:
        raise AdapterStateError(
            "an aLoRA adapter (alora_invocation_tokens) applies only from its invocation on, which a merged weight "
            "cannot express (peft refuses merging it too); keep the adapter unmerged"
        )
