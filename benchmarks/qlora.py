"""QLoRA on the real SmolLM2-135M: a training step (forward + backward + AdamW) and its memory, deltatune vs peft on
the same nf4 base, and LoRA on the full-precision (float32) base.

``python -m benchmarks.qlora [--repeats N] [--batch B] [--seq S] [--output PATH]`` (a few minutes on 2 cores).

The model is the built-in ``smollm2-135m-instruct`` (``deltatune.train.presets``: converted once from the GGUF file
into a cached float32 directory), loaded three times: float32, and twice with ``BitsAndBytesConfig`` nf4 + double
quantization, compute dtype float32 (one base per library, so neither sees the other's wrappers). Every case trains
LoRA r=16 on every linear layer of the blocks; the cases run interleaved, so their ratios compare rounds taken under
the same machine conditions.

Memory: on the CPU there is no allocator high-water mark to read, so the table gives the two parts a LoRA step's
peak is made of: the weights in memory (parameters and buffers; quantized weights as their codes and scales:
``deltatune.quant.weight_bytes``) and the activations autograd saves for backward (``benchmarks.memory``); the
adapter's gradients and AdamW state are the same few MiB in every case. On a GPU, ``benchmarks.gpu_check`` reads
``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import json
import sys

if __package__ in (None, ""):
    sys.exit("run as a module: python -m benchmarks.qlora")

import torch  # noqa: E402

from .common import Results, TrainStep, interleave, log, plain, setup_torch  # noqa: E402
from .memory import saved_activation_bytes  # noqa: E402

AREA = "qlora"
MIB = 2**20
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(directory: str, quantized: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not quantized:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu",
                                                dtype=torch.float32)


def run(repeats: int = 5, batch: int = 2, seq: int = 64, r: int = 16) -> Results:
    import peft

    import deltatune
    from deltatune.quant import weight_bytes
    from deltatune.train.presets import resolve_model

    directory = resolve_model("smollm2-135m-instruct")
    lora = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LINEAR))
    models = {
        "lora fp32": deltatune.get_peft_model(_load(directory, False), deltatune.LoraConfig(**lora)),
        "qlora dt": deltatune.get_peft_model(_load(directory, True), deltatune.LoraConfig(**lora)),
        "qlora peft": peft.get_peft_model(_load(directory, True), peft.LoraConfig(**lora)),
    }
    vocab = models["lora fp32"].get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    steps = {name: TrainStep(model, ids) for name, model in models.items()}
    timings = interleave({k: plain(v) for k, v in steps.items()}, repeats=repeats, warmup=1)
    res = Results()
    shape = f"{batch}x{seq}"
    res.time(AREA, f"LoRA r={r} step on the float32 base {shape}", timings["lora fp32"], "qlora.lora_fp32_ms")
    res.time(AREA, f"deltatune QLoRA r={r} step on the nf4 base {shape}", timings["qlora dt"], "qlora.dt_ms")
    res.time(AREA, f"peft QLoRA r={r} step on the nf4 base {shape}", timings["qlora peft"], "qlora.peft_ms")
    speedup = res.ratio(AREA, "QLoRA speed-up deltatune vs peft (peft time / deltatune time)", "qlora.peft_ms",
                        "qlora.dt_ms", "qlora.speedup")
    res.ratio(AREA, "deltatune QLoRA / float32 LoRA (time)", "qlora.dt_ms", "qlora.lora_fp32_ms", "qlora.dt_over_fp32")
    for name, key in (("lora fp32", "fp32"), ("qlora dt", "dt"), ("qlora peft", "peft")):
        model = models[name]
        weights = weight_bytes(model)[0] / MIB
        activations = saved_activation_bytes(model, ids) / MIB
        res.value(AREA, f"{name}: weights in memory", weights, "MiB", f"qlora.{key}_weights_mib")
        res.value(AREA, f"{name}: activations saved for backward {shape}", activations, "MiB",
                  f"qlora.{key}_activations_mib")
        res.value(AREA, f"{name}: weights + saved activations", weights + activations, "MiB",
                  f"qlora.{key}_memory_mib")
    res.ratio(AREA, "memory float32 LoRA / deltatune QLoRA (weights + saved activations)", "qlora.fp32_memory_mib",
              "qlora.dt_memory_mib", "qlora.memory_saving")
    res.ratio(AREA, "memory peft QLoRA / deltatune QLoRA (weights + saved activations)", "qlora.peft_memory_mib",
              "qlora.dt_memory_mib", "qlora.memory_vs_peft")
    log(f"[qlora] speed-up vs peft: {speedup:.3f}x")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--output", help="write the rows and metrics as JSON here")
    args = parser.parse_args()
    setup_torch()
    res = run(args.repeats, args.batch, args.seq)
    for row in res.rows:
        print(f"| {row.name} | {row.value:.4g} {row.unit} | {row.note} |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            json.dump({"rows": [row.__dict__ for row in res.rows], "metrics": res.metrics}, fh, indent=2)


if __name__ == "__main__":
    main()
