"""On a CUDA GPU with its Triton kernels compiled (``TRITON_INTERPRET=0 pytest -m gpu``, as
benchmarks/gpu_check.sh runs it): whole models against `transformers` on the same GPU, prefill
then steps against one forward pass (decode steps from CUDA graphs, the default there, and
eager ones), and a state made on the GPU continued on the CPU."""

import os

import pytest
import torch

import mambastep
from mambastep.settings import EngineSettings

from conftest import hf_reference, make_hf_checkpoint, random_tokens

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs a CUDA GPU and TRITON_INTERPRET=0 (benchmarks/gpu_check.sh)",
    ),
]
CONFIGS = {"mamba": dict(), "mamba2": dict(n_groups=2)}


@pytest.fixture(params=sorted(CONFIGS))
def checkpoint(request, tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products in float32, as on the CPU
    return make_hf_checkpoint(tmp_path / "ckpt", family=request.param, **CONFIGS[request.param])


def test_the_gpu_takes_the_triton_kernels(checkpoint):
    assert mambastep.load(checkpoint, device="cuda").backend.triton_kernels


def test_forward_equals_transformers_on_the_gpu(checkpoint):
    model, ref = mambastep.load(checkpoint, device="cuda"), hf_reference(checkpoint).cuda()
    for b, l in [(1, 1), (2, 3), (3, 41)]:
        tokens = random_tokens(model.config.vocab_size, b, l).cuda()
        logits, _ = model(tokens)
        with torch.no_grad():
            expected = ref(tokens).logits
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_equals_transformers_on_the_gpu(checkpoint):
    model, ref = mambastep.load(checkpoint, device="cuda"), hf_reference(checkpoint).cuda()
    prompt = random_tokens(model.config.vocab_size, 1, 7).cuda()
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 7:]
    last, state = model.prefill(prompt)
    ours = []
    for _ in range(12):
        token = last.argmax(-1)
        ours.append(int(token))
        last, state = model.step(token, state)
    assert ours == expected.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_steps_equals_forward_on_the_gpu(checkpoint, dtype):
    model = mambastep.load(checkpoint, device="cuda", dtype=dtype)
    tokens = random_tokens(model.config.vocab_size, 2, 30).cuda()
    full, _ = model(tokens)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    for prefix in (1, 17):
        last, state = model.prefill(tokens[:, :prefix])
        torch.testing.assert_close(last, full[:, prefix - 1], **tol)
        for t in range(prefix, 30):
            last, state = model.step(tokens[:, t], state)
            torch.testing.assert_close(last, full[:, t], **tol)


def test_a_state_made_on_the_gpu_continues_on_the_cpu(checkpoint, tmp_path):
    gpu = mambastep.load(checkpoint, device="cuda")
    cpu = mambastep.load(checkpoint, settings=EngineSettings(scan="torch", matvec="torch"))  # no C++ build here
    tokens = random_tokens(gpu.config.vocab_size, 2, 20)
    _, state = gpu.prefill(tokens[:, :19].cuda())
    state.save(tmp_path / "s.state")
    on_gpu, _ = gpu.step(tokens[:, 19].cuda(), state)
    on_cpu, _ = cpu.step(tokens[:, 19], mambastep.load_state(tmp_path / "s.state", cpu))
    torch.testing.assert_close(on_cpu, on_gpu.cpu(), atol=1e-4, rtol=1e-4)


def _equal_states(a, b) -> bool:
    return all(
        torch.equal(x, y)
        for la, lb in zip(a.layers, b.layers)
        for x, y in zip(la.tensors().values(), lb.tensors().values())
    )


@pytest.mark.parametrize("batch", [1, 3])
def test_steps_from_cuda_graphs_equal_eager_steps_and_leave_states_alone(checkpoint, batch):
    graphs = mambastep.load(checkpoint, device="cuda", settings=EngineSettings(decode="graphs"))
    eager = mambastep.load(checkpoint, device="cuda", settings=EngineSettings(decode="eager"))
    tokens = random_tokens(graphs.config.vocab_size, batch, 20).cuda()
    _, state = graphs.prefill(tokens[:, :4])
    eager_state, returned = state, []
    for t in range(4, 20):
        given, before = state, state.clone()
        last, state = graphs.step(tokens[:, t], given)
        want, eager_state = eager.step(tokens[:, t], eager_state)
        torch.testing.assert_close(last, want, atol=1e-4, rtol=1e-4)
        assert _equal_states(given, before)  # the given state: unchanged
        returned.append((state.clone(), state))
    assert all(_equal_states(kept, later) for kept, later in returned)  # none overwritten by a later step
    assert graphs._graphed_step is not None and eager._graphed_step is None
