"""peft 0.21.2's encoder-decoder and feature-extraction tables (``tests/test_encoder_decoder_models.py``,
``tests/test_feature_extraction_models.py``) as data, with tiny models to run them on.

peft runs each config row on hub checkpoints (tiny-random T5 / BART for ``SEQ_2_SEQ_LM``; BERT, RoBERTa, DeBERTa,
DeBERTa-v2 for ``FEATURE_EXTRACTION``). There is no network here, so each architecture is built from its transformers
config in code (hidden 32, 2 layers, vocabulary 64, seed 0): the same classes, module names and layer types.
A row is ``(config class name, kwargs)``; every row runs on every model of its table, minus the skip rules at the end
(peft's own skips, and rows peft 0.21.2 cannot serve as the oracle for).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    DebertaConfig,
    DebertaModel,
    DebertaV2Config,
    DebertaV2Model,
    RobertaConfig,
    RobertaModel,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64, pad_token_id=0, attn_implementation="eager")


def _t5() -> nn.Module:
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, attn_implementation="eager"))


def _bart() -> nn.Module:
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
        attn_implementation="eager"))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "T5": _t5,
    "Bart": _bart,
    "Bert": lambda: BertModel(BertConfig(**_ENCODER)),
    "Roberta": lambda: RobertaModel(RobertaConfig(**{**_ENCODER, "pad_token_id": 1})),
    "Deberta": lambda: DebertaModel(DebertaConfig(**_ENCODER)),
    "DebertaV2": lambda: DebertaV2Model(DebertaV2Config(**_ENCODER)),
}
SEQ2SEQ_MODELS = ("T5", "Bart")
FEATURE_MODELS = ("Bert", "Roberta", "Deberta", "DebertaV2")


def build(model_id: str) -> nn.Module:
    """The tiny model ``model_id``, identical on every call (seed 0), float32, eval mode."""
    torch.manual_seed(0)
    return MODELS[model_id]().float().eval()


def inputs(model_id: str) -> dict[str, torch.Tensor]:
    """peft's test input for the table of ``model_id``: two rows of three ids, the second with a masked middle."""
    batch = {"input_ids": torch.tensor([[1, 1, 1], [1, 2, 1]]),
             "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 1]])}
    if model_id in SEQ2SEQ_MODELS:
        batch["decoder_input_ids"] = torch.tensor([[1, 1, 1], [1, 2, 1]])
    return batch


@dataclass(frozen=True)
class Row:
    table: str  # "seq2seq" or "feature"
    model_id: str
    config_name: str
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        extra = ",".join(k for k in self.kwargs if k not in ("target_modules", "task_type"))
        return f"{self.model_id}|{self.config_name}" + (f"|{extra}" if extra else "")

    @property
    def prompt_learning(self) -> bool:
        return self.config_name in PROMPT_LEARNING


PROMPT_LEARNING = frozenset({"PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig"})
_LORA = {"r": 8, "lora_alpha": 32, "target_modules": None, "lora_dropout": 0.05, "bias": "none"}
_VBLORA = {"target_modules": None, "vblora_dropout": 0.05, "vector_length": 1, "num_vectors": 2}
_VERA = {"r": 8, "target_modules": None, "vera_dropout": 0.05, "projection_prng_key": 0xFF, "d_initial": 0.1,
         "save_projection": True, "bias": "none"}

# peft's encoder-decoder rows, in its order, without the task type (added per table).
SEQ2SEQ_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    ("AdaLoraConfig", {"target_modules": None, "total_step": 1}),
    ("BeftConfig", {"target_modules": None}),
    ("BOFTConfig", {"target_modules": None}),
    ("MissConfig", {"target_modules": None, "r": 2}),
    ("DeftConfig", {"target_modules": None}),
    ("DeloraConfig", {"target_modules": None, "r": 2}),
    ("FourierFTConfig", {"n_frequency": 10, "target_modules": None}),
    ("FrodConfig", {"target_modules": None, "sparse_rate": 0.01}),
    ("GloraConfig", {"target_modules": None}),
    ("GraloraConfig", {"target_modules": None}),
    ("HiraConfig", {"target_modules": None}),
    ("HRAConfig", {"target_modules": None}),
    ("IA3Config", {"target_modules": None, "feedforward_modules": None}),
    ("LilyConfig", {"target_modules": None, "r": 8, "stride_A": 1, "num_B": 2}),
    ("LoraConfig", dict(_LORA)),
    ("LoraConfig", {**_LORA, "trainable_token_indices": [0, 1, 3]}),
    ("OFTConfig", {"target_modules": None}),
    ("PrefixTuningConfig", {"num_virtual_tokens": 10}),
    ("PrefixTuningConfig", {"num_virtual_tokens": 10, "init_weights": "zero"}),
    ("PromptEncoderConfig", {"num_virtual_tokens": 10, "encoder_hidden_size": 32}),
    ("PromptTuningConfig", {"num_virtual_tokens": 10}),
    ("RoadConfig", {"variant": "road_1", "group_size": 2}),
    ("ShiraConfig", {"r": 1, "target_modules": None, "init_weights": False}),
    ("VBLoRAConfig", dict(_VBLORA)),
    ("VeraConfig", dict(_VERA)),
    ("UniLoraConfig", {"target_modules": None, "theta_d_length": 257}),
    ("TinyLoraConfig", {"target_modules": None}),
    ("PveraConfig", {"r": 8, "pvera_dropout": 0.05}),
    ("PeanutConfig", {"r": 4, "depth": 1, "scaling": 1.0, "act_fn": "relu", "target_modules": None}),
    ("C3AConfig", {"block_size": 1, "target_modules": None}),
    ("WaveFTConfig", {"n_frequency": 8, "target_modules": None}),
    ("OSFConfig", {}),
    ("PsoftConfig", {"r": 4, "psoft_alpha": 4}),
    ("AdamssConfig", {"target_modules": None, "r": 8}),
]

# peft's feature-extraction rows: the encoder-decoder rows of the same configs, in the same order, without the
# zero-initialized prefix. Its table also has ``BoneConfig(r=2)``, a name peft 0.21.2 no longer exports (Bone became
# MiSS, whose row is next to it), kept out here; its ``DeLoRAConfig`` is 0.21.2's ``DeloraConfig``.
_FEATURE_NAMES = frozenset({"AdaLoraConfig", "BOFTConfig", "MissConfig", "DeloraConfig", "FourierFTConfig", "HRAConfig",
                            "IA3Config", "LoraConfig", "OFTConfig", "PrefixTuningConfig", "PromptEncoderConfig",
                            "PromptTuningConfig", "RoadConfig", "ShiraConfig", "VBLoRAConfig", "VeraConfig",
                            "C3AConfig"})
FEATURE_CONFIGS: list[tuple[str, dict[str, Any]]] = [
    (name, kwargs) for name, kwargs in SEQ2SEQ_CONFIGS
    if name in _FEATURE_NAMES and not (name == "PrefixTuningConfig" and "init_weights" in kwargs)]

ROWS: list[Row] = (
    [Row("seq2seq", m, name, {**kw, "task_type": "SEQ_2_SEQ_LM"}) for name, kw in SEQ2SEQ_CONFIGS
     for m in SEQ2SEQ_MODELS]
    + [Row("feature", m, name, {**kw, "task_type": "FEATURE_EXTRACTION"}) for name, kw in FEATURE_CONFIGS
       for m in FEATURE_MODELS]
)


def peft_skip(row: Row, check: str) -> str | None:
    """peft's own skip rule for ``check`` on ``row`` (None: peft runs it). ``check`` names the generic check:
    ``merge``, ``two_adapters``, ``disable``, ``gradient_checkpointing``, ``prompt_training``; rows where peft 0.21.2
    cannot be the oracle are listed here too, saying why."""
    if check == "disable" and row.config_name == "OSFConfig":
        return "peft skips OSF's disable check: its exact SVD split leaves the output unchanged until training"
    if check == "merge" and row.config_name == "BeftConfig" and row.model_id == "T5":
        return "peft skips BEFT's merge on T5: T5 has no bias terms"
    if check == "two_adapters" and "trainable_token_indices" in row.kwargs:
        return ("peft 0.21.2 refuses a second trainable-tokens adapter on the same token ids (its merge would be "
                "undefined), so it cannot load both adapters to merge them")
    if check == "gradient_checkpointing" and row.config_name == "PrefixTuningConfig":
        return ("transformers drops the KV cache in a checkpointed training forward, so neither peft 0.21.2 nor "
                "deltatune can feed prefix tuning's prefix there (both fail in the attention mask)")
    deberta = row.model_id.startswith("Deberta")
    if (check == "gradient_checkpointing" and deberta
            and any(k in row.config_name.lower() for k in ("lora", "ia3", "boft", "vera", "fourierft", "hra"))):
        return f"peft skips gradient checkpointing with {row.config_name} on DeBERTa models"
    if check == "prompt_training" and deberta and row.config_name == "PrefixTuningConfig":
        return "peft skips prefix tuning's prompt-learning training on DeBERTa models"
    return None


# Checks where deltatune refuses what peft 0.21.2 does (config class, check) -> why; the test checks that deltatune
# refuses with a clear error and skips, so the row lights up when the gap closes.
DELTATUNE_GAPS: dict[tuple[str, str], str] = {
    ("IA3Config", "weighted_combination"): "deltatune's add_weighted_adapter combines LoRA adapters only; peft also "
                                           "sums IA3 vectors (weighted)",
}


def init_weights_off(config_name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """peft's ``set_init_weights_false``: ``kwargs`` with the method's "start as identity" switch off (LoRA / AdaLoRA:
    ``init_lora_weights``, IA3: ``init_ia3_weights``, prompt learning and VB-LoRA: nothing, others:
    ``init_weights``). TinyLoRA gets its seeded ``"uniform"`` init (peft 0.21.2 leaves ``v`` uninitialised memory
    under ``False``)."""
    if config_name in PROMPT_LEARNING or config_name == "VBLoRAConfig":
        return dict(kwargs)
    key = {"LoraConfig": "init_lora_weights", "AdaLoraConfig": "init_lora_weights",
           "IA3Config": "init_ia3_weights"}.get(config_name, "init_weights")
    return {**kwargs, key: "uniform" if config_name == "TinyLoraConfig" else False}


def make_config(lib: Any, row: Row, randomized: bool = False) -> Any:
    """Row ``row``'s config built from ``lib`` (``deltatune`` or ``peft``)."""
    kwargs = init_weights_off(row.config_name, row.kwargs) if randomized else dict(row.kwargs)
    return getattr(lib, row.config_name)(**kwargs)
