"""report.html as a reader's browser shows it: headless Chromium (tests/browser.py), at desktop and phone width.

Every figure loaded, nothing on the console, the numbers shown are metrics.json's at the precision
shown, the page fits a phone's width, and a screenshot of each is kept beside the run
(``report-desktop.png``, ``report-phone.png``).
"""
from __future__ import annotations

import json
import os
import re

import pytest

from covid_spark.constants import CLASSES
from covid_spark.data.rundir import RunDir
from tests.browser import Chromium, chromium_path

pytestmark = pytest.mark.slow

# What the page shows, read from the DOM as rendered: images with their natural size, and every table's
# caption and cells as the reader sees them (innerText).
READ_PAGE = """(() => ({
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth})),
  tables: [...document.querySelectorAll("table")].map(t => ({
      caption: t.caption ? t.caption.innerText.trim() : null,
      right: t.getBoundingClientRect().right,
      rows: [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()))})),
  page_width: document.documentElement.scrollWidth, window_width: window.innerWidth,
  overflowing_captions: [...document.querySelectorAll("figcaption")].filter(c => c.scrollWidth > c.clientWidth + 1)
      .map(c => c.innerText),
}))()"""

NUMBER = re.compile(r"-?\d+(?:\.(\d+))?")


@pytest.fixture(scope="module")
def browser():
    if not chromium_path():
        pytest.skip("Debian's chromium is not installed: scripts/setup_env.sh installs it where it runs as root "
                    "with apt (apt-get install chromium); without it the report is not checked in a browser")
    with Chromium() as chromium:
        yield chromium


def shown_equal(text: str, value, bounds=None) -> bool:
    """True when ``text`` (``0.308`` or ``0.308 [0.077, 0.538]`` or ``n/a``) shows ``value`` (and its
    interval) at the number of decimals it shows."""
    if value is None:
        return text == "n/a"
    numbers = [(m.group(0), m.group(1) or "") for m in NUMBER.finditer(text)]
    expected = [value] + (list(bounds) if bounds else [])
    if len(numbers) != len(expected):
        return False
    return all(abs(float(shown) - want) <= 0.5 * 10 ** -len(decimals) + 1e-9
               for (shown, decimals), want in zip(numbers, expected))


def table(page: dict, caption: str) -> dict[str, list[str]]:
    """The table captioned ``caption`` as {first cell: the other cells}, its header under ``""``."""
    (found,) = [t for t in page["tables"] if t["caption"] == caption]
    return {row[0]: row[1:] for row in found["rows"]}


@pytest.fixture(scope="module")
def shown(browser, tracked_run) -> dict:
    """The tracked demo run's report read at desktop width (1280 px), with its metrics and a screenshot."""
    paths = RunDir(tracked_run["run_dir"])
    browser.events.clear()
    browser.open("file://" + os.path.abspath(paths.report), width=1280)
    page = browser.evaluate(READ_PAGE)
    page["errors"] = browser.console_errors()
    page["screenshot"] = os.path.join(tracked_run["root"], "report-desktop.png")
    browser.screenshot(page["screenshot"])
    with open(paths.metrics, encoding="utf-8") as handle:
        page["metrics"] = json.load(handle)
    page["gradcam"] = len(os.listdir(paths.gradcam))
    return page


def test_every_figure_loads_and_the_console_stays_quiet(shown):
    assert shown["errors"] == []
    assert len(shown["images"]) == 3 + shown["gradcam"]  # history, confusion, ROC/PR, and the Grad-CAM gallery
    assert [i for i in shown["images"] if not (i["complete"] and i["width"] > 0)] == []
    assert os.path.getsize(shown["screenshot"]) > 10_000


def test_the_numbers_shown_are_those_of_metrics_json(shown):
    metrics = shown["metrics"]
    ci = metrics["ci95"]
    per_class = table(shown, "Per class")
    assert per_class["class"][:4] == ["precision", "recall", "F1", "support"]
    for name in CLASSES:
        cells = per_class[name]
        for column, key in enumerate(("precision", "recall", "f1")):
            value = metrics["per_class"][name][key]
            assert shown_equal(cells[column], value, ci["per_class"][name][key] if value is not None else None), \
                (name, key, cells[column])
        assert cells[3] == str(metrics["per_class"][name]["support"])
    overall = table(shown, "Overall")
    assert overall["images"] == [str(metrics["n"])]
    for label, key in (("accuracy", "accuracy"), ("macro-F1", "macro_f1"), ("cross-entropy loss", "loss")):
        assert shown_equal(overall[label][0], metrics[key], ci[key]), (label, overall[label])
    assert shown_equal(overall["calibration error (ECE, 15 bins)"][0], metrics["ece"])
    assert shown_equal(overall["temperature (fitted on val)"][0], metrics["temperature"])
    assert shown_equal(overall["ECE after temperature scaling"][0], metrics["ece_temperature_scaled"])
    confusion = table(shown, "Confusion matrix")
    assert [confusion[name] for name in CLASSES] == [[str(v) for v in row] for row in metrics["confusion_matrix"]]


def test_a_phone_reads_it_without_scrolling_sideways(browser, tracked_run, shown):
    browser.events.clear()
    browser.open("file://" + os.path.abspath(RunDir(tracked_run["run_dir"]).report), width=390, height=844, mobile=True)
    page = browser.evaluate(READ_PAGE)
    screenshot = os.path.join(tracked_run["root"], "report-phone.png")
    browser.screenshot(screenshot)
    assert browser.console_errors() == []
    assert page["window_width"] == 390  # laid out for the phone, not a zoomed-out desktop page
    assert page["page_width"] <= page["window_width"]  # wide tables scroll in their own box
    assert page["overflowing_captions"] == []  # long file names wrap inside their caption
    # The headline numbers are on screen without scrolling: a long path in the Overall table wraps.
    fits = {t["caption"]: t["right"] <= page["window_width"] for t in page["tables"]}
    assert fits["Overall"] and fits["Confusion matrix"]
    assert [i for i in page["images"] if i["width"] == 0] == []
    assert os.path.getsize(screenshot) > 10_000
