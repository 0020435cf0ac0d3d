"""Class coverage of a selection: how evenly its samples spread over the teacher's pseudo-classes.

Purity alone does not make a good student: a selection 4-5x purer than random still gave a student
below random when one or two pseudo-classes took most of the budget (DESIGN.md, "What decides
curation quality"). So every selection reports, beside its size:

- `class_entropy`: the entropy of its class shares divided by log(C), C = the teacher's number of
  classes (when known, else the classes present): 1.0 = perfectly even, 0.0 = one class only;
- `min_class_share`: the smallest class's share of the selection, over all C classes (0.0 when a
  class is missing; 1/C at best);
- `classes_covered` of `num_classes`, and the counts per class they come from.
"""
from __future__ import annotations

import math
from collections.abc import Mapping


def class_coverage(counts: Mapping[str, int], num_classes: int | None = None) -> dict:
    """Coverage of a selection from its samples per class (`counts`: class -> count). A
    `num_classes` smaller than the classes present is ignored (the counts tell more)."""
    counts = {str(c): int(n) for c, n in counts.items() if int(n) > 0}
    total = sum(counts.values())
    n_classes = max(num_classes or 0, len(counts))
    if total == 0 or n_classes == 0:
        return {"classes_covered": 0, "num_classes": n_classes, "class_entropy": None, "min_class_share": None,
                "counts_per_class": {}}
    shares = [n / total for n in counts.values()]
    entropy = -sum(p * math.log(p) for p in shares)
    normalized = entropy / math.log(n_classes) if n_classes > 1 else 1.0  # one class: nothing to spread over
    smallest = min(shares) if len(counts) == n_classes else 0.0
    return {"classes_covered": len(counts), "num_classes": n_classes,
            "class_entropy": round(min(max(normalized, 0.0), 1.0), 6), "min_class_share": round(smallest, 6),
            "counts_per_class": dict(sorted(counts.items(), key=lambda kv: _class_key(kv[0])))}


def _class_key(name: str) -> tuple:
    """Numeric class names in numeric order (2 before 10), others after, by text."""
    return (0, int(name), "") if name.lstrip("-").isdigit() else (1, 0, name)


def coverage_text(coverage: Mapping) -> str:
    """One short phrase for an output line, e.g. 'class coverage: entropy 0.98, smallest class 7.9%
    (10/10 classes)'."""
    if coverage.get("class_entropy") is None:
        return "class coverage: no pseudo-labels"
    return (f"class coverage: entropy {coverage['class_entropy']:.2f}, smallest class "
            f"{100 * coverage['min_class_share']:.1f}% ({coverage['classes_covered']}/{coverage['num_classes']} "
            "classes)")
