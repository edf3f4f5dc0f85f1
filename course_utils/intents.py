"""The intents data set: short requests to a voice assistant, labelled with one of six intents.

Entirely synthetic (templates and word lists written for this course). The test split mixes phrasings
seen in training with phrasings held out from it (`"seen": false`), so a classifier that only memorised
the training templates shows it. Files live in `datasets/intents/`; an installed package without the
folder regenerates byte-identical files into the course cache.
"""
from __future__ import annotations

import random
from pathlib import Path

LABELS = ("alarm", "timer", "music", "weather", "shopping", "message")
SPLIT_SIZES = {"train": 600, "val": 120, "test": 360}
SEEDS = {"train": 1, "val": 2, "test": 3}

_TIMES = ["6 am", "6:30", "seven", "7:15 am", "8 o'clock", "half past six", "noon", "9 pm", "5:45", "quarter to eight"]
_DAYS = ["tomorrow", "on monday", "every weekday", "on saturday", "tonight", "this friday", "on sunday morning"]
_DURATIONS = ["5 minutes", "ten minutes", "20 minutes", "an hour", "90 seconds", "half an hour", "three minutes"]
_FOODS = ["pasta", "the eggs", "rice", "the pizza", "tea", "the roast", "bread"]
_ARTISTS = ["the beatles", "miles davis", "some jazz", "taylor swift", "classical piano", "lo-fi beats", "abba"]
_PLACES = ["paris", "london", "here", "the beach", "tokyo", "my office", "berlin"]
_ITEMS = ["milk", "two apples", "coffee beans", "dish soap", "bread", "a dozen eggs", "rice", "tea"]
_PEOPLE = ["mom", "alex", "my boss", "sam", "the team", "grandma", "jordan"]
_NEWS = ["i'm running late", "dinner is ready", "see you at noon", "call me back", "happy birthday",
         "the meeting moved"]
_OPENERS = ["", "", "", "please ", "hey, ", "could you ", "can you ", "ok assistant, "]
_CLOSERS = ["", "", "", " please", " thanks", " right now", " for me"]

# Per intent: templates; the LAST TWO are held out of train and val (test only, "seen": false).
TEMPLATES = {
    "alarm": ["set an alarm for {time} {day}", "wake me up at {time} {day}", "alarm at {time}",
              "i need to be up by {time} {day}", "make sure i get up at {time}", "cancel my {time} alarm",
              "change my alarm to {time}", "turn off the alarm for {day}",
              "i have to get out of bed at {time} {day}", "ring at {time} {day} so i am not late"],
    "timer": ["set a timer for {dur}", "start a {dur} timer", "timer {dur} for {food}",
              "count down {dur}", "let me know when {dur} are up", "how much time is left on the timer",
              "stop the timer", "remind me in {dur} to check {food}",
              "{food} needs {dur}, tell me when it's done", "beep after {dur}"],
    "music": ["play {artist}", "put on {artist}", "i want to hear {artist}", "play something by {artist}",
              "skip this song", "turn the music up", "pause the music", "shuffle my playlist",
              "some {artist} would be nice now", "can we listen to {artist} {day}"],
    "weather": ["what's the weather in {place}", "will it rain {day}", "is it cold in {place}",
                "weather forecast for {day}", "do i need an umbrella {day}", "how hot is it in {place}",
                "is it going to snow in {place}", "what's the temperature at {time}",
                "should i wear a jacket in {place} {day}", "is it sunny in {place} {day}"],
    "shopping": ["add {item} to my shopping list", "put {item} on the list", "we're out of {item}",
                 "remove {item} from the shopping list", "what's on my shopping list", "buy {item}",
                 "don't let me forget {item} at the store", "i need {item}",
                 "note that the fridge has no {item} left", "pick up {item} next time i shop"],
    "message": ["text {person} that {news}", "send a message to {person}: {news}", "tell {person} {news}",
                "message {person} saying {news}", "reply to {person} with {news}", "read my new messages",
                "let {person} know {news}", "whatsapp {person} {news}",
                "drop {person} a note: {news}", "write to {person} that {news}"],
}
HELD_OUT = 2


def _fill(template: str, rng: random.Random) -> str:
    text = template.format(time=rng.choice(_TIMES), day=rng.choice(_DAYS), dur=rng.choice(_DURATIONS),
                           food=rng.choice(_FOODS), artist=rng.choice(_ARTISTS), place=rng.choice(_PLACES),
                           item=rng.choice(_ITEMS), person=rng.choice(_PEOPLE), news=rng.choice(_NEWS))
    return " ".join((rng.choice(_OPENERS) + text + rng.choice(_CLOSERS)).split())


def generate_split(split: str) -> list[dict]:
    """The examples of one split: {"text", "label", "seen"}; classes balanced, no text in two splits."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_SIZES)}, got {split!r}")
    taken: set[str] = set()
    for earlier in list(SPLIT_SIZES)[:list(SPLIT_SIZES).index(split)]:
        taken |= {ex["text"] for ex in generate_split(earlier)}
    rng = random.Random(SEEDS[split])
    out = []
    per_class = SPLIT_SIZES[split] // len(LABELS)
    for label in LABELS:
        templates = TEMPLATES[label]
        n = 0
        while n < per_class:
            # test: one example in three from a held-out phrasing
            unseen = split == "test" and n % 3 == 2
            pool = templates[-HELD_OUT:] if unseen else templates[:-HELD_OUT]
            text = _fill(rng.choice(pool), rng)
            if text in taken:
                continue
            taken.add(text)
            out.append({"text": text, "label": label, "seen": not unseen})
            n += 1
    rng.shuffle(out)
    return out


def write_split(folder: Path, split: str) -> Path:
    """Write `<folder>/<split>.jsonl` (what `datasets/intents/make_intents.py` runs)."""
    from .data import write_jsonl

    return write_jsonl(Path(folder) / f"{split}.jsonl", generate_split(split))


def load_intents(split: str) -> list[dict]:
    """The `split` ("train", "val", "test") as a list of {"text", "label", "seen"} dicts."""
    from .data import load_project_dataset

    return load_project_dataset("intents", split, SPLIT_SIZES, generate_split)
