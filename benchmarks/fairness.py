"""One customer flooding the gateway vs another's latency: is the engine shared fairly?

Starts `clora serve` (SmolLM2-135M-Instruct unless CLORA_MODEL is set; trainer off) once per
setting (CLORA_CUSTOMER_MAX_CONCURRENT / CLORA_FAIR_SHARE_REQUESTS) and measures the quiet
customer's latency (one request at a time, 16-token answers) alone, then while the flooding
customer keeps `--flood` requests of 64 tokens in flight (its 429s counted, retried after a short
pause as a client would; its answers counted). The claim: at the default settings the quiet
customer's p50 stays within 2x of its unloaded p50. Writes benchmarks/results/fairness.json.

    .venv/bin/python benchmarks/fairness.py [--flood 32] [--settings 64/0,64/8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from gateway_overhead import PROMPT, create_customer, pct, start_serve  # noqa: E402

from clora.core.provenance import provenance  # noqa: E402


async def quiet_latencies(url: str, key: str, seconds: float) -> list[float]:
    body = {"model": "default", "messages": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    out: list[float] = []
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {key}"}) as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            resp = await client.post(f"{url}/v1/chat/completions", json=body)
            resp.raise_for_status()
            out.append((time.perf_counter() - started) * 1000)
    return out


async def flood(url: str, key: str, workers: int, stop: asyncio.Event) -> dict:
    body = {"model": "default", "messages": PROMPT, "max_tokens": 64, "temperature": 0, "ignore_eos": True}
    counts = {"ok": 0, "429": 0, "other": 0}
    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(timeout=600, limits=limits, headers={"Authorization": f"Bearer {key}"}) as client:
        async def worker() -> None:
            while not stop.is_set():
                resp = await client.post(f"{url}/v1/chat/completions", json=body)
                kind = "ok" if resp.status_code == 200 else "429" if resp.status_code == 429 else "other"
                counts[kind] += 1
                if kind != "ok":
                    await asyncio.sleep(0.2)
        await asyncio.gather(*(worker() for _ in range(workers)))
    return counts


async def measure(limit: int, fair_share: int, workers: int, seconds: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix="clora-fair-"))
    (home / "cache").symlink_to((REPO / ".clora" / "cache").resolve(), target_is_directory=True)
    proc, state, env = start_serve(home, {"CLORA_CUSTOMER_MAX_CONCURRENT": str(limit),
                                          "CLORA_FAIR_SHARE_REQUESTS": str(fair_share),
                                          "CLORA_CUSTOMER_REQUESTS_PER_S": "0"})
    try:
        url = state["gateway_url"]
        quiet, noisy = create_customer(env, "quiet"), create_customer(env, "noisy")
        await quiet_latencies(url, quiet, 5)  # warm-up
        alone = await quiet_latencies(url, quiet, seconds)
        stop = asyncio.Event()
        flooding = asyncio.create_task(flood(url, noisy, workers, stop))
        await asyncio.sleep(5)  # the flood at its steady state
        loaded = await quiet_latencies(url, quiet, seconds)
        stop.set()
        counts = await flooding
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    p50_alone, p50_loaded = pct(alone, 0.5), pct(loaded, 0.5)
    return {"max_concurrent": limit, "fair_share_requests": fair_share, "flood_workers": workers, "quiet_p50_alone_ms": round(p50_alone, 1),
            "quiet_p50_flooded_ms": round(p50_loaded, 1), "quiet_p99_flooded_ms": round(pct(loaded, 0.99), 1),
            "ratio": round(p50_loaded / p50_alone, 2), "quiet_requests": [len(alone), len(loaded)],
            "flood_answers": counts}


async def main(args: argparse.Namespace) -> dict:
    started_at = datetime.now(timezone.utc)
    rows = []
    for limit, fair_share in args.settings:
        rows.append(await measure(limit, fair_share, args.flood, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    # No Settings here: each row's `clora serve` runs under `command`'s CLORA_ variables and the row's own.
    return {"benchmark": "fairness", **provenance("python benchmarks/fairness.py", started_at=started_at),
            "at": time.time(), "rows": rows}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", type=int, default=32, help="the flooding customer's requests in flight")
    parser.add_argument("--settings", type=lambda s: [tuple(int(x) for x in p.split("/")) for p in s.split(",")],
                        default=[(64, 0), (64, 8)], help="CLORA_CUSTOMER_MAX_CONCURRENT/CLORA_FAIR_SHARE_REQUESTS "
                        "pairs to measure (default: fair share off, then the defaults)")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fairness.json")
    cli = parser.parse_args()
    result = asyncio.run(main(cli))
    cli.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {cli.out}")
