"""The metrics part of `mailgate status` (and `--json`): the exporter's own registry,
collected in this process (proxies.metrics.exporter.build_registry), so the figures are the
ones a scrape would get at the same moment."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxies.config import Config


def metrics_status(config: Config) -> dict[str, Any]:
    """{"enabled", "listen", "url", "dir", "values": {sample name: [{"labels", "value"}]}}.
    Counters are named as Prometheus sees them (`..._total`), histograms as their
    `_bucket`, `_sum` and `_count` samples."""
    settings = config.metrics
    if not settings.enabled:
        return {"enabled": False}
    from proxies.metrics.exporter import build_registry, shared_dir

    values: dict[str, list[dict[str, Any]]] = {}
    for family in build_registry(config).collect():
        for sample in family.samples:
            values.setdefault(sample.name, []).append(
                {"labels": dict(sorted(sample.labels.items())), "value": sample.value})
    for samples in values.values():
        samples.sort(key=lambda s: sorted(s["labels"].items()))
    return {
        "enabled": True,
        "listen": settings.listen_text,
        "url": f"http://{settings.listen_text}/metrics",
        "dir": str(shared_dir(config)),
        "values": dict(sorted(values.items())),
    }


def metrics_lines(status: dict[str, Any]) -> list[str]:
    """Text for `mailgate status`: one line per sample, histogram buckets left out."""
    if not status.get("enabled"):
        return ["metrics: off ([metrics] listen not set)"]
    lines = [f"metrics: {status['url']} (counts kept in {status['dir']})"]
    for name, samples in status["values"].items():
        if name.endswith("_bucket"):
            continue
        for sample in samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample["labels"].items())
            value = float(sample["value"])
            shown = str(int(value)) if value.is_integer() else f"{value:g}"
            lines.append(f"  {name}{{{labels}}} {shown}" if labels else f"  {name} {shown}")
    return lines
