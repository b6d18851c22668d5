"""Prometheus metrics: the only module that imports prometheus_client.

gunicorn runs several worker processes, so the metrics use prometheus_client's multiprocess mode: each
process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and the master serves the aggregate on
its own listener (``metrics.listen``), never on the portal's port. ``gateway serve`` sets that variable
to a fresh directory BEFORE this module is first imported (prometheus_client picks its value storage at
import time); in-process use (tests, ``--debug``) keeps the default in-memory registry.

Other modules call the small functions below (``login_attempt``, ``ban``, ``quota_breach``, ``crl_age``...)
rather than touching metric objects, so label names stay consistent.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from gateway.policy.decision import Decision

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REQUESTS = Counter(
    "gateway_requests_total",
    "Access decisions on portal requests (proxy and forward-auth), by outcome and main reason.",
    ["decision", "reason"],
)
UPSTREAM_LATENCY = Histogram(
    "gateway_upstream_latency_seconds",
    "Time from sending a request to the portal until its response headers arrived.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LOGIN_ATTEMPTS = Counter(
    "gateway_login_attempts_total",
    "Login attempts by method (card, ecps) and outcome (success or a reason code).",
    ["method", "outcome"],
)
BANS = Counter("gateway_bans_total", "Bans imposed after repeated failures, by scope (ip, idnat).", ["scope"])
QUOTA_BREACHES = Counter(
    "gateway_quota_breaches_total",
    "Per-identity quota breaches, by rule and action taken.",
    ["rule", "action"],
)
CRL_AGE = Gauge(
    "gateway_crl_age_seconds",
    "Age of the CRL in use, by issuer (seconds since its thisUpdate).",
    ["issuer"],
    multiprocess_mode="max",  # the stalest copy among workers is the one that matters
)
CONFIG_RELOADS = Counter("gateway_config_reloads_total", "Configuration reloads by outcome.", ["outcome"])
CLIENT_CONNECTIONS_CLOSED = Counter(
    "gateway_client_connections_closed_total",
    "Client connections the server closed for a client fault: header_timeout, body_timeout, send_timeout "
    "(the client stopped reading its answer), head_too_large.",
    ["event"],
)
UPSTREAM_IN_FLIGHT = Gauge(
    "gateway_upstream_in_flight",
    "Portal requests being forwarded now (summed over workers).",
    multiprocess_mode="livesum",
)
UPSTREAM_CONCURRENCY_LIMIT = Gauge(
    "gateway_upstream_concurrency_limit",
    "Portal requests each worker forwards at once at most (upstream.max_concurrent), summed over workers.",
    multiprocess_mode="livesum",
)
UPSTREAM_BUSY = Counter(
    "gateway_upstream_busy_total",
    "Portal requests refused with 503 because the worker already forwarded upstream.max_concurrent.",
)
IDENTITY_PROVIDER_UP = Gauge(
    "gateway_identity_provider_up",
    "1 when the identity provider (psc) answered its last call and accepts this gateway's client, else 0.",
    ["provider"],
    multiprocess_mode="livemin",  # down as soon as one live worker cannot reach it
)


class _AuditHead(Collector):
    """The audit head the master exported last (gateway.audit.HeadExporter). A collector, not a Gauge: the
    hash is a label, and a gauge would keep one stale series per past hash."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._heads: dict[str, tuple[int, str, float]] = {}

    def set(self, file: str, seq: int, digest: str) -> None:
        with self._lock:
            self._heads[file] = (seq, digest, time.time())

    def collect(self) -> Iterable[GaugeMetricFamily | InfoMetricFamily]:
        with self._lock:
            heads = dict(self._heads)
        sequence = GaugeMetricFamily(
            "gateway_audit_head_sequence", "Sequence number of the audit file's last record.", labels=["file"]
        )
        info = InfoMetricFamily(
            "gateway_audit_head", "Hash of the audit file's last record.", labels=["file"]
        )
        exported = GaugeMetricFamily(
            "gateway_audit_head_exported_seconds",
            "When the audit head was last read (POSIX time).",
            labels=["file"],
        )
        for file, (seq, digest, at) in heads.items():
            sequence.add_metric([file], seq)
            info.add_metric([file], {"hash": digest})
            exported.add_metric([file], at)
        return [sequence, info, exported]


AUDIT_HEAD = _AuditHead()


# --- Functions the rest of the gateway calls ----------------------------------------------------------


def request_decided(decision: Decision) -> None:
    _requests_with(decision.outcome.value, decision.reason.value).inc()


@functools.lru_cache(maxsize=512)  # a handful of (decision, reason) pairs; labels() costs a lock and a tuple
def _requests_with(decision: str, reason: str) -> Any:
    return REQUESTS.labels(decision=decision, reason=reason)


@contextmanager
def upstream_timer() -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        UPSTREAM_LATENCY.observe(time.perf_counter() - started)


def client_connection_closed(event: str) -> None:
    CLIENT_CONNECTIONS_CLOSED.labels(event=event).inc()


def upstream_concurrency_limit(limit: int) -> None:
    UPSTREAM_CONCURRENCY_LIMIT.set(limit)


def upstream_started() -> None:
    UPSTREAM_IN_FLIGHT.inc()


def upstream_finished() -> None:
    UPSTREAM_IN_FLIGHT.dec()


def upstream_busy() -> None:
    UPSTREAM_BUSY.inc()


def login_attempt(method: str, outcome: str) -> None:
    """``outcome``: "success" or the Reason code of the failure (e.g. "card_revoked")."""
    LOGIN_ATTEMPTS.labels(method=method, outcome=outcome).inc()


def ban(scope: str) -> None:
    BANS.labels(scope=scope).inc()


def quota_breach(rule: str, action: str) -> None:
    QUOTA_BREACHES.labels(rule=rule, action=action).inc()


def crl_age(issuer: str, seconds: float) -> None:
    CRL_AGE.labels(issuer=issuer).set(seconds)


def identity_provider_state(provider: str, state: str) -> None:
    """``state``: "up", or why not ("starting", "down", "misconfigured"); also in /.gateway/readyz."""
    IDENTITY_PROVIDER_UP.labels(provider=provider).set(1 if state == "up" else 0)


def config_reload(outcome: str) -> None:
    CONFIG_RELOADS.labels(outcome=outcome).inc()


def audit_head(file: str, seq: int, digest: str) -> None:
    """The master's head exporter: the audit file's last record, served with the other metrics."""
    AUDIT_HEAD.set(file, seq, digest)


# --- Multiprocess plumbing (gunicorn master) -----------------------------------------------------------


def serve_metrics(listen: str) -> None:
    """Serve /metrics on ``listen`` from a thread of this (master) process, aggregating every worker."""
    host, _, port = listen.rpartition(":")
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    registry.register(AUDIT_HEAD)
    start_http_server(int(port), addr=host.strip("[]"), registry=registry)


def worker_exited(pid: int) -> None:
    """gunicorn ``child_exit``: drop the live-gauge files of a dead worker."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
