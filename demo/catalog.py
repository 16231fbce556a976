"""The emoji the demo votes on, and the one naming rule that ties a shortcode to its
``Vote<Name>`` RPC. Plain data and pure functions: the emoji service serves this list,
web and the vote-bot use it to route and choose, and a test checks that voting.proto has
exactly one RPC per entry.

The list is a subset of emojivoto's ``top100Emoji`` in its order (``:doughnut:`` third,
as there), so the leaderboard and the ``viz top`` rows read the way the seed's do.
"""

from __future__ import annotations

from dataclasses import dataclass

DOUGHNUT = ":doughnut:"


@dataclass(frozen=True, slots=True)
class Emoji:
    shortcode: str  # ":name:", the key everywhere
    unicode: str


_TABLE: tuple[tuple[str, str], ...] = (
    ("joy", "😂"),
    ("sunglasses", "😎"),
    ("doughnut", "🍩"),
    ("stuck_out_tongue_winking_eye", "😜"),
    ("money_mouth_face", "🤑"),
    ("flushed", "😳"),
    ("mask", "😷"),
    ("nerd_face", "🤓"),
    ("ghost", "👻"),
    ("skull_and_crossbones", "☠️"),
    ("heart_eyes_cat", "😻"),
    ("hear_no_evil", "🙉"),
    ("see_no_evil", "🙈"),
    ("speak_no_evil", "🙊"),
    ("santa", "🎅"),
    ("turkey", "🦃"),
    ("rabbit", "🐰"),
    ("dancer", "💃"),
    ("man_dancing", "🕺"),
    ("rainbow", "🌈"),
    ("point_up_2", "👆"),
    ("vulcan_salute", "🖖"),
    ("metal", "🤘"),
    ("thumbsup", "👍"),
    ("wave", "👋"),
    ("clap", "👏"),
    ("raised_hands", "🙌"),
    ("pray", "🙏"),
    ("dog", "🐶"),
    ("cat2", "🐈"),
    ("pig", "🐷"),
    ("hatching_chick", "🐣"),
    ("snail", "🐌"),
    ("bacon", "🥓"),
    ("pizza", "🍕"),
    ("taco", "🌮"),
    ("burrito", "🌯"),
    ("ramen", "🍜"),
    ("champagne", "🍾"),
    ("beer", "🍺"),
    ("rocket", "🚀"),
    ("fire", "🔥"),
    ("jack_o_lantern", "🎃"),
    ("balloon", "🎈"),
    ("tada", "🎉"),
    ("trophy", "🏆"),
    ("bulb", "💡"),
    ("crystal_ball", "🔮"),
    ("100", "💯"),
    ("checkered_flag", "🏁"),
    ("floppy_disk", "💾"),
    ("poop", "💩"),
)

EMOJI: tuple[Emoji, ...] = tuple(Emoji(f":{name}:", char) for name, char in _TABLE)
BY_SHORTCODE: dict[str, Emoji] = {emoji.shortcode: emoji for emoji in EMOJI}


def vote_method(shortcode: str) -> str:
    """The voting RPC for a shortcode, as emojivoto names it: ``:point_up_2:`` ->
    ``VotePointUp2``, ``:jack_o_lantern:`` -> ``VoteJackOLantern``, ``:100:`` -> ``Vote100``.
    """
    name = shortcode.strip(":")
    return "Vote" + "".join(part[:1].upper() + part[1:] for part in name.split("_"))


VOTE_METHODS: dict[str, str] = {emoji.shortcode: vote_method(emoji.shortcode) for emoji in EMOJI}
SHORTCODE_OF_METHOD: dict[str, str] = {method: code for code, method in VOTE_METHODS.items()}
