"""The chunked training loss equals the whole-logits loss (value and LoRA gradients)."""
import pytest
import torch

from loraprune import LoRAPruner
from loraprune.method.loss import training_loss
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


def test_chunked_loss_at_a_temperature_equals_whole_logits_loss():
    batch = random_batches(n=1, batch=2, seq=10, seed=5)[0]
    batch = dict(batch, labels=batch["input_ids"].clone())

    def run(chunk):
        pruner = LoRAPruner(tiny_model("llama"), ratio=0.5, lora_dropout=0.0, seed=1, loss_chunk=chunk, distill=0.7,
                            distill_temperature=2.5)
        with torch.no_grad():
            for p in pruner.lora_parameters():
                p.normal_(0, 0.05)
        loss = training_loss(pruner, batch, pruner.config)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in pruner.lora_parameters()]

    (whole, g_whole), (chunked, g_chunked) = run(0), run(4)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_chunked, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _saved_vocab_wide(chunk):
    """Elements of the tensors autograd keeps for backward that have a vocabulary-sized dimension."""
    pruner = LoRAPruner(tiny_model("llama"), ratio=0.5, lora_dropout=0.0, seed=1, loss_chunk=chunk, distill=0.5)
    vocab = pruner.model.config.vocab_size
    batch = random_batches(n=1, batch=2, seq=16, seed=6)[0]
    batch = dict(batch, labels=batch["input_ids"].clone())
    saved = []

    def pack(t):
        saved.append(t.numel() if vocab in t.shape else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = training_loss(pruner, batch, pruner.config)
    loss.backward()
    return sum(saved)


def test_chunked_loss_keeps_no_logits_for_backward():
    assert _saved_vocab_wide(0) > 0  # the whole-logits path keeps them: the probe sees them
    assert _saved_vocab_wide(8) == 0


def test_a_trained_head_gets_its_gradient():
    batch = random_batches(n=1, batch=2, seq=10, seed=7)[0]
    batch = dict(batch, labels=batch["input_ids"].clone())
    grads = []
    for chunk in (0, 4):
        pruner = LoRAPruner(tiny_model("llama"), ratio=0.5, lora_dropout=0.0, seed=1, loss_chunk=chunk, distill=0.5)
        head = pruner.model.get_output_embeddings()
        head.weight.requires_grad_(True)
        training_loss(pruner, batch, pruner.config).backward()
        grads.append(head.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
