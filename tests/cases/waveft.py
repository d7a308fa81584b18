"""WaveFT: the shared matrix (Linear and GPT-2's Conv1D) and adapters exchanged with peft, with the coefficients'
positions regenerated from ``random_loc_seed`` by both libraries (they are never saved), Haar and longer filters
(``db3``, ``sym4``, ``coif2``), ``use_idwt=False``, per-module ``n_frequency_pattern`` and ``bias="waveft_only"``."""

from __future__ import annotations

from typing import Any

from tests.cases import REMOTE_TARGETS, FuzzSeed, MatrixCase, interop_builder, without_remote_code


def _waveft(name: str, kwargs: Any, families: tuple[str, ...] | None = None) -> MatrixCase:
    # init_weights=True (peft's default): zero coefficients; the matrix perturbs them as training would (False's
    # N(0, 0.01²) start is checked in tests/test_waveft.py)
    extra = {} if families is None else dict(families=families)
    return MatrixCase(
        "WaveFTConfig", name, dict(kwargs), remote_kwargs=REMOTE_TARGETS, **extra,
    )


MATRIX = [
    _waveft("waveft_default", dict(n_frequency=64, scaling=1.0)),
    _waveft(
        "waveft_sym4_all_linear_pattern",
        dict(n_frequency=32, scaling=2.0, wavelet_family="sym4", random_loc_seed=3, target_modules="all-linear",
             bias="all", n_frequency_pattern={"fc": 16, "dense": 16}),
        without_remote_code(),
    ),
]


_exchanged = interop_builder("WaveFTConfig")


INTEROP = [
    _exchanged("waveft-llama", "llama", n_frequency=100, scaling=10.0, wavelet_family="coif2", init_weights=False),
    _exchanged("waveft-llama-db3-seed-pattern", "llama", n_frequency=50, scaling=30.0, wavelet_family="db3",
               random_loc_seed=12345, target_modules="all-linear",
               n_frequency_pattern={"down_proj": 200, r"layers\.0\.self_attn\.q_proj": 7}),
    _exchanged("waveft-gpt2-sym5", "gpt2", n_frequency=64, scaling=5.0, wavelet_family="sym5",
               target_modules=["c_attn", "c_fc", "c_proj"]),
    _exchanged("waveft-bert-bias-no-idwt", "bert", n_frequency=64, scaling=50.0, use_idwt=False, bias="waveft_only",
               target_modules=["query", "value", "dense"]),
    _exchanged("waveft-t5-db10", "t5", n_frequency=64, scaling=10.0, wavelet_family="db10",
               target_modules=["q", "v", "wo"]),
]

FUZZ_SEEDS = {
    "waveft": FuzzSeed("WaveFTConfig", dict(target_modules=["q_proj", "v_proj"], n_frequency=64, scaling=10.0,
                                            wavelet_family="db2", init_weights=False)),
}
