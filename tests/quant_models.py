"""Tiny quantized Llama models for the quantization tests (``tests/test_quant*.py``).

A random Llama is saved once per session and loaded through transformers' ``BitsAndBytesConfig`` /
``TorchAoConfig`` on the CPU, as users load real checkpoints. Its sizes are multiples of 32 so that bitsandbytes' CPU
inference repack (which needs ``out_features % 32 == 0``) can run on every layer. :func:`dequantized_reference`
builds the fp32 model that computes with exactly the weights the quantized kernels use: the oracle for gradients.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import quant

KINDS = ("nf4", "fp4", "int8", "torchao")


@functools.cache
def saved_llama() -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0,
    )
    path = tempfile.mkdtemp(prefix="deltatune-quant-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def quantization_config(kind: str, dtype: torch.dtype = torch.float32):
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if kind in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=kind == "nf4",
                                  bnb_4bit_compute_dtype=dtype)
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def load(kind: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LlamaForCausalLM:
    """The saved Llama, quantized as ``kind`` (``None``: full precision), in eval mode as from_pretrained leaves it."""
    if kind is None:
        return LlamaForCausalLM.from_pretrained(saved_llama(), dtype=dtype).to(device)
    return LlamaForCausalLM.from_pretrained(
        saved_llama(), quantization_config=quantization_config(kind, dtype), device_map={"": device}, dtype=dtype
    )


def dequantized_reference(quantized: torch.nn.Module) -> LlamaForCausalLM:
    """An fp32 Llama whose quantized layers hold the weights the quantized model's kernels compute with."""
    reference = load(None, device=str(next(quantized.parameters()).device))
    with torch.no_grad():
        for name, module in quantized.named_modules():
            handler = quant.handler_for(module)
            if handler is not None:  # (a quantized model that already holds adapters: the path of the wrapped layer)
                reference.get_submodule(name.replace(".base_layer", "")).weight.copy_(handler.dequantize(module).float())
    return reference


def copy_trainable(source: torch.nn.Module, target: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Copy ``source``'s trainable parameters into ``target`` (same names); the source's trainable parameters."""
    trained = {n: p for n, p in source.named_parameters() if p.requires_grad}
    params = dict(target.named_parameters())
    with torch.no_grad():
        for name, param in trained.items():
            params[name].copy_(param)
    return trained


def grad_errors(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Train-mode loss backward on both; each trainable parameter's relative gradient error against the reference
    (a parameter that gets no gradient by design, as Shadow's update after its last block, must get none in both)."""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    ref = dict(reference.named_parameters())
    model.train()
    reference.train()
    model(input_ids=ids, labels=ids).loss.backward()
    reference(input_ids=ids, labels=ids).loss.backward()
    gradless = {n for n, p in trained.items() if p.grad is None}
    assert gradless == {n for n in trained if ref[n].grad is None}, gradless
    return {n: float((p.grad - ref[n].grad).norm() / ref[n].grad.norm())
            for n, p in trained.items() if n not in gradless}
