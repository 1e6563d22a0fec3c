"""`chargpt serve` under load: aggregate characters/s and time to first character at 1, 4, 16
and 64 concurrent streaming clients, beside `chargpt sample` run one request after another, for
the server as it runs by default, with --quantize int8 and with --deterministic, in one run.

    python benchmarks/serve.py              # the lab model size (about 5 minutes on 2 cores)
    python benchmarks/serve.py --smoke      # a tiny model and little work: checks that it runs
    python benchmarks/serve.py --agreement  # served logits against `chargpt sample`'s (seconds)
    python benchmarks/serve.py --steps      # one decode step: 16 rows against 1 (a minute)
    python benchmarks/serve.py --steps --profile  # ... and torch.profiler's top operations

The model is the lab's size (6 layers, 384 wide, 6 heads, block 256, vocabulary 65) with random
weights, saved as a run in a temporary directory and served by `chargpt serve` in a subprocess
(on 127.0.0.1, a free port), once per --variants entry: `default` (no flag), `int8`
(--quantize int8) and `deterministic` (--deterministic: fixed step shapes). Each client streams
its requests one after another (temperature 1, its own seed, no stop string, so every request
produces exactly --max-tokens characters), from a prompt cut from the bundled Shakespeare. The
clients run in this process, on the same CPU as the server: on a small machine their share of it
is part of what is measured.

The sequential baseline is `chargpt sample`'s work done in this process (the same model loaded
from the run, `chargpt.generation.generate.stream`, the same prompts and lengths, the variant's
--quantize), one request at a time; its rate is per character, so it is measured on
--baseline-requests requests and compared with every row. "x 1 client" compares each row with
the server's own single-stream rate. The server and the baseline use --threads PyTorch threads
(default 1, see --help). The last table puts the variants side by side: 1 client against
`chargpt sample` (goal: 0.8x or more) and 16 clients against sequential `chargpt sample` (goal:
8x or more).

--agreement measures how far the server's numbers are from `chargpt sample`'s: three sequences
at different positions share batched steps (`SlotDecoder`, 16 slots, lean and fixed shapes) past
block_size, beside each decoded alone (the batch of one that `chargpt sample` runs), in fp32 and
in bf16 autocast; it prints the largest difference of a logit and of a probability. The model is
the lab size with random weights, or a trained run's with --run RUN.

--steps times one decode step of the server's decoder with 16 busy slots against the one-row
step of `chargpt sample` (what "16 clients against sequential `chargpt sample`" comes down to,
without HTTP), side by side in one process, interleaved, the best of --step-repeats each, on
--threads threads: 16 rows a few positions apart (as 16 clients that started together stream;
the masked step), 16 rows spread over 64-244 positions (the masked step, keys up to the
longest), 16 rows at one position (the lean step), against one row at position 160. The rows'
lengths are restored after each step, so every repetition runs the same step. --profile adds
torch.profiler's top operations (self CPU time) of the one-row and the spread 16-row steps;
--cpu-time times by the thread's CPU time (one thread on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from chargpt.config import ModelConfig, TrainConfig
from chargpt.data.corpus import load_text
from chargpt.data.tokenizer import CharTokenizer
from chargpt.generation.decoders import SlotDecoder, make_decoder
from chargpt.generation.generate import stream
from chargpt.model import GPTLanguageModel
from chargpt.model.precision import autocast
from chargpt.runs.directory import load_run, save_run

ROOT = Path(__file__).resolve().parents[1]
LAB = ModelConfig(dropout=0.0)  # 6 x 384, 6 heads, block 256
SMOKE = ModelConfig(block_size=32, n_embd=32, n_head=2, n_layer=2, dropout=0.0)
# each server variant's flags for `chargpt serve`; --quantize also applies to its baseline
VARIANTS = {
    "default": [],
    "int8": ["--quantize", "int8"],
    "deterministic": ["--deterministic"],
}
GOALS = {1: 0.8, 16: 8.0}  # clients: the least rate, as a multiple of sequential `chargpt sample`


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model, little work")
    parser.add_argument(
        "--agreement", action="store_true", help="batched against batch-of-one numbers"
    )
    parser.add_argument("--run", type=Path, help="--agreement: a trained run's model instead")
    parser.add_argument("--steps", action="store_true", help="16-row against 1-row step times")
    parser.add_argument("--profile", action="store_true", help="--steps: torch.profiler tables")
    parser.add_argument("--step-repeats", type=int, default=30, help="--steps: the best counts")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="--steps: time by this thread's CPU time, not the wall clock (with --threads 1 on a "
        "shared machine, time spent waiting for a core then does not count)",
    )
    parser.add_argument("--levels", default="1,4,16,64", help="concurrent clients per row")
    parser.add_argument("--max-tokens", type=int, default=200, help="characters per request")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--baseline-requests", type=int, default=4)
    parser.add_argument("--prompt-chars", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--dtype", default="auto", help="the server's and the baseline's dtype")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"servers to measure, each beside its own baseline: any of {', '.join(VARIANTS)}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch threads of the server and the baseline (default 1: on a 2-core machine the "
        "clients need the other core; two server threads and the clients oversubscribe it)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.levels, args.max_tokens, args.baseline_requests = "1,16", 20, 2
        args.requests_per_client = 1
    unknown = set(args.variants.split(",")) - VARIANTS.keys()
    if unknown:
        parser.error(f"unknown --variants {', '.join(sorted(unknown))}: use {', '.join(VARIANTS)}")
    return args


def save_model(directory: Path, config: ModelConfig) -> Path:
    run_dir = directory / "lab-size-random"
    tokenizer = CharTokenizer.from_text(load_text("shakespeare"))
    torch.manual_seed(0)
    model = GPTLanguageModel(config, tokenizer.vocab_size)
    save_run(run_dir, model, tokenizer, config, TrainConfig(), step=0)
    return run_dir


def prompts(count: int, length: int) -> list[str]:
    text = load_text("shakespeare")
    step = len(text) // (count + 1)
    return [text[i * step : i * step + length] for i in range(count)]


def quantize_of(variant: str) -> str:
    flags = VARIANTS[variant]
    return flags[flags.index("--quantize") + 1] if "--quantize" in flags else "none"


def start_server(
    run_dir: Path, args: argparse.Namespace, variant: str, log: Path
) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "chargpt", "serve", "--run", str(run_dir), "--port", "0",
        "--max-batch", str(args.max_batch), "--max-queue", "1024", "--dtype", args.dtype,
        "--threads", str(args.threads), *VARIANTS[variant],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Application startup complete" in text:
            url = text.split(" at ", 1)[1].split("/v1", 1)[0]
            return process, url
        if process.poll() is not None:
            raise SystemExit(f"chargpt serve exited:\n{text}")
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"chargpt serve did not start:\n{log.read_text()}")


async def one_stream(http: httpx.AsyncClient, body: dict) -> tuple[float, int]:
    """(time to first character, characters) of one streamed completion."""
    start, first, chars = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            text = choices[0]["text"] if choices else ""
            if text and first is None:
                first = time.perf_counter() - start
            chars += len(text)
    return first or float("nan"), chars


async def load(url: str, model: str, clients: int, texts: list[str], args) -> dict:
    """`clients` concurrent clients, each streaming its share of `texts` in turn."""
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=None) as http:

        async def client(k: int) -> list[tuple[float, int]]:
            done = []
            for i, prompt in enumerate(texts[k::clients]):
                body = {"model": model, "prompt": prompt, "max_tokens": args.max_tokens}
                body.update(stream=True, seed=k * 1000 + i)
                done.append(await one_stream(http, body))
            return done

        start = time.perf_counter()
        results = await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - start
    ttfts = [t for rows in results for t, _ in rows]
    chars = sum(c for rows in results for _, c in rows)
    return {"chars": chars, "seconds": elapsed, "ttfts": ttfts}


def sequential(run_dir: Path, texts: list[str], args, quantize: str) -> dict:
    """`chargpt sample`'s work, one request after another, in this process."""
    run = load_run(run_dir)
    ttfts, chars = [], 0
    start = time.perf_counter()
    for i, prompt in enumerate(texts):
        begun, first = time.perf_counter(), None
        for piece in stream(run.model, run.tokenizer, prompt, max_new_tokens=args.max_tokens,
                            seed=i, dtype=args.dtype, quantize=quantize):  # fmt: skip
            if first is None:
                first = time.perf_counter() - begun
            chars += len(piece.text)
        ttfts.append(first)
    return {"chars": chars, "seconds": time.perf_counter() - start, "ttfts": ttfts}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def rate(result: dict) -> float:
    return result["chars"] / result["seconds"]


def row(what: str, result: dict, base: float, single: float | None) -> str:
    p50, p99 = (1000 * percentile(result["ttfts"], q) for q in (0.5, 0.99))
    vs_single = f"{rate(result) / single:.1f}x" if single else ""
    return (
        f"| {what} | {len(result['ttfts'])} | {result['chars']:,} | {rate(result):,.1f} | "
        f"{p50:,.0f} | {p99:,.0f} | {rate(result) / base:.1f}x | {vs_single} |"
    )


@torch.inference_mode()
def agreement(
    model: GPTLanguageModel, dtype: torch.dtype, deterministic: bool, steps: int = 300
) -> tuple[float, float]:
    """Largest |logit| and |probability| differences, batched slots against decoding alone."""
    generator = torch.Generator().manual_seed(1)
    texts = [torch.randint(65, (n + steps,), generator=generator).tolist() for n in (3, 17, 40)]
    prompts = [text[: len(text) - steps] for text in texts]
    batched = SlotDecoder(model, 16, dtype=dtype, deterministic=deterministic)
    alone = [make_decoder(model, torch.tensor([prompt])) for prompt in prompts]
    logit, prob = 0.0, 0.0
    with autocast(torch.device("cpu"), dtype):
        for slot, prompt in enumerate(prompts):
            batched.start(slot, prompt)
        for t in range(steps + 1):
            for slot, decoder in enumerate(alone):
                a, b = batched.logits([slot])[0], decoder.logits[0]
                logit = max(logit, (a - b).abs().max().item())
                prob = max(prob, (a.softmax(-1) - b.softmax(-1)).abs().max().item())
            if t == steps:
                break
            nexts = {slot: texts[slot][len(prompt) + t] for slot, prompt in enumerate(prompts)}
            batched.append(nexts)
            for slot, decoder in enumerate(alone):
                decoder.append(torch.tensor([[nexts[slot]]]))
    return logit, prob


def print_agreement(config: ModelConfig, run_dir: Path | None) -> None:
    if run_dir is None:
        torch.manual_seed(0)
        model = GPTLanguageModel(config, 65).eval()
    else:
        model = load_run(run_dir).model  # type: ignore[assignment]
    c = model.config
    print(f"{run_dir or 'random weights'}: {c.n_layer} x {c.n_embd}, block {c.block_size}\n")
    print("| dtype | step shapes | max logit difference | max probability difference |")
    print("|---|---|---:|---:|")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for deterministic in (False, True):
            logit, prob = agreement(model, dtype, deterministic)
            shapes = "fixed (--deterministic)" if deterministic else "lean (default)"
            print(f"| {name} | {shapes} | {logit:.1e} | {prob:.1e} |")


class StepCase:
    """A decoder with `lengths` busy slots (slot i holds lengths[i] positions), whose step of
    every busy slot can be repeated: the lengths are put back after each."""

    clock = time.perf_counter

    def __init__(self, what: str, model: GPTLanguageModel, lengths: list[int], slots: int):
        self.what, self.times = what, []
        generator = torch.Generator().manual_seed(len(lengths))
        ids = [torch.randint(65, (n,), generator=generator).tolist() for n in lengths]
        if slots == 1:  # `chargpt sample`'s decoder: a batch of one
            self.decoder = make_decoder(model, torch.tensor(ids)).decoder
        else:
            self.decoder = SlotDecoder(model, slots)
            for slot, prompt in enumerate(ids):
                self.decoder.start(slot, prompt)
        self.next_ids = {slot: slot % 65 for slot in range(len(lengths))}

    def step(self) -> None:
        lengths = list(self.decoder.lengths)
        self.decoder.step(self.next_ids)
        self.decoder.lengths = lengths

    def timed(self) -> None:
        start = self.clock()
        self.step()
        self.times.append(self.clock() - start)


@torch.inference_mode()
def print_step_times(config: ModelConfig, args: argparse.Namespace) -> None:
    if args.cpu_time:
        StepCase.clock = time.thread_time
    torch.manual_seed(0)
    model = GPTLanguageModel(config, 65).eval()
    scale = config.block_size / 256  # the positions below are the lab size's
    near = [round((150 + s % 5) * scale) for s in range(16)]
    spread = [round((64 + 12 * s) * scale) for s in range(16)]
    one = StepCase("1 row (`chargpt sample`)", model, [round(160 * scale)], 1)
    cases = [
        one,
        StepCase("16 rows, a few positions apart", model, near, 16),
        StepCase("16 rows spread over 64-244", model, spread, 16),
        StepCase("16 rows at one position", model, [near[0]] * 16, 16),
    ]
    for case in cases:  # warm-up
        case.step()
    for _ in range(args.step_repeats):
        for case in cases:
            case.timed()
    print("| step | ms (best) | x the 1-row step |\n|---|---:|---:|")
    best = {case.what: min(case.times) for case in cases}
    for what, seconds in best.items():
        print(f"| {what} | {1000 * seconds:.2f} | {seconds / best[one.what]:.2f} |")
    if args.profile:
        for case in (one, cases[2]):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(20):
                    case.step()
            print(f"\n{case.what}, 20 steps:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def measure(run_dir: Path, texts: list[str], args, variant: str, log: Path) -> dict[int, dict]:
    """The variant's rows: its sequential baseline (key 0) and each level of clients."""
    base = sequential(run_dir, texts[: args.baseline_requests], args, quantize_of(variant))
    rows = {0: base}
    process, url = start_server(run_dir, args, variant, log)
    try:
        asyncio.run(load(url, run_dir.name, 1, texts[:1], args))  # warm-up, not shown
        print(f"\n## server: {variant} ({' '.join(VARIANTS[variant]) or 'no flag'})\n")
        print("| clients | requests | characters | chars/s | TTFT p50 ms | TTFT p99 ms "
              "| x sequential | x 1 client |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        quantize = quantize_of(variant)
        flag = "" if quantize == "none" else f" --quantize {quantize}"
        print(row(f"sequential `chargpt sample{flag}`", base, rate(base), None))
        for clients in [int(n) for n in args.levels.split(",")]:
            count = clients * args.requests_per_client
            rows[clients] = asyncio.run(load(url, run_dir.name, clients, texts[:count], args))
            single = rate(rows[1]) if 1 in rows else None
            print(row(str(clients), rows[clients], rate(base), single), flush=True)
    finally:
        process.terminate()
        process.wait(30)
    return rows


def print_summary(results: dict[str, dict[int, dict]]) -> None:
    """The variants side by side against their `chargpt sample` baselines, with the goals."""
    print("\n## side by side\n")
    header = "| server | `chargpt sample` chars/s |"
    for clients, goal in GOALS.items():
        clients_label = f"{clients} client" + "s" * (clients > 1)
        header += f" {clients_label} chars/s | x sample (goal {goal:g}x) |"
    print(header + "\n|---|---:|" + "---:|---:|" * len(GOALS))
    for variant, rows in results.items():
        base = rate(rows[0])
        line = f"| {variant} | {base:,.1f} |"
        for clients, goal in GOALS.items():
            if clients not in rows:
                line += " | |"
                continue
            ratio = rate(rows[clients]) / base
            mark = "met" if ratio >= goal else "not met"
            line += f" {rate(rows[clients]):,.1f} | {ratio:.2f}x ({mark}) |"
        print(line)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    levels = [int(n) for n in args.levels.split(",")]
    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
    print(f"# chargpt serve: {cpu}, PyTorch {torch.__version__}, {args.threads} thread(s)")
    config = SMOKE if args.smoke else LAB
    if args.agreement:
        return print_agreement(config, args.run)
    if args.steps:
        return print_step_times(config, args)
    print(
        f"model {config.n_layer} x {config.n_embd}, block {config.block_size}; "
        f"{args.max_tokens} characters per request from {args.prompt_chars}-character "
        f"prompts; server --max-batch {args.max_batch}, --dtype {args.dtype}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = save_model(Path(tmp), config)
        texts = prompts(max(levels) * args.requests_per_client, args.prompt_chars)
        results = {
            variant: measure(run_dir, texts, args, variant, Path(tmp) / f"{variant}.log")
            for variant in args.variants.split(",")
        }
    print_summary(results)


if __name__ == "__main__":
    main()
