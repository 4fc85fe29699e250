"""Reading the text exposition of `/metrics` in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample_values(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples `name` whose labels include `labels`."""
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def sample_value(text: str, name: str, **labels: str) -> float:
    """The value of the one sample `name` whose labels include `labels`."""
    [value] = sample_values(text, name, **labels)
    return value


def pids(text: str, name: str) -> set[str]:
    """The processes with a sample `name`."""
    return {
        sample.labels["pid"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }
