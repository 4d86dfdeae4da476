"""Sharded data parallelism (FSDP2 ``fully_shard``, DeepSpeed ZeRO-3): scoring from shards, the final cut.

Under FSDP2 every parameter of the model is a ``DTensor`` holding this rank's
slice of rows (``Shard(0)`` on the data-parallel mesh), and after backward so
is its gradient. Nothing in the engine changes for it:

* **Scoring, projection criteria** (``lora``, ``grad``, ``magnitude``):
  :func:`projection_sums` scores each projection from **per-shard partial
  sums**. Each rank scores the rows it owns: ``W``, ``B``, ``∇B`` (and ``∇W``
  for ``grad``) stay local; only ``A`` and ``∇A`` (``r x in``, the rank's
  share of a few hundred KB) are gathered. The row sums of the rank's rows are
  all-gathered (``out`` floats) and its column sums all-reduced (``in``
  floats). No weight-sized tensor is gathered: the extra memory is that of the
  criterion on ``out/N`` rows plus ``2·r·in`` floats, and the extra traffic a
  few vectors per projection (against the ``out x in`` of gathering ``W``).
  Layouts other than row shards (``shard_placement_fn`` returning
  ``Shard(1)``, tensor parallelism) are **gathered**, one projection at a time
  (``DTensor.full_tensor()``: peak one full projection, with its gradient for
  ``grad``), and scored as in one process.
* **Scoring, group criteria** (``fisher``, the default, and ``taylor``): they
  read the activations entering o_proj/down_proj and their gradients in hooks.
  Activations are never sharded (FSDP gathers the weights for the forward
  pass), so each rank holds statistics of its own sequences, and
  :meth:`~loraprune.method.criterion.MaskGradientImportance.synchronize` all-reduces
  them (a few KB per step) exactly as under DDP. No parameter is gathered.
* **Masks** are decided on every rank from identical scores and then broadcast
  from rank 0 (the callback, as under DDP); ``set_keep`` indexes rows of the
  full weight, which FSDP has gathered whenever the forward pass runs.
* **The final cut** needs whole weights, and a model under ``fully_shard``
  cannot be un-sharded in place. :func:`finalize_sharded` gathers every
  parameter and buffer one at a time (a collective: all ranks call it) and
  keeps the full copies on **rank 0's CPU** only, rebuilds the model there
  without FSDP (from its config, on the meta device, then the gathered
  tensors), and finalizes that: rank 0 gets the small dense model, the other
  ranks ``None``. Peak memory: the unpruned model once in rank 0's host RAM,
  one parameter at a time on each device. DeepSpeed ZeRO-3 parameters take the
  same path (``deepspeed.zero.GatheredParameters``, one at a time).

DeepSpeed scores with the group criteria only: accelerate steps the engine
inside ``backward``, so the parameter gradients the projection criteria need
are gone before any hook (see :mod:`loraprune.run.callback`); a ZeRO-3 partition
reaching :func:`projection_sums` is refused with that advice.
"""
from __future__ import annotations

import copy
import types
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import LoRAPruneError
from ..structure.archs import decoder_layers, get_submodule
from .lora import LoRALinear

try:  # builds without torch.distributed have no DTensor: nothing is ever sharded there
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None

Sums = tuple[torch.Tensor, torch.Tensor]


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of a (possibly sharded) tensor."""
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor (a collective when ``t`` is a DTensor: every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def is_zero3(t) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its data is this rank's slice or empty)."""
    return hasattr(t, "ds_id") and hasattr(t, "ds_status")


def data_parallel() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def on_comm_device(t: torch.Tensor) -> torch.Tensor:
    """NCCL only moves CUDA tensors; gloo works on CPU."""
    if dist.get_backend() == "nccl":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def all_ranks(flag: bool) -> bool:
    """``flag`` and-ed over every data-parallel rank (itself outside a process group)."""
    if not data_parallel():
        return flag
    t = on_comm_device(torch.tensor([flag], dtype=torch.uint8))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def is_sharded(model: nn.Module) -> bool:
    """Whether parameters of ``model`` are partitioned across ranks: DTensors (FSDP2
    ``fully_shard``, tensor parallelism) or DeepSpeed ZeRO-3 parameters."""
    return any(is_dtensor(p) or is_zero3(p) for p in model.parameters())


def uses_deepspeed(args=None, optimizer=None) -> bool:
    """Whether a ``transformers.Trainer`` run trains under DeepSpeed (any ZeRO stage):
    ``TrainingArguments(deepspeed=...)``, ``accelerate launch`` with a DeepSpeed config,
    or a DeepSpeed optimizer (accelerate's wrapper, or DeepSpeed's own)."""
    import os

    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        return True
    cls = type(optimizer)
    return cls.__name__ == "DeepSpeedOptimizerWrapper" or cls.__module__.split(".")[0] == "deepspeed"


# ------------------------------------------------------------------------ scoring
class _Projection:
    """What a projection criterion reads of a :class:`LoRALinear`: ``base.weight``,
    ``lora_A``, ``lora_B`` (each with ``.grad``) and ``scaling``, as plain tensors."""

    def __init__(self, module: LoRALinear, take: Callable):
        W, A, B = module.base.weight, module.lora_A, module.lora_B
        self.base = types.SimpleNamespace(weight=_with_grad(take(W), take(W.grad)), bias=None)
        # A is r x in: always whole (every row of W' needs all of it); small
        self.lora_A = _with_grad(full(A), full(A.grad))
        self.lora_B = _with_grad(take(B), take(B.grad))
        self.scaling = module.scaling


def _with_grad(t: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    t = t.detach()
    t.grad = None if grad is None else grad.detach()
    return t


def _row_sharded(W, B) -> bool:
    """``W`` and ``B`` are sharded by rows the same way (FSDP2's default), so each
    rank owns the same rows of both. Decided from global metadata: every rank agrees."""
    if not (is_dtensor(W) and is_dtensor(B)) or W.device_mesh != B.device_mesh or W.placements != B.placements:
        return False
    return all(p == Shard(0) or p.is_replicate() for p in W.placements)


def projection_sums(module_sums: Callable[[object], Sums], module: LoRALinear) -> Sums:
    """``module_sums(module)`` (row sums, column sums of a projection's element scores),
    for a module whose tensors may be sharded DTensors (see the module docstring).

    Unsharded modules are passed through untouched. All ranks must call this for the
    same modules in the same order (it runs collectives).
    """
    W, A, B = module.base.weight, module.lora_A, module.lora_B
    if not any(is_dtensor(t) for t in (W, A, B)):
        if any(is_zero3(t) for t in (W, A, B)):
            raise LoRAPruneError(
                "the projection criteria (lora, grad, magnitude) cannot score DeepSpeed ZeRO-3 partitions; use "
                "criterion='fisher' (the default) or 'taylor', which read activations, or FSDP2 / DDP"
            )
        return module_sums(module)
    if not _row_sharded(W, B):  # another layout: gather this projection whole
        return module_sums(_Projection(module, full))
    rows, cols = module_sums(_Projection(module, local))
    mesh, placements = W.device_mesh, W.placements
    rows = DTensor.from_local(rows, mesh, placements, run_check=False, shape=(W.shape[0],), stride=(1,))
    # a row-sharded mesh dimension holds partial column sums; a replicated one, equal copies
    col_placements = [Partial() if p == Shard(0) else Replicate() for p in placements]
    cols = DTensor.from_local(cols, mesh, col_placements, run_check=False, shape=(W.shape[1],), stride=(1,))
    return rows.full_tensor(), cols.full_tensor()


# ------------------------------------------------------------------------ the final cut
def _plain_class(model: nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps in a subclass of it and ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _gather_to_rank0(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer of ``model`` whole, on rank 0's CPU (``None`` elsewhere).

    One tensor at a time, in the same order on every rank (each gather is a
    collective). Tied tensors stay one tensor (and one gather).
    """
    rank0 = dist.get_rank() == 0
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if id(t) not in seen:
            seen[id(t)] = _whole_on_cpu(t, rank0)
        out[name] = seen[id(t)]
    return out if rank0 else None


def _whole_on_cpu(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """A CPU copy of the whole of ``t`` if ``keep`` (a collective for sharded ``t``)."""
    if is_zero3(t):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().to("cpu", copy=True) if keep else None
    whole = full(t).detach()
    return whole.to("cpu", copy=True) if keep else None


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor, parameter: bool, requires_grad: bool) -> None:
    owner, _, attr = name.rpartition(".")
    module = root.get_submodule(owner)
    if parameter:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad)
    else:
        module._buffers[attr] = value


def unsharded_pruner(pruner):
    """A copy of ``pruner`` on a whole, unsharded copy of its model in rank 0's CPU
    memory (``None`` on other ranks): the LoRA factors as trained, the masks and
    scores shared. A collective: every rank must call it. See the module docstring."""
    model = pruner.model
    gathered = _gather_to_rank0(model)
    if gathered is None:
        return None
    with torch.device("meta"):
        twin = _plain_class(model)(copy.deepcopy(model.config))
    spec = pruner.spec
    modules = []
    for layer, mods in zip(decoder_layers(twin, spec), pruner.modules):
        wrapped = {}
        for name, old in mods.items():
            parent = get_submodule(layer, spec.attn if name in spec.attn_projections else spec.mlp)
            wrapped[name] = LoRALinear(getattr(parent, name), r=old.r, dropout=old.dropout, scaling=old.scaling)
            setattr(parent, name, wrapped[name])
        modules.append(wrapped)
    flags = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    made: dict[int, nn.Parameter] = {}
    for kind, named in (("param", twin.named_parameters(remove_duplicate=False)),
                        ("buffer", twin.named_buffers(remove_duplicate=False))):
        for name, _ in list(named):
            if name not in gathered:
                raise LoRAPruneError(
                    f"cannot rebuild the sharded model unsharded: {type(twin).__name__}(config) has {name!r}, which "
                    "the trained model lacks; finalize on one process instead (load the base model, restore the "
                    "pruning state and LoRA factors, call pruner.finalize())"
                )
            value = gathered[name]
            if kind == "param":  # tied weights: one Parameter for one gathered tensor
                value = made.setdefault(id(value), nn.Parameter(value, flags.get(name, False)))
            _set_tensor(twin, name, value, kind == "param", flags.get(name, False))
    twin_pruner = copy.copy(pruner)
    twin_pruner.rebind(twin, modules)
    return twin_pruner


def finalize_sharded(pruner, merge: bool = True) -> nn.Module | None:
    """:meth:`LoRAPruner.finalize` for a sharded model (FSDP2, ZeRO-3): the small dense model on
    rank 0 (CPU), ``None`` on the other ranks. A collective: call it on every rank."""
    twin = unsharded_pruner(pruner)
    return None if twin is None else twin.finalize(merge=merge)
