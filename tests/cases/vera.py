"""VeRA: the shared matrix, and adapters exchanged with peft: llama, GPT-2 (Conv1D), BERT and T5, each with the
projections saved and with them regenerated from ``projection_prng_key`` (which only works if both libraries draw
them identically), targets of several shapes (every layer reads its own corner of the shared projections) and
``bias="vera_only"``."""

from __future__ import annotations

from typing import Any

from tests.cases import ALL_FAMILIES, REMOTE_TARGETS, FuzzSeed, MatrixCase, interop_builder, without_remote_code

# Targets of different shapes in one adapter, so every layer reads a different corner of the shared projections
# (sized to the largest input and output dims); GPT-2's are Conv1D.
_MIXED_SHAPES: dict[str, dict[str, Any]] = {
    "llama": dict(target_modules="all-linear"),
    "gpt2": dict(target_modules="all-linear"),
    "bert": dict(target_modules=["query", "value", "intermediate.dense", "output.dense"]),
    "t5": dict(target_modules=["q", "v", "wi", "wo"]),
    "mt5": dict(target_modules=["q", "v", "wi_0", "wi_1", "wo"]),
}


def _vera(name: str, kwargs: Any, families: tuple[str, ...] = ALL_FAMILIES) -> MatrixCase:
    # init_weights=False: b = 1 and d ~ N(0, 1), a clearly non-zero delta (the default starts with b = 0)
    return MatrixCase(
        "VeraConfig", name, kwargs, nonzero_kwargs=dict(init_weights=False), families=families,
        remote_kwargs=REMOTE_TARGETS,
    )


MATRIX = [
    _vera("vera_default", dict(r=8)),
    _vera(
        "vera_mixed_shapes", lambda family: dict(r=16, vera_dropout=0.1, **_MIXED_SHAPES[family]), without_remote_code()
    ),
    _vera("vera_no_saved_projection", dict(r=8, save_projection=False, projection_prng_key=7), without_remote_code()),
]

_INTEROP_TARGETS: dict[str, Any] = {
    "llama": "all-linear",
    "gpt2": ["c_attn", "c_fc"],
    "bert": ["query", "value", "intermediate.dense"],
    "t5": ["q", "v", "wi", "wo"],
}

_exchanged = interop_builder("VeraConfig")

INTEROP = [
    _exchanged(f"vera-{family}-{'saved' if save else 'prng'}", family, r=8, save_projection=save,
               projection_prng_key=0 if save else 3, target_modules=targets)
    for family, targets in _INTEROP_TARGETS.items()
    for save in (True, False)
] + [
    _exchanged("vera-llama-defaults", "llama"),
    _exchanged("vera-bert-bias-vera-only", "bert", r=4, bias="vera_only", d_initial=0.5),
]

# saved projections (the PRNG-regenerated form is exchanged with peft above)
FUZZ_SEEDS = {
    "vera": FuzzSeed("VeraConfig", dict(
        target_modules=["q_proj", "v_proj"], r=8, projection_prng_key=3, save_projection=True, init_weights=False,
    )),
}
