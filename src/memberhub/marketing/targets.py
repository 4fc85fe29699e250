"""What the marketing sync works on: an integration whose provider keeps a marketing list,
with its settings, and the tally of what one pass did."""

from __future__ import annotations

from dataclasses import dataclass, field

from memberhub.integrations.hub import parse_config
from memberhub.integrations.models import Integration
from memberhub.integrations.providers import get_provider, provider_names
from memberhub.integrations.providers.base import Capability, MarketingList
from memberhub.marketing.settings import MarketingSyncSettings


@dataclass(frozen=True)
class Target:
    """An integration that keeps a marketing list: its provider and list settings."""

    integration: Integration
    audience: MarketingList
    settings: MarketingSyncSettings


@dataclass
class Tally:
    """What one pass did: calls made, members written and refused."""

    requests: int = 0
    written: int = 0
    refused: int = 0
    errors: list[str] = field(default_factory=list)


def marketing_target(integration: Integration) -> Target | None:
    provider = get_provider(integration.provider)
    if provider is None or Capability.MARKETING_LIST not in provider.capabilities:
        return None
    if not isinstance(provider, MarketingList):
        return None
    config = parse_config(provider, integration.config)
    if not isinstance(config, MarketingSyncSettings):
        return None
    return Target(integration, provider, config)


def marketing_providers() -> list[str]:
    names = []
    for name in provider_names():
        provider = get_provider(name)
        if provider is not None and Capability.MARKETING_LIST in provider.capabilities:
            names.append(name)
    return names
