"""Write a tiny LLaMA as a GGUF file, as llama.cpp's converter would (f32 tensors, byte-level BPE tokenizer)."""
from pathlib import Path

import numpy as np

from tiny import tiny_model

# llama.cpp's tensor names for the seven projections
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
MERGES = ["Ġ t", "h e", "Ġt he"]


def _permute(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it on load."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]


def write_tiny_gguf(path: Path, seed: int = 0):
    """Write ``path`` and return the transformers model it holds (tied embeddings, like SmolLM2)."""
    import gguf

    vocab = tokens()
    model = tiny_model("llama", seed=seed, vocab_size=len(vocab), tie_word_embeddings=True)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab)
    w.add_token_types([1] * (len(vocab) - 1) + [3])  # the last one is a control token
    w.add_token_merges(MERGES)
    w.add_bos_token_id(len(vocab) - 1)
    w.add_eos_token_id(len(vocab) - 1)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for hf, name in GGUF_NAMES.items():
            t = sd[f"{prefix}{'self_attn' if hf[0] in 'qkvo' else 'mlp'}.{hf}.weight"]
            if hf in ("q_proj", "k_proj"):
                t = _permute(t, cfg.num_attention_heads, cfg.num_attention_heads if hf == "q_proj"
                             else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", np.ascontiguousarray(t))
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[f"{prefix}input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[f"{prefix}post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
