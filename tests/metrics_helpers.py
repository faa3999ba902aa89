"""Reading a Prometheus exposition in tests (api/test_metrics.py,
system/test_metrics_processes.py): every sample by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """Every sample of an exposition: (sample name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    """One sample's value; 0 when the exposition has no such sample."""
    return series.get((name, frozenset(labels.items())), 0.0)
