"""Outbound webhooks: endpoints, deliveries, the delivery loop."""
