"""Prometheus metrics: scans by status, queue depth and stage durations read from the database at scrape time
(so they are right across API replicas and workers), plus this process's upload bytes and request latency."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from store import repository

STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, math.inf)


class ScanCollector(Collector):
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with self.sessions() as session:
            counts = repository.count_by_status(session)
            timings = repository.recent_timings(session)
        by_status = GaugeMetricFamily("antidote_scans", "Scans by status", labels=["status"])
        for status, n in sorted(counts.items()):
            by_status.add_metric([status], n)
        yield by_status
        yield GaugeMetricFamily("antidote_queue_depth", "Scans waiting for a worker", value=counts.get("queued", 0))
        stages = HistogramMetricFamily("antidote_stage_duration_seconds",
                                       "Duration of each pipeline stage over the last 1000 finished scans",
                                       labels=["stage"])
        per_stage: dict[str, list[float]] = {}
        for row in timings:
            for stage, seconds in row.items():
                if isinstance(seconds, int | float):
                    per_stage.setdefault(stage, []).append(float(seconds))
        for stage, values in sorted(per_stage.items()):
            buckets = [(_le(b), sum(1 for v in values if v <= b)) for b in STAGE_BUCKETS]
            stages.add_metric([stage], buckets, sum_value=sum(values))
        yield stages


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else str(bound)


class ApiMetrics:
    """One registry per app, so that tests can build several apps in one process."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(ScanCollector(sessions))
        self.upload_bytes = Counter("antidote_upload_bytes", "Bytes received by POST /scans",
                                    registry=self.registry)
        self.request_seconds = Histogram("antidote_http_request_duration_seconds", "HTTP request latency",
                                         ["method", "route", "status"], registry=self.registry)
