"""``deltatune generate``: prompts answered with a run's adapter, as training formatted them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune import PeftModel
from deltatune.cli import main
from deltatune.train import TrainOptions, train
from tests.train_utils import one_thread, sentiment_records, write_bert, write_jsonl, write_llama

PROMPT = "review : the film was great sentiment ?"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    llama, bert = write_llama(root / "llama"), write_bert(root / "bert")
    data = write_jsonl(root / "train.jsonl", sentiment_records(48))
    common = dict(data=data, r=8, lr=2e-2, epochs=4, eval_split=8, eval_generate=0, show_examples=0, progress=False,
                  save_steps=2)
    with one_thread():
        train(TrainOptions(model=llama, target="all-linear", chat=True, out=str(root / "lm"), eval_steps=2, **common))
        train(TrainOptions(model=bert, task="seq-cls", target="query,value", out=str(root / "cls"), **common))
    return {"llama": llama, "lm": root / "lm", "cls": root / "cls"}


def generate(argv, capsys) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _expected(runs, adapter_dir, prompt: str, use_adapter: bool = True) -> str:
    tok = AutoTokenizer.from_pretrained(runs["llama"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["llama"]), adapter_dir)
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        if use_adapter:
            out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        else:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generates_with_the_runs_prompt_format(runs, capsys):
    code, out, _ = generate([str(runs["lm"]), "--prompt", PROMPT, "--max-new-tokens", "8"], capsys)
    assert code == 0
    assert out.strip() == _expected(runs, runs["lm"] / "adapter", PROMPT)
    assert out.strip() in ("positive", "negative")


def test_no_adapter_is_the_base_model(runs, capsys):
    code, out, _ = generate([str(runs["lm"]), "--prompt", PROMPT, "--max-new-tokens", "8", "--no-adapter"], capsys)
    assert code == 0 and out.strip() == _expected(runs, runs["lm"] / "adapter", PROMPT, use_adapter=False)


def test_adapter_directories_inside_a_run_work_too(runs, capsys):
    for sub in ("best", "checkpoints/step-000020"):
        code, out, _ = generate([str(runs["lm"] / sub), "--prompt", PROMPT, "--max-new-tokens", "8"], capsys)
        assert code == 0 and out.strip() == _expected(runs, runs["lm"] / sub, PROMPT)


def test_sampling_is_seeded_and_several_answers_are_labelled(runs, capsys):
    argv = [str(runs["lm"]), "--prompt", PROMPT, "--do-sample", "--temperature", "1.5", "--top-k", "20", "--seed", "3",
            "--num-return-sequences", "2", "--max-new-tokens", "6"]
    first = generate(argv, capsys)
    second = generate(argv, capsys)
    assert first[0] == 0 and first[1] == second[1]
    assert "--- prompt 1, answer 2" in first[1]


def test_classification_runs_print_the_label(runs, capsys):
    code, out, _ = generate([str(runs["cls"]), "--prompt", "the film was great", "--prompt", "a dull plot"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("positive", "negative") for line in lines)
    code, _, err = generate([str(runs["cls"]), "--prompt", "x", "--temperature", "0.5"], capsys)
    assert code == 2 and "--temperature does not apply to a seq-cls run" in err


@pytest.mark.parametrize("path, message", [("/no/such/run", "does not exist"), (".", "neither a run")])
def test_bad_run_paths(capsys, path, message):
    code, _, err = generate([path, "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err
