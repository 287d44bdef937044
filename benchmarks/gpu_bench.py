"""Decode and prefill on a CUDA GPU, against `transformers` on the same GPU in the same run and
against the roofline.

For each model (random weights, bfloat16): the decode step at each batch size (median of timed
steps after warm-up, CUDA-synchronised; from CUDA graphs, the default on a GPU, and at batch 1
also launched kernel by kernel, ``decode="eager"``), a prompt of ``--prefill`` tokens at batch 1, and
`transformers`' decode at batch 1 with its cache (``generate``: the time of n + 1 new tokens
less the time of one, over n). The roofline of a decode step is its bytes (weights and the
state read and written) over the measured bandwidth (a large device-to-device copy) and over
the datasheet's; the matmul peak is a measured bfloat16 product. Beside them, what the cost model
(``mambastep cost``) predicts for each step and prompt on the GPU's datasheet profile (H200,
H100 or A100, named by the device). One JSON document on stdout.

    python benchmarks/gpu_bench.py                        # on the GPU (benchmarks/gpu_check.sh)
    python benchmarks/gpu_bench.py --device cpu --models mamba-130m --batches 1 --prefill 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace

import torch

from mambastep.evidence.cost import account
from mambastep.evidence.hardware import Hardware, get_hardware
from mambastep.families.presets import builtin_config, random_model
from mambastep.models.config import ModelConfig

MODELS = [
    "mamba-130m",
    "mamba-370m",
    "mamba-1.4b",
    "mamba-2.8b",
    "mamba2-130m",
    "mamba2-370m",
    "mamba2-1.3b",
    "mamba2-2.7b",
]
DATASHEET_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}


def predicted(row: dict, config: ModelConfig, hardware: Hardware, batches: list[int], prompt: int) -> None:
    """The cost model's times for the row's steps (after a 16-token prompt) and prompt, in bfloat16."""
    for batch in batches:
        seconds = account(config, "decode", 16, batch, hardware, torch.bfloat16)["predicted_s"]
        row[f"cost_model_decode_ms_batch_{batch}"] = round(1000 * seconds, 4)
    row["cost_model_prefill_ms"] = round(
        1000 * account(config, "prefill", prompt, 1, hardware, torch.bfloat16)["predicted_s"], 3
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """The median seconds of ``fn()`` over ``repeats`` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), device, 10)


def matmul_peak(device: str) -> float:
    """FLOP/s of a bfloat16 product of two 8192 x 8192 matrices (1024 on a CPU)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / timed(lambda: a @ a, device, 5)


@torch.no_grad()
def ours(name: str, device: str, batches: list[int], prompt: int, steps: int) -> dict:
    model = random_model(name, torch.bfloat16, device)
    row = {"model": name, "backend": str(model.backend), "weight_bytes": model.info()["weight_bytes"]}
    for batch in batches:
        tokens = torch.zeros(batch, 16, dtype=torch.long, device=device)
        _, state = model.prefill(tokens)
        token = tokens[:, 0]
        row[f"decode_ms_batch_{batch}"] = round(1000 * timed(lambda: model.step(token, state), device, steps), 4)
        row[f"state_bytes_batch_{batch}"] = state.nbytes
    # The same batch-1 step launched kernel by kernel: what the graphs (decode "auto" on a GPU) save.
    model.configure(replace(model.settings, decode="eager"))
    _, state = model.prefill(torch.zeros(1, 16, dtype=torch.long, device=device))
    token = torch.zeros(1, dtype=torch.long, device=device)
    row["decode_eager_ms_batch_1"] = round(1000 * timed(lambda: model.step(token, state), device, steps), 4)
    model.configure(replace(model.settings, decode="auto"))
    long = torch.zeros(1, prompt, dtype=torch.long, device=device)
    seconds = timed(lambda: model.prefill(long), device, 3)
    row["prefill_tokens"], row["prefill_ms"] = prompt, round(1000 * seconds, 3)
    row["prefill_tokens_per_s"] = round(prompt / seconds, 1)
    row["parameters"] = model.info()["parameters"]
    return row


@torch.no_grad()
def theirs(name: str, device: str, steps: int) -> float | None:
    """`transformers`' batch-1 decode ms per token for the same configuration, random weights."""
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    from mambastep.families.presets import builtin_config

    c = builtin_config(name)
    if c.family == "mamba":
        config = MambaConfig(
            vocab_size=c.vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer, state_size=c.d_state
        )
        model = MambaForCausalLM(config)
    else:
        config = Mamba2Config(
            vocab_size=c.vocab_size,
            hidden_size=c.d_model,
            num_hidden_layers=c.n_layer,
            state_size=c.d_state,
            head_dim=c.head_dim,
            num_heads=c.d_model * c.expand // c.head_dim,
            n_groups=c.n_groups,
        )
        model = Mamba2ForCausalLM(config)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    prompt = torch.zeros(1, 16, dtype=torch.long, device=device)

    def generate(new: int):
        return lambda: model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    one, many = timed(generate(1), device, 3), timed(generate(steps + 1), device, 3)
    return round(1000 * (many - one) / steps, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=50, help="timed decode steps")
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    measured = bandwidth(args.device)
    datasheet = next((b for key, b in DATASHEET_BANDWIDTH.items() if key in name), None)
    profile = next((get_hardware(key.lower()) for key in DATASHEET_BANDWIDTH if key in name), None)
    report = {
        "device": name,
        "torch": torch.__version__,
        "bandwidth_bytes_per_s": round(measured),
        "datasheet_bandwidth_bytes_per_s": datasheet,
        "bf16_matmul_flops": round(matmul_peak(args.device)),
        "models": [],
    }
    for model in args.models:
        row = ours(model, args.device, args.batches, args.prefill, args.steps)
        if profile is not None:
            predicted(row, builtin_config(model), profile, args.batches, args.prefill)
        for batch in args.batches:
            moved = row["weight_bytes"] + 2 * row[f"state_bytes_batch_{batch}"]  # the state read and written
            row[f"roofline_ms_batch_{batch}"] = round(1000 * moved / measured, 4)
            if datasheet:
                row[f"datasheet_roofline_ms_batch_{batch}"] = round(1000 * moved / datasheet, 4)
        prefill_flops = 2 * row["parameters"] * row["prefill_tokens"]
        row["prefill_share_of_matmul_peak"] = round(
            prefill_flops / (row["prefill_ms"] / 1000) / report["bf16_matmul_flops"], 3
        )
        if not args.no_transformers:
            row["transformers_decode_ms_batch_1"] = theirs(model, args.device, min(args.steps, 32))
            row["speed_over_transformers"] = round(row["transformers_decode_ms_batch_1"] / row["decode_ms_batch_1"], 2)
        print(json.dumps(row), file=sys.stderr)
        report["models"].append(row)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
