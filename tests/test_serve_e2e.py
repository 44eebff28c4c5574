"""`clora serve` as a user runs it: embedded broker and Redis, CLI-made customer, openai SDK,
capture on Kafka, feedback into the replay buffer, a published adapter, the engine SIGKILLed and
brought back with its adapters, the whole of `clora serve` SIGKILLed right after an answer and
feedback on it and started again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
import redis.asyncio as aioredis

from clora.core.processes import free_port
from clora.feedback.replay import ReplayBuffer
from tests.test_gateway import MESSAGES, captured

pytestmark = pytest.mark.slow
CLORA = [sys.executable, "-m", "clora.cli.main"]


def wait_until(predicate, timeout_s: float, what: str, where=None):
    """`predicate()`'s first truthy value; a timeout says what it waited for and, given `where`,
    where things stood (the ingestion's state, for a wait on the buffer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise TimeoutError(f"{what}; {where()}" if where else what)


def ingestion(url: str) -> str:
    try:
        return f"ingestion: {httpx.get(f'{url}/healthz', timeout=5).json().get('ingestion')}"
    except (httpx.HTTPError, ValueError) as exc:
        return f"/healthz: {exc!r}"


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def greedy(client: openai.OpenAI) -> list[int]:
    reply = client.chat.completions.create(model="default", messages=MESSAGES, max_tokens=10, temperature=0,
                                           extra_body={"return_token_ids": True})
    return reply.choices[0].model_extra["token_ids"]


def served(client: openai.OpenAI, bootstrap: str) -> str | None:
    """The adapter version that answered a greedy request, as its capture record says. Greedy token
    ids are not compared across requests: the tiny random model's near-uniform logits flip on the
    rounding differences of different batch mixes (other customers', the trainer's, the evals')."""
    raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, max_tokens=4,
                                                           temperature=0)
    trace_id = raw.headers["x-clora-trace-id"]
    return captured(bootstrap, "clora.interactions", {trace_id})[trace_id].adapter


def trainer_metrics(port: str) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None


def test_clora_serve_end_to_end(tiny_model: Path, make_adapter, tmp_path: Path):
    env = {**os.environ, "CLORA_HOME": str(tmp_path / "home"), "CLORA_MODEL": str(tiny_model),
           "CLORA_PORT": str(free_port()), "CLORA_KV_CACHE_GIB": "1", "CLORA_MAX_MODEL_LEN": "1024",
           "CLORA_EVAL_INTERVAL_S": "2", "CLORA_TRAINER_METRICS_PORT": str(free_port())}
    def start_serve() -> subprocess.Popen:  # its own process group, as a service manager would start it
        return subprocess.Popen([*CLORA, "serve"], env=env, stdout=open(tmp_path / "serve.out", "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    serve = start_serve()
    state_file = tmp_path / "home" / "serve.json"
    try:
        state = wait_until(lambda: state_file.exists() and json.loads(state_file.read_text()), 300, "serve.json")
        url = state["gateway_url"]
        wait_until(lambda: healthy(url), 120, "healthy gateway")
        # Only the gateway listens: vLLM's own app (no key) is not served unless in diagnosis mode.
        assert state["engine_url"] is None
        listening = {c.laddr.port for c in psutil.Process(serve.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {int(env["CLORA_PORT"])}

        key = subprocess.run([*CLORA, "customers", "create", "e2e"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip()
        # The trainer learns from a lone record after max_record_wait_s; here it waits for min_records,
        # so the versions this test publishes are e2e's only ones.
        subprocess.run([*CLORA, "trainer-config", "set", "e2e", "max_record_wait_s=86400"], env=env, check=True,
                       capture_output=True)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, max_tokens=8)
        trace_id = raw.headers["x-clora-trace-id"]
        record = captured(state["kafka_bootstrap"], "clora.interactions", {trace_id})[trace_id]
        assert record.customer == "e2e" and record.choices[0].token_ids and record.choices[0].logprobs

        # Feedback on that answer reaches e2e's replay buffer through the webhook, Kafka and ingestion.
        fb = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                        json={"trace_id": trace_id, "correction": {"role": "assistant", "content": "Hello!"}})
        assert fb.status_code == 202, fb.text

        async def buffered() -> list:
            client_ = aioredis.Redis.from_url(json.loads(state_file.read_text())["redis_url"])
            try:
                return await ReplayBuffer(client_).sample("e2e", 5)
            finally:
                await client_.aclose()

        records = wait_until(lambda: asyncio.run(buffered()), 120, "feedback in the replay buffer",
                             lambda: ingestion(url))
        assert records[0].event_id == fb.json()["event_ids"][0]
        assert records[0].completion_token_ids == record.choices[0].token_ids

        base_ids = greedy(client)
        subprocess.run([*CLORA, "adapters", "publish", "e2e", str(make_adapter(seed=99))], env=env, check=True,
                       capture_output=True)
        adapter_ids = greedy(client)
        assert adapter_ids != base_ids
        bootstrap = state["kafka_bootstrap"]
        assert served(client, bootstrap) == "e2e.v1"

        # The engine core dies; the supervisor restarts it and reloads e2e's adapter before serving again.
        engines = [p for p in psutil.Process(serve.pid).children(recursive=True)
                   if "EngineCore" in " ".join(p.cmdline())]
        assert len(engines) == 1
        engines[0].send_signal(signal.SIGKILL)
        wait_until(lambda: not healthy(url), 30, "engine death noticed")
        with pytest.raises(openai.APIStatusError) as refused:
            greedy(client)
        assert refused.value.status_code == 503
        wait_until(lambda: healthy(url), 300, "engine restarted")
        assert served(client, bootstrap) == "e2e.v1"

        # Evals: a candidate is registered, not served, until the periodic eval job's gate promotes
        # it; rollback serves the previous version again; the CLI shows the decisions.
        def clora(*args: str) -> str:
            return subprocess.run([*CLORA, *args], env={**env, "COLUMNS": "200"}, check=True, capture_output=True,
                                  text=True).stdout
        clora("eval", "suite", "e2e", "--env", "token-range:0-100000", "--n", "3", "--max-tokens", "4")
        assert "not served yet" in clora("adapters", "publish", "e2e", str(make_adapter(seed=98)), "--candidate")
        # v1, unless the gate (every 2 s) has promoted v2 already: the gate routes, then records its
        # decision, so a v2 answer means the "promoted" record follows within moments.
        gate_promoted = lambda: "promoted e2e.v2" in clora("eval")  # noqa: E731
        answered_by = served(client, bootstrap)
        assert answered_by == "e2e.v1" or (answered_by == "e2e.v2" and wait_until(gate_promoted, 10, "decision"))
        wait_until(lambda: served(client, bootstrap) == "e2e.v2", 60, "candidate promoted")
        wait_until(gate_promoted, 10, "promotion recorded")
        assert "no new candidates" in clora("eval", "run")
        assert "rollback" in clora("eval", "rollback", "e2e")
        assert served(client, bootstrap) == "e2e.v1"
        history = clora("eval", "history", "e2e")
        assert history.index("promoted") < history.index("rollback")

        # Trainer configs through the admin API: changed settings, the others kept; an environment
        # the trainer cannot build is refused by the CLI, a rank the engine cannot serve by the gateway.
        shown = clora("trainer-config", "set", "e2e", "lr=0.002", "records_per_step=6")
        assert "0.002" in shown and "records_per_step" in shown
        assert "0.002" in clora("trainer-config", "show", "e2e")
        for bad, why in (("environment=nope:1", "unknown environment 'nope'"), ("rank=64", "max_lora_rank 16")):
            refused = subprocess.run([*CLORA, "trainer-config", "set", "e2e", bad], env={**env, "COLUMNS": "200"},
                                     capture_output=True, text=True)
            assert refused.returncode == 1 and why in refused.stderr, refused.stderr

        # The trainer exports its metrics (steps, rated records by path, logprob gap).
        metrics = wait_until(lambda: trainer_metrics(env["CLORA_TRAINER_METRICS_PORT"]), 60, "trainer metrics")
        assert "clora_trainer_logprob_gap_nats" in metrics and "clora_trainer_records_total" in metrics

        # The trainer child dies; clora serve starts it again.
        def trainers() -> list[psutil.Process]:
            found = []
            for p in psutil.Process(serve.pid).children(recursive=True):
                try:
                    if "clora.cli.main train" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
                except psutil.Error:  # gone, or a zombie awaiting its reaper
                    pass
            return found
        first = trainers()
        assert len(first) == 1
        first[0].send_signal(signal.SIGKILL)
        again = wait_until(lambda: [p for p in trainers() if p.pid != first[0].pid], 60, "trainer restarted")
        assert len(again) == 1

        # The whole of clora serve is SIGKILLed right after an answer and a 202 for feedback on it
        # (the interaction still in capture's memory, the broker in-memory), then started again on
        # the same home: the event reaches the buffer within 60 s of healthy, and its fate says so.
        raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, max_tokens=4)
        last_trace = raw.headers["x-clora-trace-id"]
        fb = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                        json={"trace_id": last_trace, "rating": "up"})
        assert fb.status_code == 202, fb.text
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait(30)
        last_event = fb.json()["event_ids"][0]
        serve = start_serve()
        wait_until(lambda: json.loads(state_file.read_text())["pid"] == serve.pid, 300, "serve.json of the restart")
        wait_until(lambda: healthy(url), 300, "healthy after the restart")
        wait_until(lambda: last_event in {r.event_id for r in asyncio.run(buffered())}, 60,
                   "feedback accepted before the SIGKILL in the buffer", lambda: ingestion(url))
        admin = {"Authorization": f"Bearer {(tmp_path / 'home' / 'admin_key').read_text().strip()}"}
        fate = httpx.get(f"{url}/admin/customers/e2e/feedback/{last_event}", headers=admin, timeout=30).json()
        assert fate["state"] in ("in_buffer", "trained") and fate["trace_id"] == last_trace, fate

        children = psutil.Process(serve.pid).children(recursive=True)
        serve.send_signal(signal.SIGINT)
        assert serve.wait(60) == 0
        wait_until(lambda: not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children),
                   30, "children stopped")
        assert not state_file.exists()
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        print((tmp_path / "serve.out").read_text()[-3000:])
