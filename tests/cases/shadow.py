"""ShadowPEFT: the shared matrix on the decoder-only families (the shadow state rides a decoder's block loop, so BERT,
T5 and mT5 are no targets, in peft either; the remote-code model is left out to keep the matrix short: its block
loop is Llama's). Files exchanged with peft are in ``tests/test_shadow.py``."""

from __future__ import annotations

from tests.cases import FuzzSeed, MatrixCase

_DECODERS = ("gpt2", "llama")
#: Trained but given no gradient, in peft as well: the state update after the last block (index 1 of two) feeds
#: nothing, and a GPT-2 mirror backbone keeps the embedding table (``wte``) it never reads (the base's feeds it).
_GRADLESS = (r"(layers|h)\.1\..*shadow_update_(transform|gate)\.", r"shadow_backbone\..*\bwte\.")

MATRIX = [
    # init_weights=False: a random W_up makes the injection non-zero without touching any other parameter;
    # ShadowPEFT is an input-dependent trajectory, not a weight delta: nothing to merge (peft refuses too)
    MatrixCase("ShadowConfig", "shadow_default", dict(r=4, shadow_alpha=1.0), families=_DECODERS,
               nonzero_kwargs=dict(init_weights=False), mergeable=False, gradless=_GRADLESS),
    MatrixCase("ShadowConfig", "shadow_deep_narrow", dict(r=2, shadow_num_hidden_layers=2, shadow_hidden_size=16,
                                                          update_hidden_size=3, shadow_alpha=1.0),
               families=("llama",), nonzero_kwargs=dict(init_weights=False), mergeable=False, gradless=_GRADLESS),
]

# test_shadow.py exchanges five configurations with peft both ways (Llama, GPT-2, a projected narrower backbone, a
# deeper backbone, sequence classification), comparing logits and the task + auxiliary losses, which the generic
# interop test (logits only) does not; a generic case would repeat the first of them.
INTEROP: list = []

FUZZ_SEEDS = {
    "shadow": FuzzSeed("ShadowConfig", dict(task_type="CAUSAL_LM", r=2, shadow_hidden_size=16, update_hidden_size=3,
                                            init_weights=False)),
}
