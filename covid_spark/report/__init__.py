"""Evaluation reports: figures, tables, a self-contained HTML page and a markdown model card.

    figures.py   matplotlib figures (history, confusion matrix, ROC/PR), built as Figure objects
                 and saved as PNG
    tables.py    the tables as rows of display strings, built once for the HTML page and the card
    summary.py   what a dataset summary says: inputs, sources, classes, patient ids per source;
                 its local paths as a shared document shows them (PathNames: never absolute)
    card.py      text derived from the data (confounding, limitations, licence note) and the
                 markdown model card
    html.py      the HTML report, rendered from templates/report.html.j2 with autoescaping on

The names below are the public interface; ``covid_spark.stages.report`` assembles a run's report.
"""

from covid_spark.evaluation.metrics import roc_pr_curves
from covid_spark.report.card import (
                                     KNOWN_SOURCES,
                                     data_card_sources,
                                     data_limitations,
                                     licence_note,
                                     source_confounding,
                                     training_data_lines,
                                     write_model_card,
)
from covid_spark.report.figures import (
                                     confusion_figure,
                                     history_figure,
                                     plot_confusion,
                                     plot_history,
                                     plot_roc_pr,
                                     roc_pr_figure,
)
from covid_spark.report.html import render_html_report, write_html_report
from covid_spark.report.summary import PathNames, input_name, patient_id_status
from covid_spark.report.tables import MAX_LIST_SHOWN

__all__ = [
    "KNOWN_SOURCES", "MAX_LIST_SHOWN", "PathNames", "confusion_figure", "data_card_sources", "data_limitations",
    "history_figure", "input_name", "licence_note", "patient_id_status", "plot_confusion", "plot_history", "plot_roc_pr",
    "render_html_report", "roc_pr_curves", "roc_pr_figure", "source_confounding", "training_data_lines",
    "write_html_report", "write_model_card",
]
