"""The promotion gate: a new version is published only if it scores at least as well as the one in service.

The candidate and the incumbent (the newest published version, which the service serves by default)
are both scored from their exported ``model.onnx`` on the same test images. A candidate worse by
more than the tolerance, or one that cannot be compared (other labels or input), is refused unless
forced; its export is kept in the run directory. Every published version records the comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.data import Dataset
from training.evaluate import evaluate_onnx

DEFAULT_TOLERANCE_PP = 0.1
REFUSED_EXIT = 3
FIRST, PASSED, FORCED, REFUSED = "first version", "passed", "forced", "refused"


@dataclass(frozen=True)
class Gate:
    """How a candidate is judged: the tolerance in percentage points and whether to publish anyway."""

    tolerance_pp: float = DEFAULT_TOLERANCE_PP
    force: bool = False
    keep_dir: Path | None = None
    """Where a refused candidate's export is kept (``<keep_dir>/candidate``); None discards it."""
    incumbent: int | None = None
    """The version to compare with; None: the newest published one (``refresh`` names the stable version)."""


@dataclass(frozen=True)
class Check:
    """A test beside the test set's that a candidate must pass (``refresh``'s held-out feedback): its record goes
    into the candidate's metadata under ``key``; a ``refusal`` refuses it, as the test set's gate does."""

    key: str
    record: dict[str, Any]
    refusal: str | None = None


class PromotionRefused(Exception):
    """The candidate was not published; the message says why, with both accuracies."""

    def __init__(self, message: str, kept: Path | None) -> None:
        super().__init__(message)
        self.kept = kept


def published_versions(model_root: Path) -> list[int]:
    if not model_root.is_dir():
        return []
    return sorted(int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit())


def _incomparable(incumbent: Path, interface: dict[str, Any]) -> str | None:
    """Why the incumbent cannot be compared with a candidate of this interface (None: it can)."""
    try:
        metadata = json.loads((incumbent / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        return f"version {incumbent.name} has no readable metadata.json ({exc.__class__.__name__})"
    if metadata.get("labels") != interface["labels"]:
        return (f"its labels {interface['labels']} differ from version {incumbent.name}'s "
                f"{metadata.get('labels')}")
    theirs = metadata.get("input", {})
    if [theirs.get(key) for key in ("name", "datatype", "shape")] != \
            [interface["input"][key] for key in ("name", "datatype", "shape")]:
        return (f"its input {interface['input']['name']} {interface['input']['shape']} differs from version "
                f"{incumbent.name}'s {theirs.get('name')} {theirs.get('shape')}")
    if not (incumbent / "model.onnx").is_file():
        return f"version {incumbent.name} has no model.onnx"
    return None


def judge(model_root: Path, candidate_accuracy: float, interface: dict[str, Any], ds: Dataset,
          gate: Gate) -> dict[str, Any]:
    """Compare a candidate with the newest published version; the record goes into its metadata.

    ``interface`` holds the candidate's ``labels`` and ``input`` (as in metadata.json). The
    record's ``decision`` is ``first version``, ``passed``, ``forced`` or ``refused``, and its
    ``reason`` says why when the candidate was refused or forced.
    """
    record: dict[str, Any] = {
        "decision": FIRST, "incumbent_version": None, "incumbent_accuracy": None,
        "candidate_accuracy": candidate_accuracy, "tolerance_pp": gate.tolerance_pp,
        "test_images": int(len(ds.y_test)), "forced": gate.force, "reason": None,
    }
    versions = published_versions(model_root)
    if not versions:
        return record
    chosen = versions[-1] if gate.incumbent is None else gate.incumbent
    incumbent = model_root / str(chosen)
    record["incumbent_version"] = chosen
    reason = _incomparable(incumbent, interface)
    if reason is None:
        try:
            incumbent_accuracy = evaluate_onnx(incumbent / "model.onnx", ds.x_test, ds.y_test,
                                               interface["labels"])["accuracy"]
        except Exception as exc:  # onnxruntime raises its own types for a corrupt or foreign file
            reason = f"version {incumbent.name}'s model.onnx cannot be scored ({exc.__class__.__name__})"
        else:
            record["incumbent_accuracy"] = incumbent_accuracy
            worse_pp = (incumbent_accuracy - candidate_accuracy) * 100
            if worse_pp <= gate.tolerance_pp + 1e-9:
                record["decision"] = PASSED
                return record
            reason = (f"candidate accuracy {candidate_accuracy:.2%} is {worse_pp:.2f} pp below version "
                      f"{incumbent.name}'s {incumbent_accuracy:.2%} on the same {len(ds.y_test)} test images "
                      f"(tolerance {gate.tolerance_pp:g} pp)")
    else:
        reason = f"the candidate is not comparable with version {incumbent.name}: {reason}"
    record["decision"] = FORCED if gate.force else REFUSED
    record["reason"] = reason
    return record


def add_check(record: dict[str, Any], check: Check, gate: Gate) -> None:
    """Fold a :class:`Check`'s refusal into the gate's record: refused, or forced when the gate forces."""
    if check.refusal is None:
        return
    reason = check.refusal if record["decision"] not in (REFUSED, FORCED) else f"{record['reason']}; {check.refusal}"
    record["decision"] = FORCED if gate.force else REFUSED
    record["reason"] = reason


def describe(record: dict[str, Any]) -> str:
    """One line for the CLI and the report."""
    if record["decision"] == FIRST:
        return "first version of the model: no gate"
    if record["decision"] == PASSED:
        return (f"candidate {record['candidate_accuracy']:.2%} vs version {record['incumbent_version']} "
                f"{record['incumbent_accuracy']:.2%} on the same {record['test_images']} test images "
                f"(tolerance {record['tolerance_pp']:g} pp): passed")
    if record["decision"] == "published before the gate":
        # a record written afterwards for a version that replaced another before the gate existed (the bundled
        # cifar10 v2 and fashion-mnist v2): no gate judged it; its accuracies, if any, were scored later
        scored = ""
        if record.get("incumbent_accuracy") is not None and record.get("candidate_accuracy") is not None:
            scored = (f"; scored afterwards: {record['candidate_accuracy']:.2%} vs version "
                      f"{record['incumbent_version']} {record['incumbent_accuracy']:.2%} on the same "
                      f"{record['test_images']} test images")
        return f"published before the gate existed, so not judged by it{scored}"
    return f"{record['decision']}: {record['reason']}"
