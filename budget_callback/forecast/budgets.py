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

    @property
    def checked(self) -> bool:
        return self.budget_bytes is not None

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.projected_bytes <= self.budget_bytes

    def line(self) -> str:
        if not self.checked:
            return f"{self.name}: {format_bytes(self.projected_bytes)} projected, no budget set"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        text = f"{self.name}: {format_bytes(self.projected_bytes)} projected of {format_bytes(self.budget_bytes)} budget: {verdict}"
        if not self.fits and self.advice:
            text += " (" + "; ".join(self.advice) + ")"
        return text

    def to_dict(self) -> dict:
        out = asdict(self)
        out["fits"] = self.fits
        return out
