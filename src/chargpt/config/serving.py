"""`chargpt serve`'s options: how the server listens and what it accepts (every limit with a safe
default). A module of its own beside the other options: the same `option` fields, the same flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chargpt.config.options import (
    DEVICE_HELP,
    FORWARD_DTYPE_HELP,
    QUANTIZE_HELP,
    Dtype,
    Quantize,
    check_quantize_dtype,
    option,
    positive,
)
from chargpt.errors import ChargptError


@dataclass
class ServeConfig:
    """How `chargpt serve` listens and what it accepts; every limit has a safe default."""

    host: str = option("127.0.0.1", "address to listen on: loopback unless told otherwise")
    allowed_host: tuple[str, ...] = option(
        (),
        "Host name to answer besides localhost, 127.0.0.1, [::1] and --host itself "
        "(repeatable; *.domain)",
    )
    port: int = option(8000, "TCP port to listen on")
    api_key: str = option(
        "",
        "require `Authorization: Bearer KEY` on /v1/; $CHARGPT_API_KEY also sets it "
        "(empty: no key)",
    )
    max_batch: int = option(16, "sequences decoded together, one character each per step")
    deterministic: bool = option(
        False,
        "every step runs all --max-batch slots over all block_size keys, so that a sequence's "
        "numbers never depend on the batch (alone == batched, bit for bit), at the cost of "
        "speed when few sequences run (see docs/serving.md)",
    )
    max_queue: int = option(64, "sequences waiting for a place in the batch; more get 429")
    max_tokens_limit: int = option(
        4096, "characters one request may ask for in all (prompts x n x max_tokens)"
    )
    max_prompt_chars: int = option(16384, "characters of a request's prompts together")
    max_echo_chars: int = option(
        262_144, "prompt characters one request may echo back, x n x (1 + logprobs): its size"
    )
    max_body_bytes: int = option(1_048_576, "request body size in bytes; larger bodies get 413")
    max_inspect_weights: int = option(
        4_194_304,
        "attention weights one /v1/inspect answer may hold: layers x heads x T(T+1)/2 for T "
        "characters (2 bytes each in the answer)",
    )
    device: str = option("auto", DEVICE_HELP)
    threads: int = option(0, "PyTorch intra-op threads (0: PyTorch's default)")
    dtype: Dtype = option("auto", FORWARD_DTYPE_HELP)
    grace_period: float = option(
        10.0, "seconds that requests in flight get to finish after SIGTERM before they are cut"
    )
    quantize: Quantize = option("none", QUANTIZE_HELP)

    def validate(self) -> None:
        check_quantize_dtype(self.quantize, self.dtype)
        for name in [f.name for f in dataclasses.fields(self) if f.name.startswith("max_")]:
            positive(name, getattr(self, name))  # every limit
        for name in self.allowed_host:
            if "*" in name[1:] or (name.startswith("*") and not name.startswith("*.")):
                raise ChargptError(f"allowed_host takes a name or *.domain, got {name!r}")
        if not 0 <= self.port <= 65535:
            raise ChargptError(f"port must be in 0..65535, got {self.port}")
        if self.threads < 0:
            raise ChargptError(f"threads must be 0 (the default) or more, got {self.threads}")
        if not 0 <= self.grace_period < float("inf"):
            raise ChargptError(f"grace_period must be a number >= 0, got {self.grace_period}")
