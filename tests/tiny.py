"""Tiny random models of every supported architecture, for tests."""
import torch
import transformers

ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
}


def tiny_config(arch="llama", **overrides):
    cfg_name, _, extra = ARCH_CONFIGS[arch]
    kwargs = dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    return getattr(transformers, cfg_name)(**kwargs)


def tiny_model(arch="llama", seed=0, **overrides):
    _, cls_name, _ = ARCH_CONFIGS[arch]
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(tiny_config(arch, **overrides))
    # random, non-trivial norms and biases so that wrong index maps show up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def random_batches(vocab=97, n=4, batch=2, seq=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(n)]


def logits(model, input_ids):
    """The model's logits on ``input_ids``, without autograd (for comparing two models)."""
    with torch.no_grad():
        return model(input_ids).logits
