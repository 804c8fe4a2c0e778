"""Accuracy-driven length curriculum for ``scripts/kv_train.py`` (pure Python: no torch).

Training stays at the current length of a doubling ladder (64, 128, ..., 4096) until the in-loop dense check at
that length passes ``threshold`` on every gated task that fits there, then moves one rung up. Shorter rungs stay in
the mix (``replay``): the key-matching solution found on short sequences is kept while the length grows, instead
of being lost to the positional single-needle solution that dominates the gradient on long ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def make_schedule(start: int, stop: int) -> list[int]:
    """The doubling ladder ``start, 2*start, ...`` up to and including ``stop`` (``stop`` is always the last)."""
    if start <= 0 or stop < start:
        raise ValueError(f"need 0 < start <= stop, got {start}, {stop}")
    ladder = [start]
    while ladder[-1] * 2 < stop:
        ladder.append(ladder[-1] * 2)
    if ladder[-1] != stop:
        ladder.append(stop)
    return ladder


@dataclass
class Curriculum:
    ladder: list[int]
    level: int = 0
    history: list[list] = field(default_factory=list)  # [step, length, {task: acc}, passed] per check

    @property
    def length(self) -> int:
        return self.ladder[min(self.level, len(self.ladder) - 1)]

    @property
    def done(self) -> bool:
        """True once the top rung has passed its check."""
        return self.level >= len(self.ladder)

    def mix(self, replay: float) -> tuple[list[int], list[float]]:
        """Lengths and weights to draw from: the current rung gets ``1 - replay``, the rungs below share
        ``replay`` equally (the first rung alone gets everything)."""
        top = min(self.level, len(self.ladder) - 1)
        below = self.ladder[:top]
        if not below:
            return [self.ladder[top]], [1.0]
        return below + [self.ladder[top]], [replay / len(below)] * len(below) + [1.0 - replay]

    def update(self, step: int, acc: dict[str, float], gate: list[str], threshold: float) -> bool:
        """Record a check at the current rung; advance when every gated task present in ``acc`` reaches
        ``threshold`` (tasks that do not fit at this length are absent). Returns whether it advanced."""
        scores = [acc[t] for t in gate if t in acc]
        passed = bool(scores) and min(scores) >= threshold and not self.done
        self.history.append([step, self.length, dict(acc), passed])
        if passed:
            self.level += 1
        return passed

    def to_dict(self) -> dict:
        return {"ladder": list(self.ladder), "level": self.level, "history": list(self.history)}

    @classmethod
    def from_dict(cls, d: dict, ladder: list[int] | None = None) -> Curriculum:
        """The saved schedule; given another ``ladder`` (a resume with a new --curriculum), it continues on that
        ladder at the first rung not shorter than the saved current length, with the history kept."""
        saved = cls(list(d["ladder"]), int(d["level"]), list(d.get("history", [])))
        if ladder is None or list(ladder) == saved.ladder:
            return saved
        at = saved.ladder[-1] + 1 if saved.done else saved.length
        level = next((i for i, n in enumerate(ladder) if n >= at), len(ladder))
        return cls(list(ladder), level, saved.history)
