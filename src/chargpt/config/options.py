"""Every option, defined once: dataclasses from which CLI flags, TOML files and config.json come."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from chargpt.errors import ChargptError, OptionError


def option(default: Any, help: str, **choices: Any) -> Any:
    """A dataclass field that carries its CLI help text."""
    return field(default=default, metadata={"help": help, **choices})


Quantize = Literal["none", "int8"]  # the weight formats of chargpt.model.quantize
Dtype = Literal["auto", "fp32", "bf16", "fp16"]  # the precisions of chargpt.model.precision
# the largest seed: int64's, as OpenAI's API; sample i's `seed + i` still fits torch's uint64
MAX_SEED = 2**63 - 1
# a preset's warmup is at most this fraction of a step-count run (so `--max-iters 50` works)
PRESET_WARMUP_FRACTION = 0.1
DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"
FORWARD_DTYPE_HELP = (
    "precision of the forward passes; auto picks bf16 on GPUs that run it natively, fp16 on "
    "GPUs that only emulate bf16 (measured at start-up), fp32 on CPUs"
)
QUANTIZE_HELP = (
    "none: the weights as trained; int8: int8 weights, faster on the CPU (quantized in memory "
    "after loading: the run keeps its fp32 weights)"
)


@dataclass
class ModelConfig:
    """The network's shape; saved with every run so that the run rebuilds the model alone."""

    model: Literal["gpt", "bigram"] = option("gpt", "model family: the lab's GPT or its baseline")
    block_size: int = option(256, "context length T: how many characters the model sees")
    n_embd: int = option(384, "embedding width C (divisible by n_head)")
    n_head: int = option(6, "attention heads per block; head_size = n_embd // n_head")
    n_layer: int = option(6, "decoder blocks")
    dropout: float = option(0.2, "dropout probability in attention, projections and MLP")
    attention: Literal["fused", "reference"] = option(
        "fused", "fused: one QKV projection + scaled_dot_product_attention; reference: lab's Heads"
    )
    # recipe options: each default is the lab's choice (docs: README "Recipe options")
    pos_emb: Literal["learned", "rope"] = option(
        "learned", "positions: a learned embedding table (lab), or rotary embeddings on q and k"
    )
    norm: Literal["layernorm", "rmsnorm"] = option(
        "layernorm", "normalisation in the blocks and before the LM head"
    )
    qk_norm: bool = option(False, "RMS-normalise each head's queries and keys before attention")
    mlp: Literal["relu", "relu2", "gelu"] = option(
        "relu", "feed-forward activation: ReLU (lab), squared ReLU or GELU"
    )
    tie_embeddings: bool = option(
        False, "share one matrix between the token embedding and the LM head"
    )

    def validate(self) -> None:
        positive("block_size", self.block_size)
        if self.model == "gpt":
            for name in ("n_embd", "n_head", "n_layer"):
                positive(name, getattr(self, name))
            if self.n_embd % self.n_head:
                raise ChargptError(
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                    "pick n_embd = n_head * head_size"
                )
            if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
                raise ChargptError(
                    f"rotary embeddings need an even head size, got {self.n_embd // self.n_head}: "
                    "pick n_embd and n_head with n_embd // n_head even"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ChargptError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """How to train: the lab's loop settings plus schedule, clipping, precision and seed."""

    batch_size: int = option(64, "sequences per micro-batch (B)")
    grad_accum: int = option(
        0,
        "micro-batches per optimisation step, over all processes together (a multiple of "
        "the process count): the global batch is batch_size * grad_accum, whatever the count "
        "(0: one per process)",
    )
    max_iters: int = option(5000, "optimisation steps (unless --max-time is given)")
    eval_interval: int = option(500, "steps between train/val loss estimates")
    eval_iters: int = option(200, "batches averaged by each loss estimate")
    log_interval: int = option(
        10, "steps between training-loss reports and, under torchrun, checks for a stop signal"
    )
    max_time: str = option(
        "",
        "train for this much training time (e.g. 90s, 5m, 1h; evaluations not counted, all "
        "sessions of a run together), with the LR decay following the elapsed fraction of it "
        "instead of the steps; max_iters and lr_decay_iters are then ignored (empty: off)",
    )
    learning_rate: float = option(3e-4, "peak AdamW learning rate")
    min_lr: float = option(3e-4, "learning rate at the end of cosine decay")
    warmup_iters: int = option(
        0,
        "steps of linear warmup from 0 to learning_rate (when not given: the preset's, cut to "
        f"{PRESET_WARMUP_FRACTION:.0%} of the schedule's steps in a shorter run)",
    )
    lr_schedule: Literal["constant", "cosine"] = option(
        "constant", "constant, or cosine decay from learning_rate to min_lr after warmup"
    )
    lr_decay_iters: int = option(
        0,
        "step at which cosine decay reaches min_lr, where the rate then stays; fixed when the "
        "run starts, so that a resumed run with a larger --max-iters goes on at min_lr "
        "(0: the run's first max_iters)",
    )
    weight_decay: float = option(0.01, "AdamW weight decay on matrices (not biases or norms)")
    beta2: float = option(0.999, "AdamW beta2")
    optimizer: Literal["adamw", "muon"] = option(
        "adamw",
        "adamw for every weight, or torch.optim.Muon (torch >= 2.9) for the blocks' matrices "
        "with AdamW for embeddings, LM head, biases and gains",
    )
    muon_lr: float = option(0.02, "peak Muon learning rate, following the same schedule")
    ema_decay: float = option(
        0.0,
        "evaluate, and save as the best model, an exponential moving average of the weights "
        "with this decay per step, e.g. 0.999 (0: off)",
    )
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)")
    seed: int = option(1337, "random seed for init, batches and dropout")
    device: str = option("auto", DEVICE_HELP)
    dtype: Dtype = option(
        "auto",
        "training precision: bf16 or fp16 autocast with fp32 weights (fp16 with a gradient "
        "scaler), or fp32; auto measures at start-up: bf16 where the device runs it natively, "
        "else fp16 where it is fast (GPUs that emulate bf16), else fp32",
    )
    compile: bool = option(False, "torch.compile the model")
    sample_chars: int = option(200, "characters sampled at each evaluation (0: none)")
    init_from: str = option("", "fine-tune this run's saved weights, in its shape (empty: off)")
    on_unknown: Literal["add", "skip", "error"] = option(
        "add", "with init_from: data characters the run never saw are added, skipped or an error"
    )
    tensorboard: bool = option(False, "also write TensorBoard event files into the run directory")

    def validate(self) -> None:
        for name in ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            positive(name, getattr(self, name))
        if not 0 < self.learning_rate < float("inf"):
            raise ChargptError(f"learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("min_lr", "weight_decay", "grad_clip", "sample_chars"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ChargptError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        for name in ("grad_accum", "warmup_iters", "lr_decay_iters"):
            if getattr(self, name) < 0:
                raise ChargptError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.muon_lr < float("inf"):
            raise ChargptError(f"muon_lr must be a positive number, got {self.muon_lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ChargptError(f"ema_decay must be in [0, 1) (0: off), got {self.ema_decay}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ChargptError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed}")
        if self.max_time:
            parse_duration(self.max_time)
        if not 0.0 < self.beta2 < 1.0:
            raise ChargptError(f"beta2 must be in (0, 1), got {self.beta2}")
        if self.min_lr > self.learning_rate:
            raise ChargptError(
                f"min_lr ({self.min_lr}) exceeds learning_rate ({self.learning_rate}): "
                "pass a --min-lr no larger than --learning-rate"
            )
        for name in () if self.max_time else ("max_iters", "lr_decay_iters"):
            if 0 < getattr(self, name) < self.warmup_iters:
                raise ChargptError(
                    f"warmup_iters ({self.warmup_iters}) exceeds {name} ({getattr(self, name)}): "
                    f"pass a --warmup-iters of at most {getattr(self, name)}"
                    + (" or a larger --max-iters" if name == "max_iters" else "")
                )


@dataclass
class SampleConfig:
    """How to generate: length, randomness controls, stop strings, batch, seed, long contexts."""

    max_new_tokens: int = option(500, "characters to generate per sample")
    temperature: float = option(
        1.0, "divide the logits by this before sampling; 0 (or below 1e-5) is greedy"
    )
    top_k: int = option(0, "sample among the k likeliest characters only (0: no limit)")
    top_p: float = option(
        1.0, "nucleus: sample among the fewest likeliest characters whose probability reaches top_p"
    )
    stop: tuple[str, ...] = option(
        (), "end a sample when it produces this text, which is not kept (repeatable)"
    )
    num_samples: int = option(1, "samples, generated together as one batch")
    seed: int = option(-1, "seed of sample 0; sample i uses seed + i (-1: pick one at random)")
    on_unknown: Literal["error", "skip"] = option(
        "error", "prompt characters the model never saw: error lists them, skip drops them"
    )
    kv_cache: bool = option(True, "reuse earlier positions' keys and values (fused GPT)")
    long_context: Literal["window", "exact"] = option(
        "window",
        "past block_size, exact re-reads the last block_size characters for every new one "
        "(the lab's meaning, slow); window re-prefills the last window_keep of them when the "
        "cache fills (see docs/generation.md)",
    )
    window_keep: float = option(
        0.5, "window mode: fraction of block_size kept when the cache fills, in (0, 1)"
    )
    dtype: Dtype = option("auto", FORWARD_DTYPE_HELP)
    quantize: Quantize = option("none", QUANTIZE_HELP)

    def validate(self) -> None:
        check_quantize_dtype(self.quantize, self.dtype)
        if self.max_new_tokens < 0:
            raise OptionError(
                "max_new_tokens", f"max_new_tokens must not be negative, got {self.max_new_tokens}"
            )
        if not 0.0 <= self.temperature < float("inf"):
            raise OptionError(
                "temperature", f"temperature must be 0 (greedy) or more, got {self.temperature}"
            )
        if self.top_k < 0:
            raise OptionError(
                "top_k", f"top_k must be at least 1 (or 0 for no limit), got {self.top_k}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise OptionError("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if "" in self.stop:
            raise OptionError("stop", "a stop string must not be empty")
        positive("num_samples", self.num_samples)
        if not -1 <= self.seed <= MAX_SEED:
            raise OptionError(
                "seed",
                f"seed must be an integer in 0..{MAX_SEED} (or -1: a random one), got {self.seed}",
            )
        if not 0.0 < self.window_keep < 1.0:
            raise OptionError(
                "window_keep", f"window_keep must be in (0, 1), got {self.window_keep}"
            )


@dataclass
class LoadConfig:
    """Where a command puts the run it loads and how it reads text files: flags of the commands
    that do (not saved with a run: training has TrainConfig.device)."""

    device: str = option("auto", DEVICE_HELP)
    encoding_errors: Literal["strict", "replace", "ignore"] = option(
        "strict",
        "bytes that are not UTF-8: strict stops at the first with an error, replace puts U+FFFD "
        "in their place, ignore drops them",
    )
    backend: Literal["pytorch", "onnxruntime"] = option(
        "pytorch",
        "what runs the model: pytorch, or onnxruntime on the CPU (the export extra; the run's "
        "ONNX export, see --onnx)",
    )
    onnx: str = option(
        "",
        "onnxruntime backend: this `chargpt export --format onnx` file of the run (empty: export "
        "the run to a temporary file first)",
    )


def check_quantize_dtype(quantize: str, dtype: str) -> None:
    if quantize == "int8" and dtype in ("bf16", "fp16"):
        raise ChargptError(
            f"quantize int8 runs everything but its int8 products in fp32: drop --dtype {dtype}"
        )


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `90s`, `5m`, `1.5h` or `300` (seconds)."""
    value, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(value) * DURATION_UNITS[unit]
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ChargptError(
            f"max_time must be a positive duration such as 90s, 5m or 1h, got {text!r}"
        )
    return seconds


def positive(name: str, value: int) -> None:
    if value <= 0:
        raise ChargptError(f"{name} must be a positive integer, got {value}")
