"""Settings: paths handed to child processes are absolute, a child gets the parent's settings,
every `CLORA_*` name of the release before the sections (98d410f's README) sets the field it set,
and docs/configuration.md is the table `Settings` generates."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clora.core.config_docs import rendered
from clora.core.settings import SECTIONS, Settings, variables

REPO = Path(__file__).resolve().parents[1]
CONFIGURATION = REPO / "docs" / "configuration.md"
# Every CLORA_ variable of 98d410f's Settings, the field it set then (its name, lowercased without the
# prefix) under its section now. Its README documented all of them but CLORA_SERVED_BASE_NAME, and one
# more: CLORA_SERVING_EXTRA, the set-up script's.
PREVIOUS_RELEASE = {
    "CLORA_HOME": "stores.home", "CLORA_KAFKA_BOOTSTRAP": "stores.kafka_bootstrap",
    "CLORA_REDIS_URL": "stores.redis_url", "CLORA_INTERACTIONS_TOPIC": "stores.interactions_topic",
    "CLORA_FEEDBACK_TOPIC": "stores.feedback_topic", "CLORA_DEAD_LETTER_TOPIC": "stores.dead_letter_topic",
    "CLORA_TOPIC_PARTITIONS": "stores.topic_partitions", "CLORA_MODEL": "serving.model",
    "CLORA_HOST": "serving.host", "CLORA_PORT": "serving.port", "CLORA_ADMIN_KEY": "serving.admin_key",
    "CLORA_TRACE_SECRET": "serving.trace_secret", "CLORA_MAX_REQUEST_BYTES": "serving.max_request_bytes",
    "CLORA_UPSTREAM_TIMEOUT_S": "serving.upstream_timeout_s",
    "CLORA_CUSTOMER_MAX_CONCURRENT": "serving.customer_max_concurrent",
    "CLORA_CUSTOMER_REQUESTS_PER_S": "serving.customer_requests_per_s",
    "CLORA_CUSTOMER_TOKENS_PER_MIN": "serving.customer_tokens_per_min",
    "CLORA_FAIR_SHARE_REQUESTS": "serving.fair_share_requests", "CLORA_MAX_TOKENS_CAP": "serving.max_tokens_cap",
    "CLORA_SERVED_BASE_NAME": "serving.served_base_name", "CLORA_DTYPE": "serving.dtype",
    "CLORA_MAX_MODEL_LEN": "serving.max_model_len", "CLORA_MAX_LORAS": "serving.max_loras",
    "CLORA_MAX_CPU_LORAS": "serving.max_cpu_loras", "CLORA_MAX_LORA_RANK": "serving.max_lora_rank",
    "CLORA_LORA_TARGET_MODULES": "serving.lora_target_modules", "CLORA_KV_CACHE_GIB": "serving.kv_cache_gib",
    "CLORA_CPU_THREADS_BIND": "serving.cpu_threads_bind", "CLORA_ENFORCE_EAGER": "serving.enforce_eager",
    "CLORA_GROUPED_LORA": "serving.grouped_lora", "CLORA_ENGINE_SPIN_S": "serving.engine_spin_s",
    "CLORA_ENGINE_START_TIMEOUT_S": "serving.engine_start_timeout_s",
    "CLORA_ENGINE_EXTRA_ARGS": "serving.engine_extra_args",
    "CLORA_ENGINE_DIAGNOSIS_HTTP": "serving.engine_diagnosis_http",
    "CLORA_ADAPTER_KEEP_VERSIONS": "serving.adapter_keep_versions",
    "CLORA_CAPTURE_QUEUE_SIZE": "serving.capture_queue_size", "CLORA_CAPTURE_BATCH_S": "serving.capture_batch_s",
    "CLORA_SPOOL_MAX_BYTES": "serving.spool_max_bytes",
    "CLORA_CAPTURE_OUTBOX_MAX_BYTES": "serving.capture_outbox_max_bytes",
    "CLORA_CAPTURE_JOURNAL_WAIT_S": "serving.capture_journal_wait_s",
    "CLORA_CAPTURE_SYNC_EVERY_S": "serving.capture_sync_every_s",
    "CLORA_CAPTURE_RESEND_AFTER_S": "serving.capture_resend_after_s",
    "CLORA_FEEDBACK_MAX_BODY_BYTES": "feedback.max_body_bytes",
    "CLORA_FEEDBACK_EVENTS_PER_S": "feedback.events_per_s", "CLORA_FEEDBACK_BURST": "feedback.burst",
    "CLORA_FEEDBACK_OUTBOX_MAX_BYTES": "feedback.outbox_max_bytes",
    "CLORA_FEEDBACK_RESEND_AFTER_S": "feedback.resend_after_s", "CLORA_FEEDBACK_MAX_WAIT_S": "feedback.max_wait_s",
    "CLORA_INGEST_GROUP": "feedback.ingest_group", "CLORA_INGEST_FETCH_WAIT_S": "feedback.ingest_fetch_wait_s",
    "CLORA_INGEST_MAX_POLL_RECORDS": "feedback.ingest_max_poll_records",
    "CLORA_INGEST_MAX_LAG": "feedback.ingest_max_lag", "CLORA_INTERACTION_TTL_S": "feedback.interaction_ttl_s",
    "CLORA_REPLAY_CAPACITY": "feedback.replay_capacity", "CLORA_REPLAY_MIN_SHARE": "feedback.replay_min_share",
    "CLORA_FAULT_HOOKS": "feedback.fault_hooks", "CLORA_TRAINER_ENABLED": "trainer.enabled",
    "CLORA_TRAINER_DEVICE": "trainer.device", "CLORA_TRAINER_PASS_TOKENS": "trainer.pass_tokens",
    "CLORA_TRAINER_DTYPE": "trainer.dtype", "CLORA_TRAINER_MAX_TENANTS": "trainer.max_tenants",
    "CLORA_TRAINER_THREADS": "trainer.threads", "CLORA_TRAINER_PIPELINE": "trainer.pipeline",
    "CLORA_TRAINER_IDLE_S": "trainer.idle_s", "CLORA_TRAINER_MAX_INFLIGHT": "trainer.max_inflight",
    "CLORA_TRAINER_KEEP_CHECKPOINTS": "trainer.keep_checkpoints",
    "CLORA_TRAINER_MAX_SKIPPED_STEPS": "trainer.max_skipped_steps",
    "CLORA_TRAINER_METRICS_PORT": "trainer.metrics_port", "CLORA_GATEWAY_URL": "trainer.gateway_url",
    "CLORA_EVAL_INTERVAL_S": "evals.interval_s", "CLORA_EVAL_TOLERANCE": "evals.tolerance",
}


def test_a_relative_home_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings(home=Path(".clora"))
    assert settings.home == tmp_path / ".clora"
    assert settings.cache_dir.is_absolute() and settings.adapters_dir.is_absolute()


def test_a_child_process_gets_exactly_the_parents_settings(tmp_path, monkeypatch):
    """Settings a parent set in code (the demo's trainer pacing) reach the trainer child through
    `child_env`: read back from those variables alone, they are the same settings."""
    for name in [k for k in os.environ if k.startswith("CLORA_")]:
        monkeypatch.delenv(name)
    parent = Settings(home=tmp_path, trainer_idle_s=1.0, trainer_max_inflight=0, lora_target_modules=["o_proj"],
                      engine_extra_args=["--seed", "3"], trainer_enabled=False, eval_tolerance=0.1)
    for name, value in parent.child_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == parent


def sample(value, annotation: str):
    """A value unlike the default, valid for the field."""
    if "Literal" in annotation:
        return "bfloat16"
    if "list" in annotation:
        return ["o_proj"]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return round(value + 0.01, 6)
    if "int" in annotation:
        return 123
    if "Path" in annotation:
        return "/tmp/clora-settings-test"
    return "set-by-test"


@pytest.mark.parametrize("name", sorted(PREVIOUS_RELEASE))
def test_each_variable_of_the_previous_release_sets_the_same_field(name, monkeypatch):
    for other in [k for k in os.environ if k.startswith("CLORA_")]:
        monkeypatch.delenv(other)
    baseline = Settings().values()
    section, field = PREVIOUS_RELEASE[name].split(".")
    info = SECTIONS[section].model_fields[field]
    value = sample(info.get_default(call_default_factory=True), str(info.annotation))
    monkeypatch.setenv(name, value if isinstance(value, str) else json.dumps(value))
    settings = Settings()
    assert getattr(getattr(settings, section), field) == (Path(value) if "Path" in str(info.annotation) else value)
    changed = {k for k, v in settings.values().items() if v != baseline[k]}
    assert changed == {name}
    # In code, by the same name lowercased (`Settings(port=0)`), the same field.
    flat = name.removeprefix("CLORA_").lower()
    assert getattr(getattr(Settings(**{flat: value}), section), field) == getattr(getattr(settings, section), field)


def test_every_variable_is_one_of_the_previous_release_or_new_and_documented():
    assert set(PREVIOUS_RELEASE) <= set(variables())
    assert "CLORA_SERVING_EXTRA" in (REPO / "scripts" / "setup.sh").read_text()  # the set-up script's own


def test_an_unknown_setting_in_code_is_an_error_and_the_shell_variable_of_a_field_name_is_not_read(monkeypatch):
    with pytest.raises(ValueError, match="unknown setting 'trainer_devise'"):
        Settings(trainer_devise="cpu")
    monkeypatch.delenv("CLORA_PORT", raising=False)
    monkeypatch.setenv("PORT", "1")  # `port` is the field's name, not its variable
    assert Settings().serving.port == 8000


def test_the_configuration_page_is_the_table_settings_generate():
    assert CONFIGURATION.read_text() == rendered(CONFIGURATION.read_text()), \
        "docs/configuration.md is out of date: run `make docs`"
    for name in variables():
        assert f"`{name}`" in CONFIGURATION.read_text()
