"""The markdown model card, and the text about the data that it shares with the HTML report.

The training-data description, the known limitations and the licence note are computed from the
dataset summary and the manifests' licences, so the card describes whichever collection the model
was trained on.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from covid_spark.data.storage import atomic_write_text
from covid_spark.report.audit import audit_summary_table
from covid_spark.report.summary import PathNames, inputs_of, patient_id_counts, sources_of, summary_classes
from covid_spark.report.tables import (
    Table,
    classes_of,
    count,
    group_table,
    overall_table,
    parts,
    per_class_table,
    source_class_table,
)

log = logging.getLogger(__name__)

#: One sentence each about public collections we know: shown for a source present in the data
#: only when the dataset's own data card (see :func:`data_card_sources`) does not describe it.
KNOWN_SOURCES = {
    "kaggle3way": "Pediatric patients (Guangzhou); where the other classes are adults, age is a shortcut "
                  "between classes.",
    "kermany": "Pediatric patients (Guangzhou); where the other classes are adults, age is a shortcut "
               "between classes.",
    "ieee8023": "COVID-19 images collected from publications and websites, of mixed quality.",
    "radiography2021": "Kaggle COVID-19 Radiography Database (2021), without patient ids; its COVID-19 images "
                       "come mostly from BIMCV/PadChest (Spain) and its normals mostly from RSNA (USA).",
    "nih": "NIH ChestX-ray14, adults; labels were mined from radiology reports and are noisy.",
    "hannover": "Hannover Medical School; COVID-19 images only.",
}

CONFOUND_SHARE = 0.5    # a class is confounded when at least this share of it comes from one source ...
CONFOUND_PURITY = 0.9   # ... of which at least this share is that class (it holds almost nothing else)
SMALL_TEST_CLASS = 100  # fewer test images than this in some class: the test set is called small

_NC = re.compile(r"(?<![A-Za-z])NC(?![A-Za-z])|(?i:non-?commercial)")

def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%"


def _cap(text: str) -> str:
    """``text`` with its first letter upper-cased (unlike str.capitalize, the rest is kept)."""
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------- text about the data


def data_card_sources(markdown: str) -> dict[str, str]:
    """Per source, its description in a data card: the rows of markdown tables whose header starts
    with a ``source`` column and has a ``what it is`` (or ``description``) column."""
    out: dict[str, str] = {}
    column = None
    for line in markdown.splitlines():
        line = line.strip()
        if not (line.startswith("|") and line.endswith("|")):
            column = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if column is None:
            names = [c.lower() for c in cells]
            if names and names[0] == "source":
                column = next((i for i, c in enumerate(names) if c in ("what it is", "description")), None)
        elif set(line.replace("|", "").strip()) <= set("-: ") or len(cells) <= column:
            continue  # the separator row
        elif cells[0] and cells[column]:
            out[cells[0]] = cells[column]
    return out


def source_confounding(summary: Mapping | None, classes: Sequence[str] = ()) -> str:
    """One sentence (or a few) on source/label confounding, computed from ``per_source_class``.

    For each class: the source holding the largest share of its images. A class is called
    confounded with a source when at least half of its images come from it and at least 90% of
    that source's images are of that class; sources that hold one class only are named. Without
    ``per_source_class`` the sentence says confounding could not be checked.
    """
    table = (summary or {}).get("per_source_class")
    if not isinstance(table, Mapping) or not table:
        return ("**Source/label confounding not checked.** Class counts per source were not recorded for this "
                "dataset, so whether a class comes mostly from one collection is unknown; a model can score well "
                "by recognising the source (scanner, resolution, text markers) rather than disease, so compare "
                "the per-source metrics.")
    classes = list(classes) or []
    for counts in table.values():
        classes += [str(c) for c in counts if str(c) not in classes]
    source_total = {s: sum(int(v) for v in counts.values()) for s, counts in table.items()}
    largest, confounded = [], []
    for c in classes:
        per_source = {s: int(counts.get(c, 0)) for s, counts in table.items()}
        total = sum(per_source.values())
        if total == 0:
            largest.append(f"{c} has no images")
            continue
        top = max(per_source, key=lambda s: per_source[s])
        largest.append(f"{c} {_pct(per_source[top], total)} from {top}")
        purity = per_source[top] / source_total[top]
        if per_source[top] >= CONFOUND_SHARE * total and purity >= CONFOUND_PURITY:
            confounded.append(f"{_pct(per_source[top], total)} of {c} images come from {top}, "
                              f"and {_pct(per_source[top], source_total[top])} of {top}'s images are {c}")
    single = [f"{s} ({next(c for c, v in counts.items() if int(v) > 0)})" for s, counts in table.items()
              if sum(1 for v in counts.values() if int(v) > 0) == 1]
    text = "Largest source per class: " + ", ".join(largest) + "."
    if confounded:
        text = ("**Source/label confounding.** " + text + " " + _cap("; ".join(confounded))
                + ": the model can score well by recognising the source (scanner, resolution, text markers) "
                  "rather than disease.")
    else:
        text = ("**Sources mixed across classes.** " + text + " No class has half or more of its images from a "
                "source that holds almost no other class.")
    if single:
        text += " Sources holding only one class: " + ", ".join(single) + "."
    return text + " Compare the per-source metrics."


def data_limitations(summary: Mapping | None, metrics: Mapping,
                     source_notes: Mapping[str, str] | None = None) -> list[str]:
    """The model card's "Known limitations" bullets (markdown), computed from a dataset summary.

    Args:
        summary: a preprocess ``_summary.json`` dict, or ``None`` (a short generic list then).
            Uses ``per_source_class``, ``patient_ids_per_source`` (both optional), ``per_source``,
            ``per_class``, ``per_split``, ``per_split_class`` and ``config.holdout_source``.
        metrics: the test metrics; only their class order is used.
        source_notes: per source, its description from the data's own data card
            (:func:`data_card_sources`); :data:`KNOWN_SOURCES` describes the sources it lacks.
    """
    not_validated = ("**Not externally validated.** All images come from public collections{}; performance "
                     "on another hospital's images is unknown.")
    if not summary:
        return ["**Source/label confounding unknown.** No dataset summary was recorded, so where each class's "
                "images come from is unknown; a model can learn the source rather than the disease.",
                not_validated.format("")]
    classes = summary_classes(summary, classes_of(metrics))
    sources = sources_of(summary)
    out = [source_confounding(summary, classes)]

    for s in sources:
        if (source_notes or {}).get(s):
            out.append(f"**Source {s}** (data card): {source_notes[s].rstrip('.')}.")
        elif s.lower() in KNOWN_SOURCES:
            out.append(f"**Source {s}.** {KNOWN_SOURCES[s.lower()]}")

    counts = patient_id_counts(summary)
    if counts:
        missing = [src for src in sources if src in counts and counts[src][0] == 0]
        partly = [src for src in sources if src in counts and 0 < counts[src][0] < (counts[src][1] or 0)]
        parts_ = [f"images of {', '.join(missing)} carry no patient id"] if missing else []
        parts_ += [f"only {count(counts[src][0])} of {count(counts[src][1])} images of {src} carry one"
                   for src in partly]
        if parts_:
            out.append("**Per-image split where patient ids are missing.** " + _cap("; ".join(parts_))
                       + ". Those images were split per image: near-identical images of one patient may sit in "
                         "both train and test, so figures on "
                       + ("these sources" if len(missing) + len(partly) > 1 else "that source") + " are optimistic.")
        else:
            out.append("**Patient-level split.** Every image carries a patient id, so no patient's images are "
                       "in more than one split.")
    else:
        out.append("**Patient ids not recorded per source.** Images without a patient id are split per image, "
                   "so near-identical images of one patient may sit in both train and test.")

    test_total = (summary.get("per_split") or {}).get("test")
    test_class = (summary.get("per_split_class") or {}).get("test") or {}
    if test_total is not None:
        text = f"{count(test_total)} test images"
        if test_class:
            text += " (" + ", ".join(f"{c} {count(test_class.get(c, 0))}" for c in classes) + ")"
            smallest = min(int(test_class.get(c, 0)) for c in classes)
            small = smallest < SMALL_TEST_CLASS
        else:
            small = int(test_total) < SMALL_TEST_CLASS * max(len(classes), 1)
        if small:
            out.append(f"**Small test set.** {text}: confidence intervals are wide, and a difference of a few "
                       f"points between runs is mostly noise.")
        else:
            out.append(f"**Test set.** {text}; read the confidence intervals before comparing runs.")

    per_class = {c: int((summary.get("per_class") or {}).get(c, 0)) for c in classes}
    if len(per_class) > 1 and max(per_class.values()) > 0:
        big = max(per_class, key=lambda c: per_class[c])
        low = min(per_class, key=lambda c: per_class[c])
        if per_class[low] == 0:
            out.append(f"**Class imbalance.** There are no {low} images; the model cannot have learned that class.")
        else:
            ratio = per_class[big] / per_class[low]
            head = "**Class imbalance.**" if ratio >= 1.5 else "**Class balance.**"
            out.append(f"{head} {big} {count(per_class[big])} images vs {low} {count(per_class[low])} "
                       f"({ratio:.1f}×); accuracy can hide poor recall on the smaller classes, so read "
                       f"per-class recall and macro-F1.")

    holdout = (summary.get("config") or {}).get("holdout_source")
    if holdout:
        out.append(f"**Leave-one-source-out.** Every test image comes from source {holdout}, which training and "
                   f"validation never saw; the test set covers only the classes that source holds.")

    out.append(not_validated.format(f" ({', '.join(sources)})" if sources else ""))
    return out


def licence_note(licenses: Sequence[str] | None) -> str:
    """The model card's note under the licence list, derived from the licence strings found.

    Names the non-commercial licences (an ``NC`` element, as in "CC BY-NC-SA 4.0", or the word
    non-commercial) when there are any; always asks to check each image's licence.
    """
    if not licenses:
        return ("No licence column was found in the input manifests: check each source's terms of use yourself "
                "before using or redistributing the images or models trained on them.")
    nc = [str(x) for x in licenses if _NC.search(str(x))]
    text = ""
    if nc:
        text = ("Some training images are licensed non-commercial (" + "; ".join(nc) + "): the images, and "
                "arguably models trained on them, are fine for research but not for a commercial product. ")
    return text + "Check each image's licence in the manifest before any redistribution."


# --------------------------------------------------------------------------- markdown


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table (``|`` escaped in cells) followed by a blank line."""
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _md_of(table: Table) -> list[str]:
    return md_table(table.header or [], table.rows)


def training_data_lines(summary: Mapping, classes: Sequence[str] = (), names: PathNames | None = None) -> list[str]:
    """Markdown for the card's "Training data": one paragraph (images, inputs, splits), the source ×
    class table (with a "patient ids" column: yes / no / partly), the views, and what was left out.

    Inputs are named by their folder (:func:`~covid_spark.report.summary.input_name`); the lists
    of files (rejected, skipped, duplicate groups) are counted here and listed in the HTML report
    and the dataset's ``_summary.json``. Older summaries without ``per_source_class`` get the
    paragraph only.
    """
    names = names or PathNames(summary)
    total = sum(int(v) for v in (summary.get("per_class") or {}).values()) or summary.get("written")
    head = f"{count(total)} images" if total is not None else "Images"
    per_input = [r for r in summary.get("per_input") or [] if isinstance(r, Mapping)]
    if per_input:
        listed = [f"{names.text(str(r.get('input', '?')))} ({count(r['written'])})"
                  if isinstance(r.get("written"), int) else names.text(str(r.get("input", "?"))) for r in per_input]
    else:
        listed = [names.text(loc) for loc in inputs_of(summary)]
    text = (f"{head} from {len(listed)} input(s): {', '.join(listed)}." if listed
            else f"{head}; input locations not recorded.")
    splits = summary.get("per_split") or {}
    if splits:
        text += (" Split " + " / ".join(f"{name} {count(n)}" for name, n in splits.items())
                 + ", by patient where images carry a patient id, else by image; near-duplicate images "
                   "kept in one split.")
    out = ["## Training data", "", text, ""]
    by_source = source_class_table(summary, classes)
    if by_source is not None:
        out += _md_of(_capped(by_source, "source(s)"))
    out += view_lines(summary)
    left_out = []
    for key, noun in (("rejected", "file(s) rejected"), ("skipped", "skipped")):
        if isinstance(summary.get(key), list) and summary[key]:
            left_out.append(f"{count(len(summary[key]))} {noun}")
    duplicates = summary.get("duplicates")
    if isinstance(duplicates, list) and duplicates:
        conflicts = len(summary.get("duplicate_label_conflicts") or [])
        left_out.append(f"{count(len(duplicates))} group(s) of near-duplicate images, each kept in one split"
                        + (f" ({count(conflicts)} with conflicting labels)" if conflicts else ""))
    if left_out:
        out += [_cap("; ".join(left_out)) + ": listed in the HTML report (`report.html`) and the dataset's "
                "`_summary.json`.", ""]
    return out


def view_lines(summary: Mapping) -> list[str]:
    """The views the images were taken in (``per_view``) and the ``--views`` filter, when recorded."""
    views = summary.get("per_view") or {}
    if not views:
        return []
    counts = ", ".join(f"{name} {count(n)}" for name, n in sorted(views.items(), key=lambda kv: (-kv[1], kv[0])))
    line = f"Views: {counts}."
    kept = (summary.get("config") or {}).get("views")
    if kept:
        left_out = sum(int(entry.get("excluded_by_view", 0)) for entry in summary.get("per_input") or [])
        line += f" Kept with `--views {kept}`; {count(left_out)} image(s) of other views left out."
    return [line, ""]


MAX_CARD_ROWS = 20  # rows of a per-source table in the card; the report and the JSON files hold all


def _capped(table: Table, noun: str, limit: int = MAX_CARD_ROWS) -> Table:
    if len(table.rows) <= limit:
        return table
    note = [f"… {len(table.rows) - limit} more {noun}: see the report"] + [""] * (len(table.header or [1]) - 1)
    return Table(table.caption, table.header, table.rows[:limit] + [note])


def _model_rows(run: Mapping, classes: Sequence[str], names: PathNames) -> list[list[str]]:
    """The card's "Model" table: what a reader needs from run.json, one row per question."""
    rows = []
    model = run.get("model")
    if model:
        weights = run.get("pretrained")
        start = (f"from {weights.get('weights', 'pretrained weights')} ({weights.get('package', '?')}, "
                 f"{weights.get('license', 'licence not recorded')})" if isinstance(weights, Mapping)
                 else "trained from scratch" if "pretrained" in run else None)
        rows.append(["architecture", str(model) + (f", {start}" if start else "")])
    training = []
    if run.get("epochs_run") is not None or run.get("epochs") is not None:
        training.append(f"{run.get('epochs_run', run.get('epochs'))} epoch(s)"
                        + (f" (best {run['best_epoch']})" if run.get("best_epoch") is not None else ""))
    if run.get("num_proc"):
        training.append(f"{run['num_proc']} rank(s)" + (f" ({run['engine']})" if run.get("engine") else ""))
    if run.get("effective_learning_rate") is not None:
        training.append(f"learning rate {run['effective_learning_rate']:g}")
    if run.get("seed") is not None:
        training.append(f"seed {run['seed']}")
    if run.get("wall_seconds") is not None:
        training.append(f"{float(run['wall_seconds']):,.0f} s")
    if training:
        rows.append(["training", ", ".join(training)])
    if run.get("image_size"):
        rows.append(["input", f"an RGB image, {run['image_size']}×{run['image_size']} (decoded and resized as "
                              f"`predict` does; grey X-rays as three equal channels)"])
    rows.append(["output", "a probability per class, in this order: " + ", ".join(classes)])
    versions = run.get("versions") if isinstance(run.get("versions"), Mapping) else {}
    made = [f"git commit {run['git_commit']}"] if run.get("git_commit") else []
    made += [f"{lib} {versions[lib]}" for lib in ("tensorflow", "keras", "tf_keras") if versions.get(lib)]
    if made:
        rows.append(["made with", ", ".join(made)])
    if run.get("dataset"):
        rows.append(["dataset", names.text(str(run["dataset"]))])
    return rows


def write_model_card(path: str, *, run: dict, metrics: dict, dataset_summary: dict | None,
                     licenses: list[str] | None, source_notes: Mapping[str, str] | None = None) -> None:
    """Write the markdown model card: intended use, model, training data, test metrics, limitations, licences.

    A page a reader finishes (about a hundred lines whatever the data's size): the training data is
    one paragraph and one source × class table, the metrics the per-class, overall, per-source and
    per-input tables. Lists of files (rejected, skipped, duplicate groups) stay in the HTML report
    and the run's JSON files. No absolute local path is written: inputs are named by their folder,
    files inside the run directory relative to it (:class:`~covid_spark.report.summary.PathNames`).
    The known limitations (:func:`data_limitations`) and the licence note (:func:`licence_note`)
    are derived from ``dataset_summary`` and ``licenses``.

    Args:
        path: output ``.md`` file in the run directory, written atomically.
        run: ``run.json``'s record with ``run_id``; the model, epochs, ranks, seed, starting weights,
            versions and dataset are shown, the rest stays in ``run.json``.
        metrics: as for :func:`covid_spark.report.html.write_html_report` (``ci95``,
            ``per_source``, ``per_input`` and ``patient_wise`` used when present).
        dataset_summary: a preprocess ``_summary.json`` dict, or ``None``.
        licenses: licence statements of the training data, or ``None``.
        source_notes: per source, its description in the data card (see :func:`data_limitations`).
    """
    names = PathNames(dataset_summary, base=os.path.dirname(os.path.abspath(path)))
    metrics = {k: names.text(v) if isinstance(v, str) else v for k, v in metrics.items()}
    classes = classes_of(metrics)
    title = run.get("run_id") or run.get("name") or "unnamed run"
    out = [f"# Model card: covid-spark chest X-ray classifier ({_md(names.text(str(title)))})", ""]

    out += ["## Intended use", "",
            "**Research only — not a diagnostic device.** This model is for studying distributed training "
            "and evaluation of chest X-ray classifiers. It must not be used to diagnose, triage or "
            "treat patients, or in any clinical decision.", ""]

    out += ["## Model", ""]
    out += md_table(["", ""], [[k, _md(v)] for k, v in _model_rows(run, classes, names)])
    out += ["The whole configuration, library versions and class weights are in the run's `run.json`.", ""]

    if dataset_summary:
        out += training_data_lines(dataset_summary, classes, names)
    else:
        out += ["## Training data", "", "No dataset summary was recorded for this run.", ""]

    out += ["## Metrics (test split)", ""]
    out += _md_of(per_class_table(metrics))
    out += md_table(["overall", "value"], overall_table(metrics).rows)
    ci = metrics.get("ci95")
    if ci:
        out += [f"Brackets: {100 * (1 - float(ci.get('alpha', 0.05))):.0f}% percentile-bootstrap confidence "
                f"intervals over test images ({ci.get('n_boot', '?')} resamples).", ""]
    if metrics.get("per_source"):
        out += ["### Per source", ""]
        out += _md_of(_capped(group_table(metrics["per_source"], classes), "source(s)"))
    if parts(metrics):
        out += ["### Per input, and the part split per patient", ""]
        out += _md_of(group_table(parts(metrics), classes, first="part"))

    if metrics.get("audit"):
        audit = metrics["audit"]
        out += ["## Shortcut audit", "", f"**{audit['verdict']['status'].capitalize()}.**", ""]
        out += _md_of(audit_summary_table(audit))
        out += ["Per class and per source: the HTML report and `metrics.json` (`audit`).", ""]

    out += ["## Known limitations", ""]
    out += [f"- {names.text(item)}" for item in data_limitations(dataset_summary, metrics, source_notes)] + [""]

    out += ["## Data licences", ""]
    if licenses:
        shown = list(licenses)[:MAX_CARD_ROWS]
        out += [f"- {_md(item)}" for item in shown]
        if len(licenses) > len(shown):
            out.append(f"- … {len(licenses) - len(shown)} more: see the input manifests' `license` column")
        out.append("")
    out += ["Note: " + licence_note(licenses), ""]
    atomic_write_text(path, "\n".join(out))
    log.info("wrote model card %s", path)
