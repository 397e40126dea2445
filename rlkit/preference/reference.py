"""The frozen reference of dpo, kto, ppo and eval: precomputed log-prob columns, or a model per step.

One implementation, generic over what it measures (a `LogpsSpec`): DPO the summed log-probs of
each pair's chosen and rejected completion, KTO each example's completion and its mismatched
one, PPO each response token's log-prob at the sampling temperature ([B, R], never
precomputed: its rollouts are new every step), eval a policy's pairs or sampled completions.
Whatever the command, `--ref DIR` must share the policy's tokenizer, and is refused otherwise.

Why precompute (the default): the reference never changes, so its log-probs of the training
and eval pairs are data. One no-grad pass before training (sharded over processes) turns
them into two columns, `ref_chosen_logps` and `ref_rejected_logps`, cached next to the
prepared data under a key naming the reference (its files, dtype and precision). Training
then holds no reference model and runs no reference forward, and a second run against the
same reference skips even the pass.

Why the policy itself can compute them when the reference is the starting model: before the
first optimizer step the policy *is* the starting model (a fresh LoRA adapter adds exactly
zero; an adapter dir being continued is still that adapter), so its pass in eval mode gives
the reference log-probs without a second copy of anything.

On the fly (`--no-precompute-ref`), each strategy avoids a second copy of the base weights
where it can: a fresh LoRA adapter is switched off (`disable_adapter()`); an adapter dir is
loaded a second time as a frozen adapter on the same base and switched to; `--ref DIR` is its
own frozen model; full fine-tuning with no `--ref` needs a frozen copy of the start.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import extract_model_from_parallel, gather_object

from rlkit import __version__
from rlkit.console import console, info, warn
from rlkit.data.prepare import PreparedData, tokenizer_fingerprint
from rlkit.errors import InputError
from rlkit.models.load import ModelSource, load_causal_lm, load_tokenizer, resolve_source
from rlkit.models.modes import adapter_frozen_in_use, eval_mode, load_frozen_adapter, model_device, to_device
from rlkit.preference.config import ReferenceConfig
from rlkit.preference.logps import pair_logps

if TYPE_CHECKING:
    from rlkit.training.run import TrainingRun

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REFERENCE_ADAPTER = "reference"

Batch = dict[str, Any]
Measure = Callable[[torch.nn.Module, Batch], Any]


def _pair_measure(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = pair_logps(model, batch)
    return out.chosen, out.rejected


@dataclass(frozen=True)
class LogpsSpec:
    """What a reference measures on a batch, and the columns it is stored in when precomputed.

    DPO's are two [B] vectors of summed log-probs, a pair's chosen and rejected completions;
    KTO's each example's completion and its mismatched (KL) completion. PPO's is one [B, R]
    tensor of response-token log-probs, with no columns: there is nothing to precompute.
    """

    measure: Measure
    columns: tuple[str, ...] = ()
    unit: str = "pairs"  # what a dataset row is, in messages


PAIR_LOGPS = LogpsSpec(_pair_measure, REF_COLUMNS)


class Reference(Protocol):
    def logps(self, model: torch.nn.Module, batch: Batch) -> Any:
        """The spec's measure of `batch` by the reference (DPO: chosen and rejected summed log-probs, [B] each)."""


class PrecomputedReference:
    """Reads the columns the precompute pass attached to the data."""

    def __init__(self, spec: LogpsSpec = PAIR_LOGPS):
        self.columns = spec.columns

    def logps(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored in float64; given back in the dtype the policy's own log-probs will have."""
        param = next(model.parameters())
        dtype = torch.promote_types(param.dtype, torch.float32)
        first, second = self.columns
        return batch[first].to(param.device, dtype), batch[second].to(param.device, dtype)


class DisabledAdapterReference:
    """The base under a fresh LoRA adapter: the policy's own forward with the adapter off."""

    def __init__(self, spec: LogpsSpec = PAIR_LOGPS):
        self.measure = spec.measure

    def logps(self, model: torch.nn.Module, batch: Batch) -> Any:
        with torch.no_grad(), adapter_frozen_in_use(extract_model_from_parallel(model), None):
            return self.measure(model, batch)


class AdapterReference:
    """A continued adapter's starting point: the same adapter loaded again, frozen, on the same base.

    Only the adapter's weights are held twice (megabytes), never the base. The switch runs
    before the policy forward of the step, under no_grad, and always switches back.
    """

    def __init__(self, peft_model: Any, adapter_dir: str, spec: LogpsSpec = PAIR_LOGPS):
        self.measure = spec.measure
        load_frozen_adapter(peft_model, adapter_dir, REFERENCE_ADAPTER)

    def logps(self, model: torch.nn.Module, batch: Batch) -> Any:
        with torch.no_grad(), adapter_frozen_in_use(extract_model_from_parallel(model), REFERENCE_ADAPTER):
            return self.measure(model, batch)


class ModelReference:
    """A separate frozen model (`--ref DIR`, or a copy of the start for full fine-tuning)."""

    def __init__(self, model: torch.nn.Module, spec: LogpsSpec = PAIR_LOGPS):
        self.model = model.eval().requires_grad_(False)
        self.measure = spec.measure

    def logps(self, policy: torch.nn.Module, batch: Batch) -> Any:
        device = model_device(policy)
        if model_device(self.model) != device:
            self.model.to(device)
        with torch.no_grad():
            return self.measure(self.model, to_device(batch, device))


# ---- precompute ----------------------------------------------------------------------------


def source_identity(source: ModelSource) -> dict[str, Any]:
    """What names a model's weights: its path, and each weight/config file's size and mtime."""
    files = []
    for directory in (source.path, source.adapter_dir):
        if directory and Path(directory).is_dir():
            for path in sorted(Path(directory).iterdir()):
                if path.is_file() and path.suffix in (".safetensors", ".bin", ".gguf", ".json", ".pt"):
                    stat = path.stat()
                    files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"name": source.name, "gguf": source.gguf_file, "adapter": source.adapter_dir, "files": files}


def same_weights(a: ModelSource, b: ModelSource) -> bool:
    """Whether two sources are the same files on disk (however their paths were written)."""
    ia, ib = source_identity(a), source_identity(b)
    if ia["files"] or ib["files"]:
        return (ia["files"], Path(ia["gguf"] or "").name) == (ib["files"], Path(ib["gguf"] or "").name)
    return ia["name"] == ib["name"]


def reference_key(source: ModelSource, dtype: torch.dtype, accelerator: Accelerator) -> str:
    payload = [__version__, source_identity(source), str(dtype), accelerator.mixed_precision]
    return hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]


def compute_reference_logps(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    collate: Callable[[Any], Batch],
    batch_size: int,
    accelerator: Accelerator,
    spec: LogpsSpec = PAIR_LOGPS,
) -> dict[str, list[float]]:
    """One no-grad pass in eval mode; each process takes every world-th micro-batch."""
    model.to(accelerator.device)
    starts = list(range(0, len(dataset), batch_size))
    mine = starts[accelerator.process_index :: accelerator.num_processes]
    found: list[tuple[int, list[float], list[float]]] = []
    with torch.no_grad(), eval_mode(model):
        for start in mine:
            batch = collate(dataset.select(range(start, min(start + batch_size, len(dataset)))))
            with accelerator.autocast():
                first, second = spec.measure(model, to_device(batch, accelerator.device))
            found.append((start, first.float().cpu().tolist(), second.float().cpu().tolist()))
    if accelerator.num_processes > 1:
        found = gather_object(found)
    found.sort(key=lambda item: item[0])
    return {
        spec.columns[0]: [v for _, first, _ in found for v in first],
        spec.columns[1]: [v for _, _, second in found for v in second],
    }


def _splits(data: PreparedData) -> dict[str, datasets.Dataset]:
    return {"train": data.train} | ({"eval": data.eval} if data.eval is not None else {})


def _load_cached(
    path: Path | None, sizes: dict[str, int], columns: tuple[str, ...]
) -> dict[str, dict[str, list[float]]] | None:
    if path is None or not (path / "dataset_dict.json").is_file():
        return None
    try:
        cached = datasets.load_from_disk(str(path))
    except (OSError, ValueError):
        return None
    if set(cached) != set(sizes) or any(
        len(cached[name]) != n or not set(columns) <= set(cached[name].column_names) for name, n in sizes.items()
    ):
        return None
    return {name: {c: cached[name][c] for c in columns} for name in sizes}


def _save_cached(path: Path, columns: dict[str, dict[str, list[float]]]) -> None:
    staging = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        staging.parent.mkdir(parents=True, exist_ok=True)
        datasets.DatasetDict({name: datasets.Dataset.from_dict(cols) for name, cols in columns.items()}).save_to_disk(
            str(staging)
        )
        staging.rename(path)
    except OSError:  # a read-only pack dir, or another process cached it first: no cache, same result
        shutil.rmtree(staging, ignore_errors=True)


def attach_reference_logps(
    data: PreparedData,
    key: str,
    compute: Callable[[datasets.Dataset], dict[str, list[float]]],
    accelerator: Accelerator,
    spec: LogpsSpec = PAIR_LOGPS,
) -> PreparedData:
    """`data` with the reference columns added to every split, computed once and cached.

    The cache is `<prepared data dir>/reference/<key>`; `compute` runs only on a cache miss
    (so a `--ref` model is loaded only then).
    """
    splits = _splits(data)
    sizes = {name: len(ds) for name, ds in splits.items()}
    cache = data.directory / "reference" / key if data.directory is not None else None
    columns = spec.columns
    values = _load_cached(cache, sizes, columns)
    if values is not None:
        info(f"reference log-probs: cached ({cache})")
    else:
        started = time.time()
        values = {name: compute(ds) for name, ds in splits.items()}
        info(f"reference log-probs: {sum(sizes.values())} {spec.unit} in {time.time() - started:.1f}s")
        if cache is not None and accelerator.is_main_process:
            _save_cached(cache, values)
        accelerator.wait_for_everyone()
    attached = {}
    for name, ds in splits.items():
        for column in columns:
            if column in ds.column_names:
                ds = ds.remove_columns(column)
            ds = ds.add_column(column, values[name][column])
        attached[name] = ds
    return PreparedData(attached["train"], attached.get("eval"), data.metadata, data.directory)


# ---- choosing the strategy -----------------------------------------------------------------


class ReferenceOptions(Protocol):
    """What choosing a reference reads from a trainer's config (dpo, kto and ppo all have these)."""

    ref: str | None
    lora: bool


def load_reference_model(
    ref: ModelSource, policy_tokenizer: Any, policy_name: str, dtype: torch.dtype, trust_remote_code: bool = False
) -> torch.nn.Module:
    """`--ref`'s model, frozen; refused (before its weights load) unless it shares the policy's tokenizer,
    since a log-prob ratio of two models is meaningless over different tokens."""
    tokenizer = load_tokenizer(ref, trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(policy_tokenizer):
        raise InputError(
            f"--ref {ref.name}: its tokenizer differs from {policy_name}'s; the reference must share the policy's tokens"
        )
    model = load_causal_lm(ref, dtype, trust_remote_code)
    return model.eval().requires_grad_(False)


def _load_for_run(ref: ModelSource, policy_tokenizer: Any, run: TrainingRun) -> torch.nn.Module:
    return load_reference_model(ref, policy_tokenizer, run.source.name, run.weights_dtype, run.config.trust_remote_code)


def _reference_source(config: ReferenceOptions, run: TrainingRun) -> tuple[ModelSource, bool, str]:
    """(the reference's source, whether it is the starting model, how to name it)."""
    ref_source = resolve_source(config.ref) if config.ref else run.source
    # `--ref` naming MODEL itself (iterated KTO/DPO: the previous round is both) is the starting model
    ref_is_start = same_weights(ref_source, run.source)
    described = f"`{config.ref}`" if config.ref else f"the starting model `{run.source.name}`"
    return ref_source, ref_is_start, described


def sharded_like_policy(model: torch.nn.Module, run: TrainingRun, what: str = "reference") -> torch.nn.Module:
    """A separate frozen model (`what`: the reference, distillation's teacher), sharded over the processes when the engine shards the policy
    (`--fsdp` on torchrun): a full copy on every process would undo what FSDP saves."""
    from rlkit.training.engine import shards_itself
    from rlkit.training.sharding import local_share, shard

    acc = run.accelerator
    if shards_itself(run.config, acc):
        shard(model, acc.device, frozen=True)
        local, whole = local_share(model)
        console.print(
            f"fsdp: {what} on process {acc.process_index} of {acc.num_processes} holds {local:,} of {whole:,} parameter elements"
        )
    return model


def on_the_fly_reference(
    config: ReferenceOptions,
    run: TrainingRun,
    policy: torch.nn.Module,
    tokenizer: Any,
    spec: LogpsSpec = PAIR_LOGPS,
) -> tuple[Reference, str]:
    """A reference that measures every batch during training, and its description.

    Each strategy avoids a second copy of the base where it can (see the module docstring).
    """
    ref_source, ref_is_start, described = _reference_source(config, run)
    if config.ref and not (ref_is_start and config.lora):
        model = sharded_like_policy(_load_for_run(ref_source, tokenizer, run), run)
        return ModelReference(model, spec), f"{described}, on the fly"
    if config.lora and run.source.adapter_dir:
        return AdapterReference(policy, run.source.adapter_dir, spec), f"{described} (its adapter, frozen), on the fly"
    if config.lora:
        return DisabledAdapterReference(spec), f"{described} (the base, adapter disabled), on the fly"
    if spec.columns:  # a trainer that could have precomputed it
        warn(
            "full fine-tuning with --no-precompute-ref keeps a frozen copy of the starting model in memory; the default (--precompute-ref) does not"
        )
    model = sharded_like_policy(copy.deepcopy(policy), run)
    return ModelReference(model, spec), f"{described} (a frozen copy), on the fly"


def setup_reference(
    config: ReferenceConfig,
    run: TrainingRun,
    policy: torch.nn.Module,
    data: PreparedData,
    tokenizer: Any,
    collate: Callable[[Any], Batch],
    spec: LogpsSpec = PAIR_LOGPS,
    cache_tag: str = "",
) -> tuple[Reference, PreparedData, str]:
    """The reference strategy, the data (with reference columns when precomputed) and a description.

    `cache_tag` names anything beyond the reference and the data that changes the
    precomputed columns (KTO: how the mismatched pairs were drawn).
    """
    if not config.precompute_ref:
        reference, described = on_the_fly_reference(config, run, policy, tokenizer, spec)
        return reference, data, described
    ref_source, ref_is_start, described = _reference_source(config, run)
    loaded: dict[str, torch.nn.Module] = {}  # the --ref model, loaded on a cache miss only, once

    def compute(dataset: Any) -> dict[str, list[float]]:
        if "model" not in loaded:
            loaded["model"] = policy if ref_is_start else _load_for_run(ref_source, tokenizer, run)
        return compute_reference_logps(loaded["model"], dataset, collate, config.batch_size, run.accelerator, spec)

    key = reference_key(ref_source, run.weights_dtype, run.accelerator) + cache_tag
    if ref_is_start and run.compute_dtype_4bit is not None:  # the policy measures it: its 4-bit base rounds
        key += f"-nf4-{run.compute_dtype_4bit}"
    data = attach_reference_logps(data, key, compute, run.accelerator, spec)
    loaded.clear()  # training holds no reference model
    return PrecomputedReference(spec), data, f"{described}, log-probs precomputed"
