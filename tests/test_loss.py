"""The chunked training loss equals the whole-logits loss (value and LoRA gradients)."""
import pytest
import torch

from loraprune import LoRAPruner
from loraprune.loss import training_loss

from tiny import random_batches, tiny_model


def _loss_and_grads(arch, chunk, distill, batch):
    pruner = LoRAPruner(tiny_model(arch), ratio=0.5, lora_dropout=0.0, seed=1, loss_chunk=chunk, distill=distill)
    with torch.no_grad():  # a non-zero adapter, so the student differs from the teacher
        for p in pruner.lora_parameters():
            p.normal_(0, 0.05)
    pruner.model.train()
    loss = training_loss(pruner, batch, pruner.config)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in pruner.lora_parameters()]


@pytest.mark.parametrize("arch,distill,chunk", [("llama", 0.5, 7), ("llama", 0.0, 5), ("qwen2", 1.0, 64),
                                                ("qwen3", 0.5, 1)])
def test_chunked_loss_equals_whole_logits_loss(arch, distill, chunk):
    batch = random_batches(n=1, batch=3, seq=12, seed=4)[0]
    labels = batch["input_ids"].clone()
    labels[0, 3:6] = -100  # ignored targets
    mask = torch.ones_like(labels)
    mask[2, 9:] = 0  # right padding: left out of the distillation term
    batch = dict(batch, labels=labels, attention_mask=mask)
    whole, g_whole = _loss_and_grads(arch, 0, distill, batch)
    chunked, g_chunked = _loss_and_grads(arch, chunk, distill, batch)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
