"""docs/metrics.md, rendered from the metric definitions: ``python -m adapters.prometheus.docs``.

The page is generated whole (tests/unit/test_metrics.py fails when the file and the rendering
differ), so a metric's name, labels or help text is changed in ``definitions`` only.
"""

from __future__ import annotations

import sys

from adapters.prometheus.definitions import METRICS, MetricDefinition, MetricLabel

REGENERATE = ".venv/bin/python -m adapters.prometheus.docs > docs/metrics.md"

INTRO = f"""\
# Metrics

Generated from the metric definitions in `adapters/prometheus/definitions.py`: edit those, not
this file, then regenerate it with `{REGENERATE}`.

The worker serves these metrics on `/metrics` of its operations endpoint
(`METRICS_HOST:METRICS_PORT`). The Meaning column is each metric's help text, as a scrape shows
it. Counters and series whose label values are listed start at 0; the queue depths, LoRA cache
and GPU metrics are read at each scrape and are absent while their source has no answer (no
broker, no model loaded yet, no NVML or GPU) rather than zero. Besides these, prometheus-client
serves its `process_*` (CPU seconds, resident memory, open file descriptors) and `python_*`
(garbage collector, version) metrics.
"""


def _label(label: MetricLabel) -> str:
    if label.values:
        return f"`{label.name}`: {', '.join(label.values)}"
    return f"`{label.name}` ({label.meaning})" if label.meaning else f"`{label.name}`"


def _row(metric: MetricDefinition) -> str:
    labels = "; ".join(_label(label) for label in metric.labels) or "-"
    return f"| `{metric.exposed_name}` | {metric.type} | {labels} | {metric.help} |"


def metrics_table() -> str:
    """Every metric of ``METRICS`` as a Markdown table: metric, type, labels, meaning."""
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    lines += [_row(metric) for metric in METRICS]
    return "\n".join(lines) + "\n"


def metrics_page() -> str:
    """The whole of docs/metrics.md."""
    return f"{INTRO}\n{metrics_table()}"


if __name__ == "__main__":
    sys.stdout.write(metrics_page())
