"""The self-contained HTML evaluation report, rendered from a Jinja2 template.

The report is one file: figures are embedded as base64 ``data:`` URIs, styles are inline, there
is no script and no external link, so it can be mailed or archived as is. The template
(``templates/report.html.j2``) is rendered with autoescaping on, so all text taken from inputs
is escaped; only the limitation bullets' markdown ``**bold**`` becomes ``<strong>``. The metrics
and the known limitations come first, then the figures and the Grad-CAM gallery; the dataset's lists (rejected and skipped files, duplicate groups),
the configuration and the versions sit in collapsed ``<details>`` sections. No absolute local path
is shown (:class:`~covid_spark.report.summary.PathNames`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from functools import lru_cache

import jinja2
from markupsafe import Markup, escape

from covid_spark.data.storage import atomic_write_text
from covid_spark.report.audit import audit_detail_tables, audit_summary_table
from covid_spark.report.card import data_limitations, source_confounding
from covid_spark.report.summary import PathNames
from covid_spark.report.tables import (
    classes_of,
    confusion_table,
    group_table,
    overall_table,
    parts,
    per_class_table,
    summary_tables,
    versions_table,
)

log = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEMPLATE = "report.html.j2"
FOLDED_AFTER = 12  # a dataset table with more rows than this is shown folded, in <details>


def md_bold(text: str) -> Markup:
    """Escape ``text`` and turn markdown ``**bold**`` into ``<strong>``."""
    return Markup(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", str(escape(text))))


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the package's templates: autoescaping on, undefined names an error."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("covid_spark.report", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["md_bold"] = md_bold
    return env


def png_data_uri(path: str, what: str) -> str:
    """A PNG file as a ``data:image/png;base64,`` URI.

    Raises:
        FileNotFoundError: if ``path`` is not a file.
        ValueError: if it does not start with the PNG signature.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: PNG file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{what}: {path} is not a PNG file (bad signature)")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def render_html_report(
    *,
    title: str,
    metrics: dict,
    figures: dict[str, str],
    dataset_summary: dict | None,
    config: dict,
    versions: dict,
    gradcam: list[dict] | None = None,
    gradcam_layer: str | None = None,
    extra_sections: dict[str, str] | None = None,
    source_notes: dict[str, str] | None = None,
    base: str | None = None,
) -> str:
    """The page :func:`write_html_report` writes, as a string (its arguments are described there;
    ``base`` is the folder paths inside the run are shown relative to)."""
    names = PathNames(dataset_summary, base)
    metrics = {k: names.text(v) if isinstance(v, str) else v for k, v in metrics.items()}
    dataset_summary = names.value(dataset_summary) if dataset_summary else dataset_summary
    classes = classes_of(metrics)
    ci = metrics.get("ci95")
    figure_items = [{"uri": png_data_uri(png, f"figure {caption!r}"), "caption": caption}
                    for caption, png in figures.items()]
    gallery = [{"uri": png_data_uri(item["png"], f"Grad-CAM item {i}"),
                "caption": names.text(item.get("caption", ""))}
               for i, item in enumerate(gradcam or [])]
    context = {
        "title": names.text(title),
        "per_class": per_class_table(metrics),
        "overall": overall_table(metrics),
        "ci_level": f"{100 * (1 - float(ci.get('alpha', 0.05))):.0f}" if ci else None,
        "n_boot": (ci or {}).get("n_boot", "?"),
        "confusion": confusion_table(metrics),
        "per_source": group_table(metrics["per_source"], classes) if metrics.get("per_source") else None,
        "confounding": source_confounding(dataset_summary, classes),
        "parts": group_table(parts(metrics), classes, first="part") if parts(metrics) else None,
        "figures": figure_items,
        "dataset": summary_tables(dataset_summary, classes) if dataset_summary else [],
        "audit": metrics.get("audit"),
        "audit_summary": audit_summary_table(metrics["audit"]) if metrics.get("audit") else None,
        "audit_details": audit_detail_tables(metrics["audit"]) if metrics.get("audit") else [],
        "limitations": [names.text(item) for item in data_limitations(dataset_summary, metrics, source_notes)],
        "gradcam": gallery,
        "gradcam_layer": gradcam_layer or "unknown",
        "extra_sections": [(t, names.text(text)) for t, text in (extra_sections or {}).items()],
        "folded_after": FOLDED_AFTER,
        "config_json": json.dumps(names.value(config), indent=2, sort_keys=True, default=str, ensure_ascii=False),
        "versions": versions_table(versions),
    }
    return environment().get_template(TEMPLATE).render(context)


def write_html_report(path: str, **report) -> None:
    """Write one self-contained HTML evaluation report: :func:`render_html_report`'s page, atomically.

    Args:
        path: output file; written to ``path + ".tmp"`` first and renamed into place.
        report: the keyword arguments of :func:`render_html_report`:
        title: page title.
        metrics: a :func:`covid_spark.evaluation.metrics.classification_metrics` result, optionally with
            ``"ci95"`` (a bootstrap_ci result), ``"per_source"`` (metrics_by_group result),
            ``"per_input"`` and ``"patient_wise"`` (parts of the test set), ``"roc_auc"`` /
            ``"pr_auc"`` (per-class dicts) and extra scalars such as ``"ece"``.
        figures: caption -> PNG path, embedded as base64 data URIs.
        dataset_summary: counts per class / split / source and a ``"rejected"`` list of
            ``{"path", "reason"}``; any other keys are shown generically. ``None`` to omit.
        config: the run configuration, shown as pretty JSON.
        versions: library name -> version.
        gradcam: items ``{"png": path, "caption": str}`` for the Grad-CAM gallery.
        gradcam_layer: the convolution layer the Grad-CAM maps come from.
        extra_sections: title -> plain text, each shown in its own section.
        source_notes: per source, its description in the data card, for the known limitations
            (:func:`covid_spark.report.card.data_limitations`).
        base: the folder that paths inside the run are shown relative to (default: ``path``'s folder).

    Raises:
        FileNotFoundError: if a figure or Grad-CAM PNG is missing.
        ValueError: if one of them is not a PNG.
    """
    page = render_html_report(**{"base": os.path.dirname(os.path.abspath(path)), **report})
    atomic_write_text(path, page)
    log.info("wrote HTML report %s (%d bytes)", path, len(page))
