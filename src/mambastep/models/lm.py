"""The language-model API shared by every family, and the shell of the SSM families.

``LanguageModel`` holds what every family shares: ``forward``, ``prefill`` and
``step`` with their checks, and the LM head; a family supplies ``new_state``
and ``_hidden``. ``SSMLanguageModel`` is the shell of Mamba and Mamba-2:

embedding -> n_layer x (RMSNorm -> mixer, residual add) -> RMSNorm -> LM head.

A family supplies its mixer. The residual stream is kept in float32 when the
config says ``residual_in_fp32``. An eager decode step on the CPU runs the whole stack, the final
norm and the LM head in one call of the mixers' fused step where they have one
(``SSMLanguageModel.takes_fused_step``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor, nn

from mambastep.config import ModelConfig
from mambastep.memory import place_in_huge_pages
from mambastep.models.int8 import Int8Linear
from mambastep.models.linear import Linear, takes_matvec
from mambastep.ops import cpu
from mambastep.settings import EngineSettings, log
from mambastep.state import LayerState, ModelState, SSMLayerState, StateError

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 over groups of ``group_size``.

    With ``fused_kernel`` (set by ``LanguageModel.configure`` from the ``scan`` setting), float32
    inference on the CPU takes the one-pass kernel ``ops.cpu.rms_norm``; PyTorch's operators
    made three passes over the activations and their temporaries."""

    fused_kernel = False

    def __init__(self, size: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.group_size = group_size or size

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.fused_kernel
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype == torch.float32
            and not torch.compiler.is_compiling()
            and not cpu.wants_grad(x, self.weight)
        ):
            return cpu.rms_norm(x, self.weight, self.eps, self.group_size)
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


class LanguageModel(nn.Module, ABC):
    """A language model that takes a state and returns the next: the API of every family.

    Subclasses supply ``new_state`` and ``_hidden``, and name the
    checkpoint tensors of their input and output embeddings (the loader ties
    them when the config says so) and the derived buffers a checkpoint may
    carry besides weights (the loader drops them).
    """

    config: ModelConfig
    settings: EngineSettings = EngineSettings(scan="torch")  # until configure() is called
    _compiled_step = None
    embedding_weight: ClassVar[str]
    head_weight: ClassVar[str]
    derived_buffers: ClassVar[tuple[str, ...]] = ()  # suffixes of tensor names

    @property
    def device(self) -> torch.device:
        return self.get_parameter(self.embedding_weight).device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_parameter(self.embedding_weight).dtype

    def configure(self, settings: EngineSettings) -> "LanguageModel":
        """Apply engine settings (kernels, decode backend, threads, the weights' pages); logs the choice once."""
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        fused_matvec = cpu.chosen(settings.matvec)
        if settings.matvec == "fused":
            cpu.kernels()  # a build failure is an error here, not at the first step
        onednn_prompts = cpu.uses_onednn(settings.prompt_matmul)
        fused_kernels = cpu.chosen(settings.scan)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.fused_kernel = fused_kernels
            if isinstance(module, (Linear, Int8Linear)):
                module.fused_matvec = fused_matvec
            if isinstance(module, Linear):
                module.onednn_prompts = onednn_prompts
        # Compiled at the first step (cached on disk); dynamic shapes, so a new batch size compiles at most once more.
        self._compiled_step = torch.compile(self._step_logits, dynamic=True) if settings.decode == "compiled" else None
        moved = place_in_huge_pages(self) if settings.huge_pages else 0
        log.info("engine: %s%s", settings, f"; {moved / 2**20:.0f} MiB of weights moved into huge pages" if moved else "")
        return self

    def tie_embeddings(self) -> None:
        """Make the output head share the input embedding's weight."""
        module, _, name = self.head_weight.rpartition(".")
        setattr(self.get_submodule(module), name, self.get_parameter(self.embedding_weight))

    @abstractmethod
    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
        """The state of an empty prefix for ``batch_size`` sequences."""

    @abstractmethod
    def _hidden(self, tokens: Tensor, layers: list[LayerState]) -> Tensor:
        """Final-normed hidden states (b, l, d); replaces each entry of ``layers`` (the layers'
        states before the tokens) with its next, in place, so that a layer's old state is freed
        as soon as its next exists unless someone else holds it."""

    def _logits(self, hidden: Tensor) -> Tensor:
        """(..., d) hidden states -> (..., vocab) float32 logits."""
        head = self.get_submodule(self.head_weight.rpartition(".")[0])  # a linear layer (vocab, d)
        return head(hidden.to(self.dtype)).float()

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

    def forward(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Logits at every position.

        Args:
            tokens: (b, l) token ids; state: the state before them, or None for a fresh one.

        Returns:
            logits: (b, l, vocab) float32; the state after the last token.
        """
        state = self._check(tokens, state, 2)
        layers = list(state.layers)
        hidden = self._hidden(tokens, layers)
        return self._logits(hidden), ModelState(tuple(layers), state.fingerprint)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Read a prompt of any length; return only the last position's logits.

        Long prompts are processed in pieces of ``settings.prefill_piece`` tokens,
        carrying the state, so memory does not grow with the prompt. A layer's state is
        replaced as its next is computed: unless the caller holds ``state``, one state is alive
        at a time (plus one layer's next), not two.

        Args:
            tokens: (b, l) token ids; state: the state before them, or None.

        Returns:
            logits: (b, vocab) float32 at the last token; the state after it.
        """
        state = self._check(tokens, state, 2)
        layers, fingerprint = list(state.layers), state.fingerprint
        del state  # from here only `layers` holds the states this call made
        piece = self.settings.prefill_piece
        for start in range(0, tokens.shape[1], piece):
            hidden = self._hidden(tokens[:, start : start + piece], layers)
        return self._logits(hidden[:, -1]), ModelState(tuple(layers), fingerprint)

    @torch.no_grad()
    def step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Decode one token per sequence.

        Args:
            token: (b,) token ids; state: the state before them.

        Returns:
            logits: (b, vocab) float32; the next state.
        """
        state = self._check(token, state, 1)
        return (self._compiled_step or self._step_logits)(token, state)

    def _step_logits(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        layers = list(state.layers)
        hidden = self._hidden(token[:, None], layers)  # (b, 1, d)
        return self._logits(hidden[:, 0]), ModelState(tuple(layers), state.fingerprint)


class SSMLanguageModel(LanguageModel):
    """A selective state space language model (Mamba, Mamba-2): the shell around the mixers.

    Parameter names follow the Hugging Face checkpoints (``backbone.embeddings``,
    ``backbone.layers.{i}.mixer``, ``backbone.norm_f``, ``lm_head``).
    """

    embedding_weight = "backbone.embeddings.weight"
    head_weight = "lm_head.weight"

    def __init__(self, config: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, mixers)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    _fused_layers: cpu.FusedLayers | None = None  # the layers' weights as the fused step takes them
    _mixers_seen: tuple[int, list[nn.Module], list[nn.Module]] | None = None  # see _mixers

    def configure(self, settings: EngineSettings) -> "SSMLanguageModel":
        for block in self.backbone.layers:
            block.mixer.configure(settings)
        return super().configure(settings)

    def _apply(self, fn, recurse=True):
        self._fused_layers = None  # .to(), .float(), ... may give the parameters new tensors
        return super()._apply(fn, recurse)

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
        """A zero state for ``batch_size`` sequences (the state of an empty prefix)."""
        device = self.device if device is None else torch.device(device)
        layers = tuple(
            block.mixer.new_state(batch_size, self.dtype, device) for block in self.backbone.layers
        )
        return ModelState(layers, self.config.fingerprint)

    def _embedded(self, tokens: Tensor) -> Tensor:
        """(b, l) token ids -> (b, l, d) the residual stream entering the first layer."""
        x = self.backbone.embeddings(tokens)  # (b, l, d)
        return x.to(torch.float32 if self.config.residual_in_fp32 else self.dtype)

    def _hidden(self, tokens: Tensor, layers: list[SSMLayerState]) -> Tensor:
        return self.backbone.norm_f(self._layers(self._embedded(tokens), layers))

    def _step_logits(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """A decode step. Where the layers take the fused step, the final norm and the head are
        in the same call (in float32: a bfloat16 model's hidden state and logits are not rounded
        to bfloat16 on the way, as the layer by layer step rounds them)."""
        layers = list(state.layers)
        residual = self._embedded(token[:, None])  # (b, 1, d)
        if self.takes_fused_step(residual):
            logits = self._fused_step(residual, layers, logits=True)  # (b, vocab)
        else:
            logits = self._logits(self.backbone.norm_f(self._blocks(residual, layers))[:, 0])
        return logits, ModelState(tuple(layers), state.fingerprint)

    def takes_fused_step(self, residual: Tensor) -> bool:
        """Whether the layers read ``residual`` (b, l, d) in one call of the mixers' ``layers_step``
        (a fused CPU step, ``ops.cpu``): for one float32 token per sequence, whatever the batch,
        when the products can take the matvec kernel, outside torch.compile (which traces the
        layers' own operations) and unless a hook watches a ``dt_probe``. A mixer without a fused
        step has ``layers_step = None``. On an AVX2 CPU it beat PyTorch's operators layer by layer
        (whose elementwise work grows with the batch's state) at every batch measured: 2-4x at
        16 sequences; 1.2-1.7x (Mamba-1) and 6-7.6x (Mamba-2) at 64 to 256."""
        if residual.shape[1] != 1 or residual.dtype != torch.float32 or torch.compiler.is_compiling():
            return False
        mixers, probes = self._mixers()
        return (
            mixers[0].layers_step is not None
            and takes_matvec(mixers[0].in_proj, residual[:1])
            and not any(probe._forward_hooks for probe in probes)
        )

    def _mixers(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The mixers and their ``dt_probe``s, looked up again only once a module anywhere has
        been assigned a parameter, buffer or submodule (a decode step asks at every token)."""
        assignments = cpu.module_assignments()
        if self._mixers_seen is None or self._mixers_seen[0] != assignments:
            mixers = [block.mixer for block in self.backbone.layers]
            self._mixers_seen = (assignments, mixers, [mixer.dt_probe for mixer in mixers])
        return self._mixers_seen[1], self._mixers_seen[2]

    def _layers(self, residual: Tensor, layers: list[SSMLayerState]) -> Tensor:
        """The residual stream (b, l, d) through every block; ``layers`` (the blocks' states)
        replaced with the next states, in place."""
        if self.takes_fused_step(residual):
            return self._fused_step(residual, layers, logits=False)[:, None]
        return self._blocks(residual, layers)

    def _blocks(self, residual: Tensor, layers: list[SSMLayerState]) -> Tensor:
        """The residual stream (b, l, d) through the blocks one by one; ``layers`` replaced in place."""
        for i, block in enumerate(self.backbone.layers):
            residual, layers[i] = block(residual, layers[i])
        return residual

    def _fused_step(self, residual: Tensor, layers: list[SSMLayerState], logits: bool) -> Tensor:
        """The fused step of ``residual`` (b, 1, d): the residual stream after the last layer
        (b, d), or with ``logits`` the logits (b, vocab) float32; ``layers`` replaced in place."""
        if self._fused_layers is None or not self._fused_layers.current():
            blocks = self.backbone.layers
            head = cpu.HeadWeights(self.backbone.norm_f.weight, self.lm_head.matvec_operands())
            self._fused_layers = cpu.FusedLayers([block.mixer.step_weights(block.norm.weight) for block in blocks], head)
        mixers, _ = self._mixers()
        out, conv, ssm = mixers[0].layers_step(
            residual[:, 0], self._fused_layers, [s.conv for s in layers], [s.ssm for s in layers], logits
        )  # (b, d) or (b, vocab), the next states
        layers[:] = [SSMLayerState(conv=c, ssm=s) for c, s in zip(conv, ssm)]
        return out
