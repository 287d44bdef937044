"""The Mamba block with a time-invariant (S4D-real) SSM: the paper's ablation of selection."""

import torch

from mambastep import load
from mambastep.families import config_from_dict, config_to_dict
from mambastep.files.checkpoints import save
from mambastep.models import MambaLM, MambaLTILM
from mambastep.models.config import MambaConfig, MambaLTIConfig
from mambastep.ops import TORCH, Backend

from conftest import assert_prefill_then_steps_equal_forward, random_tokens

CONFIG = MambaLTIConfig(d_model=12, n_layer=2, vocab_size=19, d_state=5, d_conv=3)


def _model(seed: int = 0) -> MambaLTILM:
    torch.manual_seed(seed)
    model = MambaLTILM(CONFIG).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _s4d_real_loop(x, dt, A, C, D, h):
    """fp64 spec, written out: h_t = exp(dt A) h_{t-1} + dt x_t (per channel and state), y_t = Σ_n C h_t + D x_t."""
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, None] * A) * h + (dt * x[:, t])[..., None]
        ys.append((C * h).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1), h


def test_ssm_matches_the_s4d_real_recurrence_from_any_state():
    mixer = _model().backbone.layers[0].mixer
    b, l, e, n = 2, 9, CONFIG.d_inner, CONFIG.d_state
    x, h0 = torch.randn(b, l, e, dtype=torch.float64), torch.randn(b, e, n, dtype=torch.float64)
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    expected_y, expected_h = _s4d_real_loop(x, dt, -torch.exp(mixer.A_log), mixer.C, mixer.D, h0)
    for chunk in (1, 4, 64):
        with torch.no_grad():
            y, h = mixer.ssm(x, h0, None, Backend(scan_chunk=chunk))
        torch.testing.assert_close(y, expected_y, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(h, expected_h, atol=1e-10, rtol=1e-10)


def test_time_invariant_ssm_is_linear_in_its_input_and_selective_one_is_not():
    lti = _model().backbone.layers[0].mixer
    torch.manual_seed(1)
    s6 = MambaLM(MambaConfig(d_model=12, n_layer=1, vocab_size=19, d_state=5)).double().backbone.layers[0].mixer
    x1, x2 = torch.randn(2, 1, 7, CONFIG.d_inner, dtype=torch.float64).unbind(0)
    zero = torch.zeros(1, CONFIG.d_inner, CONFIG.d_state, dtype=torch.float64)
    with torch.no_grad():
        combined = lti.ssm(3 * x1 + x2, zero, None, TORCH)[0]
        torch.testing.assert_close(combined, 3 * lti.ssm(x1, zero, None, TORCH)[0] + lti.ssm(x2, zero, None, TORCH)[0])
        s6_combined = s6.ssm(3 * x1 + x2, zero, None, TORCH)[0]
        assert not torch.allclose(s6_combined, 3 * s6.ssm(x1, zero, None, TORCH)[0] + s6.ssm(x2, zero, None, TORCH)[0])


def test_step_size_is_the_same_at_every_token():
    model = _model()
    seen = []
    model.backbone.layers[0].mixer.dt_probe.register_forward_hook(lambda m, i, out: seen.append(out))
    model(random_tokens(CONFIG.vocab_size, 2, 6))
    dt = seen[0]  # (b, l, e)
    assert dt.shape == (2, 6, CONFIG.d_inner)
    assert torch.equal(dt, dt[:1, :1].expand_as(dt))


def test_prefill_then_steps_equal_forward():
    assert_prefill_then_steps_equal_forward(_model().float(), length=11, prefixes=(1, 4, 10))


def test_prompt_in_pieces_equals_one_prompt_and_batch_rows_are_independent():
    model = _model()
    tokens = random_tokens(CONFIG.vocab_size, 2, 13)
    whole, _ = model(tokens)
    first, state = model(tokens[:, :5])
    rest, _ = model(tokens[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)
    alone, _ = model(tokens[1:])
    torch.testing.assert_close(alone, whole[1:])


def test_config_and_checkpoint_round_trip(tmp_path):
    raw = config_to_dict(CONFIG)
    assert raw["model_type"] == "mamba_lti" and "architectures" not in raw
    assert config_from_dict(raw) == CONFIG
    model = _model().float()
    save(model, tmp_path / "lti")
    loaded = load(tmp_path / "lti")
    assert isinstance(loaded, MambaLTILM)
    tokens = random_tokens(CONFIG.vocab_size, 1, 8)
    torch.testing.assert_close(
        loaded(tokens)[0], model(tokens)[0], atol=1e-5, rtol=1e-5
    )  # fused kernel vs PyTorch scan


def test_trains_every_ssm_parameter():
    model = _model().float()
    logits, _ = model(random_tokens(CONFIG.vocab_size, 2, 10))
    logits.logsumexp(-1).mean().backward()
    mixer = model.backbone.layers[0].mixer
    for name in ("dt_bias", "A_log", "C", "D"):
        grad = getattr(mixer, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
