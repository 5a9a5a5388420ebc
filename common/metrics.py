"""The cluster's metrics in Prometheus form, built from PostgreSQL (so every replica reports the same numbers).

The counters are running totals of the per-window statistics that one dispatcher computes for the whole
cluster; the gauges are read live.  The API serves them at ``/metrics``; the dispatcher that computed a window
pushes them to a Pushgateway when one is configured.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.database import Row

COUNTERS = (  # (metric name without _total, column, help)
    ("smsgate_attempts", "attempts", "Attempts to hand a message to a provider, by provider."),
    ("smsgate_sent", "sent", "Attempts a provider accepted, by provider."),
    ("smsgate_failed_attempts", "failed", "Attempts that ended in an error, by provider."),
    ("smsgate_delivered", "delivered", "Deliveries recorded, by provider."),
)


class ClusterCollector(Collector):
    """Yields the metric families of one snapshot of the database."""

    def __init__(self, totals: Iterable[Row], waiting: Iterable[Row], lag: float, providers: Iterable[str]) -> None:
        """``providers``: configured names, reported with zeros before their first attempt."""
        self.totals = {row["provider"]: row for row in totals}
        self.waiting = list(waiting)
        self.lag = lag
        self.providers = sorted(set(providers) | set(self.totals))

    def collect(self) -> Iterator[Metric]:
        """The families: four counters, three gauges."""
        for name, column, text in COUNTERS:
            family = CounterMetricFamily(name, text, labels=["provider"])
            for provider in self.providers:
                family.add_metric([provider], float(self.totals.get(provider, {}).get(column, 0)))
            yield family
        waiting = GaugeMetricFamily("smsgate_messages_waiting", "Messages queued or being sent, by provider "
                                    "('auto': the service has not chosen yet).", labels=["provider"])
        oldest = GaugeMetricFamily("smsgate_oldest_waiting_seconds",
                                   "Age of the oldest message queued or being sent, by provider.", labels=["provider"])
        for row in self.waiting:
            waiting.add_metric([row["provider"]], float(row["waiting"]))
            oldest.add_metric([row["provider"]], float(row["oldest_seconds"] or 0))
        yield waiting
        yield oldest
        yield GaugeMetricFamily("smsgate_dispatch_lag_seconds",
                                "How long the most overdue work (a send, retry or delivery check) has waited past "
                                "its due time: the dispatchers' lag, for the whole cluster.", value=self.lag)


def cluster_registry(totals: Iterable[Row], waiting: Iterable[Row], lag: float,
                     providers: Iterable[str]) -> CollectorRegistry:
    """A registry holding one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(totals, waiting, lag, providers))
    return registry
