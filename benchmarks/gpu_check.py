"""A short check on a CUDA machine: every layer method of the test matrix computes on the GPU what it computes on the
CPU (forward, merge, mixed-adapter batch, cached generate), QLoRA on bitsandbytes' CUDA kernels (gradients against the
float32 model of the dequantized weights, merge error, peak memory), and the cost of mixed-adapter batches in bfloat16.

Run from the repository root on a machine with a GPU: ``python -m benchmarks.gpu_check``. It needs torch with CUDA and
transformers, not peft. Not part of CI (no GPU there); the numbers it prints go to benchmarks/README.md by hand.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

import deltatune as dt
from tests.adapter_utils import family_batch
from tests.cases import matrix_cases, perturb_adapter
from tests.models import FAMILIES


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@torch.no_grad()
def correctness(family: str = "llama", device: str = "cuda") -> bool:
    """Each matrix case on ``family``: CPU vs CUDA logits, merged vs unmerged, mixed batch vs rows alone."""
    ok = True
    for case in matrix_cases():
        if family not in case.families:
            continue
        torch.manual_seed(1)
        model = dt.get_peft_model(FAMILIES[family].factory(), case.make_config(dt, family, nonzero=True))
        model.add_adapter("other", case.make_config(dt, family, nonzero=True))
        for name in ("default", "other"):
            if not case.nonzero_kwargs:
                perturb_adapter(model, name, seed=len(name))
        model.eval()
        inputs = family_batch(family, model, batch=3)
        inputs.pop("labels", None)
        cpu = model(**inputs).logits
        gpu_model = copy.deepcopy(model).to(device)
        cuda_inputs = {k: v.to(device) for k, v in inputs.items()}
        gpu = gpu_model(**cuda_inputs).logits
        errors = {"cpu-vs-cuda": _max_rel(gpu.cpu(), cpu)}
        names = ["default", "__base__", "other"]
        mixed = gpu_model(**cuda_inputs, adapter_names=names).logits
        alone = []
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in cuda_inputs.items()}
            if name == "__base__":
                with gpu_model.disable_adapter():
                    alone.append(gpu_model(**row).logits)
            else:
                gpu_model.set_adapter(name)
                alone.append(gpu_model(**row).logits)
        gpu_model.set_adapter("default")
        errors["mixed-vs-alone"] = _max_rel(mixed, torch.cat(alone))
        if case.mergeable:
            gpu_model.merge_adapter()
            errors["merged-vs-unmerged"] = _max_rel(gpu_model(**cuda_inputs).logits, gpu)
            gpu_model.unmerge_adapter()
        ids, mask = cuda_inputs["input_ids"][:, :4], cuda_inputs["attention_mask"][:, :4]
        first = gpu_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        again = gpu_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        errors["generate-repeatable"] = 0.0 if torch.equal(first, again) else 1.0
        bad = {k: v for k, v in errors.items() if v > 1e-4}
        ok &= not bad
        print(f"{'FAIL' if bad else 'ok  '} {case.config_class}:{case.name:<24} "
              + "  ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return ok


def qlora_check(device: str = "cuda") -> bool:
    """LoRA and DoRA on quantized bases on ``device`` (bitsandbytes' CUDA kernels there): adapter gradients against
    the float32 model of the dequantized weights, the measured error of a requantizing merge, and peak memory of a
    training step against the float32 base (CUDA only). The same checks as ``tests/test_quant.py``, on the GPU."""
    import warnings

    from tests.quant_models import copy_trainable, dequantized_reference, grad_errors, load

    ok = True
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    for kind, dora in (("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)):
        lora = dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
        model = dt.get_peft_model(load(kind, device=device), lora)
        reference = dt.get_peft_model(dequantized_reference(model.get_base_model()), lora)
        copy_trainable(model, reference)
        worst = max(grad_errors(model, reference, ids).values())
        model.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dt.QuantizedMergeWarning)
            model.merge_adapter()
        merge = max(model.quantized_merge_errors.values())
        bad = worst > 1e-3 or not merge < 2
        ok &= not bad
        print(f"{'FAIL' if bad else 'ok  '} qlora {kind}{' dora' if dora else ''}: gradient rel. error {worst:.1e}, "
              f"requantizing merge loses up to {merge:.1%} of the adapter's effect")
    if device == "cuda":
        peaks = {}
        for kind in (None, "nf4"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            model = dt.get_peft_model(load(kind, device=device), dt.LoraConfig(r=4, target_modules="all-linear"))
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            peaks[kind] = torch.cuda.max_memory_allocated() / 2**20
            del model
        print(f"peak memory of a training step: float32 base {peaks[None]:.1f} MiB, nf4 base {peaks['nf4']:.1f} MiB")
    return ok


def _median_ms(fn, rounds: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def mixed_batch_cost(adapters: int = 8, batch: int = 32, prompt: int = 256, new_tokens: int = 32) -> None:
    """bfloat16 Llama (hidden 2048, 8 layers), LoRA r=16 on every linear layer: prefill forward and greedy generate
    of a batch whose rows are spread over ``adapters`` adapters, against the same batch on one adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    model = dt.get_peft_model(base, dt.LoraConfig(**lora), adapter_name="a0")
    for i in range(1, adapters):
        model.add_adapter(f"a{i}", dt.LoraConfig(**lora))
    model.eval()
    ids = torch.randint(0, config.vocab_size, (batch, prompt), device="cuda")
    mask = torch.ones_like(ids)
    names = [f"a{i % adapters}" for i in range(batch)]
    generate = dict(attention_mask=mask[:, :64], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0)
    with model.disable_adapter():
        base_fwd = _median_ms(lambda: model(input_ids=ids))
    # adapters as get_peft_model makes them beside a bf16 base (float32, like peft), then cast to bf16 as for serving
    for adapter_dtype in (torch.float32, torch.bfloat16):
        if adapter_dtype == torch.bfloat16:
            model.to(torch.bfloat16)  # the base is bf16 already: only the adapters change
        single_fwd = _median_ms(lambda: model(input_ids=ids))
        mixed_fwd = _median_ms(lambda: model(input_ids=ids, adapter_names=names))
        single_gen = _median_ms(lambda: model.generate(input_ids=ids[:, :64], **generate), rounds=3)
        mixed_gen = _median_ms(lambda: model.generate(input_ids=ids[:, :64], adapter_names=names, **generate),
                               rounds=3)
        kind = str(adapter_dtype).replace("torch.", "")
        print(f"bf16 base, {kind} adapters, prefill {batch}x{prompt}: base {base_fwd:.1f} ms, one adapter "
              f"{single_fwd:.1f} ms ({single_fwd / base_fwd:.3f}x base), {adapters} adapters mixed {mixed_fwd:.1f} ms "
              f"({mixed_fwd / single_fwd:.3f}x one adapter)")
        print(f"bf16 base, {kind} adapters, generate {batch}x64 + {new_tokens} tokens: one adapter {single_gen:.0f} "
              f"ms, {adapters} adapters mixed {mixed_gen:.0f} ms ({mixed_gen / single_gen:.3f}x)")


if __name__ == "__main__":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    passed = correctness() if "--perf-only" not in sys.argv else True
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes not installed: QLoRA check skipped")
    else:
        passed &= qlora_check()
    mixed_batch_cost()
    raise SystemExit(0 if passed else 1)
