"""`--dry-run`: what a training configuration needs in memory, per device, before it runs.

Every training command stops at the same place when `--dry-run` is given: its options have been
resolved and checked (rlkit.config, then the recipe's own checks), its recipe has computed its
RunPlan (rlkit.training.run_plan), and nothing has been loaded or written (no OUT, no OUT.partial,
no lock). `rlkit.training.run.stop_for_dry_run` calls `show_plan` there, with the plan the
recipe's setup then reads: what is counted here is what the run would hold. Nothing here knows
the commands: the plan names the models, this module sizes them.

The model is read without its weights: its config (an HF dir, a hub name, a LoRA adapter's base,
or a .gguf file's header), then the model built on torch's meta device, which gives the exact
parameter count and every linear layer's shape (for LoRA's count) without allocating a byte. The
rest is arithmetic (docs/benchmarks.md, "How --dry-run estimates memory"):

- weights: parameters x their dtype (a LoRA base in bf16 under --precision bf16, else fp32);
  LoRA adds r x (in + out) per adapted linear layer, trained in fp32;
- gradients: trainable parameters x 4 bytes; optimizer: AdamW's two moments, 8 bytes each;
- activations of one micro-batch of `batch x max-length` tokens (the worst case: every row full),
  as autograd keeps them with rlkit's lean norm/MLP blocks: per token and layer
  6h + 2kv + 3i + r x adapted layers (h hidden, kv the key/value width, i the MLP width) values in
  the compute dtype, plus LoRA dropout's copies and masks when it is on; with gradient
  checkpointing h per token and layer, and one layer's full set during its recomputation; plus
  the chunked log-prob head's 1,024 x vocab fp32 logits, the attention mask of packed or padded
  rows, and the backward's working set; on a CPU x 1.2 (full) to 1.6 (LoRA) for glibc's heap, and
  a fixed 36 MiB for torch's first steps (both measured: bench/memory_plan.py);
- with --fsdp (or a ZeRO-3 accelerate config) the trained model's weights, gradients and optimizer
  state are divided by the process count (ZeRO-2: gradients and optimizer state; ZeRO-1: the
  optimizer state), plus the all-gathered blocks in flight;
- the plan's other models: a critic or value head trained beside the policy, the frozen ones (a
  `--ref` model or a frozen copy for a full fine-tune's reference, reward model dirs, a teacher
  in its own dtype), a no-grad forward's working set (kto's mismatched completions), and, for a
  run that generates, the KV cache of one `generate` call (rows x length x layers x 2 x kv values).

The process count is the launcher's (`WORLD_SIZE`, set by torchrun and accelerate launch), so
`WORLD_SIZE=8 rlkit sft ... --fsdp --dry-run` plans an 8-process run on one machine. The estimate
leaves out what every process pays whatever the model (Python, torch and CUDA's own context,
the data set), which is why it is compared against measured peaks minus that baseline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from rlkit.console import console
from rlkit.models.load import ModelSource, adapter_config, loading, resolve_source
from rlkit.training.options import TrainConfig
from rlkit.training.run_plan import Frozen, MicroBatch, RunPlan, Trained, plan_of

CHUNK_TOKENS = 1024  # rlkit.training.logprobs.CHUNK_TOKENS (not imported: that module loads more)
MIB = 2**20
#: What the first training steps on a CPU take beyond their tensors (oneDNN's kernel caches and
#: scratch pads, autograd's worker): measured as the gap that stays between planned and measured
#: peaks on the tiny model, whose tensors are a few MiB (bench/memory_plan.py).
CPU_STEP_OVERHEAD = 36 * MIB


@dataclass
class ModelShape:
    """What the arithmetic needs of one model, read from its config and a meta-device copy."""

    name: str
    params: int  # unique parameters (tied embeddings counted once)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int  # key (= value) width per token: kv heads x head dim
    vocab: int
    head_params: int  # the output layer's own parameters (0 when tied to the embeddings)
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # (name, in, out) of each nn.Linear
    adapter: dict[str, Any] | None = None  # adapter_config.json of a LoRA adapter dir

    def lora_params(self, r: int, targets: str, exclude_head: bool = True) -> int:
        """Parameters a LoRA adapter of rank r adds (A: r x in, B: out x r per adapted layer)."""
        if self.adapter:  # a continued adapter keeps its own rank and targets
            r = int(self.adapter.get("r", r))
            wanted = self.adapter.get("target_modules") or targets
            targets = wanted if isinstance(wanted, str) else ",".join(wanted)
        names = None if targets == "all-linear" else {t.strip() for t in targets.split(",") if t.strip()}
        total = 0
        for name, fan_in, fan_out in self.linears:
            leaf = name.rsplit(".", 1)[-1]
            if names is None and exclude_head and leaf in ("lm_head", "score"):
                continue
            if names is not None and leaf not in names:
                continue
            total += r * (fan_in + fan_out)
        return total

    def adapted_per_layer(self, targets: str) -> int:
        """How many linear layers of one transformer block LoRA adapts."""
        names = None if targets == "all-linear" else {t.strip() for t in targets.split(",")}
        block = [n for n, _, _ in self.linears if ".layers.0." in n or ".h.0." in n]
        return sum(1 for n in block if names is None or n.rsplit(".", 1)[-1] in names)


def _config_of(source: ModelSource, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    with loading(source.name, "a model config"):
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs())


def read_shape(name: str, trust_remote_code: bool = False, classifier: bool = False) -> ModelShape:
    """The shape of model `name` (a causal LM, or with `classifier` a one-score sequence classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = resolve_source(name)
    config = _config_of(source, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if classifier:
        config.num_labels = 1
    builder = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with loading(source.name, "a model built from its config"), torch.device("meta"):
        model = builder.from_config(config, trust_remote_code=trust_remote_code)
    seen: set[int] = set()
    params = 0
    for p in model.parameters():  # parameters() already yields a tied weight once
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    head = model.get_output_embeddings() if not classifier else None
    embed = model.get_input_embeddings()
    head_params = 0 if head is None or head.weight is embed.weight else head.weight.numel()
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    return ModelShape(
        name=name,
        params=params,
        hidden=hidden,
        intermediate=intermediate,
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_dim=kv_heads * head_dim,
        vocab=int(text.vocab_size),
        head_params=head_params,
        linears=linears,
        adapter=adapter_config(source.adapter_dir) if source.adapter_dir else None,
    )


# ---- the plan ------------------------------------------------------------------------------


@dataclass
class Row:
    """One model (or one working set) of the plan, in bytes per device."""

    what: str
    weights: float = 0
    grads: float = 0
    optimizer: float = 0
    activations: float = 0
    note: str = ""

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


@dataclass
class Plan:
    command: str
    device: str
    precision: str
    processes: int
    sharding: str
    tokens: int  # tokens per micro-batch of a training step
    rows: list[Row]
    lines: list[str] = field(default_factory=list)  # what the numbers assume

    @property
    def total(self) -> float:
        return sum(r.total for r in self.rows)

    def column(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.rows)


def world_size() -> int:
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def sharding_mode(config: TrainConfig, processes: int) -> tuple[str, int]:
    """(description, ZeRO-like stage): 3 shards weights, gradients and optimizer state; 2 the last
    two; 1 the optimizer state; 0 none. From --fsdp, or the accelerate launch config's environment."""
    if processes <= 1:
        return "none (1 process)", 0
    if config.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return f"FSDP over {processes} processes", 3
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2)
        return f"DeepSpeed ZeRO-{stage} over {processes} processes", stage
    return f"none (DDP, {processes} replicas)", 0


def resolved_precision(config: TrainConfig) -> str:
    """`--precision` as the engine resolves it (rlkit.training.engine.make_accelerator)."""
    if config.precision != "auto":
        return config.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


class Arithmetic:
    """The byte counts of one run plan: dtypes, sharding, activations per token.

    What the recipe decided (which models, LoRA or full, dropout, the micro-batch) comes from the
    RunPlan alone; `config` gives only the options every training command shares (precision,
    --fsdp, gradient checkpointing)."""

    def __init__(self, run: RunPlan, config: TrainConfig):
        self.c = config
        self.precision = resolved_precision(config)
        self.low = self.precision in ("bf16", "fp16")
        self.act = 2 if self.low else 4  # bytes of an activation in the compute dtype
        # TrainingRun.weights_dtype: a bf16 LoRA run holds its frozen weights in bf16
        self.weight_bytes = 2 if self.precision == "bf16" and run.main.lora else 4
        self.processes = world_size()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sharding, self.stage = sharding_mode(config, self.processes)

    def split(self, nbytes: float, stage: int) -> float:
        return nbytes / self.processes if self.stage >= stage else nbytes

    def trained(self, model: Trained, shape: ModelShape, micro: MicroBatch) -> Row:
        """A model trained with AdamW, holding the activations of one micro-batch."""
        lora, head = model.lora, not model.classifier
        if lora:
            extra = shape.lora_params(lora.r, lora.targets) + (0 if head else shape.hidden)  # + score head
            base, trainable = shape.params * self.weight_bytes, extra
            note = f"{shape.params / 1e6:,.1f}M frozen + {extra / 1e6:,.2f}M LoRA"
            if model.nf4:
                # QLoRA: the base's linear layers in NF4 (4 bits + double-quantised scales, ~0.53 bytes
                # a weight), the rest (embeddings, norms, a head) kept in fp32
                linear = sum(i * o for n, i, o in shape.linears if not n.endswith(("lm_head", "score")))
                base = linear * 0.53 + (shape.params - linear) * 4
                note = f"{shape.params / 1e6:,.1f}M frozen (NF4 linear layers) + {extra / 1e6:,.2f}M LoRA"
            weights = base + 4 * extra
        else:
            trainable = shape.params
            weights = 4 * shape.params  # trained weights stay fp32 (autocast computes in bf16)
            note = f"{shape.params / 1e6:,.1f}M trained"
        row = Row(
            model.name,
            weights=self.split(weights, 3),
            grads=self.split(4 * trainable, 2),
            optimizer=self.split(8 * trainable, 1),
            note=note,
        )
        row.activations = self.activations(shape, micro.rows, micro.length, model)
        if not lora and self.low:
            row.activations += 2 * shape.params / (self.processes if self.stage >= 3 else 1)  # autocast's bf16 weights
        if self.stage >= 3:  # FSDP: a block all-gathered for its forward/backward, the next one prefetched
            block = (shape.params - shape.head_params) / max(1, shape.layers)
            row.activations += 2 * block * (self.weight_bytes if lora else 4)
        return row

    def frozen(self, model: Frozen, shape: ModelShape) -> Row:
        nbytes = shape.params * (DTYPE_BYTES[model.dtype] if model.dtype else self.weight_bytes)
        return Row(model.name, weights=self.split(nbytes, 3) if model.sharded else nbytes, note=model.note)

    def per_layer_values(self, shape: ModelShape, model: Trained) -> float:
        """Values autograd keeps per token and transformer block (lean blocks, rlkit.models.lean_blocks):
        the block's input and its normalised copy twice (attention, MLP), q, the attention output,
        k and v, the MLP's gate, up and product; LoRA's rank-r projections, and dropout's copies."""
        h, i, lora = shape.hidden, shape.intermediate, model.lora
        values = 6 * h + 2 * shape.kv_dim + 3 * i + 2 * shape.heads
        if lora:
            adapted = shape.adapted_per_layer(lora.targets)
            values += lora.r * adapted
            if lora.dropout > 0 and model.dropout:
                # peft drops out each adapted layer's input on its own: a copy and its mask each
                # (measured 1.46 x the copy's bytes in all)
                values += 1.46 * ((adapted - 1) * h + i)
        return values

    def heap_factor(self, lora: bool) -> float:
        """How much more than autograd's saved tensors a step holds: on a CPU, glibc's heap keeps
        freed holes between them (measured on SmolLM2-135M, fp32: 1.2x with full fine-tuning, 1.6x
        with LoRA's many small tensors); on a GPU the caching allocator's blocks fit (1.0, not yet
        measured)."""
        if self.device != "cpu":
            return 1.0
        return 1.6 if lora else 1.2

    def activations(self, shape: ModelShape, rows: int, length: int, model: Trained) -> float:
        """Bytes one forward and backward of `rows` x `length` tokens keeps at its peak (the start
        of the backward): the blocks' saved values, the attention mask, the log-prob head's chunk
        of logits and the backward's working set."""
        h, a, tokens = shape.hidden, self.act, rows * length
        layer = self.per_layer_values(shape, model) * a * self.heap_factor(model.lora is not None)
        if self.c.gradient_checkpointing:
            kept = tokens * (shape.layers * h * a + layer)  # block inputs, and one block recomputed
            kept += rows * length * length * a  # the mask, once (each block's copy dies with its recomputation)
        else:
            kept = tokens * shape.layers * layer
            # sdpa's [rows, 1, length, length] mask of packed / padded rows, one copy per block
            kept += shape.layers * rows * length * length * a
        kept += tokens * 3 * h * a  # embeddings out, final norm in and out
        if not model.classifier:  # the chunked log-prob head: one chunk's fp32 logits and their softmax
            kept += min(tokens, CHUNK_TOKENS) * shape.vocab * (4 + a)
        # the backward's working set: gradients of one block's widest activations in flight
        kept += tokens * (2 * shape.intermediate + 4 * h) * a
        return kept

    def no_grad_forward(self, shape: ModelShape, micro: MicroBatch) -> float:
        """A forward without gradient keeps one block's working set at a time."""
        return micro.tokens * shape.hidden * 6 * self.act

    def kv_cache(self, shape: ModelShape, rows: int, length: int) -> float:
        return 2 * shape.layers * shape.kv_dim * rows * length * self.act


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

REFERENCE_LINES = {
    "precomputed": "log-probs precomputed before training (the model is freed before the first step)",
    "second model": "{source}, a second model",
    "adapter disabled": "the base with the adapter disabled (no second copy)",
    "frozen copy": "a frozen copy of the starting model (full fine-tuning)",
    "none": "none ({why})",
}


class Shapes:
    """Each model's shape, read once however many roles it plays (a frozen copy is the policy's)."""

    def __init__(self, trust_remote_code: bool):
        self.trust_remote_code = trust_remote_code
        self.read: dict[tuple[str, bool], ModelShape] = {}

    def __call__(self, source: str, classifier: bool) -> ModelShape:
        key = (source, classifier)
        if key not in self.read:
            self.read[key] = read_shape(source, self.trust_remote_code, classifier=classifier)
        return self.read[key]


def make_plan(run: RunPlan | str, config: TrainConfig) -> Plan:
    """The memory of `run` (a recipe's RunPlan; or a command name, whose recipe's plan function gives
    it) under the shared options of `config`."""
    if isinstance(run, str):
        run = plan_of(run, config)
    arith = Arithmetic(run, config)
    shapes = Shapes(config.trust_remote_code)
    micro, main = run.micro_batch, run.main
    trunk = shapes(main.source or "", main.classifier)
    lines: list[str] = []
    rows: list[Row] = []
    trained_rows: dict[str, Row] = {}
    for model in run.trained:
        if model.source is None:  # a head on the main model's trunk
            h = trunk.hidden
            row = Row(model.name, weights=4 * h, grads=4 * h, optimizer=8 * h)
        else:
            row = arith.trained(model, shapes(model.source, model.classifier), micro)
        trained_rows.setdefault(model.role, row)
        rows.append(row)
    for forward in run.no_grad_forwards:
        by = run.model(forward.by)
        shape = shapes(by.source or "", by.classifier)
        rows.append(Row(forward.label, activations=arith.no_grad_forward(shape, micro)))
    rows += [arith.frozen(model, shapes(model.source, model.classifier)) for model in run.held_frozen]
    if run.reference is not None:
        ref = run.reference
        lines.append("reference: " + REFERENCE_LINES[ref.kind].format(source=ref.source, why=ref.why))
    if run.generation is not None:
        g = run.generation
        sampler = run.model(g.by)
        shape = shapes(sampler.source or "", sampler.classifier)
        kv = arith.kv_cache(shape, g.rows, g.length)
        # generation and training alternate: the larger of the two working sets is the peak
        gen = kv + g.rows * shape.vocab * 4 * 2  # + one step's logits and their softmax
        row = trained_rows[g.by]
        lines.append(
            f"generation: KV cache of {g.rows} rows x {g.length} tokens = {gen / MIB:,.0f} MiB; "
            f"the training step's activations {row.activations / MIB:,.0f} MiB; the larger counts"
        )
        if gen > row.activations:
            row.activations = gen
            row.note += "; activations: generation's KV cache"
    if arith.device == "cpu":
        rows.append(
            Row("torch on a CPU", activations=CPU_STEP_OVERHEAD, note="kernel caches and scratch of the first steps")
        )
    precision_note = {
        "fp32": "fp32 weights and activations",
        "bf16": "bf16 autocast" + (" over a bf16 LoRA base" if main.lora else " over fp32 weights"),
        "fp16": "fp16 autocast over fp32 weights",
    }[arith.precision]
    lines.insert(0, f"precision: {arith.precision} ({precision_note})")
    sides = f" x {micro.sides} sides" if micro.sides > 1 else ""
    lines.append(
        f"activations: one micro-batch of {micro.tokens:,} tokens (batch x max-length{sides}: "
        f"the worst case, every row full){'; gradient checkpointing' if config.gradient_checkpointing else ''}"
    )
    return Plan(run.command, arith.device, arith.precision, arith.processes, arith.sharding, micro.tokens, rows, lines)


def _size(nbytes: float) -> str:
    if nbytes == 0:
        return "-"
    if nbytes < 0.05 * MIB:
        return "<0.1 MiB"
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:,.2f} GiB"
    return f"{nbytes / MIB:,.1f} MiB" if nbytes < 10 * MIB else f"{nbytes / MIB:,.0f} MiB"


def plan_table(plan: Plan) -> Any:
    """The plan as a table: one row per model or working set, bytes per device (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"rlkit {plan.command} --dry-run: memory per device ({plan.device}, {plan.processes} "
        f"process{'es' if plan.processes > 1 else ''}; sharding: {plan.sharding})",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("", overflow="fold", min_width=10)
    for name in ("weights", "gradients", "optimizer", "activations", "total"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in [*plan.rows, Row("total", *(plan.column(n) for n in ("weights", "grads", "optimizer", "activations")))]:
        sizes = (row.weights, row.grads, row.optimizer, row.activations, row.total)
        table.add_row(row.what, *map(_size, sizes), style="bold" if row.what == "total" else None)
    return table


def show_plan(run: RunPlan, config: TrainConfig) -> Plan:
    """Print the plan on stderr (stdout stays empty: nothing is written, there is no OUT to print)."""
    plan = make_plan(run, config)
    from rlkit.console import is_main_process

    if is_main_process():
        console.print(plan_table(plan))
        for row in plan.rows:
            if row.note:
                console.print(f"  {row.what}: {row.note}")
        for line in plan.lines:
            console.print(f"  {line}")
        console.print(
            "  not counted: the process itself (Python, torch, the CUDA context: ~0.3-0.5 GiB on a GPU) and the data; "
            "nothing was loaded or written (--dry-run)"
        )
    return plan
