"""The cluster's own view for operators: every replica's Prometheus metrics in one text,
each series labelled with its replica, and the cluster's totals beside them.

Each replica serves its own ``/metrics`` (what ``hexin serve`` serves); behind Ray
Serve's proxy a plain ``GET /metrics`` reaches whichever replica the router picks. The
replicas report their metrics text to the registry, and ``GET /cluster/metrics`` renders
them with ``merge_metrics``. Totals get their own names (``hexin_cluster_...``): a
family holding both per-replica series and their sum would be counted twice by any
``sum()`` over it.
"""

from __future__ import annotations

from collections import defaultdict


def _split(sample: str) -> tuple[str, str, float] | None:
    """``name{labels} value`` -> (name, labels without braces, value)."""
    head, _, value = sample.rpartition(" ")
    try:
        number = float(value)
    except ValueError:
        return None
    name, brace, labels = head.partition("{")
    return name, labels.rstrip("}") if brace else "", number


def _sample(name: str, labels: list[str], value: float) -> str:
    inside = ",".join(label for label in labels if label)
    text = str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return f"{name}{{{inside}}} {text}" if inside else f"{name} {text}"


def merge_metrics(replicas: dict[str, str]) -> str:
    """One Prometheus text of ``replicas`` (replica id -> its ``/metrics`` text): each
    family with every replica's samples labelled ``replica="id"``, then a
    ``hexin_cluster_*`` family of totals over the replicas (means for ``*_rate``
    gauges, which do not add up), and ``hexin_cluster_replicas``."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = defaultdict(list)
    totals: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(dict)
    for replica, text in sorted(replicas.items()):
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    headers.setdefault(family, [])
                    if line not in headers[family]:
                        headers[family].append(line)
                continue
            split = _split(line)
            if split is None:
                continue
            name, labels, value = split
            fam = family if name.startswith(family) and family else name
            headers.setdefault(fam, [])
            samples[fam].append(_sample(name, [f'replica="{replica}"', labels], value))
            totals[fam].setdefault((name, labels), []).append(value)
    out: list[str] = []
    for fam in headers:
        out += headers[fam] + samples[fam]
    for fam in headers:
        if not totals[fam]:
            continue
        cluster = fam.replace("hexin_", "hexin_cluster_", 1)
        out += [h.replace(fam, cluster, 1) for h in headers[fam]]
        for (name, labels), values in totals[fam].items():
            value = sum(values) / len(values) if fam.endswith("_rate") else sum(values)
            out.append(_sample(name.replace(fam, cluster, 1), [labels], value))
    out += [
        "# HELP hexin_cluster_replicas Replicas reporting.",
        "# TYPE hexin_cluster_replicas gauge",
        f"hexin_cluster_replicas {len(replicas)}",
    ]
    return "\n".join(out) + "\n"
