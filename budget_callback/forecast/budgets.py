"""Budget verdicts and the policy that acts on them (pure: no I/O)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..units import format_bytes

POLICIES = ("downsample", "abort", "warn")


@dataclass
class Verdict:
    name: str  # "disk" | "memory" | "wandb"
    projected_bytes: int
    budget_bytes: int | None  # None: not checked
    advice: list[str] = field(default_factory=list)
    known: bool = True  # False: the projection is only a lower bound (the memory of a step that was not traced)
    basis: str = ""  # how the projection was made when that matters to the verdict ("estimated: ...", why unknown)

    @property
    def checked(self) -> bool:
        return self.budget_bytes is not None

    @property
    def fits(self) -> bool:
        """Within its budget, and known to be: an unknown projection never fits a budget."""
        if self.budget_bytes is None:
            return True
        return self.known and self.projected_bytes <= self.budget_bytes

    @property
    def exceeds(self) -> bool:
        """Known to exceed its budget (an unknown one does not: it is ``unknown``)."""
        return self.checked and self.known and self.projected_bytes > self.budget_bytes

    def line(self) -> str:
        basis = f" [{self.basis}]" if self.basis else ""
        if not self.known:
            budget = f" of {format_bytes(self.budget_bytes)} budget" if self.checked else ""
            return (f"{self.name}: UNKNOWN, at least {format_bytes(self.projected_bytes)} (model states only){budget}"
                    f"{basis}")
        if not self.checked:
            return f"{self.name}: {format_bytes(self.projected_bytes)} projected, no budget set{basis}"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        text = f"{self.name}: {format_bytes(self.projected_bytes)} projected of {format_bytes(self.budget_bytes)} budget: {verdict}"
        if not self.fits and self.advice:
            text += " (" + "; ".join(self.advice) + ")"
        return text + basis

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fits"] = self.fits
        return out


def decide(verdicts: dict[str, Verdict], on_exceed: str, downsampled: bool) -> str:
    """The fit-start decision: ``abort`` or ``warn`` (by the policy) when a budget is known to be exceeded;
    ``unknown`` when a budget's projection is not known (``abort`` under the ``abort`` policy: a guard that
    cannot vouch for a budget does not start the run); else ``downsampled`` or ``fits``."""
    if any(v.exceeds for v in verdicts.values()):
        return "warn" if on_exceed == "warn" else "abort"
    if any(v.checked and not v.known for v in verdicts.values()):
        return "abort" if on_exceed == "abort" else "unknown"
    return "downsampled" if downsampled else "fits"
