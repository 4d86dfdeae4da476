"""Which adapters a model may carry into pruning: checked before anything is touched.

loraprune continues exactly one plain LoRA adapter on the decoder projections
(its factors become the :class:`~loraprune.model.lora.LoRALinear` factors).
Anything else a ``PeftModel`` or an injected model can hold would be dropped,
pruned as if absent, or half-wrapped: another adapter type (IA3, prefix or
prompt tuning, LoHa, AdaLoRA, ...), DoRA, a LoRA bias, several adapters,
``modules_to_save`` copies, trainable-token wrappers. Those are refused here,
with the fix (``merge_and_unload()``), before :class:`~loraprune.run.engine.LoRAPruner`
freezes or wraps a single parameter; so is a model that already carries
loraprune's own LoRA layers (a pruner attached to it, or ``finalize(merge=False)``'s
output), which a second pruner would share with the first.
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import AdapterError
from .lora import LoRALinear, _peft_lora_parts, is_peft_lora_layer, unwrap_compiled, unwrap_peft

MERGE = "merge it into the weights first (model = peft_model.merge_and_unload()) and prune the merged model"
_LORA_LAYER_MODULE = "peft.tuners.lora.layer"  # where PEFT's plain LoRA Linear layer lives


def _kind(config) -> str:
    kind = getattr(config, "peft_type", None)
    return str(getattr(kind, "value", kind) or type(config).__name__)


def _check_configs(model: nn.Module) -> None:
    """The adapters a ``PeftModel`` declares (its ``peft_config``)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not hasattr(model, "get_base_model"):
        return
    for name, config in configs.items():
        kind = _kind(config)
        if getattr(config, "is_prompt_learning", False):
            raise AdapterError(
                f"the PeftModel's adapter {name!r} is {kind} (virtual tokens in front of the input, not weights): "
                "pruning would silently drop it. loraprune continues LoRA adapters only; prune the base model "
                "(peft_model.get_base_model()) and train the prompt again on the pruned model "
                "(merge_and_unload() cannot merge prompt learning)")
        if kind != "LORA":
            raise AdapterError(f"the PeftModel's adapter {name!r} is {kind}: loraprune continues plain LoRA adapters "
                               f"only; {MERGE}")
        if getattr(config, "use_dora", False):
            raise AdapterError(f"the PeftModel's adapter {name!r} is DoRA (use_dora=True): loraprune continues plain "
                               f"LoRA only; {MERGE}")
        if getattr(config, "lora_bias", False):
            raise AdapterError(f"the PeftModel's adapter {name!r} trains a LoRA bias (lora_bias=True); {MERGE}")
        if getattr(config, "modules_to_save", None):
            raise AdapterError(
                f"the PeftModel's adapter {name!r} keeps trained copies of {sorted(config.modules_to_save)} "
                "(modules_to_save), which pruning would write into a folder load_pruned refuses; " + MERGE)
    if len(configs) > 1:
        active = list(getattr(model, "active_adapters", None) or [])
        raise AdapterError(
            f"the PeftModel holds {len(configs)} adapters ({', '.join(map(repr, configs))}; active: {active}): "
            "loraprune continues one. Merge them (peft_model.merge_and_unload()), or delete the others "
            "(peft_model.delete_adapter(name)) before pruning")


def check_adapters(model: nn.Module) -> None:
    """Refuse, without changing anything, a model whose adapters loraprune cannot continue (see module doc)."""
    model = unwrap_compiled(model)
    _check_configs(model)
    inner = unwrap_peft(model)
    for name, module in inner.named_modules():
        if isinstance(module, LoRALinear):
            raise AdapterError(
                f"the model already carries loraprune's LoRA layers ({name}): a LoRAPruner is attached to it, or it "
                "is finalize(merge=False)'s output. Finish or undo that one (pruner.finalize() / pruner.restore()), "
                "or merge its adapter (loraprune.merge_lora(model)), before pruning again")
        from_peft = type(module).__module__.startswith("peft.")
        if not from_peft:
            continue
        lora_linear = type(module).__module__ == _LORA_LAYER_MODULE and type(module).__name__ == "Linear"
        if lora_linear and is_peft_lora_layer(module):
            try:
                _peft_lora_parts(module)  # several adapters, DoRA, a LoRA bias, a base that is not nn.Linear
            except ValueError as err:
                raise AdapterError(f"{name}: {err}") from err
            continue
        if hasattr(module, "base_layer") or hasattr(module, "original_module") or hasattr(module, "token_adapter"):
            raise AdapterError(f"{name} is a PEFT {type(module).__name__} layer ({type(module).__module__}): "
                               f"loraprune continues plain LoRA Linear layers only; {MERGE}")
