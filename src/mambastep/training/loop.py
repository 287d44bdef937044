"""The training loop: check everything, build the run, step, evaluate, checkpoint.

Every check that can fail (settings, config, memory, data, resume) runs before
the first step. Each window starts from a fresh state, in training and in
evaluation alike, so the held-out figure measures what training optimised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mambastep.families import config_from_dict, family_of, parameter_count
from mambastep.families.presets import BUILTIN_CONFIGS, BYTE_CONFIG, builtin_config
from mambastep.files.checkpoints import load, read_config, resolve
from mambastep.files.tokenizer import BYTES, Tokenizer, load_tokenizer, train_bpe
from mambastep.models.config import ConfigError, ModelConfig
from mambastep.models.lm import LanguageModel
from mambastep.settings import EngineSettings
from mambastep.training import distributed
from mambastep.training.budget import check_fits
from mambastep.training.checkpoint import read_train_state, write_model, write_train_state
from mambastep.training.data import Corpus, Lanes, LineStarts, SplitTexts, read_texts, tokenize
from mambastep.training.distributed import Placement
from mambastep.training.init import deepen, deeper_config, init_for_training
from mambastep.training.loss import token_nll
from mambastep.training.optim import build_optimizer, build_scheduler, lr_factor
from mambastep.training.report import RunLog, bits_per_byte, compressor_baselines
from mambastep.training.settings import TrainingError, TrainSettings

log = logging.getLogger(__name__)

MODEL_DIR = "model"
TRAIN_STATE_FILE = "train_state.pt"
SPLIT_RULE = 'held out iff sha256(f"{seed}/{relative path}")[:8] / 2**64 < holdout'
# A vocabulary is padded beyond its tokenizer's tokens up to a multiple of this at most (Pythia's 50,304).
VOCAB_PADDING = 128


def model_config(name_or_file: str) -> ModelConfig:
    """A built-in configuration by name, or a config.json file (Hugging Face or state-spaces format).

    Raises:
        TrainingError: neither a known name nor a readable, valid JSON config; the message names it.
    """
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        if name_or_file in BUILTIN_CONFIGS:
            return builtin_config(name_or_file)
        raise TrainingError(
            f"config {name_or_file!r} is neither a JSON file nor a built-in name ({', '.join(BUILTIN_CONFIGS)})"
        )
    try:
        raw = json.loads(path.read_text())
        return config_from_dict(raw, str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrainingError(f"{path}: not valid JSON ({err})") from None
    except ConfigError as err:
        raise TrainingError(str(err)) from None


class _Run:
    """Everything one process holds during a run."""

    def __init__(self, settings: TrainSettings, place: Placement):
        self.settings, self.place = settings, place
        self.out = Path(settings.out).expanduser()
        self.seq_len = settings.data.seq_len
        self.started = time.perf_counter()
        self.elapsed_before = 0.0  # wall seconds of the runs this one resumes
        self._prepare()

    # --- set-up: every check, then the allocations -------------------------------------

    def _prepare(self) -> None:
        s, place = self.settings, self.place
        saved = self._saved_state()
        tokenizer_source = s.data.tokenizer or (s.init if s.init is not None else BYTES)
        bpe_size = s.data.bpe_vocab_size
        given = load_tokenizer(tokenizer_source) if bpe_size is None else None
        config = read_config(resolve(s.init)) if s.init is not None else model_config(s.config)
        if s.n_layer is not None:
            config = deeper_config(config, s.n_layer)
        tokens = bpe_size or given.vocab_size
        if tokens > config.vocab_size:
            raise TrainingError(f"the tokenizer has {tokens} tokens but the model's vocab_size is {config.vocab_size}")
        if s.batch_size % place.world:
            raise TrainingError(f"batch_size {s.batch_size} is not a multiple of the {place.world} processes")
        self.local_batch = s.batch_size // place.world
        self.memory_estimate = check_fits(
            config, self.local_batch, self.seq_len, place.world, place.local_world, place.device
        )
        texts = read_texts(s.data)
        if given is None:
            given = self._learned_tokenizer(texts, bpe_size, resuming=saved is not None)
        self.tokenizer: Tokenizer = given
        self.corpus: Corpus = tokenize(texts, self.tokenizer)
        self.train_lanes = Lanes(
            self.corpus.train.tokens,
            s.batch_size,
            self.seq_len,
            place.rank,
            place.world,
            "training",
            self.seq_len + 1,
            LineStarts.of(self.tokenizer) if s.data.window_starts == "lines" else None,
        )
        self.eval_lanes = (
            Lanes(self.corpus.heldout.tokens, s.batch_size, self.seq_len, place.rank, place.world, "held-out", 2)
            if s.data.holdout > 0
            else None
        )
        if place.main:
            self._warn_of_traps(config, tokenizer_source)
        self.out.mkdir(parents=True, exist_ok=True)  # every check has passed
        torch.manual_seed(s.data.seed)
        if s.init is not None:
            model = load(s.init, dtype=torch.float32, device=place.device)
            if s.n_layer is not None:
                model = deepen(model, s.n_layer)
        else:
            with place.device:
                model = family_of(config).model(config)
            init_for_training(model)
            model.configure(EngineSettings())
        self.model: LanguageModel = model.train()
        self.optimizer = build_optimizer(model, s.optim)
        self.scheduler = build_scheduler(self.optimizer, s.optim, s.steps)
        self.step = 0
        if saved is not None:
            self._restore(saved)
        net = DistributedDataParallel(model) if place.world > 1 else model
        self.net = torch.compile(net) if s.compile else net  # the training step's forward and backward
        if place.main:
            self.log = RunLog(self.out, self._header(), RunLog.read(self.out) if saved else None, since=self.step)

    def _learned_tokenizer(self, texts: SplitTexts, vocab_size: int, resuming: bool) -> Tokenizer:
        """The "bpe:N" tokenizer: learned from the training files, or, on resume, the one saved with the model."""
        if resuming:
            return load_tokenizer(self.out / MODEL_DIR)
        return train_bpe((data.decode("utf-8") for _, data in texts.train), vocab_size)

    def _warn_of_traps(self, config: ModelConfig, tokenizer_source: str) -> None:
        """One line on stderr for each setting that runs but does not train as it is likely meant to."""
        s, tokens = self.settings, self.tokenizer.vocab_size
        if config.vocab_size > -(-tokens // VOCAB_PADDING) * VOCAB_PADDING:
            log.warning(
                "the model's vocabulary has %s tokens but the tokenizer (%s) has %s: the other rows of the "
                "embedding never train; for text read as bytes start from --config %s, or pass the --tokenizer "
                "the model was made for",
                f"{config.vocab_size:,}",
                tokenizer_source,
                f"{tokens:,}",
                BYTE_CONFIG,
            )
        warmup = s.optim.warmup_steps
        if warmup > s.steps:
            log.warning(
                "--warmup-steps %d exceeds --steps %d: the learning rate rises through the whole run, to %.0f%% "
                "of --lr, and never decays; lower --warmup-steps (a tenth of --steps is usual)",
                warmup,
                s.steps,
                100 * s.steps / warmup,
            )

    def _saved_state(self) -> dict[str, Any] | None:
        """The state to resume from, checked against these settings; None for a new run."""
        s = self.settings
        path = self.out / TRAIN_STATE_FILE
        if not s.resume:
            if path.exists():
                raise TrainingError(
                    f"{self.out} already holds a run ({path}); pass --resume to continue it, or choose another --out"
                )
            return None
        saved = read_train_state(path)
        before, now = json.loads(saved["settings"]), s.resume_key()
        changed = _differences({**before, "steps": s.steps}, now)  # steps may change: the schedule's length
        if changed:
            raise TrainingError(f"cannot resume {self.out}: settings differ from the saved run: {'; '.join(changed)}")
        if saved["step"] >= s.steps:
            raise TrainingError(
                f"cannot resume {self.out}: the run is at step {saved['step']} and --steps is {s.steps}; "
                "pass a larger --steps to train it further"
            )
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["cpu"])
        if saved["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        self.step, self.elapsed_before = saved["step"], saved["elapsed_s"]
        steps_before = json.loads(saved["settings"])["steps"]
        if steps_before != self.settings.steps:
            self._stretch_schedule(steps_before)

    def _stretch_schedule(self, steps_before: int) -> None:
        """Set the learning rate of the step resumed at to that of the schedule over the new number of steps
        (the saved optimiser holds the old schedule's; the scheduler computes the new one's from the next)."""
        o, before = self.settings.optim, self.scheduler.get_last_lr()[0]
        factor = lr_factor(self.step, o.warmup_steps, self.settings.steps, o.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
        if self.place.main:
            log.warning(
                "resuming at step %d with --steps %d (the run had %d): from here the learning rate follows the "
                "%d-step schedule, at %.3g (it was %.3g)",
                self.step,
                self.settings.steps,
                steps_before,
                self.settings.steps,
                o.lr * factor,
                before,
            )

    def _header(self) -> dict[str, Any]:
        s, c, config = self.settings, self.corpus, self.model.config
        parameters = parameter_count(config)
        return {
            "title": f"{config.family}, {parameters:,} parameters",
            "settings": asdict(s),
            "model": {"family": config.family, "config": asdict(config), "parameters": parameters},
            "data": {
                "split_rule": SPLIT_RULE,
                "train_files": len(c.train.names),
                "train_tokens": len(c.train.tokens),
                "train_bytes": c.train.n_bytes,
                "heldout_files": len(c.heldout.names),
                "heldout_tokens": len(c.heldout.tokens),
                "heldout_bytes": c.heldout.n_bytes,
                "heldout_names": list(c.heldout.names),
            },
            "processes": self.place.world,
            "memory_estimate_bytes": self.memory_estimate,
            "baselines": compressor_baselines(self.corpus.heldout_text),
        }

    # --- the loop -----------------------------------------------------------------------

    def _autocast(self):
        if self.settings.precision == "bf16":
            return torch.autocast(self.place.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_step(self) -> Tensor:
        """One optimiser step on the windows of ``step``; returns this process's mean loss."""
        x, y = (t.to(self.place.device) for t in self.train_lanes.sample(self.step, self.settings.data.offsets_seed))
        with self._autocast():
            logits, _ = self.net(x, float_logits=False)  # (b, l, vocab), bfloat16 under autocast
        loss = token_nll(logits.flatten(0, 1), y.flatten()).mean()
        loss.backward()
        if self.settings.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, max_tokens: int, what: str) -> dict[str, float]:
        """Held-out loss and bits per byte, reading each lane from its start (to ``max_tokens`` inputs per lane);
        ``what`` names it on the progress bar."""
        lanes = self.eval_lanes
        totals = torch.zeros(2, dtype=torch.float64, device=self.place.device)
        show = self.place.main and self.settings.progress
        windows = tqdm(
            range(lanes.windows(max_tokens)),
            desc=what,
            unit="window",
            leave=False,
            disable=not show,
            dynamic_ncols=True,
        )
        for i in windows:
            x, y = (t.to(self.place.device) for t in lanes.window(i, max_tokens))
            with self._autocast():
                logits, _ = self.model(x, float_logits=False)  # (b, q, vocab)
            totals[0] += token_nll(logits.flatten(0, 1), y.flatten()).sum().double()
            totals[1] += y.numel()
        nll, count = distributed.sum_all(totals, self.place).tolist()
        return {
            "loss": nll / count,
            "bits_per_byte": bits_per_byte(nll, int(count), self.corpus.heldout.bytes_per_token),
            "tokens_read": int(count),
        }

    def run(self) -> dict[str, Any]:
        s, place = self.settings, self.place
        last = min(s.steps, s.stop_after) if s.stop_after else s.steps
        tokens_per_step = s.batch_size * self.seq_len
        eval_per_lane = max(1, s.eval_tokens // s.batch_size)  # at most eval_tokens in all
        bar = tqdm(
            total=s.steps, initial=self.step, unit="step", disable=not (place.main and s.progress), dynamic_ncols=True
        )
        losses, since, since_step = [], time.perf_counter(), self.step
        while self.step < last:
            losses.append(self._train_step())
            bar.update(1)
            if self.step % s.log_every == 0 or self.step == last:
                mean_loss = distributed.sum_all(torch.stack(losses).mean()[None].double(), place).item() / place.world
                rate = tokens_per_step * (self.step - since_step) / (time.perf_counter() - since)
                bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{rate:,.0f}")
                if place.main:
                    self.log.add(
                        "train",
                        {
                            "step": self.step,
                            "tokens": self.step * tokens_per_step,
                            "loss": mean_loss,
                            "bits_per_byte": mean_loss / math.log(2) / self.corpus.train.bytes_per_token,
                            "lr": self.scheduler.get_last_lr()[0],
                            "tokens_per_s": rate,
                            "elapsed_s": self._elapsed(),
                        },
                    )
                    self.log.write()
                losses, since, since_step = [], time.perf_counter(), self.step
            paused = False
            if self.eval_lanes is not None and s.eval_every and self.step % s.eval_every == 0 and self.step < s.steps:
                self._log_eval(self.evaluate(eval_per_lane, "held-out evaluation"), final=False)
                paused = True
            if (s.checkpoint_every and self.step % s.checkpoint_every == 0) or self.step == last:
                self.checkpoint()
                paused = True
            if paused:  # evaluation and checkpoints do not count against the training throughput
                since, since_step = time.perf_counter(), self.step
        bar.close()
        if self.step == s.steps and self.eval_lanes is not None:
            self._log_eval(self.evaluate(eval_per_lane, "final held-out evaluation"), final=True)
        if place.main:
            self.log.set("wall_s", self._elapsed())
            self.log.write()
            self.log.plot()
            return self.log.record
        return {}

    def _log_eval(self, result: dict[str, float], final: bool) -> None:
        if self.place.main:
            self.log.add(
                "eval",
                {
                    "step": self.step,
                    "tokens": self.step * self.settings.batch_size * self.seq_len,
                    "final": final,
                    **result,
                },
            )
            self.log.write()

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def checkpoint(self) -> None:
        """Write out/model and out/train_state.pt (the main process; the others hold the same weights)."""
        if not self.place.main:
            return
        write_model(self.model, self.tokenizer, self.out / MODEL_DIR)
        write_train_state(
            self.out / TRAIN_STATE_FILE,
            {
                "step": self.step,
                "elapsed_s": self._elapsed(),
                "settings": json.dumps(self.settings.resume_key()),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": {
                    "cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.place.device.type == "cuda" else [],
                },
            },
        )
        self.log.write()


def _differences(before: dict, now: dict, prefix: str = "") -> list[str]:
    """'key (saved x, now y)' for every key whose value differs, nested dicts flattened."""
    out = []
    for key in sorted(set(before) | set(now)):
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (saved {a!r}, now {b!r})")
    return out


def train(settings: TrainSettings) -> dict[str, Any]:
    """Train (or fine-tune, or resume) a language model as ``settings`` say.

    Runs alone or under ``torchrun`` (DistributedDataParallel). Writes out/model,
    out/train_state.pt, out/log.json and out/curve.png.

    Returns:
        the run's log (settings, data, curve, final evaluation) on the main process; {} on the others.

    Raises:
        TrainingError: settings, data, memory or resume problems, before the first step.
    """
    place = distributed.start(settings.device)
    try:
        if settings.threads is not None:
            torch.set_num_threads(settings.threads)
        return _Run(settings, place).run()
    finally:
        distributed.stop(place)
