"""`mambastep bench` end to end on a tiny checkpoint: the report's schema and its arithmetic."""

import json

import pytest
import torch

from mambastep.cli import main
from mambastep.evidence.bench import BenchSettings, markdown, matmul_flops_per_token, run_bench
from mambastep.ops.cpu import build

from conftest import make_hf_checkpoint


@pytest.fixture
def report(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m")
    settings = BenchSettings(model=str(path), batches=(1, 3), prompts=(20,), decode_steps=2, repeats=1, long_context=40)
    return run_bench(settings)


def test_report_schema_and_ratios(report):
    assert report["schema"] == "mambastep.bench/1"
    assert [r["batch"] for r in report["decode"]] == [1, 3]
    for r in report["decode"]:
        ms, theirs = r["ms_per_step"], r["transformers_ms_per_step"]
        # Times are rounded to 0.01 ms (a few % of a tiny model's step), ratios to 0.01: the
        # unrounded time lies within 0.005 ms of the reported one.
        assert 1000 * r["batch"] / (ms + 0.005) <= r["tokens_per_s"] * 1.001
        assert r["tokens_per_s"] <= 1000 * r["batch"] / (ms - 0.005) * 1.001
        assert r["roofline_fraction"] == pytest.approx(r["roofline_ms"] / ms, abs=0.006 + 0.01 / (ms - 0.005))
        assert r["roofline_ms"] == max(r["memory_ms"], r["compute_ms"])
        rounding = 0.005 / (ms - 0.005) + 0.005 / (theirs - 0.005)
        assert r["speedup"] == pytest.approx(theirs / ms, abs=0.006 + r["speedup"] * rounding)
    assert report["machine"]["matmul_peak_gflop_s_float32_decode"] > 0
    (p,) = report["prefill"]
    assert p["tokens"] == 20 and p["speedup"] == pytest.approx(
        p["tokens_per_s"] / p["transformers_tokens_per_s"], rel=0.02
    )
    assert report["context"]["long_context"] == 40
    assert report["weight_bytes"] > 0 and report["state_bytes_per_sequence"] > 0
    assert "| batch |" in markdown(report)
    # The path every figure took: the C++ kernels of this build's instruction set, where they ran.
    assert report["kernels"]["cpu_isa"] == build.load() and "matvec mambastep" in report["kernels"]["backend"]
    assert report["kernels"]["matvec_paths"] == torch.ops.mambastep.cpu_matvec_paths()
    assert report["kernels"]["ssd_scan_path"] == torch.ops.mambastep.cpu_ssd_scan_path()
    assert f"{build.load()} kernels" in markdown(report)


def test_bench_cli_appends_markdown(tmp_path, capsys):
    path = make_hf_checkpoint(tmp_path / "m")
    out = tmp_path / "BENCH.md"
    assert (
        main(
            [
                "bench",
                "--model",
                str(path),
                "--batches",
                "2",
                "--prompts",
                "8",
                "--decode-steps",
                "1",
                "--repeats",
                "1",
                "--long-context",
                "0",
                "--no-baseline",
                "--quantize",
                "int8",
                "--matvec",
                "torch",
                "--no-huge-pages",
                "--json",
                "--markdown",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert "transformers_ms_per_step" not in report["decode"][0] and "context" not in report
    assert report["engine"]["matvec"] == "torch" and report["engine"]["huge_pages"] is False
    assert "matvec torch" in report["kernels"]["backend"]
    assert "int8 weights" in out.read_text() and "matvec torch" in out.read_text() and "4 KiB pages" in out.read_text()


def test_bad_bench_settings():
    with pytest.raises(ValueError, match="int8 weights go with float32"):
        BenchSettings(quantize="int8", dtype="bfloat16")
    with pytest.raises(ValueError, match="batches"):
        BenchSettings(batches=(0,))


def test_weight_bytes_count_what_a_decode_step_reads(tmp_path):
    """Every weight once; the embedding table only where the (tied) head reads it whole."""
    import mambastep
    from mambastep.evidence.bench import weight_bytes

    path = make_hf_checkpoint(tmp_path / "m")
    full, int8 = mambastep.load(path), mambastep.load(path, quantize="int8")
    unique = {t.data_ptr(): t for t in full.state_dict().values()}.values()
    assert weight_bytes(full) == sum(t.numel() * t.element_size() for t in unique)
    table = int8.get_parameter(int8.embedding_weight)
    assert (
        weight_bytes(int8) == sum(t.numel() * t.element_size() for t in int8.state_dict().values()) - table.numel() * 4
    )


def test_matmul_peak_shrinks_the_product_where_matmul_is_slow(monkeypatch):
    """On a CPU without native kernels for a dtype a 2048 x 2048 product takes a minute: the
    measurement then shrinks it to fit its time budget. The products' times are modelled, not
    measured, so that a busy machine cannot change the outcome."""
    from mambastep.evidence import hardware

    sizes = []

    def product(a, b):
        sizes.append(a.shape[0])
        return torch.mm(a, b)

    def modelled_seconds(fn, repeats):
        fn()
        return 0.01 * (sizes[-1] / 256) ** 3  # 0.01 s at 256: 2048 would take 5 s

    monkeypatch.setattr(hardware, "_best_seconds", modelled_seconds)
    hardware.matmul_peak(torch.float32, repeats=1, budget_s=0.3, product=product)
    assert max(sizes) == 512  # 0.08 s per product; 1024 would take 0.64 s


def test_decode_roofline_takes_the_compute_time_of_the_whole_batch(tmp_path, monkeypatch):
    """With a slow enough matmul peak, the products of a step (LM head included, every sequence)
    outlast the memory time, and the roofline is their time."""
    from mambastep.evidence import bench
    from mambastep.files.checkpoints import model_for

    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, product: 1e6)  # FLOP/s
    path = make_hf_checkpoint(tmp_path / "m")
    settings = BenchSettings(
        model=str(path), batches=(1, 3), prompts=(8,), decode_steps=1, repeats=1, long_context=0, baseline=False
    )
    report = run_bench(settings)
    flops = matmul_flops_per_token(model_for(str(path), torch.float32), head=True)
    assert flops > matmul_flops_per_token(model_for(str(path), torch.float32))
    for r in report["decode"]:
        assert r["compute_ms"] == pytest.approx(1000 * r["batch"] * flops / 1e6, abs=0.005)
        assert r["roofline_ms"] == r["compute_ms"] > r["memory_ms"]
    assert "| compute |" in markdown(report)


@pytest.mark.parametrize("native", [True, False])
def test_prefill_bound_takes_the_peak_of_the_dtype_the_products_compute_in(tmp_path, monkeypatch, native):
    """bfloat16 prompts multiply in float32 on a CPU without native bfloat16 kernels, so their
    compute bound is the float32 peak there (PyTorch's bfloat16 matmul peak is 100x lower).
    Decode steps multiply in float32 either way: with native bfloat16 the float32 peak is
    measured too, for the decode roofline."""
    from mambastep.evidence import bench

    peaks = []
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, product: peaks.append(dtype) or 1e12)
    monkeypatch.setattr(bench, "computes_in", lambda dtype: native or dtype == torch.float32)
    path = make_hf_checkpoint(tmp_path / "m")
    settings = BenchSettings(
        model=str(path),
        dtype="bfloat16",
        batches=(1,),
        prompts=(8,),
        decode_steps=1,
        repeats=1,
        long_context=0,
        baseline=False,
    )
    report = run_bench(settings)
    want = torch.bfloat16 if native else torch.float32
    assert peaks == ([want, torch.float32] if native else [want])
    assert report["machine"][f"matmul_peak_gflop_s_{str(want)[6:]}"] == 1000.0
    assert report["machine"]["matmul_peak_gflop_s_float32_decode"] == 1000.0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("prompt_matmul", ["onednn", "torch"])
def test_prefill_bound_takes_the_peak_of_the_product_prompts_take(tmp_path, monkeypatch, prompt_matmul):
    """Where float32 prompts go to oneDNN's matmul, the compute bound is that product's peak."""
    from mambastep.evidence import bench
    from mambastep.settings import EngineSettings

    products = []
    monkeypatch.setattr(bench, "matmul_peak", lambda dtype, product: products.append(product) or 1e12)
    path = make_hf_checkpoint(tmp_path / "m")
    settings = BenchSettings(
        model=str(path), batches=(1,), prompts=(8,), decode_steps=1, repeats=1, long_context=0, baseline=False
    )
    report = run_bench(settings, EngineSettings(prompt_matmul=prompt_matmul))
    assert report["machine"]["matmul_peak_by"] == prompt_matmul
    a, b = torch.randn(5, 7), torch.randn(6, 7)
    (product,) = products
    want = a @ b.T if prompt_matmul == "onednn" else None  # oneDNN's linear multiplies by b's transpose
    assert product is torch.mm if want is None else torch.allclose(product(a, b), want, atol=1e-5)


def test_transformers_decode_is_timed_from_its_own_tokens(tmp_path):
    """A clock read as each of steps + 1 tokens is chosen: the prefill is left out and a time can
    never come out negative, however busy the machine (a difference of two generate calls could)."""
    from mambastep.evidence.bench import _theirs_decode

    from conftest import hf_reference

    ref = hf_reference(make_hf_checkpoint(tmp_path / "m"))
    seconds = _theirs_decode(ref, torch.zeros(2, 5, dtype=torch.long), steps=3)
    assert 0 < seconds < 60
