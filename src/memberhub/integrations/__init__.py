"""The integration hub: the gateway every third-party call goes through, and inbound webhooks."""
