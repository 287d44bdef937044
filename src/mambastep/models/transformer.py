"""GPT-NeoX / Pythia: the transformer baseline, whose state (a KV cache) grows with every token.

Same API as the SSM models (``new_state``, ``forward``, ``prefill``, ``step``),
so every mambastep command runs on it too. Attention is PyTorch's
``scaled_dot_product_attention``. Parameter names follow the Hugging Face
``GPTNeoXForCausalLM`` checkpoints (``gpt_neox.embed_in``,
``gpt_neox.layers.{i}.attention.query_key_value``, ``embed_out``...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep.models.config import GPTNeoXConfig
from mambastep.models.linear import Linear
from mambastep.models.lm import LanguageModel
from mambastep.models.state import KVLayerState, ModelState
from mambastep.ops.backend import Backend


def rotary_angles(config: GPTNeoXConfig, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles of positions start .. start+length-1: (l, r) each, float32.

    Frequency i of r/2 is base^(-2i/r); each appears twice, once per half of the rotated dims.
    """
    r = config.rotary_dim
    inv_freq = config.rotary_base ** (-torch.arange(0, r, 2, dtype=torch.float32, device=device) / r)  # (r/2,)
    positions = torch.arange(start, start + length, dtype=torch.float32, device=device)
    angles = positions[:, None] * inv_freq  # (l, r/2)
    angles = torch.cat([angles, angles], dim=-1)  # (l, r)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first r dims of every head: (b, l, h, p) -> (b, l, h, p); the other p - r pass through."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (l, 1, r): broadcast over heads
    rotated = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1)


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary positions, reading and extending a KV cache."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.query_key_value = Linear(config.d_model, 3 * config.d_model, bias=config.attention_bias)
        self.dense = Linear(config.d_model, config.d_model, bias=config.attention_bias)

    def forward(
        self, x: Tensor, state: KVLayerState, cos: Tensor, sin: Tensor, backend: Backend
    ) -> tuple[Tensor, KVLayerState]:
        """Args: x (b, l, d), state with the cache of the tokens before, cos/sin (l, r), backend.
        Returns: (b, l, d) and the cache extended by these l tokens."""
        c = self.config
        b, l, _ = x.shape
        qkv = self.query_key_value(x, backend).view(b, l, c.n_heads, 3 * c.head_dim)  # per head [q | k | v]
        q, k, v = qkv.chunk(3, dim=-1)  # (b, l, h, p) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = state.length
        state = state.append(k, v)  # (b, past + l, h, p)
        if l == 1:
            mask, causal = None, False  # one query sees every key
        elif past == 0:
            mask, causal = None, True
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            mask, causal = torch.ones(l, past + l, dtype=torch.bool, device=x.device).tril(past), False
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), state.k.transpose(1, 2), state.v.transpose(1, 2), attn_mask=mask, is_causal=causal
        )  # (b, h, l, p)
        return self.dense(y.transpose(1, 2).reshape(b, l, c.d_model), backend), state


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.d_model, config.d_ff)
        self.dense_4h_to_h = Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor, backend: Backend) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x, backend)), backend)  # (b, l, f) inside


class Layer(nn.Module):
    """x + attn(ln1(x)) + mlp(ln2(x)) with a parallel residual, else x' = x + attn(ln1(x)); x' + mlp(ln2(x'))."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.parallel = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, state: KVLayerState, cos: Tensor, sin: Tensor, backend: Backend
    ) -> tuple[Tensor, KVLayerState]:
        attn, state = self.attention(self.input_layernorm(x), state, cos, sin, backend)
        if self.parallel:
            return self.mlp(self.post_attention_layernorm(x), backend) + attn + x, state
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x), backend) + x, state


class GPTNeoX(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layer))
        self.final_layer_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps)


class TransformerLM(LanguageModel):
    """GPT-NeoX / Pythia language model (``GPTNeoXForCausalLM`` in transformers)."""

    embedding_weight = "gpt_neox.embed_in.weight"
    head_weight = "embed_out.weight"
    # Older checkpoints carry the causal mask and the rotary frequencies; both are rebuilt here.
    derived_buffers = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoX(config)
        self.embed_out = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.tie_embeddings()

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
        """An empty KV cache (length 0) per layer for ``batch_size`` sequences."""
        device = self.device if device is None else torch.device(device)
        c = self.config
        return self.state_of(
            [KVLayerState.zeros(batch_size, c.n_heads, c.head_dim, self.dtype, device) for _ in range(c.n_layer)]
        )

    def _hidden(self, tokens: Tensor, layers: list[KVLayerState]) -> Tensor:
        """Final-normed hidden states (b, l, d); each layer's cache replaced with one l tokens longer."""
        cos, sin = rotary_angles(self.config, layers[0].length, tokens.shape[1], tokens.device)  # (l, r)
        x = self.gpt_neox.embed_in(tokens)  # (b, l, d)
        backend = self.backend
        for i, layer in enumerate(self.gpt_neox.layers):
            x, layers[i] = layer(x, layers[i], cos, sin, backend)
        return self.gpt_neox.final_layer_norm(x)
