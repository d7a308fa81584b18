"""FourierFT: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft, with the learned
entries' positions regenerated from ``random_loc_seed`` by both libraries (they are never saved), per-module
``n_frequency_pattern`` and ``bias="fourier_only"``."""

from __future__ import annotations

from typing import Any

from tests.cases import REMOTE_TARGETS, FuzzSeed, MatrixCase, interop_builder, without_remote_code


def _fourierft(name: str, kwargs: Any, families: tuple[str, ...] | None = None) -> MatrixCase:
    # init_weights=True: a zero spectrum (peft's default, False, draws a random one: a fresh adapter changes the model)
    extra = {} if families is None else dict(families=families)
    return MatrixCase(
        "FourierFTConfig", name, dict(init_weights=True, **kwargs), nonzero_kwargs=dict(init_weights=False),
        remote_kwargs=REMOTE_TARGETS, **extra,
    )


MATRIX = [
    _fourierft("fourierft_default", dict(n_frequency=64, scaling=10.0)),
    _fourierft(
        "fourierft_all_linear_pattern",
        dict(n_frequency=32, scaling=20.0, random_loc_seed=3, target_modules="all-linear", bias="all",
             n_frequency_pattern={"fc": 16, "dense": 16}),
        without_remote_code(),
    ),
]


_exchanged = interop_builder("FourierFTConfig")


INTEROP = [
    _exchanged("fourierft-llama", "llama", n_frequency=100, scaling=10.0),
    _exchanged("fourierft-llama-seed-pattern", "llama", n_frequency=50, scaling=30.0, random_loc_seed=12345,
               target_modules="all-linear", n_frequency_pattern={"down_proj": 200, r"layers\.0\.self_attn\.q_proj": 7}),
    _exchanged("fourierft-gpt2", "gpt2", n_frequency=64, scaling=5.0, target_modules=["c_attn", "c_fc", "c_proj"]),
    _exchanged("fourierft-bert-bias", "bert", n_frequency=64, scaling=50.0, bias="fourier_only",
               target_modules=["query", "value", "dense"]),
    _exchanged("fourierft-t5", "t5", n_frequency=64, scaling=10.0, target_modules=["q", "v", "wo"], init_weights=True),
]

FUZZ_SEEDS = {
    "fourierft": FuzzSeed("FourierFTConfig", dict(target_modules=["q_proj", "v_proj"], n_frequency=64, scaling=10.0)),
}
