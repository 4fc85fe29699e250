"""The provider registry: plugins registered by name.

register(MyProvider())            # at import time of the plugin's module
provider = get_provider("stripe")
payments = capability(provider, Payments)   # None unless it takes payments
"""

from __future__ import annotations

from memberhub.integrations.providers.base import (
    CAPABILITY_INTERFACES,
    Accounting,
    AnalyticsSink,
    Capability,
    EventsSource,
    MarketingList,
    MessageChannel,
    ObjectStorage,
    Orders,
    Payments,
    Provider,
    SearchIndex,
)

_PROVIDERS: dict[str, Provider] = {}


def register(provider: Provider) -> Provider:
    """Add a provider; its declared capabilities must match the interfaces it implements."""
    for declared in provider.capabilities:
        interface = CAPABILITY_INTERFACES[declared]
        if not isinstance(provider, interface):
            raise TypeError(f"{provider.name} declares {declared} but does not implement it")
    if provider.name in _PROVIDERS:
        raise ValueError(f"a provider named {provider.name!r} is already registered")
    _PROVIDERS[provider.name] = provider
    return provider


def get_provider(name: str) -> Provider | None:
    return _PROVIDERS.get(name)


def provider_names() -> list[str]:
    return sorted(_PROVIDERS)


def as_events_source(provider: Provider) -> EventsSource | None:
    """The provider as a webhook source, if it declares it is one."""
    if Capability.EVENTS_SOURCE in provider.capabilities and isinstance(provider, EventsSource):
        return provider
    return None


def as_payments(provider: Provider) -> Payments | None:
    """The provider as a payments provider, if it declares it is one."""
    if Capability.PAYMENTS in provider.capabilities and isinstance(provider, Payments):
        return provider
    return None


def as_accounting(provider: Provider) -> Accounting | None:
    """The provider as an accounting system, if it declares it is one."""
    if Capability.ACCOUNTING in provider.capabilities and isinstance(provider, Accounting):
        return provider
    return None


def as_orders(provider: Provider) -> Orders | None:
    """The provider as a shop whose orders earn points, if it declares it is one."""
    if Capability.ORDERS in provider.capabilities and isinstance(provider, Orders):
        return provider
    return None


def as_message_channel(provider: Provider) -> MessageChannel | None:
    """The provider as a sender of notifications, if it declares it is one."""
    if Capability.MESSAGES in provider.capabilities and isinstance(provider, MessageChannel):
        return provider
    return None


def as_storage(provider: Provider) -> ObjectStorage | None:
    """The provider as an object store, if it declares it is one."""
    if Capability.STORAGE in provider.capabilities and isinstance(provider, ObjectStorage):
        return provider
    return None


def as_marketing_list(provider: Provider) -> MarketingList | None:
    """The provider as a marketing list (an audience), if it declares it is one."""
    if Capability.MARKETING_LIST in provider.capabilities and isinstance(provider, MarketingList):
        return provider
    return None


def as_analytics_sink(provider: Provider) -> AnalyticsSink | None:
    """The provider as an analytics sink of our events, if it declares it is one."""
    if Capability.ANALYTICS_SINK in provider.capabilities and isinstance(provider, AnalyticsSink):
        return provider
    return None


def as_search_index(provider: Provider) -> SearchIndex | None:
    """The provider as a hosted search index, if it declares it is one."""
    if Capability.SEARCH_INDEX in provider.capabilities and isinstance(provider, SearchIndex):
        return provider
    return None


def _register_builtin() -> None:
    from memberhub.integrations.providers.algolia import Algolia
    from memberhub.integrations.providers.custom_crm import CustomCrm
    from memberhub.integrations.providers.eventbrite import Eventbrite
    from memberhub.integrations.providers.fcm import Fcm
    from memberhub.integrations.providers.ga4 import Ga4
    from memberhub.integrations.providers.generic import GenericHttp, GenericWebhook
    from memberhub.integrations.providers.hubspot import HubSpot
    from memberhub.integrations.providers.local_storage import LocalStorage
    from memberhub.integrations.providers.mailchimp import Mailchimp
    from memberhub.integrations.providers.onedrive import OneDrive
    from memberhub.integrations.providers.pipedrive import Pipedrive
    from memberhub.integrations.providers.s3 import S3
    from memberhub.integrations.providers.salesforce import Salesforce
    from memberhub.integrations.providers.segment import Segment
    from memberhub.integrations.providers.sendgrid import SendGrid
    from memberhub.integrations.providers.shopify import Shopify
    from memberhub.integrations.providers.smtp import Smtp
    from memberhub.integrations.providers.stripe import Stripe
    from memberhub.integrations.providers.twilio import Twilio
    from memberhub.integrations.providers.xero import Xero

    for provider in (
        Stripe(),
        HubSpot(),
        Salesforce(),
        Pipedrive(),
        CustomCrm(),
        GenericHttp(),
        GenericWebhook(),
        Shopify(),
        Eventbrite(),
        SendGrid(),
        Twilio(),
        Fcm(),
        OneDrive(),
        Algolia(),
        Mailchimp(),
        Xero(),
        Smtp(),
        S3(),
        LocalStorage(),
        Segment(),
        Ga4(),
    ):
        register(provider)


_register_builtin()

__all__ = [
    "Capability",
    "Provider",
    "as_accounting",
    "as_events_source",
    "as_marketing_list",
    "as_message_channel",
    "as_orders",
    "as_payments",
    "as_search_index",
    "as_storage",
    "get_provider",
    "provider_names",
    "register",
]
