"""Mixed-adapter batches: one forward where row ``i`` uses adapter ``names[i]``, against a single-adapter batch.

Both libraries hold the same number of adapters (the largest count measured, non-zero random deltas); a mixed batch
over ``n`` adapters assigns row ``i`` to adapter ``i mod n`` (interleaved rows: the realistic serving case, and the
worst one for contiguous slicing). The single-adapter batch is the same forward with one active adapter and no
``adapter_names``.
"""

from __future__ import annotations

import torch

from .common import Results, Size, build_llama, fresh_copy, interleave, lora_kwargs, log, plain, token_ids

AREA = "mixed"


def _names(count: int) -> list[str]:
    return [f"a{i}" for i in range(count)]


def build_models(size: Size, base, count: int):
    import deltatune
    import peft

    names = _names(count)
    dt_cfg = deltatune.LoraConfig(**lora_kwargs(size, init_lora_weights=False))
    pf_cfg = peft.LoraConfig(**lora_kwargs(size, init_lora_weights=False))
    torch.manual_seed(0)
    dt = deltatune.get_peft_model(fresh_copy(base), dt_cfg, adapter_name=names[0])
    for n in names[1:]:
        dt.add_adapter(n, dt_cfg)
    torch.manual_seed(0)
    pf = peft.get_peft_model(fresh_copy(base), pf_cfg, adapter_name=names[0])
    for n in names[1:]:
        pf.add_adapter(n, pf_cfg)
    dt.set_adapter(names[0])
    pf.set_adapter(names[0])
    return dt.eval(), pf.eval()


def run(size: Size) -> Results:
    res = Results()
    base = build_llama(size)
    dt, pf = build_models(size, base, max(size.mixed_adapters))
    ids = token_ids(size, batch=size.mixed_batch, seq=size.mixed_seq)

    def forward(model, names=None):
        kwargs = {} if names is None else {"adapter_names": names}

        def call():
            with torch.no_grad():
                model(input_ids=ids, **kwargs)
        return plain(call)

    cases = {"dt single": forward(dt), "peft single": forward(pf)}
    for n in size.mixed_adapters:
        rows = [f"a{i % n}" for i in range(size.mixed_batch)]
        cases[f"dt mixed {n}"] = forward(dt, rows)
        cases[f"peft mixed {n}"] = forward(pf, rows)
    t = interleave(cases, repeats=size.repeats_mixed, warmup=size.warmup)

    shape = f"{size.mixed_batch}x{size.mixed_seq}"
    ds = res.time(AREA, f"deltatune single-adapter batch {shape}", t["dt single"], "mixed.dt_single_ms")
    ps = res.time(AREA, f"peft single-adapter batch {shape}", t["peft single"], "mixed.peft_single_ms")
    for n in size.mixed_adapters:
        dm = res.time(AREA, f"deltatune mixed batch, {n} adapters", t[f"dt mixed {n}"], f"mixed.dt_{n}_ms")
        pm = res.time(AREA, f"peft mixed batch, {n} adapters", t[f"peft mixed {n}"], f"mixed.peft_{n}_ms")
        res.ratio(AREA, f"deltatune mixed {n} / deltatune single (time)", f"mixed.dt_{n}_ms", "mixed.dt_single_ms",
                  f"mixed.dt_{n}_over_single")
        res.ratio(AREA, f"peft mixed {n} / peft single (time)", f"mixed.peft_{n}_ms", "mixed.peft_single_ms",
                  f"mixed.peft_{n}_over_single")
        res.ratio(AREA, f"mixed {n} speed-up deltatune vs peft (peft time / deltatune time)", f"mixed.peft_{n}_ms",
                  f"mixed.dt_{n}_ms", f"mixed.speedup_{n}")
        log(f"[mixed] {n} adapters: deltatune {dm:.0f} ms ({dm / ds:.2f}x single), "
            f"peft {pm:.0f} ms ({pm / ps:.2f}x single)")
    return res
