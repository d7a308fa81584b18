"""X-LoRA's cases for the shared suites.

X-LoRA is a router (``registry.RouterMethod``), not a layer method: it has no targets of its own, so the matrix and
the interop table do not apply (``tests/test_xlora.py`` checks it against peft and its own math). The fuzzer mutates
a saved X-LoRA adapter whose one expert is a LoRA written on first use into a temporary directory.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.cases import FuzzSeed, InteropCase, MatrixCase
from tests.models import tiny_llama

MATRIX: list[MatrixCase] = []
INTEROP: list[InteropCase] = []  # tests/test_xlora.py: files both ways with peft, equal outputs


def _expert() -> str:
    """A LoRA expert on tiny_llama, written once per test session."""
    if not _EXPERT:
        import deltatune as dt

        root = tempfile.mkdtemp(prefix="deltatune-xlora-expert-")
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        path = Path(root) / "lora"
        dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"],
                                                      init_lora_weights=False)).save_pretrained(path)
        _EXPERT.append(str(path))
    return _EXPERT[0]


_EXPERT: list[str] = []


class _XLoraSeed(FuzzSeed):
    def config(self, library: Any) -> Any:
        return getattr(library, self.config_class)(adapters={"0": _expert()}, **self.kwargs)


FUZZ_SEEDS = {"xlora": _XLoraSeed("XLoraConfig", dict(task_type="CAUSAL_LM", xlora_depth=2, xlora_size=4))}
