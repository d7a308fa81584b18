"""The training loop on tiny models, in process: every task, accumulation, early stopping, checkpoints, errors."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from deltatune import PeftModel
from deltatune.train import TrainError, TrainOptions, train
from deltatune.train.state import latest_checkpoint
from tests.train_utils import (
    ner_records,
    read_losses,
    sentiment_records,
    write_bert,
    write_jsonl,
    write_llama,
    write_t5,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "llama": write_llama(root / "llama"),
        "bert": write_bert(root / "bert"),
        "t5": write_t5(root / "t5"),
        "sentiment": write_jsonl(root / "sentiment.jsonl", sentiment_records(48)),
        "ner": write_jsonl(root / "ner.jsonl", ner_records(24)),
    }


def opts(files, tmp_path, **kw) -> TrainOptions:
    base = dict(model=files["llama"], data=files["sentiment"], r=8, target="all-linear", lr=2e-2, epochs=4,
                batch_size=8, eval_split=16, eval_generate=16, save_steps=0, progress=False, out=str(tmp_path / "run"))
    base.update(kw)
    return TrainOptions(**base)


def test_causal_lm_run_improves_and_writes_everything(files, tmp_path, capsys):
    result = train(opts(files, tmp_path, save_steps=5))
    out = tmp_path / "run"
    assert result.steps == 16
    assert result.after["eval_loss"] < result.before["eval_loss"] / 2
    assert result.after["eval_exact_match"] > result.before["eval_exact_match"]
    for name in ("run.json", "metrics.jsonl", "loss.png", "summary.json", "before.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert sorted(os.listdir(out / "checkpoints")) == ["LATEST", "step-000015", "step-000016"]  # save_total_limit 2
    losses = read_losses(out)
    assert sorted(losses) == list(range(1, 17)) and losses[16][0] < losses[1][0]
    printed = capsys.readouterr().out
    assert "held-out metric" in printed and "exact match" in printed and "expected: 'positive'" in printed
    # The saved adapter is plain peft format: it loads onto the base and reproduces the trained model's loss.
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["llama"]), out / "adapter")
    assert model.peft_config["default"].r == 8
    final = load_file(out / "checkpoints" / "step-000016" / "adapter_model.safetensors")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)


def test_grad_accumulation_matches_the_big_batch(files, tmp_path):
    train(opts(files, tmp_path / "a", max_steps=3, eval_split=0, out=str(tmp_path / "a")))
    train(opts(files, tmp_path / "b", max_steps=3, eval_split=0, batch_size=2, grad_accum=4,
               out=str(tmp_path / "b")))
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    la, lb = read_losses(tmp_path / "a"), read_losses(tmp_path / "b")
    assert all(abs(la[s][0] - lb[s][0]) < 1e-5 for s in la)


def test_seq_cls_on_a_bare_encoder_trains_a_new_head(files, tmp_path):
    result = train(opts(files, tmp_path, model=files["bert"], task="seq-cls", target="query,value", epochs=6,
                        lr=1e-2, eval_steps=3))
    assert "eval_accuracy" in result.after and result.after["eval_loss"] < result.before["eval_loss"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["labels"] == ["negative", "positive"]
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.classifier.") for k in saved)  # the head is saved with the adapter
    assert (tmp_path / "run" / "best" / "adapter_config.json").is_file()


def test_token_cls_and_seq2seq(files, tmp_path):
    tc = train(opts(files, tmp_path / "tc", model=files["bert"], data=files["ner"], task="token-cls",
                    target="query,value", eval_split=4, lr=1e-2, out=str(tmp_path / "tc")))
    assert tc.after["eval_token_accuracy"] >= tc.before["eval_token_accuracy"]
    s2s = train(opts(files, tmp_path / "s2s", model=files["t5"], target="q,v", eval_generate=4,
                     out=str(tmp_path / "s2s")))
    assert s2s.after["eval_loss"] < s2s.before["eval_loss"]
    assert "eval_exact_match" in s2s.after and "eval_choice_accuracy" in s2s.after


def test_task_is_inferred_from_the_model(files, tmp_path):
    result = train(opts(files, tmp_path, model=files["t5"], target="q,v", max_steps=1, eval_split=0))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["task"] == "seq2seq" and result.steps == 1


def test_early_stopping_keeps_the_best_adapter(files, tmp_path):
    # A huge constant learning rate makes the eval loss get worse after the first evaluation.
    result = train(opts(files, tmp_path, lr=5.0, lr_schedule="constant", eval_steps=1, early_stopping_patience=2,
                        max_grad_norm=0, epochs=20))
    assert result.stopped_early and result.steps < 20 * 4
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_early"] and summary["best_step"] < result.steps
    assert (tmp_path / "run" / "best" / "adapter_model.safetensors").is_file()
    options = opts(files, tmp_path, lr=5.0, lr_schedule="constant", eval_steps=1, early_stopping_patience=2,
                   max_grad_norm=0, epochs=20)
    resumed = train(TrainOptions.from_dict({**options.to_dict(), "resume": options.out}))
    assert resumed.steps == result.steps and resumed.stopped_early  # a stopped run stays stopped


def test_bf16_and_gradient_checkpointing_run(files, tmp_path):
    result = train(opts(files, tmp_path, max_steps=2, bf16=True, gradient_checkpointing=True, eval_generate=2))
    assert result.steps == 2 and result.after["eval_loss"] == result.after["eval_loss"]  # finite, not NaN


def test_disk_full_during_checkpoint_keeps_the_previous_one(files, tmp_path, monkeypatch):
    import deltatune.files as files_module

    real = files_module._write_synced
    calls = {"n": 0}

    def failing(path, data):
        if path.endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint hits a full disk while writing
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(files_module, "_write_synced", failing)
    with pytest.raises(TrainError, match=r"checkpoint step-000004 \(disk full\); the previous checkpoint "
                                         r"step-000002 is intact.*--resume"):
        train(opts(files, tmp_path, save_steps=2, max_steps=6))
    run = tmp_path / "run"
    assert os.path.basename(latest_checkpoint(str(run))) == "step-000002"
    assert sorted(os.listdir(run / "checkpoints")) == ["LATEST", "step-000002"]
    assert not [n for n in os.listdir(run / "checkpoints" / "step-000002") if n.startswith(".tmp")]
    monkeypatch.setattr(files_module, "_write_synced", real)
    result = train(TrainOptions(resume=str(run), out=str(run), **{k: v for k, v in opts(
        files, tmp_path, save_steps=2, max_steps=6).identity().items()}, progress=False))
    assert result.steps == 6


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model="/nonexistent/model"), "model path '/nonexistent/model' does not exist"),
        (dict(data="/nonexistent/train.jsonl"), "data file '/nonexistent/train.jsonl' does not exist"),
        (dict(label_column="y"), "--label-column does not apply to --task causal-lm"),
        (dict(prompt_column="question"), "has no column 'question'"),
        (dict(chat=True, task="seq-cls", model="bert"), "--chat does not apply to --task seq-cls"),
        (dict(method="nope"), "--method 'nope' is not available"),
        (dict(method_options={"nope": 1}), "LoraConfig has no field 'nope'"),
        (dict(target="nothing_matches"), "matched no module"),
        (dict(early_stopping_patience=2), "--early-stopping-patience needs"),
        (dict(eval_split=48), "leaving none to train on"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(files, tmp_path, change, message):
    if change.get("model") == "bert":
        change["model"] = files["bert"]
    with pytest.raises(TrainError, match=message):
        train(opts(files, tmp_path, **change))
    assert not (tmp_path / "run").exists()


def test_option_that_does_not_apply_to_the_method(files, tmp_path):
    with pytest.raises(TrainError, match="--r does not apply to --method ia3"):
        train(opts(files, tmp_path, method="ia3"))
    assert not (tmp_path / "run").exists()


def test_alpha_flag_reaches_the_alpha_field_of_each_method():
    from deltatune.train.models import build_peft_config

    for method, field in (("lora", "lora_alpha"), ("loha", "alpha"), ("lokr", "alpha")):
        config = build_peft_config(TrainOptions(method=method, r=4, lora_alpha=16), "causal-lm")
        assert (config.r, getattr(config, field)) == (4, 16), method
        assert getattr(build_peft_config(TrainOptions(method=method, r=4), "causal-lm"), field) == 8  # 2r


def test_adalora_run_allocates_its_budget_and_peft_loads_the_result(files, tmp_path):
    import peft
    from transformers import LlamaForCausalLM

    options = opts(files, tmp_path, method="adalora", r=None, target="q_proj,v_proj", epochs=2, save_steps=4,
                   method_options={"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1})
    result = train(options)
    saved = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == result.steps  # filled from the run's length
    kept = [sum(mask) for mask in saved["rank_pattern"].values()]
    assert len(kept) == 4 and sum(kept) == 2 * 4  # target_r per layer on average, spread unevenly or not

    ours = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(files["llama"]), tmp_path / "run/adapter")
    theirs = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(files["llama"]),
                                            tmp_path / "run/adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_adalora_run_interrupted_after_pruning_resumes_exactly(files, tmp_path, monkeypatch):
    from deltatune.train import loop

    def options(name: str) -> TrainOptions:
        return opts(files, tmp_path, method="adalora", r=None, target="q_proj,v_proj", epochs=2, save_steps=4,
                    eval_split=0, lora_dropout=0.1, out=str(tmp_path / name),
                    method_options={"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1})

    train(options("ref"))
    real = loop.save_checkpoint

    def then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # as if killed right after the checkpoint of step 4 (of 8)

    monkeypatch.setattr(loop, "save_checkpoint", then_interrupt)
    with pytest.raises(TrainError, match="interrupted at step 4"):
        train(options("run"))
    monkeypatch.undo()
    ckpt = tmp_path / "run/checkpoints/step-000004"
    pattern = json.loads((ckpt / "adapter_config.json").read_text())["rank_pattern"]
    assert 0 < sum(map(sum, pattern.values())) < 4 * 4  # the allocator had pruned before the interruption
    extra = load_file(ckpt / "train_state.safetensors")
    assert any(k.endswith(".importance.lora_E.smooth") for k in extra) and any(k.endswith(".kept") for k in extra)
    assert extra["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 4  # full, not pruned

    # A checkpoint without the training state (an older deltatune) is refused, saying why.
    shutil.copytree(tmp_path / "run", tmp_path / "old")
    os.unlink(tmp_path / "old/checkpoints/step-000004/train_state.safetensors")
    with pytest.raises(TrainError, match="holds no train_state.safetensors, which this ADALORA adapter needs"):
        train(TrainOptions.from_dict({**options("old").to_dict(), "resume": str(tmp_path / "old")}))

    train(TrainOptions.from_dict({**options("run").to_dict(), "resume": str(tmp_path / "run")}))
    assert read_losses(tmp_path / "run") == read_losses(tmp_path / "ref")  # every step's loss, lr and grad norm
    configs = [json.loads((tmp_path / d / "adapter/adapter_config.json").read_text()) for d in ("ref", "run")]
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    a, b = (load_file(tmp_path / d / "adapter/adapter_model.safetensors") for d in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seq_cls_on_a_decoder_uses_the_tokenizer_pad_id(files, tmp_path):
    result = train(opts(files, tmp_path, task="seq-cls", target="q_proj,v_proj", max_steps=2, eval_generate=0))
    assert "eval_accuracy" in result.after
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.score.") for k in saved)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning"])
def test_virtual_token_methods_train_their_labels_not_the_virtual_positions(files, tmp_path, method):
    # The virtual tokens add positions in front of the logits; the loss must line up with the real tokens.
    result = train(opts(files, tmp_path, method=method, r=None, target=None, epochs=2, lr=5e-2,
                        method_options={"num_virtual_tokens": 4}))
    assert result.after["eval_loss"] < result.before["eval_loss"]
    saved = json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())
    assert saved["peft_type"] == method.upper() and saved["num_virtual_tokens"] == 4


def test_shadow_trains_with_its_auxiliary_loss(files, tmp_path):
    # The loop takes a Shadow adapter's loss from the model (task loss + λ · shadow loss, as Trainer does): the first
    # step's loss (computed before any update, from the same seeded adapter and batch) is linear in λ, and λ adds.
    def first_loss(weight: float) -> float:
        out = tmp_path / f"w{weight}"
        train(opts(files, tmp_path, method="shadow", r=4, target=None, max_steps=1, eval_split=0, eval_generate=0,
                   method_options={"auxiliary_loss_weight": weight, "shadow_dropout": 0.0}, out=str(out)))
        return read_losses(out)[1][0]

    plain, half, full = first_loss(0.0), first_loss(0.5), first_loss(1.0)
    assert full - plain > 1e-3
    assert half - plain == pytest.approx((full - plain) / 2, rel=1e-4)
