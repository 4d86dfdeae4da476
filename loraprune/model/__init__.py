"""What loraprune adds to or toggles on a model: LoRA layers, distributed wrappers, recompute."""
