"""peft 0.21.2's decoder case table (``tests/test_decoder_models.py``: ``ALL_CONFIGS`` and its skip rules) as data,
with tiny causal LMs to run it on.

peft runs the table on hub checkpoints (``hf-internal-testing/tiny-random-OPTForCausalLM`` and friends); without
network each architecture is built here from its transformers config (hidden 32, 2 layers, vocabulary 100, seed 0),
so the module names and layer types (``Conv1D`` in GPT-2, fused ``query_key_value`` in Bloom, ``c_attn`` with
multi-query in GPTBigCode, grouped-query attention in Llama / Qwen2 / Mistral / Gemma 3) are those of the checkpoints.
A row is ``(name, config class name, kwargs)``; the models are crossed with every row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import transformers as tf
from transformers import PreTrainedModel

VOCAB = 100
_COMMON = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "attn_implementation": "eager"}
_GQA = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}

# model id (peft's checkpoint's short name) -> (causal LM class name, config class name, config kwargs)
_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "OPTForCausalLM": ("OPTForCausalLM", "OPTConfig",
                       {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "max_position_embeddings": 64, "word_embed_proj_dim": 32}),
    "GPT2LMHeadModel": ("GPT2LMHeadModel", "GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64}),
    "BloomForCausalLM": ("BloomForCausalLM", "BloomConfig", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "gpt_neo": ("GPTNeoForCausalLM", "GPTNeoConfig",
                {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "attention_types": [[["global", "local"], 1]],
                 "max_position_embeddings": 64, "window_size": 8}),
    "GPTJForCausalLM": ("GPTJForCausalLM", "GPTJConfig",
                        {"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 64}),
    "GPTBigCodeForCausalLM": ("GPTBigCodeForCausalLM", "GPTBigCodeConfig",
                              {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64, "multi_query": True}),
    "LlamaForCausalLM": ("LlamaForCausalLM", "LlamaConfig", _GQA),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", _GQA),
    "Gemma3ForCausalLM": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                          {**_GQA, "head_dim": 8, "sliding_window": 4, "layer_types":
                           ["sliding_attention", "full_attention"]}),
    "MistralForCausalLM": ("MistralForCausalLM", "MistralConfig", _GQA),
}

# peft's PEFT_DECODER_MODELS_TO_TEST (Mistral is in its SMALL_GRID_MODELS only; kept as an extra model here)
MODEL_IDS: list[str] = list(_ARCHS)


def build(model_id: str) -> PreTrainedModel:
    """The tiny ``model_id``, identical on every call (seed 0), float32, eval mode."""
    model_class, config_class, kwargs = _ARCHS[model_id]
    config = getattr(tf, config_class)(**_COMMON, **kwargs)
    torch.manual_seed(0)
    return getattr(tf, model_class)(config).eval()


def inputs() -> dict[str, torch.Tensor]:
    """peft's decoder input: two 3-token rows, the second with a masked middle token."""
    return {"input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}


@dataclass(frozen=True)
class Row:
    name: str
    config_name: str
    kwargs: dict[str, Any]


_CAUSAL = {"task_type": "CAUSAL_LM"}
_LORA = {**_CAUSAL, "r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05, "bias": "none"}
_CPT = {"cpt_token_ids": [0, 1, 2, 3, 4, 5, 6, 7], "cpt_mask": [1] * 8,
        "cpt_tokens_type_mask": [1, 2, 2, 2, 3, 3, 4, 4]}

# peft's ALL_CONFIGS, in its order (names: the method, plus the variant where peft has several LoRA rows)
ROWS: list[Row] = [
    Row("AdaLoRA", "AdaLoraConfig", {**_CAUSAL, "target_modules": None, "total_step": 1}),
    Row("BOFT", "BOFTConfig", {**_CAUSAL, "target_modules": None}),
    Row("Bone", "BoneConfig", {**_CAUSAL, "target_modules": None, "r": 2}),
    Row("MiSS", "MissConfig", {**_CAUSAL, "target_modules": None, "r": 2}),
    Row("CPT", "CPTConfig", {**_CAUSAL, **_CPT}),
    Row("FourierFT", "FourierFTConfig", {**_CAUSAL, "n_frequency": 10, "target_modules": None}),
    Row("HRA", "HRAConfig", {**_CAUSAL, "target_modules": None}),
    Row("IA3", "IA3Config", {**_CAUSAL, "target_modules": None, "feedforward_modules": None}),
    Row("LoRA", "LoraConfig", _LORA),
    Row("aLoRA", "LoraConfig", {**_LORA, "alora_invocation_tokens": [1]}),
    # no test input holds token 1000: the adapter never activates
    Row("aLoRA-inactive", "LoraConfig", {**_LORA, "alora_invocation_tokens": [1000]}),
    Row("LoRA-trainable-tokens", "LoraConfig", {**_LORA, "trainable_token_indices": [0, 1, 3]}),
    Row("OFT", "OFTConfig", {**_CAUSAL, "target_modules": None}),
    Row("PrefixTuning", "PrefixTuningConfig", {**_CAUSAL, "num_virtual_tokens": 10}),
    Row("PromptEncoder", "PromptEncoderConfig", {**_CAUSAL, "num_virtual_tokens": 10, "encoder_hidden_size": 32}),
    Row("PromptTuning", "PromptTuningConfig", {**_CAUSAL, "num_virtual_tokens": 10}),
    Row("RoAd", "RoadConfig", {**_CAUSAL, "variant": "road_1", "group_size": 2}),
    Row("SHiRA", "ShiraConfig", {"r": 1, **_CAUSAL, "target_modules": None, "init_weights": False}),
    Row("VBLoRA", "VBLoRAConfig", {**_CAUSAL, "target_modules": None, "vblora_dropout": 0.05, "vector_length": 1,
                                   "num_vectors": 2}),
    Row("VeRA", "VeraConfig", {**_CAUSAL, "r": 8, "target_modules": None, "vera_dropout": 0.05,
                               "projection_prng_key": 0xFF, "d_initial": 0.1, "save_projection": True,
                               "bias": "none"}),
    Row("C3A", "C3AConfig", {**_CAUSAL, "block_size": 1, "target_modules": None}),
    Row("WaveFT", "WaveFTConfig", {**_CAUSAL, "n_frequency": 8, "target_modules": None}),
    Row("OSF", "OSFConfig", dict(_CAUSAL)),
]

PROMPT_LEARNING = frozenset({"CPTConfig", "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig"})

# peft's skip rules, as data. ``_skip_if_not_conv1d_supported``: methods without a transformers ``Conv1D`` layer,
# skipped on GPT-2 in every check but merge_layers / merge_fp16 / half precision / layer indexing.
NO_CONV1D = frozenset({"BOFTConfig", "BoneConfig", "HRAConfig", "OFTConfig", "RoadConfig", "ShiraConfig",
                       "C3AConfig", "MissConfig"})
# ``_skip_adalora_oft_hra_bone_for_gpt2``: also skipped on GPT-2 in test_unload_adapter
NO_CONV1D_UNLOAD = NO_CONV1D | {"AdaLoraConfig"}
# test_mixed_adapter_batches / test_generate_with_mixed_adapter_batches run LoRA rows only
MIXED_BATCHES = frozenset({"LoraConfig"})
# ``_skip_alora_no_activation``: a row whose adapter never activates on the test inputs (no output change to see),
# skipped in mixed batches, unload and disable
NEVER_ACTIVE = frozenset({"aLoRA-inactive"})


def skip_reason(check: str, model_id: str, row: Row) -> str | None:
    """peft's reason for skipping ``check`` (one of peft's test names, without ``test_``) on this row, or None."""
    gpt2 = model_id == "GPT2LMHeadModel"
    no_conv1d_checks = {"merge_layers", "merge_layers_fp16", "generate_half_prec", "training_decoders_layer_indexing",
                        "mixed_adapter_batches", "generate_with_mixed_adapter_batches", "merge_layers_nan",
                        "weighted_combination_of_adapters", "peft_model_device_map", "training_prompt_learning_tasks"}
    if gpt2 and check == "unload_adapter" and row.config_name in NO_CONV1D_UNLOAD:
        return f"peft skips {row.config_name} on GPT-2 (no Conv1D layer)"
    if gpt2 and check not in no_conv1d_checks and row.config_name in NO_CONV1D:
        return f"peft skips {row.config_name} on GPT-2 (no Conv1D layer)"
    if check in {"mixed_adapter_batches", "generate_with_mixed_adapter_batches"} \
            and row.config_name not in MIXED_BATCHES:
        return "peft runs mixed adapter batches for LoRA only"
    if check in {"mixed_adapter_batches", "unload_adapter", "disable_adapter"} and row.name in NEVER_ACTIVE:
        return "the adapter never activates on the test inputs (peft's _skip_alora_no_activation)"
    return None


def init_weights_off(lib: Any, row: Row) -> dict[str, Any]:
    """``row.kwargs`` with the method's identity init switched off where it has one (peft's
    ``set_init_weights_false``: ``init_lora_weights`` for LoRA / AdaLoRA, ``init_ia3_weights`` for IA3, else
    ``init_weights``; prompt learning and VB-LoRA have none)."""
    if row.config_name in PROMPT_LEARNING or row.config_name == "VBLoRAConfig":
        return dict(row.kwargs)
    key = {"LoraConfig": "init_lora_weights", "AdaLoraConfig": "init_lora_weights",
           "IA3Config": "init_ia3_weights"}.get(row.config_name, "init_weights")
    config_class = getattr(lib, row.config_name)
    if key not in {f.name for f in dataclasses.fields(config_class)}:
        return dict(row.kwargs)
    return {**row.kwargs, key: False}


class Missing(Exception):
    """The library running a row lacks its config class (the message says which)."""


def make_config(lib: Any, row: Row, randomized: bool = False, **extra: Any) -> Any:
    """Row ``row``'s config from ``lib`` (``deltatune`` or ``peft``); raises :class:`Missing` without the class."""
    if not hasattr(lib, row.config_name):
        raise Missing(f"{row.config_name} not in {lib.__name__}")
    kwargs = init_weights_off(lib, row) if randomized else dict(row.kwargs)
    return getattr(lib, row.config_name)(**kwargs, **extra)


# Rows whose config class neither library has (the test says so and skips)
MISSING_IN_BOTH: dict[str, str] = {
    "Bone": "peft 0.21.2 has no BoneConfig (Bone was folded into MiSS, the next row); neither has deltatune",
}

# (model id, row name) -> why peft 0.21.2 cannot be the oracle for that cell; deltatune's own behaviour is checked
PEFT_ORACLE_DIFFERS: dict[tuple[str, str], str] = {
    ("GPT2LMHeadModel", "OSF"): ("peft 0.21.2's OSF finds GPT-2's c_attn/c_proj (transformers Conv1D), wraps none and "
                                 "trains nothing; deltatune refuses the Conv1D targets by name"),
    ("MistralForCausalLM", "AdaLoRA"): ("peft 0.21.2's AdaLoRA table has no Mistral entry (it refuses target_modules="
                                        "None); deltatune adapts q_proj/v_proj as for Llama"),
}

# Prompt-learning methods on a causal LM: deltatune derives position_ids from the attention mask (cumsum - 1, as
# generate() does), so a plain forward over a batch with masked tokens equals cached generation; peft's forward uses
# 0..n-1 whatever the mask. Outputs are compared with peft on unmasked inputs only.
PROMPT_POSITIONS = PROMPT_LEARNING

# aLoRA finds its invocation tokens in input_ids: called with inputs_embeds alone it never activates and the model
# computes the base model's logits, in peft 0.21.2 as in deltatune.
EMBEDS_WITHOUT_INVOCATION = "an aLoRA adapter called with inputs_embeds only stays off (peft: the same)"

# The combination types of peft 0.21.2's add_weighted_adapter that its table's rows exercise (None: IA3's one way)
WEIGHTED_COMBINATIONS: dict[str, tuple[str | None, ...]] = {
    "LoraConfig": ("linear", "cat", "svd"),
    "IA3Config": (None,),
}

# Rows whose add_weighted_adapter deltatune refuses by name where peft 0.21.2 combines (row name or config class ->
# why); the check asserts the refusal and that nothing changed.
WEIGHTED_REFUSED: dict[str, str] = {
    "IA3Config": "deltatune's add_weighted_adapter combines LoRA adapters only; peft also sums IA3 vectors (a gap)",
    "LoRA-trainable-tokens": ("peft's combination gets the original token rows, silently dropping both adapters' "
                              "trained tokens; deltatune refuses trainable_token_indices"),
}
