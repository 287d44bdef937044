"""Shared test helpers: tiny random checkpoints written by `transformers` itself, the bundled
model in process, and PostgreSQL servers (`mambastep.serve.local_postgres`)."""

from __future__ import annotations

import os

# Triton's kernels run through its interpreter on the CPU unless a run asks for the GPU with
# TRITON_INTERPRET=0 (benchmarks/gpu_check.sh). Read when triton is imported: before torch is.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest
import torch

import mambastep
from mambastep import ops
from mambastep.serve.local_postgres import PostgresServer
from mambastep.settings import EngineSettings

# PyTorch's operators only, and mambastep's C++ kernels (built on first use): the two backends
# every fast path is tested between. CPP is resolved by the ``cpp`` fixture, which builds them.
TORCH = ops.TORCH

# A trained byte-level Mamba-2 (690k parameters, the bundled default model until 2026-12-04;
# tests/data/README.md): the servers and sessions of the tests read text one byte per token.
BYTE_MODEL = Path(__file__).parent / "data" / "byte-model"

# Tolerances per dtype for fast ops against the float64 reference.
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    # bf16 inputs are cast up exactly; the op then runs in fp32, so fp32 rounding is all that differs.
    torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
}


ACTIVATION_MAX = 127 * 128  # int8 weights multiply activations rounded to integers of this size


def activations_as_multiplied(x: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """What the matvec kernel multiplies weights of each storage by (in x's dtype): the
    activations as they are (float32 weights), as the sum of the bfloat16 nearest to them and the
    bfloat16 nearest to the rest (bfloat16 weights), or rounded per row to integers of at most
    ACTIVATION_MAX times the row's largest magnitude / ACTIVATION_MAX (int8 weights)."""
    if weight_dtype is torch.bfloat16:  # infinities and NaNs as they are; finite beyond bfloat16's range: its largest
        x32 = x.float()
        high = x32.bfloat16().float()
        truncated = (x32.view(torch.int32) & -65536).view(torch.float32)
        finite = x32.isfinite()
        high = torch.where(finite & high.isinf(), truncated, high)
        rest = torch.where(finite, x32 - high, 0.0).bfloat16().float()
        return (high + rest).to(x.dtype)
    if weight_dtype is torch.int8:  # in float32 operations, as the kernel computes q and the scale
        x32 = x.float()
        largest = x32.abs().amax(-1, keepdim=True)
        q = (x32 * (ACTIVATION_MAX / largest)).round().clamp(-ACTIVATION_MAX, ACTIVATION_MAX)
        return torch.where(largest > 0, q.double() * (largest / ACTIVATION_MAX).double(), 0.0).to(x.dtype)
    return x


def round_product_inputs(model: torch.nn.Module, weight_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Make a reference model's linear layers take their inputs as the matvec kernel does for
    weights of ``weight_dtype`` (each layer's own weights' where None), whatever path their
    products then take."""
    from mambastep.models.int8 import Int8Linear
    from mambastep.models.linear import Linear

    for module in model.modules():
        if isinstance(module, (Linear, Int8Linear)):
            dtype = weight_dtype or (torch.int8 if isinstance(module, Int8Linear) else module.weight.dtype)
            module.register_forward_pre_hook(
                lambda _, args, d=dtype: (activations_as_multiplied(args[0], d), *args[1:])
            )
    return model


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every weight off its initial value so that no term is trivially zero or one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.05 if name.endswith("A_log") else 0.2
            p.add_(scale * torch.randn(p.shape, generator=gen))


def make_hf_model(family: str = "mamba", seed: int = 0, **config) -> torch.nn.Module:
    """A random `transformers` Mamba, Mamba-2 or GPT-NeoX LM, its weights moved off their initial values."""
    from transformers import (
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        Mamba2Config,
        Mamba2ForCausalLM,
        MambaConfig,
        MambaForCausalLM,
    )

    torch.manual_seed(seed)
    if family == "mamba":
        defaults = dict(vocab_size=97, hidden_size=16, num_hidden_layers=2, state_size=4)
        model = MambaForCausalLM(MambaConfig(**{**defaults, **config}))
    elif family == "gpt_neox":
        defaults = dict(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            rotary_pct=0.5,
        )
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**{**defaults, **config}))
    else:
        defaults = dict(
            vocab_size=97, hidden_size=16, num_hidden_layers=2, state_size=4, num_heads=4, head_dim=8, n_groups=1
        )
        model = Mamba2ForCausalLM(Mamba2Config(**{**defaults, **config}))
    _perturb(model, seed)
    return model.eval()


def make_hf_checkpoint(path: Path, family: str = "mamba", seed: int = 0, **config) -> Path:
    """Save a random `transformers` Mamba, Mamba-2 or GPT-NeoX LM with ``save_pretrained`` and return its directory."""
    make_hf_model(family, seed, **config).save_pretrained(path)
    return path


def hf_reference(path: Path):
    """The `transformers` model saved at ``path``, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def random_tokens(vocab_size: int, b: int, l: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


def assert_greedy_equals_transformers(model, ref, prompt_len: int = 7, new_tokens: int = 12) -> None:
    """Our prefill + argmax steps give the tokens of `transformers`' greedy ``generate``."""
    prompt = random_tokens(model.config.vocab_size, 1, prompt_len)
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)[0, prompt_len:]
    assert len(expected) == new_tokens
    last, state = model.prefill(prompt)
    ours = []
    for _ in range(new_tokens):
        token = last.argmax(-1)
        ours.append(int(token))
        last, state = model.step(token, state)
    assert ours == expected.tolist()


def assert_prefill_then_steps_equal_forward(model, length: int, prefixes: tuple[int, ...]) -> None:
    """Prefilling a prefix and stepping through the rest gives the logits of one forward pass."""
    tokens = random_tokens(model.config.vocab_size, 2, length)
    full, _ = model(tokens)
    for prefix in prefixes:
        last, state = model.prefill(tokens[:, :prefix])
        torch.testing.assert_close(last, full[:, prefix - 1], atol=1e-5, rtol=1e-5)
        for t in range(prefix, length):
            last, state = model.step(tokens[:, t], state)
            torch.testing.assert_close(last, full[:, t], atol=1e-5, rtol=1e-5)


def original_checkpoint(model: torch.nn.Module, out_dir: Path, vocab_size: int | None = None) -> Path:
    """Write a `transformers` Mamba or Mamba-2 LM in the original state-spaces format of ``mamba_ssm``.

    Built from the `transformers` model alone (never through mambastep): config.json with the
    original keys, and the model's state dict under the original names (``backbone.embedding``,
    ``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm``, ``backbone.norm_f``,
    ``lm_head``) in pytorch_model.bin.

    ``vocab_size``: the unpadded vocabulary to write in config.json, with
    ``pad_vocab_size_multiple`` 8, as the published checkpoints do: their embedding has the
    vocabulary rounded up to a multiple of 8 rows (the model's own ``vocab_size``), their
    config.json the unpadded number. None: the model's vocabulary, with no padding (multiple 1).
    """
    c = model.config
    if vocab_size is None:
        vocab_size, multiple = c.vocab_size, 1
    else:
        multiple = 8
        assert vocab_size + (-vocab_size % multiple) == c.vocab_size, "the model's vocabulary must be the padded one"
    ssm_cfg = {
        "d_state": c.state_size,
        "d_conv": c.conv_kernel,
        "expand": c.expand,
        "conv_bias": c.use_conv_bias,
        "bias": c.use_bias,
    }
    if c.model_type == "mamba":
        ssm_cfg["dt_rank"] = c.time_step_rank
    else:
        assert c.model_type == "mamba2", c.model_type
        ssm_cfg.update(layer="Mamba2", headdim=c.head_dim, ngroups=c.n_groups, dt_limit=list(c.time_step_limit))
    config = {
        "d_model": c.hidden_size,
        "n_layer": c.num_hidden_layers,
        "vocab_size": vocab_size,
        "ssm_cfg": ssm_cfg,
        "rms_norm": True,
        "residual_in_fp32": c.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": multiple,
        "tie_embeddings": c.tie_word_embeddings,
    }
    # transformers' names are the original ones but for the embedding ("embeddings" there); a tied
    # lm_head.weight is in the state dict as well, as mamba_ssm saves it.
    tensors = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config))
    torch.save(tensors, out_dir / "pytorch_model.bin")
    return out_dir


def to_original_format(hf_dir: Path, out_dir: Path, vocab_size: int | None = None) -> Path:
    """Rewrite a `transformers` checkpoint in the original state-spaces format (config.json + pytorch_model.bin),
    from the `transformers` model it holds (see `original_checkpoint`)."""
    return original_checkpoint(hf_reference(hf_dir), out_dir, vocab_size)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine the threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def local(one_thread):
    """The byte-level test model and its tokenizer in this process, on one thread (as the test servers run)."""
    model = mambastep.load(BYTE_MODEL, settings=EngineSettings(threads=1))
    return model, mambastep.load_tokenizer(BYTE_MODEL)


@pytest.fixture
def mamba_dir(tmp_path: Path) -> Path:
    return make_hf_checkpoint(tmp_path / "mamba")


@pytest.fixture
def mamba2_dir(tmp_path: Path) -> Path:
    return make_hf_checkpoint(tmp_path / "mamba2", family="mamba2", n_groups=2)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for this test session (Debian's postgresql package), deleted at its end."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return postgres.create_database()


@pytest.fixture
def own_postgres():
    """A PostgreSQL server of this test alone, to stop and start (deleted at its end)."""
    server = PostgresServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def cpp() -> ops.Backend:
    """The backend of mambastep's C++ CPU kernels, built (for ``MAMBASTEP_CPU_ISA``) if need be."""
    return ops.resolve(EngineSettings(scan="cpp", matvec="cpp"), "cpu")


def pytest_report_header(config) -> str:
    """Which instruction set the C++ kernels of this run use."""
    from mambastep.ops.cpu import build

    try:
        return f"mambastep CPU kernels: {build.load()} (MAMBASTEP_CPU_ISA={build.requested_isa()})"
    except (RuntimeError, OSError, ValueError) as err:
        return f"mambastep CPU kernels: unavailable ({err})"
