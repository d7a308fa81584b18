"""The fast training path behind :meth:`PeftModel.enable_fast_training` (``docs/fast-training.md``).

An adapter's own cost is small next to what the frozen base costs in a training step; this module changes how the
base is computed, without changing what is trained or saved. Each part is an option of
:func:`enable_fast_training` and can be used alone:

* **Chunked linear + cross-entropy** (:func:`linear_cross_entropy`): the loss of ``model(..., labels=...)`` in
  training is computed from the LM head's *input* chunk by chunk, so the full ``(tokens, vocab)`` logits and their
  gradient never exist (vocab 49k x 1k tokens: 192 MiB each in float32). With a plain linear head the gradient is
  computed in the same pass as the loss (one logits matmul per chunk, no recomputation); any other head (an adapted
  or trained ``lm_head``) runs per chunk under activation checkpointing. Tokens whose label is ignored are skipped
  entirely. The result equals transformers' loss for the model (label shift, ``ignore_index=-100``,
  ``num_items_in_batch``, ``shift_labels`` for causal LMs; T5's unshifted mean) up to float32 summation order.
  ``outputs.logits`` is ``None`` then; eval mode or ``torch.no_grad()`` gives the logits as usual.
* **Low-precision frozen base** (``compute_dtype``): the frozen base parameters are stored and computed in bfloat16
  (float16 on GPUs without bfloat16) while every adapter parameter, its gradient and the optimizer stay float32; the
  adapters compute in float32 on the rounded activations (the methods' mixed-dtype rule, ``methods/common.py``).
* **Selective activation checkpointing** (``checkpoint_every``): every k-th decoder layer recomputes its activations
  in backward (transformers' own per-layer checkpointing, non-reentrant, switched on only for those layers). Given a
  ``memory_budget`` and a sample batch instead, :func:`profile_activations` measures what one forward saves for
  backward, per layer, and the largest ``k`` whose predicted step memory fits is taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError
from .layers import Delta, ModulesToSaveWrapper, current_row_plan, unwrap

__all__ = ["FastTraining", "IGNORE_INDEX", "enable_fast_training", "linear_cross_entropy", "supports_chunked_loss"]

IGNORE_INDEX = -100  # transformers' ignore_index for language-model labels
# Logits held at once per chunk: tokens x vocab float32 values (about 32 MiB), small next to a step's activations
# and large enough that each chunk's matmul runs at full speed.
CHUNK_LOGITS = 8 * 2**20

# Model types whose forward feeds the LM head's output straight into transformers' causal-LM loss (no logit
# scaling, soft-capping or bias added after the head), and the encoder-decoders whose loss is the plain token mean.
_CAUSAL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2", "smollm3"})
_SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "umt5"})


# --- the chunked loss -------------------------------------------------------------------------------------------------

class _LinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(h @ W.T + b, y)``, divided by ``denominator``, in chunks of rows.

    The gradient is computed in the forward pass, chunk by chunk, while each chunk's logits exist (softmax minus the
    one-hot target, divided by the denominator): backward only scales it by the incoming gradient, since the loss is
    a scalar. Holds ``(rows, hidden)`` for the input gradient and, for a trained head, the head's gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                denominator: torch.Tensor, chunk: int) -> torch.Tensor:
        # hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) in [0, V), denominator: 0-dim float32.
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        x_all = hidden.to(weight.dtype)
        for start in range(0, hidden.shape[0], chunk):
            x, y = x_all[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(x, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(y), device=y.device), y] -= 1
            grad.div_(denominator)
            g = grad.to(weight.dtype)
            if need_h:
                grad_h[start:start + chunk] = g @ weight
            if need_w:
                grad_w += (g.T @ x).float()
            if need_b:
                grad_b += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / denominator

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out.float()
        return (
            None if grad_h is None else (grad_h * scale.to(grad_h.dtype)),
            None if grad_w is None else (grad_w * scale).to(w_dtype),
            None if grad_b is None else (grad_b * scale).to(b_dtype),
            None, None, None,
        )


def _head_sum(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x).float(), y, reduction="sum")


def linear_cross_entropy(
    head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *, shift: bool,
    num_items_in_batch: torch.Tensor | int | None = None, shift_labels: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX, chunk_logits: int = CHUNK_LOGITS,
) -> torch.Tensor:
    """transformers' language-model loss of ``head(hidden)`` against ``labels``, without the full logits.

    Args:
        head: The output layer (``model.get_output_embeddings()``): a plain ``nn.Linear`` takes the fused path, any
            other module (an adapted head) is run per chunk under activation checkpointing.
        hidden: ``(..., T, H)``, the head's input.
        labels: ``(..., T)`` token ids, ``ignore_index`` where no loss is wanted.
        shift: Causal LM: position ``t`` predicts ``labels[t + 1]`` (transformers' ``ForCausalLMLoss``); ``False``
            for seq2seq, whose labels line up with the decoder positions.
        num_items_in_batch: When given, the summed loss is divided by it (gradient accumulation over micro-batches);
            otherwise the mean over the non-ignored targets (``nan`` when there are none, as in torch).
        shift_labels: Already shifted labels (transformers' argument); ``labels`` is then only the trigger.
        chunk_logits: How many logits (tokens x vocab) one chunk holds.

    Returns:
        The float32 scalar loss; its gradient reaches ``hidden`` and the head's trainable parameters.
    """
    targets = labels if shift_labels is None else shift_labels
    if shift and shift_labels is None:
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    targets = targets.reshape(-1).to(flat.device)
    keep = (targets != ignore_index).nonzero().squeeze(1)  # rows that count: ignored ones cost nothing
    x, y = flat.index_select(0, keep), targets.index_select(0, keep)
    if num_items_in_batch is None:
        denominator = torch.tensor(float(len(keep)), device=flat.device)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=flat.device).float()
    linear = _plain_linear(head)
    if linear is not None:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= linear.out_features):
            raise IndexError(f"label ids must lie in [0, {linear.out_features}) or be {ignore_index}; "
                             f"got {int(y.min())}..{int(y.max())}")
        chunk = max(1, chunk_logits // linear.out_features)
        return _LinearCrossEntropy.apply(x, linear.weight, linear.bias, y, denominator, chunk)
    vocab = getattr(unwrap(head), "out_features", None) or 32768
    chunk = max(1, chunk_logits // vocab)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, len(y), chunk):
        total = total + checkpoint(_head_sum, head, x[start:start + chunk], y[start:start + chunk], use_reentrant=False)
    return total / denominator


def _plain_linear(head: nn.Module) -> nn.Linear | None:
    """The ``nn.Linear`` that computes ``head``'s output by itself (the head, or the module a ``modules_to_save``
    wrapper runs: an ``lm_head`` trained in full), or ``None`` for anything else (an adapted head)."""
    if isinstance(head, ModulesToSaveWrapper):
        head = head._module_for(head.active_adapter)
    return head if isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward else None


# --- the options ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FastTraining:
    """What :meth:`PeftModel.enable_fast_training` switched on (returned by it, kept as ``model.fast_training``).

    Attributes:
        chunked_loss: The loss of ``model(..., labels=...)`` in training comes from :func:`linear_cross_entropy`.
        compute_dtype: The dtype the frozen base is stored and computed in (``None``: unchanged).
        checkpoint_every: Every k-th decoder layer recomputes its activations in backward (``None``: none).
        chunk_logits: How many logits (tokens x vocab) one chunk of the loss holds.
        notes: Why an ``"auto"`` part stayed off, one line each.
    """

    chunked_loss: bool = False
    compute_dtype: torch.dtype | None = None
    checkpoint_every: int | None = None
    chunk_logits: int = CHUNK_LOGITS
    notes: tuple[str, ...] = ()
    # (parameter, original dtype) of every base parameter that compute_dtype cast, to cast back on disable.
    _cast: tuple[tuple[nn.Parameter, torch.dtype], ...] = dataclasses.field(default=(), repr=False, compare=False)


def supports_chunked_loss(base: nn.Module) -> str | None:
    """``None`` when :func:`linear_cross_entropy` reproduces ``base``'s own loss, else why not."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if getattr(base, "get_output_embeddings", lambda: None)() is None:
        return f"{type(base).__name__} has no output embeddings (LM head)"
    known = _SEQ2SEQ_TYPES if getattr(config, "is_encoder_decoder", False) else _CAUSAL_TYPES
    if model_type not in known:
        return (f"the chunked loss is checked against transformers' loss for model types {sorted(known)}; "
                f"{type(base).__name__} has model_type {model_type!r}")
    return None


def fast_dtype(device: torch.device) -> tuple[torch.dtype | None, str]:
    """The low-precision dtype whose matmuls are fast on ``device`` (``None`` and why not, where none is)."""
    if device.type == "cuda":
        return (torch.bfloat16, "") if torch.cuda.is_bf16_supported() else (torch.float16, "")
    if device.type == "cpu":
        try:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            native = False
        if native:
            return torch.bfloat16, ""
        return None, "this CPU has no native bfloat16 matmuls (AVX512-BF16 / AMX); bfloat16 is slower than float32"
    return None, f"no low-precision default for device type {device.type!r}"


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _parse_dtype(value: Any) -> torch.dtype | None | str:
    if value is None or value == "auto":
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    if value in (torch.bfloat16, torch.float16):
        return value
    raise ConfigError(
        f"compute_dtype must be 'auto', 'bf16', 'fp16', torch.bfloat16, torch.float16 or None; got {value!r}")


def _decoder_layers(base: nn.Module) -> list[list[nn.Module]]:
    """The model's checkpointable layers (transformers' ``GradientCheckpointingLayer``), grouped per layer stack; a
    block that an adapter wraps whole (Shadow) counts by the block inside."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    stacks = []
    for module in base.modules():
        if isinstance(module, nn.ModuleList):
            layers = [unwrap(m) for m in module if isinstance(unwrap(m), GradientCheckpointingLayer)]
            if layers:
                stacks.append(layers)
    return stacks


def enable_fast_training(
    model: nn.Module, *, chunked_loss: bool | str = "auto", compute_dtype: Any = "auto",
    checkpoint_every: int | None = None, chunk_logits: int = CHUNK_LOGITS, memory_budget: int | str | None = None,
    sample_batch: Mapping[str, Any] | None = None,
) -> FastTraining:
    """Implements :meth:`PeftModel.enable_fast_training` on the ``PeftModel`` ``model`` (whose docstring describes the
    options); checks every option before changing anything."""
    if model.__dict__.get("_fast_training") is not None:
        disable_fast_training(model)
    base = model.get_base_model()
    notes = []
    if chunked_loss not in (True, False, "auto"):
        raise ConfigError(f"chunked_loss must be True, False or 'auto'; got {chunked_loss!r}")
    if not isinstance(chunk_logits, int) or isinstance(chunk_logits, bool) or chunk_logits < 1:
        raise ConfigError(f"chunk_logits must be a positive int; got {chunk_logits!r}")
    if checkpoint_every is not None and (
            not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1):
        raise ConfigError(f"checkpoint_every must be None or an int >= 1; got {checkpoint_every!r}")
    budget = None if memory_budget is None else parse_bytes(memory_budget, "memory_budget")
    if budget is not None and (checkpoint_every is not None or sample_batch is None):
        raise ConfigError("memory_budget chooses checkpoint_every from a sample_batch: give sample_batch (a batch as "
                          "large as the training batches) and no checkpoint_every")
    if sample_batch is not None and budget is None:
        raise ConfigError("sample_batch is only read with memory_budget")
    dtype = _parse_dtype(compute_dtype)
    if chunked_loss:
        why = "prompt adapters run the base model themselves" if model.prompt_encoder else supports_chunked_loss(base)
        if why is not None and chunked_loss is True:
            raise ConfigError(f"chunked_loss=True: {why}")
        if why is not None:
            notes.append(f"chunked loss off: {why}")
        chunked_loss = why is None
    if dtype == "auto":
        device = next(base.parameters()).device
        dtype, why = fast_dtype(device)
        if why:
            notes.append(f"compute dtype float32: {why}")
    stacks = _decoder_layers(base) if checkpoint_every is not None or budget is not None else []
    if (checkpoint_every is not None or budget is not None) and not stacks:
        raise ConfigError(f"{'checkpoint_every' if budget is None else 'memory_budget'}: {type(base).__name__} has "
                          f"no transformers checkpointable layers")
    # the profile runs on the cast model; a budget it cannot meet must leave the weights as they were, not rounded
    originals = [p.data for p in model.parameters()] if budget is not None and dtype is not None else []
    cast = _cast_frozen_base(model, dtype) if dtype is not None else ()
    state = FastTraining(bool(chunked_loss), dtype, None, chunk_logits, tuple(notes), cast)
    _install(model, state)
    if budget is not None:
        try:
            checkpoint_every = _fit_budget(model, profile_activations(model, sample_batch), budget)
        except BaseException:
            disable_fast_training(model)
            for param, data in zip(model.parameters(), originals):
                param.data = data
            raise
        del originals
    if checkpoint_every is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for layers in stacks:
            for i, layer in enumerate(layers):
                layer.gradient_checkpointing = i % checkpoint_every == checkpoint_every - 1
        state = dataclasses.replace(state, checkpoint_every=checkpoint_every)
        _install(model, state)
    return state


def _install(model: nn.Module, state: FastTraining) -> None:
    model.__dict__["_fast_training"] = state
    model.base_model.__dict__["_fast_training"] = state


# --- checkpointing to a memory budget ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ActivationProfile:
    """What one training forward saved for backward, by storage (parameters excluded: they are there anyway).

    Attributes:
        sizes: Bytes of each saved storage, by storage id.
        savers: For each storage, the checkpointable layers (``(stack, index)``) that saved it, ``None`` for the rest
            of the model (embeddings, loss).
        inputs: For each layer, the storages of its tensor inputs: what non-reentrant checkpointing keeps of it.
        static: Bytes of the parameters, plus three times the trainable ones (gradient and AdamW's two moments).
    """

    sizes: dict[int, int]
    savers: dict[int, frozenset]
    inputs: dict[tuple[int, int], frozenset[int]]
    static: int

    def saved(self, every: int | None) -> int:
        """Bytes saved for backward with every ``every``-th layer of each stack checkpointed (``None``: none): what
        only checkpointed layers save is recomputed instead, and their inputs are kept."""
        chosen = {layer for layer in self.inputs if every is not None and layer[1] % every == every - 1}
        live = {s for s, who in self.savers.items() if not who <= chosen}
        live.update(s for layer in chosen for s in self.inputs[layer])
        return sum(self.sizes[s] for s in live)


def profile_activations(model: nn.Module, batch: Mapping[str, Any]) -> ActivationProfile:
    """Run one training forward of ``model`` (a ``PeftModel``) on ``batch`` without backward, recording every tensor
    autograd saves and which checkpointable layer saved it."""
    base = model.get_base_model()
    stacks = _decoder_layers(base)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}
    savers: dict[int, set] = {}
    inputs: dict[tuple[int, int], frozenset[int]] = {}
    current: list[tuple[int, int] | None] = [None]

    def storage(t: torch.Tensor) -> int | None:
        s = t.untyped_storage()
        key = s.data_ptr()
        if key in params or s.device.type == "meta":
            return None
        sizes[key] = s.nbytes()
        return key

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage(t)
        if key is not None:
            savers.setdefault(key, set()).add(current[0])
        return t

    def enter(where: tuple[int, int]):
        def hook(_module, args, kwargs):
            current[0] = where
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, tuple) for t in a
                        if isinstance(t, torch.Tensor)]
            inputs[where] = frozenset(k for k in map(storage, tensors) if k is not None)
        return hook

    def leave(_module, _args, _output):
        current[0] = None

    handles = []
    for s, layers in enumerate(stacks):
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(enter((s, i)), with_kwargs=True))
            handles.append(layer.register_forward_hook(leave))
    was_training = model.training
    try:
        model.train()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return ActivationProfile(sizes, {k: frozenset(v) for k, v in savers.items()}, inputs,
                             parameters + 3 * trained)


def _fit_budget(model: nn.Module, profile: ActivationProfile, budget: int) -> int | None:
    """The largest ``checkpoint_every`` (the least recomputation; ``None``: none at all) whose predicted step memory
    (parameters, gradients and AdamW state, plus what the forward saves) fits ``budget``."""
    depth = max(i for _, i in profile.inputs) + 1
    for every in (None, *range(depth, 0, -1)):
        if profile.static + profile.saved(every) <= budget:
            return every
    need = profile.static + profile.saved(1)
    raise ConfigError(f"memory_budget {_mib(budget)} is too small for this batch even with every layer checkpointed: "
                      f"it needs about {_mib(need)} ({_mib(profile.static)} parameters, gradients and AdamW state, "
                      f"{_mib(profile.saved(1))} saved activations); use a smaller batch or a larger budget")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str, where: str) -> int:
    """``value`` in bytes: an int, or a string such as ``"6GiB"``, ``"512 MiB"``, ``"2GB"``."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{where} must be a positive number of bytes or a size like '6GiB' / '512MiB'; "
                          f"got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def disable_fast_training(model: nn.Module) -> None:
    """Undo :func:`enable_fast_training`: the standard loss, float32 base weights again (their values rounded to the
    compute dtype: reload the base model for the original float32 values), no per-layer checkpointing."""
    state: FastTraining | None = model.__dict__.pop("_fast_training", None)
    model.base_model.__dict__.pop("_fast_training", None)
    if state is None:
        return
    with torch.no_grad():
        for param, dtype in state._cast:
            param.data = param.data.to(dtype)
    if state.checkpoint_every is not None:
        base = model.get_base_model()
        if hasattr(base, "gradient_checkpointing_disable"):
            base.gradient_checkpointing_disable()


def _cast_frozen_base(model: nn.Module, dtype: torch.dtype) -> tuple[tuple[nn.Parameter, torch.dtype], ...]:
    """Store every frozen floating-point base parameter in ``dtype``; adapter parameters (in deltas, shared state and
    ``modules_to_save`` copies), trainable parameters, buffers (rotary frequencies) and the model's
    ``_keep_in_fp32_modules`` stay as they are."""
    base = model.get_base_model()
    keep = {id(p) for m in model.modules() if isinstance(m, (Delta, ModulesToSaveWrapper)) for p in m.parameters()}
    keep |= {id(p) for p in model.base_model.shared_state.parameters()}
    fp32_names = tuple(getattr(base, "_keep_in_fp32_modules", None) or ())
    cast = []
    with torch.no_grad():
        for name, param in base.named_parameters():
            if (param.requires_grad or id(param) in keep or not param.is_floating_point() or param.dtype == dtype
                    or any(part in fp32_names for part in name.split("."))):
                continue
            cast.append((param, param.dtype))
            param.data = param.data.to(dtype)
    return tuple(cast)


# --- the forward ------------------------------------------------------------------------------------------------------

def forward(state: FastTraining, base: nn.Module, args: tuple, kwargs: dict[str, Any]):
    """``base(*args, **kwargs)``, with the loss from :func:`linear_cross_entropy` when the chunked loss is on, the
    model trains with gradients and ``labels`` are given; ``outputs.logits`` is then ``None``."""
    labels = kwargs.get("labels")
    # A mixed-adapter batch keeps the standard loss: an adapted head's checkpointed chunks would rerun in backward,
    # outside the batch's row plan. TRL's SFTTrainer asks for its own fused head (``fused_lm_head=True``: per-token
    # log-probabilities without full logits, from the labels it needs to see), which already does what ours would.
    if (not state.chunked_loss or labels is None or not base.training or not torch.is_grad_enabled()
            or current_row_plan() is not None or kwargs.get("fused_lm_head")):
        return base(*args, **kwargs)
    kwargs = dict(kwargs)
    del kwargs["labels"]
    seq2seq = bool(getattr(base.config, "is_encoder_decoder", False))
    if seq2seq and kwargs.get("decoder_input_ids") is None and kwargs.get("decoder_inputs_embeds") is None:
        kwargs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
    head = base.get_output_embeddings()
    with _capture_head_input(head) as captured:
        outputs = base(*args, **kwargs)
    if seq2seq:  # T5 (transformers 5.x): CrossEntropyLoss(ignore_index=-100), mean, num_items_in_batch unused
        loss = linear_cross_entropy(head, captured[0], labels, shift=False, chunk_logits=state.chunk_logits)
    else:
        loss = linear_cross_entropy(
            head, captured[0], labels, shift=True, num_items_in_batch=kwargs.get("num_items_in_batch"),
            shift_labels=kwargs.get("shift_labels"), ignore_index=kwargs.get("ignore_index", IGNORE_INDEX),
            chunk_logits=state.chunk_logits,
        )
    outputs.loss = loss
    outputs.logits = None
    return outputs


@contextlib.contextmanager
def _capture_head_input(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, the head records its input and runs on zero positions of it (``(..., 0, H)``), so the model's
    forward goes on as usual but computes no logits."""
    captured: list[torch.Tensor] = []

    def hook(_module, inputs):
        if captured:
            raise RuntimeError("the chunked loss expects the LM head to run once per forward")
        captured.append(inputs[0])
        return (inputs[0].narrow(-2, 0, 0), *inputs[1:])

    handle = head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
