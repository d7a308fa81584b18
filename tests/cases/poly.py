"""Poly: no shared-matrix or shared-interop cases, since their forwards carry no ``task_ids``, which every Poly
forward needs; ``tests/test_poly.py`` checks the same properties (fresh = base, gradients only on the adapter,
save/load, cached generation, merging refused) and the exchange with peft both ways, on Llama and T5. The loading
fuzzer passes ``task_ids`` for Poly seeds."""

from __future__ import annotations

from tests.cases import FuzzSeed

MATRIX: list = []
INTEROP: list = []

FUZZ_SEEDS = {
    "poly": FuzzSeed("PolyConfig", dict(target_modules=["q_proj", "v_proj"], r=4, n_tasks=2, n_skills=2, n_splits=2,
                                        init_weights=False)),
}
