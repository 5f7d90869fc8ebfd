"""The tables of the honest protocol (``scripts/generalisation.sh``, docs/shortcuts.md), from its runs.

``python -m covid_spark.evaluation.protocol RUNS --variants default lungcrop ... --sources nih ...``
reads ``RUNS/<variant>/without-<source>/metrics.json`` (the held-out source: never trained on),
their ``metrics_val.json`` (the only split a variant is chosen on) and
``RUNS/<variant>/all/metrics_cxr3.json`` (cxr-xl → all of cxr3 minus near-copies), and prints:

1. the choice, on val: each variant's mean val macro-F1 over its leave-one-out runs (or, where
   some of those are missing, the val split of its run on all of cxr-xl);
2. per held-out source: macro-F1 [95 % CI], recall per class, and each variant minus the first
   (default) on the same images with a paired-bootstrap interval;
3. the external set, the same way;
4. the shortcut audit of each model (probe gap, lungs-removed macro-F1, Grad-CAM share in the lungs).

Missing runs are shown as "not run". Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Mapping, Sequence

import numpy as np

from covid_spark.constants import CLASSES
from covid_spark.data.rundir import RunDir
from covid_spark.evaluation.compare import paired_differences

NOT_RUN = "not run"


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _f(value, ci=None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.3f}"
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def _macro(metrics: Mapping | None) -> str:
    if metrics is None:
        return NOT_RUN
    return _f(metrics.get("macro_f1"), (metrics.get("ci95") or {}).get("macro_f1"))


def _recalls(metrics: Mapping | None) -> str:
    if metrics is None:
        return NOT_RUN
    per = metrics.get("per_class", {})
    return ", ".join(f"{c} {_f(per[c].get('recall'))}" for c in CLASSES if per.get(c, {}).get("support"))


def _paired(first: Mapping | None, other: Mapping | None, names: tuple[str, str]) -> str:
    if first is None or other is None:
        return NOT_RUN
    try:
        rows = paired_differences([(names[0], other), (names[1], first)], list(CLASSES))
    except ValueError as err:
        return f"not paired: {err}"
    return next(value for label, value in rows if label.startswith("macro-F1"))


def _audit(metrics: Mapping | None) -> list[str]:
    audit = (metrics or {}).get("audit")
    if not audit:
        return [NOT_RUN] * 4
    return [_f(audit["probe"]["summary"].get("balanced_gap")), _f(audit["lungs_removed"].get("macro_f1")),
            _f(audit["cam"]["overall"].get("mean")), audit["verdict"]["status"]]


def tables(runs: str, variants: Sequence[str], sources: Sequence[str]) -> str:
    """The protocol's markdown tables (see the module docstring)."""
    def metrics(variant: str, run: str, name: str) -> dict | None:
        return _load(os.path.join(runs, variant, run, name))

    test, val = RunDir("").metrics_path("test"), RunDir("").metrics_path("val")  # file names, run-relative

    out = ["## Choice on val", "",
           "| variant | mean val macro-F1, leave-one-source-out runs | runs | val macro-F1, trained on all |",
           "|---|---:|---:|---:|"]
    means, whole, complete = {}, {}, bool(sources)
    for v in variants:
        values = [m["macro_f1"] for s in sources if (m := metrics(v, f"without-{s}", val))]
        means[v] = float(np.mean(values)) if values else None
        whole[v] = (metrics(v, "all", val) or {}).get("macro_f1")
        complete = complete and len(values) == len(sources)
        out.append(f"| {v} | {_f(means[v])} | {len(values)} of {len(sources)} | {_f(whole[v])} |")
    # The leave-one-out runs' val decides; where some are missing and every variant has its run on all of
    # cxr-xl, that run's val split decides instead (never a test split, never cxr3).
    on_whole = not complete and all(whole[v] is not None for v in variants)
    scores = whole if on_whole else means
    chosen = max((v for v in variants if scores[v] is not None), key=lambda v: scores[v], default=None)
    rule = "the val split of the runs on all of cxr-xl" if on_whole else "the leave-one-source-out runs' val"
    out += ["", f"Chosen on val ({rule}): **{chosen or 'none (no run finished)'}**.", ""]
    base = variants[0]
    for s in sources:
        out += [f"## Held-out source: {s} (never trained on)", "",
                f"| variant | macro-F1 [95% CI] | recall per class | {'variant − ' + base + ' (paired)'} |",
                "|---|---|---|---|"]
        first = metrics(base, f"without-{s}", test)
        for v in variants:
            m = metrics(v, f"without-{s}", test)
            paired = "" if v == base else _paired(first, m, (v, base))
            out.append(f"| {v} | {_macro(m)} | {_recalls(m)} | {paired} |")
        out.append("")
    out += ["## External: trained on all of cxr-xl, tested on all of cxr3 minus near-copies", "",
            f"| variant | macro-F1 [95% CI] | recall per class | variant − {base} (paired) |", "|---|---|---|---|"]
    first = metrics(base, "all", "metrics_cxr3.json")
    for v in variants:
        m = metrics(v, "all", "metrics_cxr3.json")
        out.append(f"| {v} | {_macro(m)} | {_recalls(m)} | {'' if v == base else _paired(first, m, (v, base))} |")
    out += ["", "## Shortcut audit of each model (on its own test split)", "",
            "| variant | run | probe gap (balanced) | lungs-removed macro-F1 | Grad-CAM in lungs | verdict |",
            "|---|---|---:|---:|---:|---|"]
    for v in variants:
        for run in [f"without-{s}" for s in sources] + ["all"]:
            out.append(f"| {v} | {run} | " + " | ".join(_audit(metrics(v, run, test))) + " |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Tables of the leave-one-source-out protocol (markdown).")
    parser.add_argument("runs", help="the protocol's runs folder")
    parser.add_argument("--variants", nargs="+", required=True, help="variant names, the baseline first")
    parser.add_argument("--sources", nargs="*", default=[],
                        help="the held-out sources (none: only the runs on all of cxr-xl)")
    args = parser.parse_args(argv)
    print(tables(args.runs, args.variants, args.sources), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
