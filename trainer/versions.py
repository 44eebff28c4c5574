"""Versions out of the trainer: a step's checkpoint published through the admin API (origin
`trainer:step-N`, an idempotency key per checkpoint), and, after a restart or a failed publish,
a checkpoint written but not (known to be) published is published once."""

from __future__ import annotations

import logging
from pathlib import Path

from clora.core.admin_client import RuntimeClient
from clora.core.tenant_configs import TenantConfigStore
from clora.trainer.adapter_store import AdapterStore
from clora.wire.trainer_config import TenantConfig

log = logging.getLogger("clora.trainer")


class Publisher:
    def __init__(self, store: AdapterStore, client: RuntimeClient, configs: TenantConfigStore, base_model: str):
        self.store, self.client, self.configs, self.base_model = store, client, configs, base_model

    # -- versions --------------------------------------------------------------------------------
    async def publish(self, customer: str, switch: bool = True) -> str:
        """Checkpoint (state + PEFT adapter, whole or absent), then publish it as a new version
        (served now, or a candidate for the promotion gate). The origin names the checkpoint, so a
        restart can tell whether it was published already."""
        checkpoint = self.store.checkpoint(customer, self.base_model)
        origin = f"trainer:{checkpoint.name}"
        published = await self.client.publish(customer, checkpoint / "adapter", origin, switch,
                                              publish_key(checkpoint))
        self.store.mark_published(customer, checkpoint, published.version)
        log.info("customer %s: step %s published as %s", customer, checkpoint.name, published.name)
        return published.name

    async def ensure_published(self, customer: str) -> None:
        """A tenant whose last step was checkpointed but not published (the publish failed) is
        published before it samples again: that step must not be skipped."""
        async with self.store.lock(customer):
            state = self.store.get(customer)
            if state is not None and state.published_version is None and state.step > 0:
                await self.recover(customer)

    async def recover(self, customer: str) -> None:
        """After a restart: a checkpoint written but not (known to be) published gets published."""
        self.store.discard_partial(customer)
        state = self.store.get(customer)
        checkpoint = self.store.latest_checkpoint(customer)
        if state is None or checkpoint is None or state.published_version is not None:
            return
        origin = f"trainer:{checkpoint.name}"
        listed = await self.client.versions(customer)
        match = next((v for v in listed.versions if v.source == origin), None)
        if match is None:
            config = await self.configs.get(customer) or TenantConfig()
            match = await self.client.publish(customer, checkpoint / "adapter", origin, not config.gated,
                                              publish_key(checkpoint))
        self.store.mark_published(customer, checkpoint, match.version)

    async def recover_all(self) -> None:
        """Publish any checkpoint a previous run wrote but did not get to publish."""
        root = self.store.root
        for directory in sorted(root.iterdir()) if root.exists() else []:
            if directory.is_dir():
                await self.recover(directory.name)



def publish_key(checkpoint: Path) -> str:
    """One checkpoint's idempotency key: its name and when its adapter was written (a tenant whose
    state was reset writes `step-1` again, a different checkpoint)."""
    written = next((checkpoint / "adapter").glob("*.safetensors")).stat().st_mtime_ns
    return f"trainer:{checkpoint.name}:{written}"
