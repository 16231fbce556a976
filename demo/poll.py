"""The voting service's state: an in-memory tally per shortcode. Plain code, no I/O;
each voting replica holds its own (as emojivoto's does), so without a mesh web sees only
the replica it talks to, and with one the leaderboard depends on where votes landed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .catalog import BY_SHORTCODE, DOUGHNUT


class UnknownEmoji(ValueError):
    """The caller asked to vote for a shortcode that is not in the catalog."""


class DoughnutFailure(RuntimeError):
    """The demo's deliberate bug: a vote for the doughnut always fails."""


@dataclass
class Poll:
    tallies: Counter[str] = field(default_factory=Counter)

    def vote(self, shortcode: str) -> int:
        """Count one vote and return the new tally."""
        if shortcode not in BY_SHORTCODE:
            raise UnknownEmoji(shortcode)
        if shortcode == DOUGHNUT:
            raise DoughnutFailure("ERROR")
        self.tallies[shortcode] += 1
        return self.tallies[shortcode]

    def results(self) -> list[tuple[str, int]]:
        """(shortcode, votes) for every emoji with votes, most first; ties by shortcode so
        the order is stable between calls."""
        return sorted(self.tallies.items(), key=lambda item: (-item[1], item[0]))
