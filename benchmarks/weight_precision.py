"""What bfloat16 and int8 weights cost in accuracy: next-token logits against float32, on a fixed prompt set.

The prompt set: the first --length bytes of every --every-th Python source file of this
Python's standard library (sorted paths; the same set for the same Python version). Each
variant runs the decode path that generation uses, in batches of MATVEC_ROWS sequences
(the fused matvec kernel's rows): prefill the first --prefill tokens, then one recurrent
step per token. At every stepped position its logits are compared with float32's:

- top-1 agreement: the fraction of positions where the argmax is float32's;
- logit error: max and mean absolute difference, and the max relative to float32's max |logit|;
- bits per token: cross-entropy of the true next token, for float32 and the variant.

    python benchmarks/weight_precision.py                  # the bundled model
    python benchmarks/weight_precision.py --model DIR --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mambastep.cli.common import DEFAULT_MODEL
from mambastep.files.checkpoints import load
from mambastep.files.tokenizer import load_tokenizer
from mambastep.ops.products import MATVEC_ROWS
from mambastep.settings import EngineSettings

VARIANTS = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.float32, "int8")}


def prompt_set(length: int, every: int) -> list[Path]:
    """Every ``every``-th standard-library source file at least ``length`` bytes long, by sorted path."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size >= length)
    return files[::every]


@torch.no_grad()
def stepped_logits(model, tokens: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits (b, l - prefill, vocab) at each stepped position: prefill, then one step per token."""
    logits, state = model.prefill(tokens[:, :prefill])
    out = [logits]
    for t in range(prefill, tokens.shape[1] - 1):
        logits, state = model.step(tokens[:, t], state)
        out.append(logits)
    return torch.stack(out, dim=1)  # predictions for positions prefill .. l-1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=str(DEFAULT_MODEL), help="checkpoint directory or hub id (default: the bundled model)"
    )
    parser.add_argument("--length", type=int, default=512, help="tokens per prompt")
    parser.add_argument("--prefill", type=int, default=64, help="tokens prefilled before stepping")
    parser.add_argument("--every", type=int, default=64, help="take every N-th standard-library file")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not 1 <= args.prefill < args.length:
        parser.error("need 1 <= --prefill < --length")
    tokenizer = load_tokenizer(args.model)
    files = prompt_set(4 * args.length, args.every)
    rows = [tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))[: args.length] for f in files]
    tokens = torch.tensor([r for r in rows if len(r) == args.length])  # (b, l)
    targets = tokens[:, args.prefill :]  # the token each stepped position predicts
    settings = EngineSettings(threads=args.threads)
    logits = {}
    for name, (dtype, quantize) in tqdm(VARIANTS.items(), desc="variants", disable=None):
        model = load(args.model, dtype=dtype, settings=settings, quantize=quantize)
        logits[name] = torch.cat([stepped_logits(model, batch, args.prefill) for batch in tokens.split(MATVEC_ROWS)])

    def bits(x: torch.Tensor) -> float:
        return F.cross_entropy(x.flatten(0, 1), targets.flatten()).item() / math.log(2)

    ref = logits["float32"]
    report = {
        "model": args.model,
        "prompts": tokens.shape[0],
        "tokens_per_prompt": args.length,
        "prefill": args.prefill,
        "positions": targets.numel(),
        "float32_bits_per_token": round(bits(ref), 4),
        "variants": {},
    }
    for name in ("bfloat16", "int8"):
        err = (logits[name] - ref).abs()
        report["variants"][name] = {
            "top1_agreement": round((logits[name].argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
            "max_abs_logit_error": round(err.max().item(), 4),
            "mean_abs_logit_error": round(err.mean().item(), 5),
            "max_error_over_max_logit": round((err.max() / ref.abs().max()).item(), 5),
            "bits_per_token": round(bits(logits[name]), 4),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
