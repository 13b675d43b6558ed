"""The model zoo: small models holding the cases that break naive loaders (tests and the conformance kit)."""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import nn


class HardCases(nn.Module):
    """One small model holding every case that breaks naive loaders.

    Tied weights (embedding <-> output), a non-contiguous parameter, BatchNorm buffers
    (int64 ``num_batches_tracked``), a non-persistent buffer, float32/float16/bfloat16/
    int64/bool tensors, a scalar and an empty tensor, and nested containers.
    """

    positions: torch.Tensor  # (buffers, registered below)
    mask: torch.Tensor
    scale: torch.Tensor

    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.BatchNorm1d(dim), nn.GELU()) for _ in range(2)
        )
        self.heads = nn.ModuleDict({"out": nn.Linear(dim, vocab, bias=False)})
        self.heads["out"].weight = self.embed.weight  # tied: one Parameter under two names
        self.transposed = nn.Parameter(torch.randn(dim, dim).t())  # non-contiguous
        self.fp16 = nn.Parameter(torch.randn(dim, dtype=torch.float16))
        self.bf16 = nn.Parameter(torch.randn(dim, dtype=torch.bfloat16))
        self.register_buffer("positions", torch.arange(vocab), persistent=False)
        self.register_buffer("mask", torch.rand(dim) > 0.5)
        self.register_buffer("scale", torch.tensor(0.5))  # 0-dim
        self.empty = nn.Parameter(torch.empty(0, dim))
        for block in self.blocks:  # non-trivial running stats, so buffers matter for the output
            norm = cast(nn.Sequential, block)[1]
            norm.get_buffer("running_mean").uniform_(-1, 1)
            norm.get_buffer("running_var").uniform_(0.5, 2)
            norm.get_buffer("num_batches_tracked").fill_(7)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids % self.positions.numel()).mean(1)
        for block in self.blocks:
            h = block(h)
        h = h @ self.transposed + self.fp16.float() + self.bf16.float()
        h = torch.where(self.mask, h, -h) * self.scale + self.empty.sum()
        return self.heads["out"](h)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    return BertModel(cfg)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class _HFOutput(nn.Module):
    """Wraps a Hugging Face model so it returns one tensor (the zoo compares tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


ZOO: dict[str, Callable[[], nn.Module]] = {
    "hard_cases": HardCases,
    "bert": lambda: _HFOutput(_tiny_bert()),
    "gpt2": lambda: _HFOutput(_tiny_gpt2()),
}


def zoo_model(name: str, seed: int = 0) -> nn.Module:
    """A zoo model in eval mode, deterministic for a given seed."""
    torch.manual_seed(seed)
    return ZOO[name]().eval()


def zoo_input(batch: int = 3, seq: int = 8, vocab: int = 50, seed: int = 1) -> torch.Tensor:
    """Token ids every zoo model accepts."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
