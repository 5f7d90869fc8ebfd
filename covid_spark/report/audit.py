"""The shortcut audit (``metrics["audit"]``, made by ``covid_spark.evaluation.shortcuts``) as report
tables and model-card lines: the verdict in plain words, the four measurements against their limits,
and where the Grad-CAM energy falls per class and per source."""
from __future__ import annotations

from typing import Mapping

from covid_spark.report.tables import Table, fmt


def audit_summary_table(audit: Mapping) -> Table:
    """One row per check: what was measured, its value, the limit, and whether it passed."""
    limits = audit.get("thresholds", {})
    probe = audit.get("probe", {}).get("summary", {})
    cam = audit.get("cam", {}).get("overall", {})
    rows = [
        ["macro-F1 on the audited images", fmt(audit.get("macro_f1")), "", ""],
        ["source probe within class: balanced accuracy − chance (1 / sources)",
         fmt(probe.get("balanced_gap")), f"≤ {fmt(limits.get('probe_gap_max'), 2)}",
         _passed(probe.get("balanced_gap"), limits.get("probe_gap_max"), below=True)],
        ["macro-F1 with the lungs blacked out", fmt(audit.get("lungs_removed", {}).get("macro_f1")),
         f"≤ {fmt(limits.get('lungs_removed_macro_f1_max'), 2)} (chance)",
         _passed(audit.get("lungs_removed", {}).get("macro_f1"), limits.get("lungs_removed_macro_f1_max"), below=True)],
        ["macro-F1 with only the lungs kept", fmt(audit.get("lungs_only", {}).get("macro_f1")), "", ""],
        ["Grad-CAM energy inside the lungs", fmt(cam.get("mean")), f"≥ {fmt(limits.get('cam_in_lungs_min'), 2)}",
         _passed(cam.get("mean"), limits.get("cam_in_lungs_min"), below=False)],
    ]
    held = audit.get("held_out_source")
    if held:
        rows.append([f"macro-F1 on the held-out source {held['source']} (never trained on)",
                     fmt(held.get("macro_f1")), "", ""])
    return Table(f"Shortcut audit of {audit.get('images', '?')} test image(s)", ["check", "value", "limit", "passed"],
                 rows)


def _passed(value, limit, below: bool) -> str:
    if value is None or limit is None:
        return "not measured"
    return "yes" if (value <= limit if below else value >= limit) else "NO"


def audit_detail_tables(audit: Mapping) -> list[Table]:
    """The probe per class, and the in-lung Grad-CAM share per class and per source."""
    probe_rows = []
    for label, part in sorted(audit.get("probe", {}).get("classes", {}).items()):
        if part.get("status") == "probed":
            probe_rows.append([label, str(part.get("probed_images")), fmt(part.get("probe_accuracy")),
                               fmt(part.get("baseline")), fmt(part.get("balanced_accuracy")),
                               fmt(part.get("balanced_baseline")), fmt(part.get("balanced_gap"))])
        else:
            probe_rows.append([label, "", "", "", "", "", f"skipped: {part.get('reason', '')}"])
    cam = audit.get("cam", {})
    cam_rows = [[f"class {k}", fmt(v.get("mean")), str(v.get("images"))] for k, v in sorted(cam.get("by_class", {}).items())]
    cam_rows += [[f"source {k}", fmt(v.get("mean")), str(v.get("images"))] for k, v in sorted(cam.get("by_source", {}).items())]
    return [Table("Source probe within each class (cross-validated)", ["class", "images", "probe accuracy",
                                                                        "majority baseline", "balanced accuracy",
                                                                        "chance", "balanced gap"], probe_rows),
            Table(f"Grad-CAM energy inside the lungs (layer {cam.get('layer', '?')})", ["group", "share", "images"],
                  cam_rows)]
