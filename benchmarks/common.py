"""Shared pieces of the benchmark suite: sizes, model builders, interleaved timing, result rows.

Every measurement runs deltatune and peft (and, where it makes sense, the plain base model) in the same process, on
the same weights, inputs and thread count. Timings are taken round-robin: each round runs every case once, in an
order rotated from round to round, so slow drift of the machine (other processes, thermal state, allocator warm-up)
hits all cases alike. The reported number is the median over rounds after warm-up rounds.

peft is imported here only as the reference to compare with; ``src/deltatune`` never imports it.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# How idle OpenMP threads wait, chosen by how busy the machine is when the run starts. Shared with other processes,
# spinning threads waiting at a barrier for a descheduled sibling turn each small parallel op into a scheduler time
# slice (measured here: a 64x64 matmul on 2 threads took 5-25 ms instead of 0.05 ms while one other process was
# busy), so timings would count parallel regions rather than work: then idle threads sleep (PASSIVE). On an idle
# machine sleeping costs every parallel region a wake-up instead (64x64 matmul: 80 us on 2 threads vs 7 us on 1),
# which inflates whichever code runs more, smaller ops: there OpenMP's default (spinning) is kept. Must be set before
# torch (libgomp) loads; an explicit OMP_WAIT_POLICY in the environment wins. The choice is printed with the results.
def _other_load(seconds: float = 0.5) -> float:
    """The fraction of CPU time other processes used over ``seconds`` (``/proc/stat``; the load average elsewhere)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    try:
        idle0, total0 = sample()
        time.sleep(seconds)
        idle1, total1 = sample()
    except OSError:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


if "OMP_WAIT_POLICY" not in os.environ and _other_load() > 0.25:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

THREADS = 2

# Every linear layer of a Llama block; "all linear layers" in the brief (lm_head excluded, as peft's "all-linear").
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- sizes ------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Size:
    """Model and workload shapes for one run of the suite.

    Attributes:
        name: ``"full"`` or ``"quick"``.
        hidden, layers, intermediate, vocab, heads: the Llama-shaped model the timings run on.
        batch, seq: the training / forward batch (rows x tokens).
        mixed_batch, mixed_seq: the mixed-adapter batch.
        mixed_adapters: adapter counts the mixed batch is spread over.
        meta_*: the (meta-device) model that injection is timed on.
        r: LoRA rank.
        warmup, repeats: rounds per measurement, by area (``fast``: sub-second ops; ``slow``: training steps;
            ``setup``: operations needing a fresh model per round; ``mixed``: the mixed-batch group).
    """

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    batch: int
    seq: int
    mixed_batch: int
    mixed_seq: int
    mixed_adapters: tuple[int, ...]
    meta_hidden: int
    meta_layers: int
    meta_intermediate: int
    meta_vocab: int
    meta_heads: int
    r: int = 16
    warmup: int = 2
    repeats_fast: int = 11
    repeats_slow: int = 7
    repeats_setup: int = 5
    repeats_mixed: int = 9


FULL = Size(
    name="full", hidden=512, layers=4, intermediate=1408, vocab=8000, heads=8, batch=8, seq=128,
    mixed_batch=32, mixed_seq=64, mixed_adapters=(2, 8, 32),
    meta_hidden=4096, meta_layers=32, meta_intermediate=11008, meta_vocab=32000, meta_heads=32,
)

QUICK = Size(
    name="quick", hidden=64, layers=2, intermediate=128, vocab=256, heads=4, batch=2, seq=16,
    mixed_batch=32, mixed_seq=8, mixed_adapters=(2, 8, 32),
    meta_hidden=256, meta_layers=2, meta_intermediate=512, meta_vocab=1000, meta_heads=4,
    r=4, warmup=1, repeats_fast=2, repeats_slow=2, repeats_setup=2, repeats_mixed=2,
)


def setup_torch(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


def contention_probe() -> str:
    """How much slower a small op is on all threads than on one: ~1-5x on an idle machine, far more when other
    processes compete for the cores (then parallel timings are noisy; see the note on OMP_WAIT_POLICY above)."""
    x = torch.randn(64, 64)
    threads = torch.get_num_threads()
    per_op = {}
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        x @ x
        start = time.perf_counter()
        for _ in range(200):
            x @ x
        per_op[n] = (time.perf_counter() - start) / 200 * 1e6
    torch.set_num_threads(threads)
    policy = f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset: spinning')}"
    if threads == 1:
        return f"64x64 matmul {per_op[1]:.1f} us on 1 thread ({policy})"
    return f"64x64 matmul {per_op[threads]:.1f} us on {threads} threads vs {per_op[1]:.1f} us on 1 ({policy})"


# --- models and inputs -----------------------------------------------------------------------------------------------

def llama_config(size: Size, meta: bool = False):
    from transformers import LlamaConfig

    if meta:
        return LlamaConfig(
            vocab_size=size.meta_vocab, hidden_size=size.meta_hidden, intermediate_size=size.meta_intermediate,
            num_hidden_layers=size.meta_layers, num_attention_heads=size.meta_heads,
            num_key_value_heads=size.meta_heads, max_position_embeddings=4096, tie_word_embeddings=False,
        )
    return LlamaConfig(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=max(512, size.seq, size.mixed_seq), tie_word_embeddings=False,
        attn_implementation="sdpa", pad_token_id=0,
    )


def build_llama(size: Size, seed: int = 0) -> nn.Module:
    """The random-init Llama-shaped model of ``size`` in float32, eval mode; same ``seed`` -> same weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(size)).eval()


def build_meta_llama(size: Size) -> nn.Module:
    """The 7B-shaped Llama (in full size) with every parameter on the meta device: no memory, no init cost."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(size, meta=True))


def fresh_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def token_ids(size: Size, batch: int | None = None, seq: int | None = None, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, size.vocab, (batch or size.batch, seq or size.seq), generator=g)


def lora_kwargs(size: Size, **extra: Any) -> dict[str, Any]:
    """LoraConfig arguments shared by both libraries: r, alpha 2r, dropout 0, every linear layer of a block."""
    return dict(r=size.r, lora_alpha=2 * size.r, lora_dropout=0.0, target_modules=list(LLAMA_LINEAR), **extra)


def deltatune_lora(model: nn.Module, size: Size, **extra: Any) -> nn.Module:
    import deltatune

    return deltatune.get_peft_model(model, deltatune.LoraConfig(**lora_kwargs(size, **extra)))


def peft_lora(model: nn.Module, size: Size, **extra: Any) -> nn.Module:
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs(size, **extra)))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class TrainStep:
    """One optimisation step: causal-LM forward with labels, backward, AdamW step, zero_grad (set to None)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, lr: float = 1e-4) -> None:
        self.model = model.train()
        self.ids = ids
        self.optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr)

    def __call__(self) -> None:
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class FrozenBaseStep:
    """The floor under any LoRA step on the same targets: the base model's own forward and backward with every weight
    frozen and no adapter and no optimizer — exactly the base-model work a LoRA step cannot avoid.

    The outputs of the targeted linear layers are made to require grad (a forward hook; a no-op where the input
    already requires grad), as a LoRA branch would make them. Backward then computes every activation gradient a LoRA
    step needs and none it does not: no weight gradients, and no input gradient for the first block's projections,
    whose input (the frozen embeddings) needs none.
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, targets: list[str] = LLAMA_LINEAR) -> None:
        self.model = model.train().requires_grad_(False)
        self.ids = ids

        def require_grad(_module, _inputs, out):
            return out if out.requires_grad else out.detach().requires_grad_(True)

        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                module.register_forward_hook(require_grad)

    def __call__(self) -> None:
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()


# --- timing -----------------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One thing to time. ``fn(state)`` is timed; ``setup()`` (untimed) makes ``state`` fresh for every call —
    for operations that consume their input (injection, merging, loading)."""

    fn: Callable[[Any], Any]
    setup: Callable[[], Any] | None = None


@dataclass
class Timing:
    """Per-round samples of one case: wall-clock seconds and process CPU seconds (all threads)."""

    samples: list[float]
    cpu_samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_samples) if self.cpu_samples else math.nan

    @property
    def spread(self) -> float:
        """Relative half-width of the inter-quartile range: how noisy the median is."""
        if not self.median:
            return 0.0
        if len(self.samples) < 4:
            return (max(self.samples) - min(self.samples)) / (2 * self.median)
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / (2 * self.median)


def interleave(cases: dict[str, Case], repeats: int, warmup: int) -> dict[str, Timing]:
    """Time every case ``repeats`` times after ``warmup`` untimed rounds, round-robin with a rotating order.

    Automatic garbage collection is off while a case runs (see below). Besides wall time, process CPU time is
    recorded: it does not count time spent descheduled, so it is a useful cross-check of the wall ratios on a machine
    shared with other processes (it still inflates under heavy load, through cache and memory-bandwidth contention).
    """
    names = list(cases)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            case = cases[name]
            state = case.setup() if case.setup is not None else None
            # As timeit does: no cyclic garbage collection on the clock. A full collection walks the whole heap (both
            # libraries' models, transformers' modules: ~0.5 s here), so whichever case happened to trigger it would
            # pay for everyone's objects.
            gc.disable()
            try:
                start, start_cpu = time.perf_counter(), time.process_time()
                case.fn(state)
                elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            finally:
                gc.enable()
            if round_ >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
            del state
    return {n: Timing(wall[n], cpu[n]) for n in names}


def plain(fn: Callable[[], Any]) -> Case:
    """A case with no per-call setup."""
    return Case(lambda _state: fn())


# --- results ----------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the results table.

    Attributes:
        area: which benchmark (``forward``, ``train``, ...).
        name: what was measured.
        value: the number (milliseconds, MiB or a ratio).
        unit: ``"ms"``, ``"MiB"`` or ``"x"``.
        note: spread and CPU time of a timing, the CPU-time variant of a ratio.
    """

    area: str
    name: str
    value: float
    unit: str
    note: str = ""


CPU = ":cpu"  # suffix of the metric key holding the CPU-time variant of a timing or ratio


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)  # key -> number, read by the goals and ratio rows
    notes: list[str] = field(default_factory=list)

    def time(self, area: str, name: str, timing: Timing, key: str) -> float:
        """A timing row (median wall ms); stores ``key`` (wall ms) and ``key + ":cpu"`` (CPU ms)."""
        ms, cpu_ms = timing.median * 1e3, timing.cpu_median * 1e3
        note = f"±{100 * timing.spread:.0f}% (IQR/2), n={len(timing.samples)}; CPU {cpu_ms:.4g} ms"
        self.rows.append(Row(area, name, ms, "ms", note))
        self.metrics[key], self.metrics[key + CPU] = ms, cpu_ms
        return ms

    def ratio(self, area: str, name: str, num_key: str, den_key: str, key: str) -> float:
        """A ratio row ``metrics[num_key] / metrics[den_key]``; for timings also the CPU-time ratio (note, key)."""
        m = self.metrics
        value = m[num_key] / m[den_key] if m.get(den_key) else math.nan
        m[key] = value
        note = ""
        if num_key + CPU in m and m.get(den_key + CPU):
            m[key + CPU] = m[num_key + CPU] / m[den_key + CPU]
            note = f"by CPU time: {m[key + CPU]:.3f}x"
        self.rows.append(Row(area, name, value, "x", note))
        return value

    def value(self, area: str, name: str, value: float, unit: str, key: str, note: str = "") -> None:
        self.rows.append(Row(area, name, value, unit, note))
        self.metrics[key] = value

    def skip(self, area: str, name: str, why: str) -> None:
        self.notes.append(f"{area}: {name} skipped — {why}")

    def extend(self, other: Results) -> None:
        self.rows += other.rows
        self.metrics.update(other.metrics)
        self.notes += other.notes


def log(msg: str) -> None:
    print(msg, flush=True)
