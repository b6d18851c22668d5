"""Reading a gateway's Prometheus text exposition in tests."""

from __future__ import annotations

import requests


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` carrying ``labels`` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scraped_value(metrics_url: str, name: str, **labels: str) -> float:
    return metric_value(requests.get(metrics_url + "/metrics", timeout=5).text, name, **labels)


def login_attempts(metrics_url: str, method: str, outcome: str) -> float:
    """gateway_login_attempts_total for one login method (card, ecps) and outcome (success or a reason code)."""
    return scraped_value(metrics_url, "gateway_login_attempts_total", method=method, outcome=outcome)
