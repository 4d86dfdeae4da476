"""Tiny ``PeftModel``s of every adapter kind loraprune refuses (and the one it continues), for tests."""
import peft

from tiny import tiny_model

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=kw.pop("target_modules", PROJ), task_type="CAUSAL_LM",
                           **kw)


def _two(active_both: bool):
    model = peft.get_peft_model(tiny_model(), _lora())
    model.add_adapter("second", _lora(target_modules=["q_proj", "v_proj"]))
    if active_both:
        model.base_model.set_adapter(["default", "second"])
    return model


BUILDERS = {
    "ia3": lambda: peft.get_peft_model(tiny_model(), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM")),
    "prefix-tuning": lambda: peft.get_peft_model(tiny_model(), peft.PrefixTuningConfig(
        num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "prompt-tuning": lambda: peft.get_peft_model(tiny_model(), peft.PromptTuningConfig(
        num_virtual_tokens=4, task_type="CAUSAL_LM")),
    "dora": lambda: peft.get_peft_model(tiny_model(), _lora(use_dora=True)),
    "lora-bias": lambda: peft.get_peft_model(tiny_model(), _lora(lora_bias=True)),
    "modules-to-save": lambda: peft.get_peft_model(tiny_model(), _lora(modules_to_save=["lm_head"])),
    "two-active-adapters": lambda: _two(True),
    "two-adapters-one-active": lambda: _two(False),
    "loha": lambda: peft.get_peft_model(tiny_model(), peft.LoHaConfig(r=4, target_modules=PROJ, task_type="CAUSAL_LM")),
    "lokr": lambda: peft.get_peft_model(tiny_model(), peft.LoKrConfig(r=4, target_modules=PROJ, task_type="CAUSAL_LM")),
    "adalora": lambda: peft.get_peft_model(tiny_model(), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, target_modules=PROJ, task_type="CAUSAL_LM")),
    "lora-on-embeddings": lambda: peft.get_peft_model(tiny_model(), _lora(target_modules=["embed_tokens", "q_proj"])),
    "ia3-injected-without-peftmodel": lambda: peft.inject_adapter_in_model(
        peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), tiny_model()),
    "loha-base-model-of-peftmodel": lambda: peft.get_peft_model(
        tiny_model(), peft.LoHaConfig(r=4, target_modules=PROJ, task_type="CAUSAL_LM")).get_base_model(),
}


def plain_lora():
    return peft.get_peft_model(tiny_model(), _lora())
