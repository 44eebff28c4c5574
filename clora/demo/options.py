"""What a demo run is asked to do and the runtime it runs on: its options, the time budget that
decides whether another round fits, the runtime's settings and every customer's trainer config."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from clora.core.models import resolve_model
from clora.core.processes import free_port
from clora.core.settings import Settings
from clora.wire.trainer_config import TenantConfig


@dataclass
class DemoOptions:
    minutes: float = 14.5  # whole run, start-up included: a round starts only if it and the report fit
    max_rounds: int | None = None  # stop after this many rounds even if time is left
    requests_per_round: int = 8  # per customer
    eval_prompts: int = 16  # the gate set (promotions, and when to stop)
    report_prompts: int = 64  # the report set (the reported scores): a 90% interval of about +/-0.1
    max_tokens: int = 64
    target_gain: float = 0.4
    ratings_only_gain: float = 0.3
    lr: float = 2e-3  # the product's is 1e-3; the demo was tuned, and all its recorded runs made, at 2e-3
    training_wait_s: float = 240.0  # a round waits this long at most for every customer's next version
    out_dir: Path | None = None  # None: <CLORA_HOME>/demo/<start time>/


@dataclass
class Budget:
    """Whether another round fits: it (as long as the longest so far) and the final report must end
    within the run's minutes. The report scores every customer's served adapter on the report set,
    all at once: measured 1.5-1.9 minutes on the 2-core reference machine, hence the 2-minute floor
    (or the base model's scoring time, if that was longer)."""

    minutes: float
    report: float  # minutes the final report is expected to take
    longest_round: float = 0.0

    def fits_a_round(self, now: float) -> bool:
        return now + self.longest_round + self.report <= self.minutes

    def ran(self, started: float, ended: float) -> None:
        self.longest_round = max(self.longest_round, ended - started)


def trainer_config(options: DemoOptions) -> TenantConfig:
    """Every customer's: the product's defaults but for the learning rate, and gated (the demo shows
    the promotion gate at work: a trained version is served only once it scores no worse)."""
    return TenantConfig(gated=True, lr=options.lr)


def demo_settings(base: Settings) -> Settings:
    """The runtime's settings: a fresh home per run (its own Redis data, adapters, trainer state),
    sharing the model cache, on free ports; and the few that differ from the product's for the
    demo's sake (the report's `settings_changed` records them; docs/operations.md's demo section says
    why)."""
    model = str(resolve_model(base.serving.model, base.cache_dir))
    home = base.home / "demo" / time.strftime("%Y%m%d-%H%M%S")
    return base.updated(**{
        "home": home, "model": model, "port": 0, "trainer_metrics_port": free_port(),
        "trainer_enabled": True,  # whatever the environment says: the demo is about training
        "eval_interval_s": 0.0,  # no periodic eval job: the demo runs the gate after each round's training
        "trainer_idle_s": 1.0,  # an idle trainer looks for feedback every second, not 5: rounds wait less
        # On a small machine serving and training must take turns (two compute-bound processes on the
        # same cores slow each other down many times over): the trainer waits while any request runs.
        "trainer_max_inflight": 0})


def default_out_dir(settings: Settings) -> Path:
    """A fresh folder per run under the data dir: running the main job never writes into the checkout."""
    return settings.home / "demo" / time.strftime("%Y%m%d-%H%M%S")
