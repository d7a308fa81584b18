"""ShadowPEFT: the shared matrix on the decoder-only families (the shadow state rides a decoder's block loop, so BERT,
T5 and mT5 are no targets, in peft either; the remote-code model is left out to keep the matrix short: its block
loop is Llama's). Files exchanged with peft are in ``tests/test_shadow.py``."""

from __future__ import annotations

from tests.cases import FuzzSeed, MatrixCase

_DECODERS = ("gpt2", "llama")

MATRIX = [
    # init_weights=False: a random W_up makes the injection non-zero without touching any other parameter;
    # ShadowPEFT is an input-dependent trajectory, not a weight delta: nothing to merge (peft refuses too)
    MatrixCase("ShadowConfig", "shadow_default", dict(r=4, shadow_alpha=1.0), families=_DECODERS,
               nonzero_kwargs=dict(init_weights=False), mergeable=False),
    MatrixCase("ShadowConfig", "shadow_deep_narrow", dict(r=2, shadow_num_hidden_layers=2, shadow_hidden_size=16,
                                                          update_hidden_size=3, shadow_alpha=1.0),
               families=("llama",), nonzero_kwargs=dict(init_weights=False), mergeable=False),
]

# test_shadow.py exchanges five configurations with peft both ways (Llama, GPT-2, a projected narrower backbone, a
# deeper backbone, sequence classification), comparing logits and the task + auxiliary losses, which the generic
# interop test (logits only) does not; a generic case would repeat the first of them.
INTEROP: list = []

FUZZ_SEEDS = {
    "shadow": FuzzSeed("ShadowConfig", dict(task_type="CAUSAL_LM", r=2, shadow_hidden_size=16, update_hidden_size=3,
                                            init_weights=False)),
}
