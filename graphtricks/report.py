"""Change records and the rewrite report.

Every edit a pass makes is one :class:`Change`; a rewrite collects them, with the region
tree and any warnings, into one :class:`Report` that the CLI renders as a table or JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Change", "Report"]


@dataclass
class Change:
    """One edit made by a pass.

    Attributes:
        pass_name: the registry name of the pass (``"dropout"``).
        where: qualified name of the module or graph node edited (``layer1.0.relu``).
        action: ``inserted``, ``replaced``, ``wrapped`` or ``initialized``.
        what: a short human description (``Dropout(p=0.1) after ReLU``).
        new_params: qualified names of parameters the edit created.
        copied_params: qualified names of parameters carried over from what was replaced.
        details: pass-specific figures (shapes, drift, std, …), JSON-able.
    """

    pass_name: str
    where: str
    action: str
    what: str
    new_params: list[str] = field(default_factory=list)
    copied_params: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, **{k: v for k, v in asdict(self).items() if k != "pass_name"}}


@dataclass
class Report:
    """What a rewrite did: the passes run, each change, warnings, and the region tree.

    ``skipped`` counts, per pass, what it left alone by design (``{"dropout": {"gates": 9}}``).
    """

    passes: list[dict[str, Any]] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    regions: dict[str, Any] = field(default_factory=dict)
    inlined: dict[str, str] = field(default_factory=dict)
    traced_fraction: float = 1.0
    seconds: float = 0.0

    def __repr__(self) -> str:
        by_pass = ", ".join(f"{k} {v}" for k, v in self.changes_by_pass().items())
        warned = f"{len(self.warnings)} warning" + "s" * (len(self.warnings) != 1)
        return (f"Report({len(self.changes)} changes ({by_pass or 'no passes'}), {warned},"
                f" traced {self.traced_fraction:.0%}, {self.seconds:.2f} s)")

    def changes_by_pass(self) -> dict[str, int]:
        """Number of changes per pass, in pass order (passes with none included)."""
        counts = {p["pass"]: 0 for p in self.passes}
        for c in self.changes:
            counts[c.pass_name] = counts.get(c.pass_name, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "passes": self.passes,
            "changes": [c.to_dict() for c in self.changes],
            "changes_by_pass": self.changes_by_pass(),
            "warnings": list(self.warnings),
            "skipped": {k: dict(v) for k, v in self.skipped.items()},
            "traced_fraction": round(self.traced_fraction, 4),
            "regions": self.regions,
            "inlined": dict(self.inlined),
            "seconds": round(self.seconds, 4),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report read from ``report.json``."""
        changes = [
            Change(pass_name=c["pass"], **{k: v for k, v in c.items() if k != "pass"}) for c in data.get("changes", [])
        ]
        return cls(
            passes=data.get("passes", []),
            changes=changes,
            warnings=data.get("warnings", []),
            skipped=data.get("skipped", {}),
            regions=data.get("regions", {}),
            inlined=data.get("inlined", {}),
            traced_fraction=data.get("traced_fraction", 1.0),
            seconds=data.get("seconds", 0.0),
        )
