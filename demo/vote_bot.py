"""``python -m shoal.demo.vote_bot``: the demo's steady load, as emojivoto's vote-bot:
each round fetches ``/api/list`` from web, picks an emoji (the doughnut about 15% of the
time, otherwise any other one at random) and votes for it with ``/api/vote?choice=``.

Rounds run at ``--rate`` per second (1 by default) until ``--count`` rounds or
``--duration`` seconds have passed, or until SIGTERM / Ctrl-C; the bot then prints its
tally as one JSON line on stdout. HTTP goes through urllib, which honours ``http_proxy``
(and ``no_proxy``), so a meshed bot needs no change: its requests reach the local
outbound proxy in absolute form (``GET http://web.emojivoto:8080/api/list``).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from types import FrameType
from typing import Any
from urllib.parse import quote

from shoal.kernel.logs import setup_logging

from . import common
from .catalog import DOUGHNUT
from .common import ENV_WEB_HOST

log = logging.getLogger("shoal.demo.vote_bot")

DOUGHNUT_RATIO = 0.15  # emojivoto's vote-bot: 15% of votes go to the doughnut
DEFAULT_RATE = 1.0  # rounds per second, emojivoto's pace
# Each HTTP request gets this long; web's own gRPC deadline is 5 s, so a slower answer
# means web or the path to it is stuck, and the bot moves on.
REQUEST_TIMEOUT_SECONDS = 6.0
# The list is ~5 KB; a larger body than this is not web's and is not read further.
MAX_BODY_BYTES = 1024 * 1024
# The bot logs its running tally this often (stderr), so a demo shows it alive.
REPORT_INTERVAL_SECONDS = 10.0
# The upper bound on --rate: the bot is a steady trickle, not a load generator (use
# wrk or h2load for that); 1000 rounds/s is far above what one thread of urllib does.
MAX_RATE = 1000.0


@dataclass
class Tally:
    """What the bot did; ``votes`` counts answers to /api/vote by HTTP status."""

    rounds: int = 0
    lists_ok: int = 0
    doughnut_votes: int = 0  # rounds that chose the doughnut
    votes: Counter[int] = field(default_factory=Counter)
    errors: int = 0  # requests with no HTTP answer (refused, reset, timed out) or bad bodies

    def as_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "lists_ok": self.lists_ok,
                "doughnut_votes": self.doughnut_votes,
                "votes": {str(status): n for status, n in sorted(self.votes.items())},
                "errors": self.errors}


def choose(rng: random.Random, shortcodes: list[str], doughnut_ratio: float) -> str:
    """The doughnut with probability ``doughnut_ratio`` (when it is on the list), else
    any other shortcode uniformly."""
    others = [code for code in shortcodes if code != DOUGHNUT]
    if DOUGHNUT in shortcodes and (not others or rng.random() < doughnut_ratio):
        return DOUGHNUT
    if not others:
        raise ValueError("web listed no emoji")
    return rng.choice(others)


def base_url(web: str) -> str:
    """``host:port`` or a URL -> ``http://host:port`` (no trailing slash)."""
    web = web.strip().rstrip("/")
    return web if "://" in web else f"http://{web}"


class BadAnswer(Exception):
    """web answered something the bot cannot use (not JSON, not a list of emoji)."""


@dataclass
class Bot:
    web: str  # base URL
    rng: random.Random
    doughnut_ratio: float = DOUGHNUT_RATIO
    opener: urllib.request.OpenerDirector = field(default_factory=urllib.request.build_opener)
    tally: Tally = field(default_factory=Tally)

    def get(self, path: str) -> tuple[int, bytes]:
        """One GET; (status, body) for any HTTP answer, OSError when there is none."""
        request = urllib.request.Request(self.web + path, headers={"User-Agent": "vote-bot"})
        try:
            with self.opener.open(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
                return int(response.status), response.read(MAX_BODY_BYTES)
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code), error.read(MAX_BODY_BYTES)

    def round(self) -> None:
        self.tally.rounds += 1
        try:
            status, body = self.get("/api/list")
            if status != 200:
                raise BadAnswer(f"/api/list answered {status}")
            shortcodes = _shortcodes(body)
            self.tally.lists_ok += 1
            choice = choose(self.rng, shortcodes, self.doughnut_ratio)
            if choice == DOUGHNUT:
                self.tally.doughnut_votes += 1
            status, body = self.get("/api/vote?choice=" + quote(choice))
            self.tally.votes[status] += 1
            if status != 200:
                log.debug("vote for %s: %d %s", choice, status, body[:200].decode(errors="replace"))
        except (OSError, BadAnswer, ValueError) as error:
            self.tally.errors += 1
            log.warning("round %d: %s", self.tally.rounds, error)

    def run(self, rate: float, count: int | None, duration: float | None,
            stop: threading.Event) -> Tally:
        """Rounds on a fixed schedule (no catch-up bursts after a slow round)."""
        interval = 1.0 / rate
        start = time.monotonic()
        deadline = start + duration if duration is not None else None
        next_round = start
        next_report = start + REPORT_INTERVAL_SECONDS
        while not stop.is_set() and (count is None or self.tally.rounds < count):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                break
            if now < next_round:
                wait = next_round - now
                if deadline is not None:
                    wait = min(wait, deadline - now)
                stop.wait(wait)
                continue
            self.round()
            next_round = max(next_round + interval, time.monotonic())
            if time.monotonic() >= next_report:
                log.info("so far: %s", json.dumps(self.tally.as_dict()))
                next_report += REPORT_INTERVAL_SECONDS
        return self.tally


def _shortcodes(body: bytes) -> list[str]:
    try:
        items = json.loads(body)
        codes = [str(item["shortcode"]) for item in items]
    except (ValueError, TypeError, KeyError) as error:
        raise BadAnswer(f"/api/list: not a list of emoji ({error})") from None
    if not codes:
        raise BadAnswer("/api/list: empty")
    return codes


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= MAX_RATE:
        raise argparse.ArgumentTypeError(f"must be in (0, {MAX_RATE:g}]: {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = common.parser("shoal-demo-vote-bot", "steady votes against the demo's web")
    parser.add_argument("--web", type=common.address,
                        default=common.env_address(ENV_WEB_HOST, common.DEFAULT_WEB_ADDRESS),
                        help="web's HOST:PORT (env WEB_HOST)")
    parser.add_argument("--rate", type=_positive, default=DEFAULT_RATE,
                        help="rounds (list + vote) per second (default 1)")
    parser.add_argument("--count", type=_count, default=None, help="stop after N rounds")
    parser.add_argument("--duration", type=_positive, default=None,
                        help="stop after SECONDS")
    parser.add_argument("--doughnut-ratio", type=_ratio, default=DOUGHNUT_RATIO,
                        help="share of votes for the doughnut (default 0.15)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (repeatable runs)")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    bot = Bot(base_url(args.web), random.Random(args.seed), args.doughnut_ratio)
    log.info("vote-bot voting at %s, %g rounds/s", bot.web, args.rate)
    tally = bot.run(args.rate, args.count, args.duration, stop)
    print(json.dumps({"vote_bot": tally.as_dict()}), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
