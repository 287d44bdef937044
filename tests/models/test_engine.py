"""Engine settings: each fast path gives what the plain path gives."""

import copy
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import mambastep
from mambastep.models.linear import Linear
from mambastep.ops.products import (
    CONVERTED_ROWS,
    MATVEC_ROWS,
    ONEDNN_MIN_FEATURES,
    WIDE_MATVEC_ROWS,
    matvec_rows,
    takes_matvec,
)
from mambastep.runtime.generation import generate_tokens
from mambastep.runtime.sampling import SamplingParams
from mambastep.settings import EngineSettings

from conftest import make_hf_checkpoint, round_product_inputs


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_compiled_decode_equals_eager(tmp_path, family):
    path = make_hf_checkpoint(tmp_path / family, family=family)
    eager = mambastep.load(path, settings=EngineSettings(decode="eager"))
    compiled = mambastep.load(path, settings=EngineSettings(decode="compiled"))
    tokens = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    _, state = eager.prefill(tokens)
    a, b = state, state
    counters.clear()
    for batch in (3, 2):
        a, b = a.select(range(batch)), b.select(range(batch))
        for t in range(4):
            token = tokens[:batch, t]
            la, a = eager.step(token, a)
            lb, b = compiled.step(token, b)
            torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(b.layers[-1].ssm, a.layers[-1].ssm, atol=1e-5, rtol=1e-5)
        if batch == 3:  # one graph serves prefilled and stepped states alike
            assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("family", ["mamba", "mamba2", "gpt_neox"])
def test_compiled_generation_warns_nothing_and_equals_eager(tmp_path, monkeypatch, family):
    """Generation through the compiled step (products by the matvec kernel, whose choice of rows
    torch.compile traces; a growing KV cache) draws eager's tokens, and tracing it raises no warning."""
    path = make_hf_checkpoint(tmp_path / "m", family=family)
    eager = mambastep.load(path, settings=EngineSettings(matvec="cpp"))
    compiled = mambastep.load(path, settings=EngineSettings(matvec="cpp", decode="compiled"))
    prompts = [[5, 17, 3], [40, 2, 9]]  # of one length: a transformer batches no others
    params = SamplingParams(max_new_tokens=6, seed=0)
    want = list(generate_tokens(eager, prompts, params))
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())  # Dynamo warns of a cause once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(generate_tokens(compiled, prompts, params))
    assert [str(w.message) for w in caught] == []
    assert got == want


@pytest.mark.parametrize(
    "family, config",
    [("mamba", dict(hidden_size=24)), ("mamba2", dict(hidden_size=24, num_heads=6, n_groups=2, head_dim=8))],
)
def test_fused_and_torch_scans_give_the_same_prefill(tmp_path, family, config):
    path = make_hf_checkpoint(tmp_path / "m", family=family, **config)
    fused = mambastep.load(path, settings=EngineSettings(scan="cpp"))
    plain = mambastep.load(path, settings=EngineSettings(scan="torch"))
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))
    (lf, sf), (lp, sp) = fused.prefill(tokens), plain.prefill(tokens)
    torch.testing.assert_close(lf, lp, atol=1e-5, rtol=1e-5)
    for a, b in zip(sf.layers, sp.layers):
        torch.testing.assert_close(a.ssm, b.ssm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_prefill_through_the_fused_kernels(tmp_path, family, dtype):
    """A half-precision prompt through the fused conv and scans (float32 inside, rounded once)
    and through PyTorch's operators: each within rounding of a float32 model on the same
    rounded weights (relative error of the whole logits; seen: 1.1e-2 fused and 6.6e-3 PyTorch
    in bfloat16, 9.2e-4 and 8.9e-4 in float16, for Mamba-1; 5.9e-3 and 7.6e-3, 1.1e-3 and 8.5e-4
    for Mamba-2). 70 tokens: a bfloat16 Mamba-2 prompt takes the AMX tiles where the CPU has them
    (ops/cpu/amx_ssd.cpp)."""
    config = dict(hidden_size=24) if family == "mamba" else dict(hidden_size=24, num_heads=6, n_groups=2, head_dim=8)
    path = make_hf_checkpoint(tmp_path / "m", family=family, **config)
    tokens = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    exact = mambastep.load(path, dtype=dtype, settings=EngineSettings(scan="torch")).float()
    want, _ = exact.prefill(tokens)
    for scan in ("cpp", "torch"):
        logits, _ = mambastep.load(path, dtype=dtype, settings=EngineSettings(scan=scan)).prefill(tokens)
        assert ((logits - want).norm() / want.norm()).item() < 2e-2, scan


@pytest.mark.parametrize("family", ["mamba", "mamba_lti", "mamba2"])
def test_fused_and_torch_scans_give_the_same_gradients(tmp_path, family):
    """Training through the fused kernels' backward (the scans, and the conv with its SiLU)
    equals training through the PyTorch scan and conv."""
    if family in ("mamba", "mamba2"):
        path = make_hf_checkpoint(
            tmp_path / "m", family=family, hidden_size=24, **({"num_heads": 6} if family == "mamba2" else {})
        )
    else:
        from mambastep.files.checkpoints import save
        from mambastep.models import MambaLTILM
        from mambastep.models.config import MambaLTIConfig

        torch.manual_seed(0)
        path = save(MambaLTILM(MambaLTIConfig(d_model=24, n_layer=2, vocab_size=97, d_state=4)), tmp_path / "m")
    tokens = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    grads = []
    for scan in ("cpp", "torch"):
        model = mambastep.load(path, settings=EngineSettings(scan=scan))
        logits, _ = model(tokens)
        logits.logsumexp(-1).mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "gpt_neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matvec_decode_equals_pytorch_linear(tmp_path, family, dtype):
    """Decode steps through the fused matvec kernel give PyTorch's linear's logits, for batches
    up to the layers' matvec_rows and above (which take F.linear), and through the compiled step.

    bfloat16: each path is held to a float32 model on the same (bfloat16) weight values, as the
    paths round differently: PyTorch's layers round every output to bfloat16, the fused SSM step
    keeps its activations float32. Outliers of one logit grow with the batch (seen: 0.19 on the
    plain path at 65 sequences), so the bound is on the relative error of the whole logits
    (seen: at most 1.5%; a wrong product gives errors of order 1); the fused path is also held
    logit by logit."""
    path = make_hf_checkpoint(tmp_path / family, family=family)
    plain = mambastep.load(path, dtype=dtype, settings=EngineSettings(matvec="torch"))
    fused = mambastep.load(path, dtype=dtype, settings=EngineSettings(matvec="cpp"))
    compiled = mambastep.load(path, dtype=dtype, settings=EngineSettings(matvec="cpp", decode="compiled"))
    reference = copy.deepcopy(plain).float()
    assert fused.backend.matvec_kernel and not plain.backend.matvec_kernel
    rows = matvec_rows(fused.dtype)
    for batch in (1, 3, rows, rows + 1):
        tokens = torch.randint(0, 97, (batch, 6), generator=torch.Generator().manual_seed(batch))
        _, state = plain.prefill(tokens[:, :3])
        states = [state] * 3 + [reference.prefill(tokens[:, :3])[1]]
        for t in range(3, 6):
            logits = []
            for i, model in enumerate((plain, fused, compiled, reference)):
                out, states[i] = model.step(tokens[:, t], states[i])
                logits.append(out)
            for got in logits[:3]:
                if dtype is torch.float32:  # the same sums in another order
                    torch.testing.assert_close(got, logits[3], atol=1e-5, rtol=1e-5)
                else:
                    assert (got.float() - logits[3]).norm() <= 0.03 * logits[3].norm()
            if dtype is torch.bfloat16:  # the fused path also logit by logit, as before (seen: 0.06 at most)
                torch.testing.assert_close(logits[1].float(), logits[3], atol=0.1, rtol=0.02)


def test_fused_matvec_stays_out_of_training(cpp):
    """A product that would take the kernel takes F.linear when a gradient is wanted."""
    layer = Linear(12, 5)
    x = torch.randn(1, 12)
    assert takes_matvec(x, layer.weight, cpp, layer.bias) is False
    layer(x, cpp).sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert takes_matvec(x, layer.weight, cpp) and not takes_matvec(
            torch.randn(MATVEC_ROWS + 1, 12), layer.weight, cpp
        )
        torch.testing.assert_close(layer(x, cpp), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_matvec_rows_follow_what_pytorch_multiplies_natively(monkeypatch, tmp_path):
    """Float32 weights take the kernel up to MATVEC_ROWS rows; bfloat16 ones as many where PyTorch
    multiplies bfloat16 natively, up to WIDE_MATVEC_ROWS where it would copy them to float32;
    float16 ones never (the kernel does not read them), so a float16 model decodes through F.linear."""
    from mambastep.ops import products as linear

    assert matvec_rows(torch.float32) == MATVEC_ROWS < WIDE_MATVEC_ROWS
    monkeypatch.setattr(linear, "computes_in", lambda d: True)
    assert matvec_rows(torch.bfloat16) == MATVEC_ROWS
    monkeypatch.setattr(linear, "computes_in", lambda d: d != torch.bfloat16)
    assert matvec_rows(torch.bfloat16) == WIDE_MATVEC_ROWS
    assert matvec_rows(torch.float16) == 0
    monkeypatch.undo()
    path = make_hf_checkpoint(tmp_path / "m")
    half = mambastep.load(path, dtype=torch.float16, settings=EngineSettings(matvec="cpp"))
    plain = mambastep.load(path, dtype=torch.float16, settings=EngineSettings(matvec="torch"))
    tokens = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(0))
    (_, a), (_, b) = half.prefill(tokens), plain.prefill(tokens)
    torch.testing.assert_close(half.step(tokens[:, 0], a)[0], plain.step(tokens[:, 0], b)[0], atol=0, rtol=0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(scan="fast"),
        dict(matvec="blas"),
        dict(prompt_matmul="mkl"),
        dict(decode="jit"),
        dict(scan_chunk=0),
        dict(threads=0),
        dict(huge_pages="yes"),
    ],
)
def test_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineSettings(**bad)


@pytest.mark.parametrize("name", ["scan", "matvec"])
def test_a_renamed_setting_value_names_the_new_one(name):
    with pytest.raises(ValueError, match=f"{name}='fused' is now called 'cpp': use {name}='cpp'"):
        EngineSettings(**{name: "fused"})


FUSED_STEP_SHAPES = [
    ("mamba", dict(d_model=24, d_state=5, d_conv=4)),
    ("mamba", dict(d_model=40, d_state=24, d_conv=2, dt_rank=3)),  # three vectors of state per channel
    ("mamba2", dict(d_model=24, d_state=5, d_conv=4, head_dim=6)),  # 8 heads, 1 group, D per head
    ("mamba2", dict(d_model=20, d_state=16, d_conv=2, head_dim=5, n_groups=2, D_has_hdim=True, dt_limit=(0.01, 0.2))),
]


@pytest.mark.parametrize("family, shape", FUSED_STEP_SHAPES)
@pytest.mark.parametrize("biases", [dict(conv_bias=True, bias=False), dict(conv_bias=False, bias=True)])
@pytest.mark.parametrize("weights", ["float32", "bfloat16", "int8"])
def test_fused_layers_step_equals_the_layers_own_steps(family, shape, biases, weights):
    """The fused CPU step of a stack of layers (one call per step) against the blocks' own steps
    on the same weights, over a few tokens from a random state: awkward widths, groups, dt
    limits, with and without biases, at 3 sequences and at a batch wider than any matvec limit."""
    from mambastep.models import Mamba2LM, MambaLM
    from mambastep.models.config import Mamba2Config, MambaConfig
    from mambastep.models.int8 import quantize_int8

    torch.manual_seed(0)
    config, lm = (MambaConfig, MambaLM) if family == "mamba" else (Mamba2Config, Mamba2LM)
    model = lm(config(n_layer=3, vocab_size=11, **shape, **biases))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    if weights == "int8":
        quantize_int8(model)
    model = model.to(torch.bfloat16 if weights == "bfloat16" else torch.float32).configure(EngineSettings(matvec="cpp"))
    # The reference: the blocks' own steps through F.linear, in float32 on the same weight values
    # (a bfloat16 model's plain step rounds every intermediate to bfloat16; the fused one does not),
    # their products' inputs rounded as the kernel rounds them for bfloat16 and int8 weights.
    reference = copy.deepcopy(model).float().configure(EngineSettings(matvec="torch"))
    round_product_inputs(reference, {"bfloat16": torch.bfloat16, "int8": torch.int8}.get(weights, torch.float32))

    def assert_close_to_scale(got, want):
        # float32: sums in another order and a vectorised exp, relative to the tensor's scale
        # (outputs are differences of larger terms); bfloat16: the conv state is stored in
        # bfloat16 and carried over the steps, and the plain path rounds more often. int8: the
        # products round their inputs, and an input that differs in its last float32 bit between
        # the two paths can round to the neighbouring value, a step of 2^-14 of its row's largest
        # magnitude (amplified here by random models, 3 layers and 3 steps).
        scale = want.abs().max().item()
        rel = {"bfloat16": 2e-2, "int8": 2e-3}.get(weights, 2e-5)
        tol = dict(atol=rel * scale, rtol=rel)
        torch.testing.assert_close(got, want, **tol)

    with torch.no_grad():
        residual = torch.randn(3, 1, shape["d_model"])
        assert model._takes_stack_step(residual)  # an eager step takes it ...
        hook = model.backbone.layers[1].mixer.dt_probe.register_forward_hook(lambda *args: None)
        assert not model._takes_stack_step(residual)  # ... unless Δ is watched (inspect)
        hook.remove()
        assert model._takes_stack_step(residual)
        unwatched, watched = model.backbone.layers[1].mixer.dt_probe, torch.nn.Identity()
        watched.register_forward_hook(lambda *args: None)
        model.backbone.layers[1].mixer.dt_probe = watched  # a probe put in after the mixers were looked up
        assert not model._takes_stack_step(residual)
        model.backbone.layers[1].mixer.dt_probe = unwatched
        assert not model._takes_stack_step(residual.to(torch.bfloat16)) and not model._takes_stack_step(
            residual.expand(3, 2, -1)
        )
    # a few sequences (row groups in the products), then a batch of blocks and the widest rows
    for batch in (3, WIDE_MATVEC_ROWS + 6):
        random = model.new_state(batch)
        fused = type(random)(
            tuple(type(s)(conv=torch.randn_like(s.conv), ssm=torch.randn_like(s.ssm)) for s in random.layers),
            random.fingerprint,
        )
        plain = type(fused)(tuple(type(s)(conv=s.conv.float(), ssm=s.ssm) for s in fused.layers), fused.fingerprint)
        for _ in range(3):
            residual = torch.randn(batch, 1, shape["d_model"])
            with torch.no_grad():
                assert model._takes_stack_step(residual)
                fused_layers, plain_layers = list(fused.layers), list(plain.layers)
                r_fused, r_plain = (
                    model._stack_step(residual, fused_layers, logits=False)[:, None],
                    reference._blocks(residual, plain_layers),
                )
                fused, plain = (type(fused)(tuple(s), fused.fingerprint) for s in (fused_layers, plain_layers))
            assert (
                r_fused.dtype == torch.float32
                and fused.layers[0].conv.dtype == model.dtype
                and fused.layers[0].ssm.dtype == torch.float32
            )
            pairs = [(r_fused, r_plain)] + [
                (a, b) for fl, pl in zip(fused.layers, plain.layers) for a, b in ((fl.conv, pl.conv), (fl.ssm, pl.ssm))
            ]
            for got, want in pairs:
                assert_close_to_scale(got.float(), want.float())
        # A whole decode step: the embedding, the fused layers, then the final norm and the head in the same call.
        token = torch.randint(0, 11, (batch,), generator=torch.Generator().manual_seed(batch))
        got, _ = model.step(token, fused)
        want, _ = reference.step(token, plain)
        assert got.dtype == torch.float32 and got.shape == (batch, 11)
        assert_close_to_scale(got, want)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "gpt_neox"])
@pytest.mark.parametrize("how", ["bfloat16 weights", "bfloat16 autocast", "float32"])
def test_logits_in_the_heads_dtype_widen_to_the_float32_logits(tmp_path, family, how):
    """forward(float_logits=False) skips only the widening: the same values in the head's dtype,
    and through token_nll the same loss and the same gradients, bit for bit."""
    from mambastep.training.loss import token_nll

    path = make_hf_checkpoint(tmp_path / "m", family=family)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    dtype = torch.bfloat16 if how == "bfloat16 weights" else torch.float32
    results = []
    for widen in (True, False):
        model = mambastep.load(path, dtype=dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "bfloat16 autocast"):
            logits, _ = model(tokens, float_logits=widen)  # (2, 9, vocab)
        loss = token_nll(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).mean()
        loss.backward()
        results.append((logits, loss, {name: p.grad for name, p in model.named_parameters()}))
    (wide, wide_loss, wide_grads), (own, own_loss, own_grads) = results
    assert wide.dtype == torch.float32 and own.dtype == (torch.float32 if how == "float32" else torch.bfloat16)
    assert torch.equal(own.float(), wide)
    assert torch.equal(own_loss, wide_loss)
    for name, grad in own_grads.items():
        assert torch.equal(grad, wide_grads[name]), name


@pytest.mark.parametrize("bad", [-1, 11])
def test_token_ids_outside_the_vocabulary_are_refused_eager_and_compiled(bad):
    """Eager, a clear error names the range; compiled (the read would break the graph), the
    embedding's own index check still refuses them."""
    model = _tiny_ssm("mamba2")
    tokens = torch.tensor([[1, 2, bad]])
    for call in (model.forward, model.prefill):
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
            call(tokens)
    with pytest.raises(RuntimeError, match="index out of (range|bounds)"):
        torch.compile(model)(tokens)
    logits, _ = torch.compile(model)(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(logits, model(torch.tensor([[1, 2, 3]]))[0])


def _tiny_ssm(family: str, n_layer: int = 2):
    """A random Mamba or Mamba-2 model of width 16, its products through the fused kernel."""
    from mambastep.models import Mamba2LM, MambaLM
    from mambastep.models.config import Mamba2Config, MambaConfig

    config = (
        MambaConfig(n_layer=n_layer, vocab_size=11, d_model=16, d_state=4)
        if family == "mamba"
        else Mamba2Config(n_layer=n_layer, vocab_size=11, d_model=16, d_state=4, head_dim=8)
    )
    return (MambaLM if family == "mamba" else Mamba2LM)(config).configure(EngineSettings(matvec="cpp"))


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_fused_step_follows_changes_to_the_weights(family):
    """A model prepares its layers' weights for the fused step once (float32 copies, conv taps, A = -exp(A_log))
    and keeps them while they match its parameters: after an in-place update, a replaced layer or a
    dtype change, its next step is still the one its current weights give."""
    from mambastep.models.int8 import quantize_int8
    from mambastep.ops.stack_step import PreparedStack

    torch.manual_seed(0)
    model = _tiny_ssm(family)
    token = torch.tensor([3, 5])

    def check_step(tol=1e-5):
        """One fused step against the layers' own steps through F.linear, from the same state (the
        products' inputs rounded as the kernel rounds them)."""
        reference = round_product_inputs(copy.deepcopy(model).configure(EngineSettings(matvec="torch")))
        state = model.new_state(2)
        with torch.no_grad():
            model.step(token, state)  # prepares (or keeps) the fused weights
            prepared = model._prepared
            got, _ = model.step(token, state)
            assert model._prepared is prepared and prepared.current()  # kept between steps
            want, _ = reference.step(token, reference.new_state(2))
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
        return prepared

    prepared = check_step()
    mixer = model.backbone.layers[1].mixer
    with torch.no_grad():  # an optimizer step, or load_state_dict, writes in place
        mixer.A_log.add_(0.5)
        mixer.conv1d.weight.mul_(1.5)  # the step reads its taps from a (k, c) copy
        model.backbone.layers[0].norm.weight.mul_(2.0)
    assert not prepared.current()
    prepared = check_step()
    quantize_int8(model)  # replaces the linear layers: their weights are new tensors
    assert not prepared.current()
    # int8: the products' inputs rounded, as in test_fused_layers_step_equals_the_layers_own_steps
    prepared = check_step(tol=2e-3)
    model.to(torch.bfloat16)
    assert model._prepared is None
    check_step(tol=2e-2)
    with torch.inference_mode():  # inference tensors keep no version counter: never kept
        frozen = _tiny_ssm(family, n_layer=1)
    layers = PreparedStack([frozen.backbone.layers[0].mixer.step_weights(frozen.backbone.layers[0].norm.weight)])
    assert not layers.current()


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_fused_step_reuses_only_the_memory_of_dropped_states(monkeypatch, family):
    """Large next SSM states go into the memory of states nothing holds any more (every size
    here, with the threshold at 0): the same steps as fresh memory gives, no state or view still
    held is ever written, and a decode loop's memory does go round."""
    from mambastep.ops import stack_step

    torch.manual_seed(0)
    model = _tiny_ssm(family)
    tokens = torch.randint(0, 11, (6, 3))

    def decode(keep: bool):
        """Logits of each step from a fresh state; every state too if ``keep``."""
        state, logits, kept = model.new_state(3), [], []
        with torch.no_grad():
            for token in tokens:
                out, state = model.step(token, state)
                logits.append(out)
                if keep:
                    kept.append((state, [s.ssm.clone() for s in state.layers]))
        return torch.stack(logits), kept

    fresh, _ = decode(keep=False)  # the default threshold: states this small take fresh memory
    monkeypatch.setattr(stack_step, "STATE_REUSE_BYTES", 0)
    reused, _ = decode(keep=False)
    assert torch.equal(reused, fresh)
    kept_logits, kept = decode(keep=True)
    assert torch.equal(kept_logits, fresh)
    for state, copies in kept:  # states still held were never written by later steps
        assert all(torch.equal(s.ssm, copy) for s, copy in zip(state.layers, copies))

    with torch.no_grad():
        older = model.step(tokens[0], model.new_state(3))[1]
        address = older.layers[0].ssm.data_ptr()
        view, view_copy = older.layers[0].ssm[1], older.layers[0].ssm[1].clone()
        state = model.step(tokens[1], older)[1]
        del older  # only a view of its first layer's state is left
        state = model.step(tokens[2], state)[1]
        assert state.layers[0].ssm.data_ptr() != address and torch.equal(view, view_copy)
        del view
        previous = state.layers[0].ssm.data_ptr()
        state = model.step(tokens[3], state)[1]
        state = model.step(tokens[4], state)[1]  # the memory of two steps back, dropped: reused
        assert state.layers[0].ssm.data_ptr() == previous


def test_fused_layers_step_checks_its_arguments(cpp):
    from mambastep.ops.stack_step import HeadWeights, MambaLayerWeights, PreparedStack
    from mambastep.ops.stack_step import mamba_stack_step as mamba_layers_step

    e, n, k, d, r = 8, 4, 4, 6, 2
    lin = lambda rows, cols: (torch.randn(rows, cols), None, None)  # noqa: E731
    layer = MambaLayerWeights(
        norm=torch.ones(d),
        in_proj=lin(2 * e, d),
        conv_weight=torch.randn(e, 1, k),
        conv_bias=None,
        x_proj=lin(r + 2 * n, e),
        dt_proj=(torch.randn(e, r), None, torch.randn(e)),
        A_log=torch.randn(e, n),
        D=None,
        out_proj=lin(d, e),
    )
    conv, ssm = [torch.randn(1, k - 1, e)] * 2, [torch.randn(1, e, n)] * 2
    residual, convs, ssms = mamba_layers_step(torch.randn(1, d), [layer, layer], conv, ssm, 1e-5)
    assert (
        residual.shape == (1, d)
        and [c.shape for c in convs] == [(1, k - 1, e)] * 2
        and [s.shape for s in ssms] == [(1, e, n)] * 2
    )
    with pytest.raises(RuntimeError, match=r"SSM state \(b, e, n\) must have shape"):
        mamba_layers_step(torch.randn(1, d), [layer], conv[:1], [torch.randn(1, e, n + 1)], 1e-5)
    with pytest.raises(RuntimeError, match="do not fit"):
        mamba_layers_step(torch.randn(1, d), [layer._replace(x_proj=lin(r + 2 * n + 1, e))], conv[:1], ssm[:1], 1e-5)
    with pytest.raises(RuntimeError, match="has no dt_proj bias"):
        mamba_layers_step(
            torch.randn(1, d), [layer._replace(dt_proj=(torch.randn(e, r), None, None))], conv[:1], ssm[:1], 1e-5
        )
    with pytest.raises(RuntimeError, match="two states per layer"):
        mamba_layers_step(torch.randn(1, d), [layer], conv, ssm[:1], 1e-5)
    # With the head: the final norm and the output layer after the last layer, logits instead of the residual.
    vocab, x = 5, torch.randn(1, d)
    head = HeadWeights(norm=torch.rand(d) + 0.5, out=(torch.randn(vocab, d), None, torch.randn(vocab)))
    residual, _, _ = mamba_layers_step(x, [layer], conv[:1], ssm[:1], 1e-5)
    logits, _, _ = mamba_layers_step(x, PreparedStack([layer], head), conv[:1], ssm[:1], 1e-5, logits=True)
    normed = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-5) * head.norm
    torch.testing.assert_close(logits, normed @ head.out[0].T + head.out[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prepared with a head"):
        mamba_layers_step(x, [layer], conv[:1], ssm[:1], 1e-5, logits=True)
    with pytest.raises(RuntimeError, match=r"final norm weight \(d,\) must have shape"):
        mamba_layers_step(
            x, PreparedStack([layer], head._replace(norm=torch.ones(d + 1))), conv[:1], ssm[:1], 1e-5, logits=True
        )


def test_fused_mamba2_layers_step_checks_its_arguments(cpp):
    from mambastep.ops.stack_step import Mamba2LayerWeights
    from mambastep.ops.stack_step import mamba2_stack_step as mamba2_layers_step

    d, e, h, p, n, g, k = 6, 8, 2, 4, 3, 1, 4
    c = e + 2 * g * n
    layer = Mamba2LayerWeights(
        norm=torch.ones(d),
        in_proj=(torch.randn(e + c + h, d), None, None),
        conv_weight=torch.randn(c, 1, k),
        conv_bias=None,
        dt_bias=torch.zeros(h),
        A_log=torch.zeros(h),
        D=torch.ones(h),
        gate_norm=torch.ones(e),
        out_proj=(torch.randn(d, e), None, None),
    )
    conv, ssm = [torch.randn(1, k - 1, c)], [torch.randn(1, h, p, n)]
    residual, convs, ssms = mamba2_layers_step(torch.randn(1, d), [layer], conv, ssm, 1e-5, g, (0.0, float("inf")))
    assert residual.shape == (1, d) and convs[0].shape == (1, k - 1, c) and ssms[0].shape == (1, h, p, n)
    with pytest.raises(RuntimeError, match="do not fit"):  # two groups need 2gn more conv channels
        mamba2_layers_step(torch.randn(1, d), [layer], conv, ssm, 1e-5, 2, (0.0, float("inf")))
    with pytest.raises(RuntimeError, match=r"D \(h,\) or \(e,\) must have shape"):
        mamba2_layers_step(
            torch.randn(1, d), [layer._replace(D=torch.ones(3))], conv, ssm, 1e-5, g, (0.0, float("inf"))
        )
    with pytest.raises(RuntimeError, match="the residual must be float32"):
        mamba2_layers_step(torch.randn(1, d, dtype=torch.float64), [layer], conv, ssm, 1e-5, g, (0.0, float("inf")))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_products_upcast_on_cpus_without_native_kernels(monkeypatch, dtype):
    """Where PyTorch's bfloat16 (float16) matmul is slow, such a layer multiplies in float32 and
    rounds the result back; elsewhere it keeps PyTorch's own product."""
    from mambastep.ops import products as linear

    torch.manual_seed(0)
    layer = Linear(12, 2 * CONVERTED_ROWS + 5).to(dtype)  # converted in two blocks and a part
    x = torch.randn(MATVEC_ROWS + 12, 12).to(dtype)
    monkeypatch.setattr(linear, "computes_in", lambda d: d not in (torch.bfloat16, torch.float16))
    want = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    monkeypatch.setattr(linear, "computes_in", lambda d: True)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias), atol=0, rtol=0)


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_prompt_products_equal_pytorch_linear(bias):
    """oneDNN's matmul gives PyTorch's float32 linear up to summation order, for wide layers,
    whatever the input's leading dimensions; narrow layers, other dtypes and training keep F.linear."""
    from torch.utils.flop_counter import FlopCounterMode

    from mambastep.ops import Backend
    from mambastep.ops.products import takes_onednn

    torch.manual_seed(0)
    layer = Linear(48, ONEDNN_MIN_FEATURES + 8, bias=bias)
    onednn = Backend(onednn_prompts=True)
    for shape in [(2, 40, 48), (300, 48), (1, 48)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert takes_onednn(x, layer.weight)
            want = torch.nn.functional.linear(x, layer.weight, layer.bias)
            with FlopCounterMode(display=False) as counter:
                got = layer(x, onednn)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert counter.get_total_flops() == 2 * x.numel() * layer.out_features
    x = torch.randn(5, 48)
    assert not takes_onednn(x, layer.weight)  # the weight wants a gradient
    assert layer(x, onednn).grad_fn is not None
    with torch.no_grad():
        assert not takes_onednn(x, Linear(48, ONEDNN_MIN_FEATURES - 1).weight)
        assert not takes_onednn(x.double(), layer.weight.double())
        assert not takes_onednn(x.bfloat16(), layer.weight.bfloat16())


@needs_onednn
def test_prompt_matmul_setting(monkeypatch, tmp_path):
    """ "auto" takes oneDNN only where MKL is not tuned for the CPU; a model prefilled with
    oneDNN's products is as close to the float64 model as one prefilled with PyTorch's."""
    from mambastep.ops import backend

    monkeypatch.setattr(backend, "mkl_tuned_here", lambda: True)
    assert not backend.uses_onednn("auto") and backend.uses_onednn("onednn") and not backend.uses_onednn("torch")
    monkeypatch.setattr(backend, "mkl_tuned_here", lambda: False)
    assert backend.uses_onednn("auto")
    path = make_hf_checkpoint(tmp_path / "m", hidden_size=ONEDNN_MIN_FEATURES // 2)  # in_proj: 2 x 2 x hidden outputs
    tokens = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    exact = mambastep.load(path, dtype=torch.float64, settings=EngineSettings(prompt_matmul="torch", scan="torch"))
    want, want_state = exact.prefill(tokens)
    for setting in ("onednn", "torch"):
        model = mambastep.load(path, settings=EngineSettings(prompt_matmul=setting))
        in_proj = model.backbone.layers[0].mixer.in_proj
        assert model.backend.onednn_prompts == (setting == "onednn") and in_proj.out_features >= ONEDNN_MIN_FEATURES
        logits, state = model.prefill(tokens)
        # Seen: 2.7e-6 (logits) and 4-6e-6 (state) of the largest value, for both settings.
        for got, ref in [(logits, want), (state.layers[-1].ssm, want_state.layers[-1].ssm)]:
            assert (got.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_the_stack_steps_parameter_lists_are_checked_by_name(cpp):
    """The layers' weights reach the kernel as flat lists; their entries are named, and a list
    in another order than the kernel reads is an error before any step, not a wrong result."""
    from mambastep.ops.stack_step import MambaLayerWeights, PreparedStack

    class Swapped(MambaLayerWeights):
        def entries(self, prepare):
            entries = super().entries(prepare)
            i, j = [name for name, _ in entries].index("A"), [name for name, _ in entries].index("D")
            entries[i], entries[j] = entries[j], entries[i]
            return entries

    e, n, k, d, r = 8, 4, 4, 6, 2
    lin = lambda rows, cols: (torch.randn(rows, cols), None, None)  # noqa: E731
    weights = dict(
        norm=torch.ones(d),
        in_proj=lin(2 * e, d),
        conv_weight=torch.randn(e, 1, k),
        conv_bias=None,
        x_proj=lin(r + 2 * n, e),
        dt_proj=(torch.randn(e, r), None, torch.randn(e)),
        A_log=torch.randn(e, n),
        D=torch.ones(e),
        out_proj=lin(d, e),
    )
    assert len(PreparedStack([MambaLayerWeights(**weights)]).params) == 16
    with pytest.raises(RuntimeError, match=r"the mamba layers step reads \('norm', .* but was given"):
        PreparedStack([Swapped(**weights)])
