"""Shared pytest setup: offline mode, one torch thread, and tiny-model fixtures.

The factories themselves live in :mod:`tests.models` so non-pytest code
(benchmarks, scripts) can import them too; this file only wires them up as
fixtures. The ``slow`` marker is registered in ``pyproject.toml``.
"""

from __future__ import annotations

import os

# Must happen before anything imports huggingface_hub / transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Tiny models: one thread avoids the thread-pool overhead that dominates their microsecond matmuls, and keeps the
# suite's speed independent of whatever else runs on the machine.
torch.set_num_threads(1)

# Make ``import tests.models`` work whatever rootdir / import mode pytest uses,
# without relying on ``pythonpath`` in pyproject.toml.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.models import (  # noqa: E402
    FAMILIES,
    Family,
    TinyConvNet,
    TinyMLP,
    tiny_bert,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
    tiny_mlp,
    tiny_mt5,
    tiny_t5,
    write_remote_code_model,
)


# Fresh model per test (function scope): tests mutate models in place
# (inject adapters, merge, train), and a tiny build costs only milliseconds.
@pytest.fixture
def llama() -> nn.Module:
    """Tiny GQA Llama causal LM (see :func:`tests.models.tiny_llama`)."""
    return tiny_llama()


@pytest.fixture
def gpt2() -> nn.Module:
    """Tiny GPT-2 causal LM with ``Conv1D`` projections."""
    return tiny_gpt2()


@pytest.fixture
def bert_seq_cls() -> nn.Module:
    """Tiny BERT sequence classifier (3 labels)."""
    return tiny_bert("seq_cls")


@pytest.fixture
def bert_token_cls() -> nn.Module:
    """Tiny BERT token classifier (5 labels)."""
    return tiny_bert("token_cls")


@pytest.fixture
def bert_qa() -> nn.Module:
    """Tiny BERT extractive-QA model."""
    return tiny_bert("qa")


@pytest.fixture
def bert_base() -> nn.Module:
    """Tiny bare ``BertModel`` (no head)."""
    return tiny_bert("base")


@pytest.fixture
def t5() -> nn.Module:
    """Tiny T5 seq2seq LM."""
    return tiny_t5()


@pytest.fixture
def mt5() -> nn.Module:
    """Tiny mT5 seq2seq LM (gated-GELU FFN)."""
    return tiny_mt5()


@pytest.fixture
def convnet() -> TinyConvNet:
    """Plain-torch model with Conv2d/Conv1d/Embedding/Linear layers."""
    return tiny_convnet()


@pytest.fixture
def mlp() -> TinyMLP:
    """Plain-torch 3-Linear MLP."""
    return tiny_mlp()


@pytest.fixture(params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest) -> tuple[str, Family]:
    """Parametrize a test over every transformers family: yields ``(name, Family)``."""
    return request.param, FAMILIES[request.param]


@pytest.fixture(params=["llama", "gpt2"])
def causal_lm_factory(request: pytest.FixtureRequest) -> Callable[..., nn.Module]:
    """Parametrize over the causal-LM factories (Llama-style Linear and GPT-2 ``Conv1D``)."""
    return FAMILIES[request.param].factory


@pytest.fixture
def remote_code_dir(tmp_path: Path) -> Path:
    """A freshly written ``trust_remote_code`` checkpoint directory (see ``write_remote_code_model``)."""
    return write_remote_code_model(tmp_path / "tinycustom")
