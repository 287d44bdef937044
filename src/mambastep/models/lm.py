"""The language-model shell shared by every family.

embedding -> n_layer x (RMSNorm -> mixer, residual add) -> RMSNorm -> LM head.
A family supplies its mixer; the shell supplies ``forward``, ``prefill``,
``step`` and ``new_state``. The residual stream is kept in float32 when the
config says ``residual_in_fp32``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambastep.config import ModelConfig
from mambastep.state import ModelState, SSMLayerState, StateError

# Tokens per piece when prefill walks a long prompt: bounds activation memory.
PREFILL_PIECE = 2048


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 over groups of ``group_size``."""

    def __init__(self, size: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.group_size = group_size or size

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        h = x.float().unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(self.weight.dtype).view(shape)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, mixer: nn.Module, d_model: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer

    def forward(self, residual: Tensor, state: SSMLayerState) -> tuple[Tensor, SSMLayerState]:
        y, state = self.mixer(self.norm(residual), state)
        return residual + y.to(residual.dtype), state


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(m, config.d_model, config.norm_eps) for m in mixers)
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


class LanguageModel(nn.Module):
    """A selective state space language model that takes a state and returns the next.

    Parameter names follow the Hugging Face checkpoints (``backbone.embeddings``,
    ``backbone.layers.{i}.mixer``, ``backbone.norm_f``, ``lm_head``).
    """

    def __init__(self, config: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, mixers)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
        """A zero state for ``batch_size`` sequences (the state of an empty prefix)."""
        device = self.device if device is None else torch.device(device)
        layers = tuple(
            block.mixer.new_state(batch_size, self.dtype, device) for block in self.backbone.layers
        )
        return ModelState(layers, self.config.fingerprint)

    def _check(self, tokens: Tensor, state: ModelState | None, ndim: int) -> ModelState:
        if tokens.dim() != ndim:
            raise ValueError(f"tokens must have {ndim} dimension(s), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        if ndim == 2 and tokens.shape[1] == 0:
            raise ValueError("tokens must hold at least one token")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if state is None:
            return self.new_state(tokens.shape[0])
        if state.fingerprint != self.config.fingerprint:
            raise StateError("this state belongs to another model")
        if state.batch_size != tokens.shape[0]:
            raise StateError(f"state holds {state.batch_size} sequences, tokens hold {tokens.shape[0]}")
        return state

    def _hidden(self, tokens: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Final-normed hidden states (b, l, d) and the next state."""
        x = self.backbone.embeddings(tokens)  # (b, l, d)
        residual_dtype = torch.float32 if self.config.residual_in_fp32 else self.dtype
        residual = x.to(residual_dtype)
        layers = []
        for block, layer_state in zip(self.backbone.layers, state.layers):
            residual, layer_state = block(residual, layer_state)
            layers.append(layer_state)
        return self.backbone.norm_f(residual), ModelState(tuple(layers), state.fingerprint)

    def _logits(self, hidden: Tensor) -> Tensor:
        return F.linear(hidden.to(self.lm_head.weight.dtype), self.lm_head.weight).float()

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Logits at every position.

        Args:
            tokens: (b, l) token ids; state: the state before them, or None for a fresh one.

        Returns:
            logits: (b, l, vocab) float32; the state after the last token.
        """
        state = self._check(tokens, state, 2)
        hidden, state = self._hidden(tokens, state)
        return self._logits(hidden), state

    @torch.no_grad()
    def prefill(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Read a prompt of any length; return only the last position's logits.

        Long prompts are processed in pieces of PREFILL_PIECE tokens, carrying the
        state, so memory does not grow with the prompt.

        Args:
            tokens: (b, l) token ids; state: the state before them, or None.

        Returns:
            logits: (b, vocab) float32 at the last token; the state after it.
        """
        state = self._check(tokens, state, 2)
        for start in range(0, tokens.shape[1], PREFILL_PIECE):
            hidden, state = self._hidden(tokens[:, start : start + PREFILL_PIECE], state)
        return self._logits(hidden[:, -1]), state

    @torch.no_grad()
    def step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Decode one token per sequence.

        Args:
            token: (b,) token ids; state: the state before them.

        Returns:
            logits: (b, vocab) float32; the next state.
        """
        state = self._check(token, state, 1)
        hidden, state = self._hidden(token[:, None], state)
        return self._logits(hidden[:, 0]), state
