"""Engine settings: each fast path gives what the plain path gives."""

import pytest
import torch
from torch._dynamo.utils import counters

import mambastep
from mambastep.models.linear import MATVEC_ROWS, Linear, takes_matvec
from mambastep.settings import EngineSettings
from conftest import make_hf_checkpoint


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


def test_fused_and_torch_scans_give_the_same_prefill(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m", hidden_size=24)
    fused = mambastep.load(path, settings=EngineSettings(scan="fused"))
    plain = mambastep.load(path, settings=EngineSettings(scan="torch"))
    tokens = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(1))
    (lf, sf), (lp, sp) = fused.prefill(tokens), plain.prefill(tokens)
    torch.testing.assert_close(lf, lp, atol=1e-5, rtol=1e-5)
    for a, b in zip(sf.layers, sp.layers):
        torch.testing.assert_close(a.ssm, b.ssm, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mamba", "mamba_lti"])
def test_fused_and_torch_scans_give_the_same_gradients(tmp_path, family):
    """Training through the fused kernel's backward equals training through the PyTorch scan."""
    if family == "mamba":
        path = make_hf_checkpoint(tmp_path / "m", hidden_size=24)
    else:
        from mambastep.config import MambaLTIConfig
        from mambastep.loading import save
        from mambastep.models import MambaLTILM

        torch.manual_seed(0)
        path = save(MambaLTILM(MambaLTIConfig(d_model=24, n_layer=2, vocab_size=97, d_state=4)), tmp_path / "m")
    tokens = torch.randint(0, 97, (2, 70), generator=torch.Generator().manual_seed(1))
    grads = []
    for scan in ("fused", "torch"):
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
    below and above MATVEC_ROWS (which take F.linear) and through the compiled step."""
    path = make_hf_checkpoint(tmp_path / family, family=family)
    plain = mambastep.load(path, dtype=dtype, settings=EngineSettings(matvec="torch"))
    fused = mambastep.load(path, dtype=dtype, settings=EngineSettings(matvec="fused"))
    compiled = mambastep.load(path, dtype=dtype, settings=EngineSettings(matvec="fused", decode="compiled"))
    assert all(m.fused_matvec for m in fused.modules() if isinstance(m, Linear))
    # float32: the same sums in another order; bfloat16: the layer outputs are rounded to
    # bfloat16 (8 bits) on both paths, so one rounding may fall the other way.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype is torch.float32 else dict(atol=0.05, rtol=0.02)
    for batch in (1, 3, MATVEC_ROWS + 1):
        tokens = torch.randint(0, 97, (batch, 6), generator=torch.Generator().manual_seed(batch))
        _, state = plain.prefill(tokens[:, :3])
        states = [state] * 3
        for t in range(3, 6):
            logits = []
            for i, model in enumerate((plain, fused, compiled)):
                out, states[i] = model.step(tokens[:, t], states[i])
                logits.append(out)
            torch.testing.assert_close(logits[1], logits[0], **tol)
            torch.testing.assert_close(logits[2], logits[1], **tol)


def test_fused_matvec_stays_out_of_training(tmp_path):
    """A layer that would take the kernel takes F.linear when a gradient is wanted."""
    layer = Linear(12, 5)
    layer.fused_matvec = True
    x = torch.randn(1, 12)
    assert takes_matvec(layer, x) is False
    layer(x).sum().backward()
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert takes_matvec(layer, x) and not takes_matvec(layer, torch.randn(MATVEC_ROWS + 1, 12))
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("bad", [dict(scan="fast"), dict(matvec="blas"), dict(decode="jit"), dict(scan_chunk=0), dict(threads=0)])
def test_bad_settings(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineSettings(**bad)
