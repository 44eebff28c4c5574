"""An upgrade as an operator does it: `clora serve` of the previous release (its source taken from
this repository's history) writes a data directory, a customer trains a step on it and is served
the trained version; then this release starts on the same directory, serves that version, and
training resumes from the checkpoint (the next step is step 2, not a fresh step 1)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import openai
import pytest

from clora.core.processes import free_port
from tests.test_gateway import MESSAGES, captured
from tests.test_serve_e2e import healthy, wait_until

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
# The release before the trainer, the settings and the docs were split up (issue 44); a later data
# format change names the release before it here.
PREVIOUS_RELEASE = "98d410f"
PACKAGE_DIRS = {"runtime": "runtime", "feedback": "feedback", "agents": "agents", "trainer": "trainer",
                "evals": "evals"}  # pyproject's package-dir: clora.<key> lives in <value>/


def release_tree(commit: str, out: Path) -> Path:
    """`commit`'s source laid out as the installed `clora` package (its package-dir mapping), for
    PYTHONPATH: it imports ahead of the editable install of this checkout."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], capture_output=True)
    assert archive.returncode == 0, (f"release {commit} not in this clone's history (a shallow clone?): "
                                     f"{archive.stderr.decode()}")
    src = out / "src"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    package = out / "pkg" / "clora"
    shutil.copytree(src / "clora", package)
    for name, directory in PACKAGE_DIRS.items():
        shutil.copytree(src / directory, package / name)
    return out / "pkg"


class Serve:
    """`clora serve` (and its CLI) of one release on one home, run from outside any checkout."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path):
        self.env, self.cwd, self.log = env, cwd, log
        self.process: subprocess.Popen | None = None

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "clora.cli.main", *args], env={**self.env, "COLUMNS": "200"},
                              cwd=self.cwd, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self) -> dict:
        self.process = subprocess.Popen([sys.executable, "-m", "clora.cli.main", "serve"], env=self.env, cwd=self.cwd,
                                        stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        state_file = Path(self.env["CLORA_HOME"]) / "serve.json"
        def mine() -> dict | None:
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            return state if state.get("pid") == self.process.pid else None
        state = wait_until(mine, 300, "serve.json")
        wait_until(lambda: healthy(state["gateway_url"]), 300, "healthy gateway")
        return state

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(90) == 0

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)


def versions(state: dict, home: Path, customer: str) -> dict:
    admin = {"Authorization": f"Bearer {(home / 'admin_key').read_text().strip()}"}
    return httpx.get(f"{state['gateway_url']}/admin/customers/{customer}/adapters", headers=admin, timeout=30).json()


def trained_by(state: dict, home: Path, customer: str, step: int) -> dict | None:
    return next((v for v in versions(state, home, customer)["versions"] if v["source"] == f"trainer:step-{step:08d}"),
                None)


def teach(state: dict, key: str, n: int) -> list[str]:
    """`n` answers, each corrected through the feedback webhook; their trace ids."""
    client = openai.OpenAI(base_url=f"{state['gateway_url']}/v1", api_key=key, max_retries=0)
    traces = []
    for _ in range(n):
        raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, max_tokens=6)
        traces.append(raw.headers["x-clora-trace-id"])
        fb = httpx.post(f"{state['gateway_url']}/v1/feedback", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                        json={"trace_id": traces[-1], "correction": {"role": "assistant", "content": "Hello there!"}})
        assert fb.status_code == 202, fb.text
    return traces


def test_a_data_directory_of_the_previous_release_starts_serves_and_resumes_training(tiny_model: Path, tmp_path: Path):
    home = tmp_path / "home"
    env = {**os.environ, "CLORA_HOME": str(home), "CLORA_MODEL": str(tiny_model), "CLORA_PORT": str(free_port()),
           "CLORA_KV_CACHE_GIB": "1", "CLORA_MAX_MODEL_LEN": "1024", "CLORA_EVAL_INTERVAL_S": "0",
           "CLORA_TRAINER_METRICS_PORT": "0", "CLORA_TRAINER_IDLE_S": "1"}
    env.pop("PYTHONPATH", None)
    old_env = {**env, "PYTHONPATH": str(release_tree(PREVIOUS_RELEASE, tmp_path / "release"))}
    old = Serve(old_env, tmp_path, tmp_path / "old-serve.out")
    new = Serve(env, tmp_path, tmp_path / "new-serve.out")
    where = subprocess.run(  # the old release is what runs, not this checkout
        [sys.executable, "-c", "import clora.trainer.loop as m; print(m.__file__)"], env=old_env, cwd=tmp_path,
        capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(tmp_path / "release")), where
    try:
        state = old.start()
        key = old.cli("customers", "create", "veteran").strip()
        old.cli("trainer-config", "set", "veteran", "rank=4", "alpha=8", "min_records=2", "records_per_step=4",
                "max_record_wait_s=86400")
        teach(state, key, 2)
        first = wait_until(lambda: trained_by(state, home, "veteran", 1), 240, "the old release's trainer step 1")
        wait_until(lambda: versions(state, home, "veteran")["current"] == first["name"], 30, "step 1 served")
        old.stop()

        state = new.start()
        listed = versions(state, home, "veteran")
        assert listed["current"] == first["name"] == "veteran.v1"
        client = openai.OpenAI(base_url=f"{state['gateway_url']}/v1", api_key=key, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="default", messages=MESSAGES, max_tokens=4)
        trace = raw.headers["x-clora-trace-id"]
        assert captured(state["kafka_bootstrap"], "clora.interactions", {trace})[trace].adapter == "veteran.v1"
        teach(state, key, 2)
        second = wait_until(lambda: trained_by(state, home, "veteran", 2), 240, "this release's trainer step 2")
        assert second["version"] == 2 and trained_by(state, home, "veteran", 1)["version"] == 1
        wait_until(lambda: versions(state, home, "veteran")["current"] == "veteran.v2", 30, "step 2 served")
        new.stop()
    finally:
        old.kill()
        new.kill()
        for log in ("old-serve.out", "new-serve.out"):
            if (tmp_path / log).exists():
                print(f"--- {log}\n" + (tmp_path / log).read_text()[-3000:])
