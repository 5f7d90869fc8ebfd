"""A plain-words verdict from the three audit measurements: does the model read the lungs or the hospital?"""
from __future__ import annotations

from dataclasses import dataclass

# Within a class, a source probe whose balanced accuracy (mean recall over the sources) beats chance
# (1 / sources) by more than this reads the hospital from the features. Balanced, because a class
# whose main source holds 93 % of it caps plain accuracy's lead over guessing that source at 0.07,
# however well the sources are told apart. Each source's recall over a hundred images has a standard
# error near 0.04 (sqrt(p(1-p)/n), p ~ 0.8, n ~ 100): 0.10 is well beyond that, not noise.
PROBE_GAP_MAX = 0.10

# With the lungs blacked out (masking.remove_lungs) a model that reads the lungs should fall to chance.
# Guessing among k classes gives a macro-F1 near 1/k (exactly 1/k for balanced classes, less otherwise);
# the margin allows for small test sets, so three classes allow up to 0.45. Maguolo & Nanni
# (Information Fusion 2021) found COVID classifiers far above this on films with the lungs removed.
LUNGS_REMOVED_MARGIN = 0.12

# Lungs cover 0.37 of a film on average (the drawn masks, lung-masks/manifest.csv), so a Grad-CAM map
# spread evenly puts about 0.37 of its energy in them; 0.70 asks for nearly twice that concentration.
# DeGrave et al. (Nature Machine Intelligence 2021) found shortcut models' saliency on borders, text
# and shoulders, outside the lung fields.
CAM_IN_LUNGS_MIN = 0.70


def lungs_removed_f1_max(num_classes: int) -> float:
    """The highest lungs-removed macro-F1 still called chance for ``num_classes`` classes."""
    return 1.0 / num_classes + LUNGS_REMOVED_MARGIN


@dataclass(frozen=True)
class Finding:
    """One check: its measured ``value``, the ``threshold`` it was held to, and what it means."""
    check: str
    value: float
    threshold: float
    passed: bool
    message: str


@dataclass(frozen=True)
class Verdict:
    """``status``: 'shortcut suspected' (a check failed), 'no shortcut found' (all measured checks
    passed) or 'not measured' (no measurement given). ``findings`` in the order probe, lungs removed, CAM."""
    status: str
    findings: tuple[Finding, ...]

    @property
    def text(self) -> str:
        lines = [f"Verdict: {self.status}."]
        lines += [f"- {finding.message}" for finding in self.findings]
        if self.status == "no shortcut found":
            lines.append("Passing these checks does not prove the model reads the disease; it only finds "
                         "no sign that it reads the hospital. Report per-source and leave-one-source-out "
                         "scores beside it.")
        return "\n".join(lines)


def verdict(probe_gap: float | None = None, lungs_removed_macro_f1: float | None = None,
            cam_share_in_lungs: float | None = None, num_classes: int = 3) -> Verdict:
    """Judge a classifier from whichever of the three measurements are given (None: not measured).

    Args:
        probe_gap: ``source_probe(...)["summary"]["balanced_gap"]``: within-class balanced accuracy of
            the source probe minus chance (1 / sources).
        lungs_removed_macro_f1: the classifier's macro-F1 on test images passed through
            :func:`covid_spark.audit.masking.remove_lungs`.
        cam_share_in_lungs: mean of :func:`covid_spark.audit.cam.cam_energy_in_mask` over the test set.
        num_classes: classes of the classifier (sets the chance level of the macro-F1).

    Raises:
        ValueError: if ``num_classes < 2``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    findings = []
    if probe_gap is not None:
        passed = probe_gap <= PROBE_GAP_MAX
        findings.append(Finding("source probe", probe_gap, PROBE_GAP_MAX, passed, (
            f"Within each class the features tell sources apart only {probe_gap:+.2f} beyond chance "
            f"(balanced accuracy; limit {PROBE_GAP_MAX:.2f}): no sign of the hospital in the features."
            if passed else
            f"Within a class, the features tell which source an image came from {probe_gap:+.2f} beyond "
            f"chance (balanced accuracy; limit {PROBE_GAP_MAX:.2f}): the model's features carry the "
            f"hospital. Balance sources within each class, train on lung crops, and report "
            f"leave-one-source-out scores before trusting the headline metric.")))
    if lungs_removed_macro_f1 is not None:
        limit = lungs_removed_f1_max(num_classes)
        passed = lungs_removed_macro_f1 <= limit
        findings.append(Finding("lungs removed", lungs_removed_macro_f1, limit, passed, (
            f"With the lungs blacked out the model falls to macro-F1 {lungs_removed_macro_f1:.2f} "
            f"(chance about {1 / num_classes:.2f}, limit {limit:.2f}): it needs the lungs."
            if passed else
            f"With the lungs blacked out the model still reaches macro-F1 {lungs_removed_macro_f1:.2f} "
            f"(chance about {1 / num_classes:.2f}, limit {limit:.2f}): it reads something outside the "
            f"lungs (text, markers, borders, body size). Train and predict on lung crops "
            f"(covid_spark.lungs.crop_to_box) or with the outside masked, and re-run this audit.")))
    if cam_share_in_lungs is not None:
        passed = cam_share_in_lungs >= CAM_IN_LUNGS_MIN
        findings.append(Finding("Grad-CAM in lungs", cam_share_in_lungs, CAM_IN_LUNGS_MIN, passed, (
            f"{cam_share_in_lungs:.0%} of the Grad-CAM energy lies in the lungs "
            f"(at least {CAM_IN_LUNGS_MIN:.0%} asked): the model looks where the disease is."
            if passed else
            f"Only {cam_share_in_lungs:.0%} of the Grad-CAM energy lies in the lungs (at least "
            f"{CAM_IN_LUNGS_MIN:.0%} asked; an even spread gives about 37%): look at the maps per "
            f"source for what it looks at instead, and crop to the lungs.")))
    if not findings:
        status = "not measured"
    elif all(finding.passed for finding in findings):
        status = "no shortcut found"
    else:
        status = "shortcut suspected"
    return Verdict(status, tuple(findings))
