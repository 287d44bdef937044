"""The language-model API shared by every family, and the shell of the SSM families.

``LanguageModel`` holds what every family shares: ``forward``, ``prefill`` and ``step`` with
their checks, the LM head, the engine settings and the backend they resolve to; a family
supplies ``new_state`` and ``_hidden``. ``SSMLanguageModel`` is the shell of Mamba and Mamba-2:

embedding -> n_layer x (RMSNorm -> mixer, residual add) -> RMSNorm -> LM head.

A family supplies its mixer. The residual stream is kept in float32 when the config says
``residual_in_fp32``. Every module passes the model's backend (``ops.backend``) to the ops it
calls, and the ops choose their kernels: no module here knows which one runs.
"""

from __future__ import annotations

import hashlib
import weakref
from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import ClassVar

import torch
from torch import Tensor, nn

from mambastep import ops
from mambastep.memory import place_in_huge_pages
from mambastep.models.config import ModelConfig
from mambastep.models.cuda_graphs import GraphedStep
from mambastep.models.int8 import Int8Linear
from mambastep.models.linear import Linear
from mambastep.models.state import LayerState, ModelState, SSMLayerState, StateError
from mambastep.ops.backend import TORCH, Backend
from mambastep.ops.stack_step import HeadWeights, PreparedStack, module_assignments, takes_stack_step
from mambastep.settings import EngineSettings, log


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in float32 over groups of ``group_size``."""

    def __init__(self, size: int, eps: float, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self.group_size = group_size or size

    def forward(self, x: Tensor, backend: Backend = TORCH) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.group_size, backend=backend)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, mixer: nn.Module, d_model: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.mixer = mixer

    def forward(self, residual: Tensor, state: SSMLayerState, backend: Backend) -> tuple[Tensor, SSMLayerState]:
        y, state = self.mixer(self.norm(residual, backend), state, backend)
        return residual + y.to(residual.dtype), state


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(m, config.d_model, config.norm_eps) for m in mixers)
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)


class _WeightsOf:
    """The digest of a model's weights, asked for when a state the model made is saved. It
    holds the model weakly: a state does not keep its model alive."""

    def __init__(self, model: LanguageModel):
        self._model = weakref.ref(model)

    def __call__(self) -> str | None:
        model = self._model()
        return None if model is None else model.weights_digest()


class LanguageModel(nn.Module, ABC):
    """A language model that takes a state and returns the next: the API of every family.

    Subclasses supply ``new_state`` and ``_hidden``, and name the checkpoint tensors of their
    input and output embeddings (the loader ties them when the config says so) and the derived
    buffers a checkpoint may carry besides weights (the loader drops them).
    """

    config: ModelConfig
    # Until configure() is called: PyTorch's operators only.
    settings: EngineSettings = EngineSettings(scan="torch", matvec="torch", prompt_matmul="torch")
    embedding_weight: ClassVar[str]
    head_weight: ClassVar[str]
    derived_buffers: ClassVar[tuple[str, ...]] = ()  # suffixes of tensor names
    # A state that does not grow with the tokens: CUDA graphs can replay its steps.
    fixed_size_state: ClassVar[bool] = False
    _compiled_step = None
    _graphed_step: GraphedStep | None = None  # made at the first step that takes graphs
    _backend: Backend | None = None  # resolved from the settings for the weights' device; None: not yet
    _digest: tuple[tuple, str] | None = None  # (what the weights were, their digest), see weights_digest
    _weights_of: _WeightsOf | None = None

    @property
    def device(self) -> torch.device:
        return self.get_parameter(self.embedding_weight).device

    @property
    def dtype(self) -> torch.dtype:
        return self.get_parameter(self.embedding_weight).dtype

    @property
    def backend(self) -> Backend:
        """The kernels this model's ops take: its settings resolved for its device (``ops.backend``)."""
        if self._backend is None:
            self._backend = ops.resolve(self.settings, self.device)
        return self._backend

    def configure(self, settings: EngineSettings) -> LanguageModel:
        """Apply engine settings (kernels, decode backend, threads, the weights' pages); logs the choice once.

        Raises:
            RuntimeError, ValueError: a kernel asked for explicitly ("cpp", "onednn") is not available here;
                decode="graphs" for a model that is not a Mamba or Mamba-2 on a CUDA GPU.
        """
        if settings.decode == "graphs" and not (self.fixed_size_state and self.device.type == "cuda"):
            raise ValueError(
                f"decode='graphs' replays CUDA graphs of a Mamba or Mamba-2 model on a CUDA GPU, "
                f"not of a {self.config.family} model on {self.device}: choose 'auto' or 'eager'"
            )
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self._backend = ops.resolve(settings, self.device)  # an explicit kernel that cannot run fails here
        # Traced at the first step of every process; Inductor's code is cached on disk. Static shapes at first
        # (dynamic=True would make the norms' eps symbolic, and Dynamo traces twice to undo it); a second
        # batch size compiles once more, with the batch dynamic from then on (batch 1 keeps a graph of its own).
        self._compiled_step = torch.compile(self._step_logits, dynamic=None) if settings.decode == "compiled" else None
        self._graphed_step = None
        moved = place_in_huge_pages(self) if settings.huge_pages else 0
        log.info(
            "engine: %s (%s)%s",
            settings,
            self._backend,
            f"; {moved / 2**20:.0f} MiB of weights moved into huge pages" if moved else "",
        )
        return self

    def _apply(self, fn, recurse=True):
        self._backend = None  # .to(device) may move the weights to a device with other kernels
        self._graphed_step = None  # and graphs replay the weights they were captured with
        return super()._apply(fn, recurse)

    def tie_embeddings(self) -> None:
        """Make the output head share the input embedding's weight."""
        module, _, name = self.head_weight.rpartition(".")
        setattr(self.get_submodule(module), name, self.get_parameter(self.embedding_weight))

    def weights_digest(self) -> str:
        """A digest of the weights (SHA-256 of every tensor's name, dtype, shape and bytes; 16
        hex digits). States and sessions record it, so that one saved with other weights of the
        same shape is not continued by mistake. Computed once, and again only after a weight
        has changed (in place, or a tensor or layer replaced)."""
        tensors = self.state_dict()
        if any(t.is_inference() for t in tensors.values()):
            seen = None  # inference tensors keep no version: whether they changed cannot be told
        else:
            seen = (module_assignments(), tuple((t.data_ptr(), t._version) for t in tensors.values()))
        if seen is not None and self._digest is not None and self._digest[0] == seen:
            return self._digest[1]
        digest = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(torch.uint8).numpy())
        self._digest = None if seen is None else (seen, digest.hexdigest()[:16])
        return digest.hexdigest()[:16]

    def state_of(self, layers: list[LayerState]) -> ModelState:
        """A state of this model made of ``layers`` (one state per layer), which records that
        this model made it."""
        if self._weights_of is None:
            self._weights_of = _WeightsOf(self)
        return ModelState(tuple(layers), self.config.fingerprint, self._weights_of)

    def info(self) -> dict:
        """What a user wants to know before running the model: family, size and state cost (the
        state of one sequence with no context, and what it grows by per token of context)."""
        params = {id(p): p for p in self.parameters()}.values()  # tied weights once
        int8 = [m.weight_int8 for m in self.modules() if isinstance(m, Int8Linear)]
        # weights, int8 and scales; a tied weight once (by identity: on the meta device no tensor has an address)
        tensors = {id(t): t for t in self.state_dict(keep_vars=True).values()}.values()
        state = self.new_state(batch_size=1)
        return {
            "family": self.config.family,
            "fingerprint": self.config.fingerprint,
            "config": asdict(self.config),
            "parameters": sum(t.numel() for t in [*params, *int8]),
            "weight_bytes": sum(t.numel() * t.element_size() for t in tensors),
            "dtype": str(self.dtype).removeprefix("torch."),
            "state_bytes_per_sequence": state.nbytes,
            "state_bytes_per_token": state.nbytes_per_token,
        }

    @abstractmethod
    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
        """The state of an empty prefix for ``batch_size`` sequences."""

    @abstractmethod
    def _hidden(self, tokens: Tensor, layers: list[LayerState]) -> Tensor:
        """Final-normed hidden states (b, l, d); replaces each entry of ``layers`` (the layers'
        states before the tokens) with its next, in place, so that a layer's old state is freed
        as soon as its next exists unless someone else holds it."""

    def _logits(self, hidden: Tensor, widen: bool = True) -> Tensor:
        """(..., d) hidden states -> (..., vocab) logits: float32, or the head's dtype unless ``widen``."""
        head = self.get_submodule(self.head_weight.rpartition(".")[0])  # a linear layer (vocab, d)
        logits = head(hidden.to(self.dtype), self.backend)
        return logits.float() if widen else logits

    def _check(self, tokens: Tensor, state: ModelState | None, ndim: int) -> ModelState:
        if tokens.dim() != ndim:
            raise ValueError(f"tokens must have {ndim} dimension(s), got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
        if ndim == 2 and tokens.shape[1] == 0:
            raise ValueError("tokens must hold at least one token")
        # The range is read eagerly; a compiled graph leaves it to the embedding's own index check
        # rather than break at the two reads.
        eager = not torch.compiler.is_compiling()
        if eager and tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        if state is None:
            return self.new_state(tokens.shape[0])
        if state.fingerprint != self.config.fingerprint:
            raise StateError("this state belongs to another model")
        if state.batch_size != tokens.shape[0]:
            raise StateError(f"state holds {state.batch_size} sequences, tokens hold {tokens.shape[0]}")
        return state

    def forward(
        self, tokens: Tensor, state: ModelState | None = None, *, float_logits: bool = True
    ) -> tuple[Tensor, ModelState]:
        """Logits at every position.

        Args:
            tokens: (b, l) token ids; state: the state before them, or None for a fresh one.
            float_logits: widen the logits to float32. False leaves them in the head's dtype
                (bfloat16 for a bfloat16 model or under a bfloat16 autocast), without a float32
                copy of b x l x vocab values: for a loss that widens them block by block
                (``training.loss.token_nll``).

        Returns:
            logits: (b, l, vocab), float32 unless ``float_logits`` is False; the state after the
            last token.
        """
        state = self._check(tokens, state, 2)
        layers = list(state.layers)
        hidden = self._hidden(tokens, layers)
        return self._logits(hidden, widen=float_logits), self.state_of(layers)

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
        layers = list(state.layers)
        del state  # from here only `layers` holds the states this call made
        piece = self.settings.prefill_piece
        for start in range(0, tokens.shape[1], piece):
            hidden = self._hidden(tokens[:, start : start + piece], layers)
        return self._logits(hidden[:, -1]), self.state_of(layers)

    @torch.no_grad()
    def step(self, token: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Decode one token per sequence.

        Args:
            token: (b,) token ids; state: the state before them.

        Returns:
            logits: (b, vocab) float32; the next state.
        """
        state = self._check(token, state, 1)
        logits, layers = self._decode_step()(token, state.layers)
        return logits, self.state_of(layers)

    def _decode_step(self):
        """What runs a decode step (``settings.decode``): the compiled step, the step from CUDA
        graphs, or the eager step."""
        if self._compiled_step is not None:
            return self._compiled_step
        if not self._takes_graphs():
            return self._step_logits
        if self._graphed_step is None:
            self._graphed_step = GraphedStep(self._step_logits)
        return self._graphed_step

    def _takes_graphs(self) -> bool:
        return self.settings.decode in ("auto", "graphs") and self.fixed_size_state and self.backend.device == "cuda"

    def _step_logits(self, token: Tensor, layers: tuple[LayerState, ...]) -> tuple[Tensor, list[LayerState]]:
        """(b,) tokens and the layers' states -> (b, vocab) logits and the next layer states:
        what ``torch.compile`` compiles for ``decode="compiled"``."""
        layers = list(layers)
        hidden = self._hidden(token[:, None], layers)  # (b, 1, d)
        return self._logits(hidden[:, 0]), layers


class SSMLanguageModel(LanguageModel):
    """A selective state space language model (Mamba, Mamba-2): the shell around the mixers.

    Parameter names follow the Hugging Face checkpoints (``backbone.embeddings``,
    ``backbone.layers.{i}.mixer``, ``backbone.norm_f``, ``lm_head``).

    A decode step goes through the whole stack, the final norm and the LM head in one call of
    the mixers' ``stack_step`` where the backend takes it (``ops.stack_step``), unless a hook
    watches a mixer's ``dt_probe`` (which must then see Δ layer by layer).
    """

    embedding_weight = "backbone.embeddings.weight"
    head_weight = "lm_head.weight"
    fixed_size_state = True
    _prepared: PreparedStack | None = None  # the layers' weights as the stack step takes them
    _mixers_seen: tuple[int, list[nn.Module], list[nn.Module]] | None = None  # see _mixers

    def __init__(self, config: ModelConfig, mixers: list[nn.Module]):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config, mixers)
        self.lm_head = Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def _apply(self, fn, recurse=True):
        self._prepared = None  # .to(), .float(), ... may give the parameters new tensors
        return super()._apply(fn, recurse)

    def new_state(self, batch_size: int = 1, device: torch.device | str | None = None) -> ModelState:
        """A zero state for ``batch_size`` sequences (the state of an empty prefix)."""
        device = self.device if device is None else torch.device(device)
        return self.state_of([block.mixer.new_state(batch_size, self.dtype, device) for block in self.backbone.layers])

    def _embedded(self, tokens: Tensor) -> Tensor:
        """(b, l) token ids -> (b, l, d) the residual stream entering the first layer."""
        x = self.backbone.embeddings(tokens)  # (b, l, d)
        return x.to(torch.float32 if self.config.residual_in_fp32 else self.dtype)

    def _hidden(self, tokens: Tensor, layers: list[SSMLayerState]) -> Tensor:
        residual = self._embedded(tokens)
        if self._takes_stack_step(residual):
            return self.backbone.norm_f(self._stack_step(residual, layers, logits=False)[:, None], self.backend)
        return self.backbone.norm_f(self._blocks(residual, layers), self.backend)

    def _step_logits(self, token: Tensor, layers: tuple[SSMLayerState, ...]) -> tuple[Tensor, list[SSMLayerState]]:
        """A decode step. Where the stack step takes it, the final norm and the head are in the
        same call (in float32: a bfloat16 model's hidden state and logits are not rounded to
        bfloat16 on the way, as the layer by layer step rounds them)."""
        layers = list(layers)
        residual = self._embedded(token[:, None])  # (b, 1, d)
        if self._takes_stack_step(residual):
            logits = self._stack_step(residual, layers, logits=True)  # (b, vocab)
        else:
            logits = self._logits(self.backbone.norm_f(self._blocks(residual, layers), self.backend)[:, 0])
        return logits, layers

    def _takes_stack_step(self, residual: Tensor) -> bool:
        first = self.backbone.layers[0].mixer
        if first.stack_step is None or not takes_stack_step(residual, first.in_proj.operands()[0], self.backend):
            return False  # decided before _mixers(), which torch.compile must not trace
        return not self._watched()

    def _takes_graphs(self) -> bool:
        return super()._takes_graphs() and not self._watched()

    def _watched(self) -> bool:
        """Whether a hook watches a mixer's ``dt_probe``: it must then see Δ at every step, layer
        by layer (a graph would run it only when it is captured)."""
        return any(probe._forward_hooks for probe in self._mixers()[1])

    def _mixers(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The mixers and their ``dt_probe``s, looked up again only once a module anywhere has
        been assigned a parameter, buffer or submodule (a decode step asks at every token)."""
        assignments = module_assignments()
        if self._mixers_seen is None or self._mixers_seen[0] != assignments:
            mixers = [block.mixer for block in self.backbone.layers]
            self._mixers_seen = (assignments, mixers, [mixer.dt_probe for mixer in mixers])
        return self._mixers_seen[1], self._mixers_seen[2]

    def _blocks(self, residual: Tensor, layers: list[SSMLayerState]) -> Tensor:
        """The residual stream (b, l, d) through the blocks one by one; ``layers`` replaced in place."""
        backend = self.backend
        for i, block in enumerate(self.backbone.layers):
            residual, layers[i] = block(residual, layers[i], backend)
        return residual

    def _stack_step(self, residual: Tensor, layers: list[SSMLayerState], logits: bool) -> Tensor:
        """The stack step of ``residual`` (b, 1, d): the residual stream after the last layer
        (b, d), or with ``logits`` the logits (b, vocab) float32; ``layers`` replaced in place."""
        if self._prepared is None or not self._prepared.current():
            blocks = self.backbone.layers
            head = HeadWeights(self.backbone.norm_f.weight, self.lm_head.operands())
            self._prepared = PreparedStack([block.mixer.step_weights(block.norm.weight) for block in blocks], head)
        mixers, _ = self._mixers()
        out, conv, ssm = mixers[0].stack_step(
            residual[:, 0], self._prepared, [s.conv for s in layers], [s.ssm for s in layers], logits
        )  # (b, d) or (b, vocab), the next states
        layers[:] = [SSMLayerState(conv=c, ssm=s) for c, s in zip(conv, ssm)]
        return out
