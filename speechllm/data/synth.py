"""Offline multi-task spoken corpus: templated sentences spoken by espeak-ng, for the tiny default and tests.

Every clip is real synthesized speech (or, for speech/non-speech detection, generated noise and tones),
and every target is true by construction: the transcript is the text that was spoken, the gender is the
voice variant's, the German translation comes from a phrase grammar written with correct agreement.
Dev and test are held out twice over: their voice variants never speak in train, and their sentences
never occur in train (each sentence belongs to one split, chosen by a hash of its text).

espeak-ng is called through ctypes on the library that the `espeakng-loader` wheel ships, so no system
package is needed. Synthesis runs in this process, one utterance after another: at a few milliseconds
an utterance that beats a process pool, whose start-up alone costs more. The same arguments give
byte-identical files: the library is loaded afresh for each corpus and its noise seeded per utterance.
"""

from __future__ import annotations

import _ctypes
import ctypes
import math
import random
import string
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import espeakng_loader
import numpy as np
import soundfile as sf
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from speechllm.config import ConfigError
from speechllm.data.audio import resample
from speechllm.data.manifest import write_manifest

SYNTH_TASKS = ("asr", "kws", "kwe", "ic", "sf", "sc", "sns", "st")
SPLITS = ("train", "dev", "test")

# ----------------------------------------------------------------------------------------- voices
ACCENTS = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc")
# espeak's variants m1..m7 are male and f1..f5 female (as their files declare); dev and test keep one of each
# to themselves. (Other variants as unseen voices were much harder to hear; the README's demo section has it.)
VARIANTS = {
    "train": {"male": ("m1", "m2", "m3", "m4", "m5"), "female": ("f1", "f2", "f3")},
    "dev": {"male": ("m6",), "female": ("f4",)},
    "test": {"male": ("m7",), "female": ("f5",)},
}
WPM_RANGE = (130, 200)
PITCH_RANGE = (30, 70)

# Sentences hash into ten buckets: eight for train, one each for dev and test.
_SPLIT_BUCKETS = {"train": range(0, 8), "dev": range(8, 9), "test": range(9, 10)}

# ------------------------------------------------------------------- sentence grammar (asr, sc, sns)
# No word here is a keyword-spotting candidate (KWS_POOL), so a carrier sentence never says one by chance.
_DETERMINERS = ("the", "my", "our", "their", "this", "that", "every")  # no "a": "an apple" would need a rule
_AGENTS = ("man", "woman", "child", "teacher", "doctor", "farmer", "driver", "student", "neighbor", "captain",
           "baker", "painter", "sailor", "nurse", "horse", "rabbit")
_AGENT_ADJECTIVES = ("old", "young", "tired", "busy", "clever", "famous", "quiet", "little", "strange", "angry")
_THINGS = ("window", "garden", "table", "river", "bridge", "letter", "bottle", "basket", "kitchen", "market",
           "station", "village", "forest", "mountain", "picture", "wagon", "apple", "candle", "blanket", "ladder",
           "road", "boat", "jacket", "wall", "chair", "bucket")
_THING_ADJECTIVES = ("old", "small", "large", "bright", "dark", "green", "yellow", "heavy", "broken", "empty",
                     "warm", "cold", "strange", "little", "quiet")
_TRANSITIVE = ("found", "carried", "painted", "opened", "cleaned", "watched", "visited", "moved", "lifted",
               "washed", "dropped", "bought", "sold", "fixed", "pushed", "pulled", "noticed", "remembered")
_INTRANSITIVE = ("arrived", "waited", "smiled", "laughed", "slept", "worked", "listened", "rested",
                 "returned", "stayed", "sang", "danced")
_PREPOSITIONS = ("near", "behind", "beside", "under", "across", "inside", "past", "along", "toward", "above")
_ADVERBIALS = ("today", "yesterday", "again", "slowly", "quietly", "early", "last week", "every morning",
               "after lunch", "at dawn")
_THING_SLOT = "<thing>"  # filled with a thing, or with a keyword for kwe
MAX_WORDS = 12

# ------------------------------------------------------------------------------ keyword tasks
SPEECH_COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
KWS_POOL = SPEECH_COMMANDS + ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                              "nine", "bird", "cat", "dog", "tree", "house", "bed", "happy", "wow")
KEYWORDS = ("piano", "volcano", "diamond", "telescope", "umbrella", "hospital", "elephant", "guitar",
            "helicopter", "library", "museum", "passport", "camera", "satellite", "dinosaur", "penguin",
            "tornado", "violin", "castle", "lighthouse", "submarine", "pyramid", "compass", "microscope")

# ------------------------------------------------------------------ spoken commands (ic, sf)
_SLOT_VALUES = {
    "device": ("lights", "lamp", "ceiling light", "desk lamp"),
    "room": ("kitchen", "bedroom", "living room", "bathroom", "office", "garage", "hallway", "dining room"),
    "time": ("six am", "seven thirty", "half past eight", "a quarter to seven", "noon", "nine fifteen",
             "five forty five", "ten pm"),
    "duration": ("five minutes", "ten minutes", "twenty minutes", "one hour", "ninety seconds", "half an hour"),
    "genre": ("jazz", "rock", "classical", "pop", "reggae", "country", "blues", "hip hop"),
    "playlist": ("workout", "dinner", "study", "road trip", "morning", "party"),
    "city": ("paris", "london", "berlin", "tokyo", "madrid", "chicago", "seattle", "sydney", "rome"),
    "date": ("today", "tomorrow", "tonight", "this weekend", "next week"),
    "temperature": ("seventeen", "eighteen", "nineteen", "twenty", "twenty one", "twenty two"),
    "item": ("milk", "eggs", "bread", "coffee", "apples", "rice", "butter", "cheese"),
}
INTENTS = {
    "lights_on": ("turn on the {device}", "turn on the {device} in the {room}", "switch on the {room} {device}",
                  "i need the {device} on in the {room}"),
    "lights_off": ("turn off the {device}", "turn off the {device} in the {room}", "switch off the {room} {device}",
                   "kill the {device} in the {room}"),
    "set_alarm": ("set an alarm for {time}", "wake me up at {time}", "i need an alarm at {time}",
                  "set my alarm to {time}"),
    "set_timer": ("set a timer for {duration}", "start a {duration} timer", "count down {duration}"),
    "play_music": ("play some {genre}", "play {genre} music", "put on some {genre} in the {room}",
                   "play my {playlist} playlist"),
    "weather_query": ("what is the weather in {city}", "what is the weather like {date}",
                      "will it rain in {city} {date}", "how cold will it be in {city} {date}",
                      "is it sunny in {city}"),
    "set_temperature": ("set the temperature to {temperature} degrees", "set the {room} to {temperature} degrees",
                        "make it {temperature} degrees in the {room}", "heat the {room} to {temperature} degrees"),
    "add_to_list": ("add {item} to my shopping list", "put {item} on the shopping list", "i need to buy {item}",
                    "remember to buy {item}"),
    "volume_up": ("turn the volume up", "make it louder", "louder", "increase the volume", "turn it up a bit"),
    "volume_down": ("turn the volume down", "make it quieter", "lower the volume", "turn it down a little",
                    "not so loud"),
}
_COMMAND_OPENERS = ("", "hey assistant", "okay computer", "excuse me")
_COMMAND_CLOSERS = ("", "please", "now", "thanks")

# ------------------------------------------------------------- English -> German phrases (st)
# English noun: (German noun, grammatical gender). Objects are accusative after a definite article.
_ST_NOUNS = {
    "door": ("Tür", "f"), "window": ("Fenster", "n"), "book": ("Buch", "n"), "box": ("Kiste", "f"),
    "bag": ("Tasche", "f"), "letter": ("Brief", "m"), "key": ("Schlüssel", "m"), "cup": ("Tasse", "f"),
    "bottle": ("Flasche", "f"), "chair": ("Stuhl", "m"), "plate": ("Teller", "m"), "glass": ("Glas", "n"),
    "jacket": ("Jacke", "f"), "umbrella": ("Regenschirm", "m"), "lamp": ("Lampe", "f"),
    "radio": ("Radio", "n"), "heater": ("Heizung", "f"), "fan": ("Ventilator", "m"), "light": ("Licht", "n"),
    "television": ("Fernseher", "m"), "computer": ("Computer", "m"),
}
_ST_ARTICLES = {"m": "den", "f": "die", "n": "das"}
_ST_ENDINGS = {"m": "en", "f": "e", "n": "e"}  # weak adjective endings, accusative singular
_ST_ADJECTIVES = {"red": "rot", "blue": "blau", "green": "grün", "black": "schwarz", "white": "weiß",
                  "small": "klein", "big": "groß", "old": "alt", "new": "neu"}
# English room: (German "in the room", German "from the room")
_ST_ROOMS = {
    "kitchen": ("in der Küche", "aus der Küche"), "garage": ("in der Garage", "aus der Garage"),
    "living room": ("im Wohnzimmer", "aus dem Wohnzimmer"), "bedroom": ("im Schlafzimmer", "aus dem Schlafzimmer"),
    "office": ("im Büro", "aus dem Büro"), "hallway": ("im Flur", "aus dem Flur"),
    "garden": ("im Garten", "aus dem Garten"), "bathroom": ("im Badezimmer", "aus dem Badezimmer"),
}
_ST_ADVERBS = {"now": "jetzt", "quickly": "schnell"}
_PORTABLE = ("book", "box", "bag", "letter", "key", "cup", "bottle", "plate", "glass", "jacket", "umbrella")
_APPLIANCES = ("lamp", "radio", "heater", "fan", "light", "television", "computer")
# (English verb, German imperative with slots, "in" or "from" for the room, objects it takes)
_ST_VERBS = (
    ("open", "öffne {adv} {obj} {room}", "in", ("door", "window", "box", "bag", "bottle", "book", "letter")),
    ("close", "schließe {adv} {obj} {room}", "in", ("door", "window", "box", "bag", "bottle", "book")),
    ("clean", "putze {adv} {obj} {room}", "in", ("door", "window", "cup", "plate", "glass", "chair", "bottle")),
    ("bring me", "bring mir {adv} {obj} {room}", "from", _PORTABLE),
    ("take", "nimm {adv} {obj} {room}", "from", _PORTABLE),
    ("show me", "zeig mir {adv} {obj} {room}", "in", _PORTABLE),
    ("find", "finde {adv} {obj} {room}", "in", _PORTABLE),
    ("turn on", "schalte {adv} {obj} {room} ein", "in", _APPLIANCES),
    ("turn off", "schalte {adv} {obj} {room} aus", "in", _APPLIANCES),
)

NON_SPEECH = ("white noise", "pink noise", "tone", "chord", "near silence")


@dataclass(frozen=True)
class _Utterance:
    """One example before synthesis. For non-speech, `text` is only spoken to measure the clip's length."""

    text: str
    target: str
    fields: dict = field(default_factory=dict)
    sound: str | None = None  # the non-speech kind; None for speech


@dataclass(frozen=True)
class _Voice:
    name: str  # espeak's "accent+variant", e.g. "en-us+f2"
    gender: str


# ---------------------------------------------------------------------------------- task makers
def _sentence(rng: random.Random) -> list[str]:
    """A past-tense sentence of 3..MAX_WORDS words (past tense needs no agreement); things are slots."""
    while True:
        words = _noun_phrase(rng, _AGENT_ADJECTIVES, rng.choice(_AGENTS))
        if rng.random() < 0.6:
            words += [rng.choice(_TRANSITIVE)] + _noun_phrase(rng, _THING_ADJECTIVES, _THING_SLOT)
        else:
            words.append(rng.choice(_INTRANSITIVE))
        if rng.random() < 0.5:
            words += [rng.choice(_PREPOSITIONS)] + _noun_phrase(rng, _THING_ADJECTIVES, _THING_SLOT)
        if rng.random() < 0.4:
            words += rng.choice(_ADVERBIALS).split()
        if len(words) <= MAX_WORDS:
            return words


def _noun_phrase(rng: random.Random, adjectives: tuple[str, ...], noun: str) -> list[str]:
    adjective = [rng.choice(adjectives)] if rng.random() < 0.5 else []
    return [rng.choice(_DETERMINERS), *adjective, noun]


def _fill(words: list[str], things: Iterable[str]) -> str:
    things = iter(things)
    return " ".join(next(things) if w == _THING_SLOT else w for w in words)


def _plain_sentence(rng: random.Random) -> str:
    words = _sentence(rng)
    return _fill(words, (rng.choice(_THINGS) for _ in words))


def _asr(rng: random.Random, voice: _Voice) -> _Utterance:
    text = _plain_sentence(rng)
    return _Utterance(text, text)


def _kws(rng: random.Random, voice: _Voice) -> _Utterance:
    """A carrier sentence with one candidate planted between commas (so it is spoken apart), or none."""
    labels = list(SPEECH_COMMANDS) if rng.random() < 0.5 else rng.sample(KWS_POOL, rng.randint(4, 8))
    words = _plain_sentence(rng).split()
    if rng.random() < 0.25:
        return _Utterance(" ".join(words), "none", {"labels": labels})
    keyword = rng.choice(labels)
    at = rng.randint(0, len(words))
    text = ", ".join(filter(None, (" ".join(words[:at]), keyword, " ".join(words[at:]))))
    return _Utterance(text, keyword, {"labels": labels})


def _kwe(rng: random.Random, voice: _Voice) -> _Utterance:
    """A sentence whose thing slots hold 1-3 distinct keywords; the other slots hold ordinary things."""
    words = _sentence(rng)
    while not (slots := words.count(_THING_SLOT)):
        words = _sentence(rng)
    chosen = set(rng.sample(range(slots), rng.randint(1, min(3, slots))))
    keywords = iter(rng.sample(KEYWORDS, len(chosen)))
    nouns = [next(keywords) if i in chosen else rng.choice(_THINGS) for i in range(slots)]
    return _Utterance(_fill(words, nouns), ", ".join(n for n in nouns if n in KEYWORDS))


def _command(rng: random.Random) -> tuple[str, str, list[tuple[str, str]]]:
    """A spoken assistant command: (text, intent, [(slot type, value)] in order of appearance)."""
    intent = rng.choice(sorted(INTENTS))
    template = rng.choice(INTENTS[intent])
    slot_types = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    slots = [(name, rng.choice(_SLOT_VALUES[name])) for name in slot_types]
    core = template.format(**dict(slots))
    text = " ".join(filter(None, (rng.choice(_COMMAND_OPENERS), core, rng.choice(_COMMAND_CLOSERS))))
    return text, intent, slots


def _ic(rng: random.Random, voice: _Voice) -> _Utterance:
    text, intent, _ = _command(rng)
    return _Utterance(text, intent, {"intent": intent})


def _sf(rng: random.Random, voice: _Voice) -> _Utterance:
    text, intent, slots = _command(rng)
    target = "; ".join(f"{name}: {value}" for name, value in slots) or "none"
    return _Utterance(text, target, {"intent": intent})


def _sc(rng: random.Random, voice: _Voice) -> _Utterance:
    return _Utterance(_plain_sentence(rng), voice.gender)


def _sns(rng: random.Random, voice: _Voice) -> _Utterance:
    text = _plain_sentence(rng)
    if rng.random() < 0.5:
        return _Utterance(text, "speech")
    sound = rng.choice(NON_SPEECH)
    return _Utterance(text, "non-speech", {"sound": sound}, sound=sound)


def _st(rng: random.Random, voice: _Voice) -> _Utterance:
    """An English command and its German translation, built side by side from the phrase grammar."""
    verb, german, room_kind, objects = rng.choice(_ST_VERBS)
    noun = rng.choice(objects)
    german_noun, gender = _ST_NOUNS[noun]
    english = [verb, "the", noun]
    german_object = [_ST_ARTICLES[gender], german_noun]
    if rng.random() < 0.5:
        adjective = rng.choice(sorted(_ST_ADJECTIVES))
        english.insert(2, adjective)
        german_object.insert(1, _ST_ADJECTIVES[adjective] + _ST_ENDINGS[gender])
    german_room = german_adverb = ""
    if rng.random() < 0.5:
        room = rng.choice(sorted(_ST_ROOMS))
        english += [room_kind, "the", room]
        german_room = _ST_ROOMS[room][room_kind == "from"]
    if rng.random() < 0.4:
        adverb = rng.choice(sorted(_ST_ADVERBS))
        english.append(adverb)
        german_adverb = _ST_ADVERBS[adverb]
    translation = german.format(adv=german_adverb, obj=" ".join(german_object), room=german_room)
    if rng.random() < 0.3:
        english.insert(0, "please")
        translation = "bitte " + translation
    translation = " ".join(translation.split())  # closes the gaps of empty slots
    return _Utterance(" ".join(english), translation[0].upper() + translation[1:] + ".", {"target_language": "German"})


# Each maker draws one utterance for the voice that will speak it (only sc's target depends on the voice).
_MAKERS: dict[str, Callable[[random.Random, _Voice], _Utterance]] = {
    "asr": _asr, "kws": _kws, "kwe": _kwe, "ic": _ic, "sf": _sf, "sc": _sc, "sns": _sns, "st": _st,
}


def _sentence_split(text: str) -> str:
    """The one split a sentence may appear in (stable across seeds, runs and machines)."""
    bucket = zlib.crc32(text.encode()) % 10
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def _voice(rng: random.Random, split: str) -> _Voice:
    """Genders are balanced in every split, whatever the number of variants each has."""
    gender = rng.choice(("male", "female"))
    return _Voice(f"{rng.choice(ACCENTS)}+{rng.choice(VARIANTS[split][gender])}", gender)


def _draw(make: Callable[[random.Random, _Voice], _Utterance], rng: random.Random, split: str,
          voice: _Voice) -> _Utterance:
    for _ in range(10_000):
        utterance = make(rng, voice)
        if _sentence_split(utterance.text) == split:
            return utterance
    raise RuntimeError(f"{make.__name__}: no sentence of split {split!r} in 10000 draws; the grammar is too small")


def draw_texts(task: str, count: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`count` examples of a task as text only (no audio): the spoken text, the target and the row fields.

    The sentences obey the same split rule as the corpus, so text drawn for "train" never holds a dev or
    test sentence (the demo pretrains its language model on such text).
    """
    rng = random.Random(f"text:{seed}:{split}:{task}")
    rows = []
    for _ in range(count):
        utterance = _draw(_MAKERS[task], rng, split, _voice(rng, split))
        rows.append({"task": task, "text": utterance.text, "target": utterance.target, **utterance.fields})
    return rows


# ------------------------------------------------------------------------------------ espeak-ng
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8, _ENDPAUSE = 0x1, 0x1000
_RATE, _PITCH = 1, 3
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Espeak:
    """libespeak-ng in synchronous mode: `speak` returns one utterance's int16 samples."""

    def __init__(self):
        self._chunks: list[bytes] = []
        self._callback = _SynthCallback(self._collect)  # referenced here so that it outlives every call
        self._lib: ctypes.CDLL | None = None
        self.sample_rate = 0

    def restart(self) -> None:
        """Unload the library and load it afresh.

        libespeak-ng keeps wave-generator state (the pitch-flutter phase, ...) in C statics that
        espeak_Terminate leaves alone, so a text's audio, even its length, depends on everything spoken
        before it in the process. A fresh library makes a corpus depend only on its own arguments.
        """
        if self._lib is not None:
            self._lib.espeak_Terminate()
            _ctypes.dlclose(self._lib._handle)
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        data = espeakng_loader.get_data_path().encode()
        self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 1000, data, 0)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {data.decode()}")
        lib.espeak_SetSynthCallback(self._callback)
        self._lib = lib

    def speak(self, text: str, voice: str, wpm: int, pitch: int, seed: int) -> np.ndarray:
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        lib.espeak_SetParameter(_RATE, wpm, 0)
        lib.espeak_SetParameter(_PITCH, pitch, 0)
        lib.espeak_ng_SetRandSeed(seed)  # its noise sources (fricatives, ...) are otherwise seeded by the clock
        self._chunks.clear()
        encoded = text.encode()
        status = lib.espeak_Synth(encoded, len(encoded) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8 | _ENDPAUSE, None, None)
        lib.espeak_Synchronize()
        if status != 0 or not self._chunks:
            raise RuntimeError(f"espeak-ng could not speak {text!r} with voice {voice!r} (status {status})")
        return np.frombuffer(b"".join(self._chunks), dtype=np.int16)

    def _collect(self, wave, samples: int, events) -> int:
        if samples > 0:
            self._chunks.append(ctypes.string_at(wave, samples * 2))
        return 0  # 0: go on synthesizing


_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    """The process's one engine, created on first use (importing this module loads no library)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE


# ------------------------------------------------------------------------------------- sounds
def _non_speech(kind: str, frames: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(frames) / sample_rate
    if kind in ("white noise", "near silence"):  # near silence is white noise at a very low peak level
        return rng.standard_normal(frames)
    if kind == "pink noise":  # 1/f power: white noise shaped by 1/sqrt(f) in the frequency domain
        spectrum = np.fft.rfft(rng.standard_normal(frames))
        spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(frames, 1 / sample_rate), 1.0))
        return np.fft.irfft(spectrum, frames)
    if kind == "tone":
        return _faded(np.sin(2 * np.pi * rng.uniform(150, 2000) * t), sample_rate)
    if kind == "chord":  # a major or minor triad
        root, third = rng.uniform(110, 660), rng.choice([5 / 4, 6 / 5])
        return _faded(sum(np.sin(2 * np.pi * root * ratio * t) for ratio in (1, third, 3 / 2)), sample_rate)
    raise ValueError(f"unknown non-speech kind {kind!r}")


def _faded(wave: np.ndarray, sample_rate: int, seconds: float = 0.02) -> np.ndarray:
    """Fade in and out, as a recorded tone starts and ends, instead of clicking."""
    ramp = np.minimum(1.0, np.minimum(np.arange(len(wave)), np.arange(len(wave))[::-1]) / (seconds * sample_rate))
    return wave * ramp


def _with_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    noise_power = np.mean(wave**2) / 10 ** (snr_db / 10)
    return wave + rng.standard_normal(len(wave)) * math.sqrt(noise_power)


def _peak_normalized(wave: np.ndarray, peak: float) -> np.ndarray:
    """Random levels, the same for speech and sounds, so loudness tells no class apart."""
    return wave * (peak / max(float(np.abs(wave).max()), 1e-9))


# ------------------------------------------------------------------------------------- corpus
def synthesize_corpus(
    out_dir: str | Path,
    *,
    train_per_task: int = 200,
    eval_per_task: int = 40,
    tasks: Iterable[str] = SYNTH_TASKS,
    train_sizes: Mapping[str, int] | None = None,
    seed: int = 0,
    snr_db: float | None = None,
    sample_rate: int = 16000,
    progress: bool = True,
) -> dict:
    """Write train/dev/test manifests and their WAV files under `out_dir`; return a summary.

    train holds `train_per_task` examples of each task but those `train_sizes` gives its own count (stage 1
    trains on ASR alone, and ASR corpora dwarf the others in practice too); dev and test hold `eval_per_task`
    examples per task each. The same arguments give byte-identical files, and a task's first N examples do not
    depend on how many follow or on the other tasks.
    """
    tasks = _checked_tasks(tasks, train_per_task, eval_per_task)
    train_sizes = _checked_train_sizes(tasks, train_per_task, train_sizes or {})
    out_dir = Path(out_dir)
    held_out = dict.fromkeys(tasks, eval_per_task)
    sizes = {"train": train_sizes, "dev": held_out, "test": held_out}
    engine = _engine()
    started, seconds = time.perf_counter(), 0.0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress) as bar:
        job = bar.add_task("synthesizing speech", total=sum(sum(split.values()) for split in sizes.values()))
        for split, per_task in sizes.items():
            (out_dir / "audio" / split).mkdir(parents=True, exist_ok=True)
            rows = []
            for task in tasks:
                rng = random.Random(f"{seed}:{split}:{task}")
                engine.restart()  # so a task's clips depend on nothing spoken before them
                for index in range(per_task[task]):
                    rows.append(_example(engine, out_dir, split, task, index, rng, sample_rate, snr_db))
                    seconds += rows[-1]["duration"]
                    bar.advance(job)
            write_manifest(out_dir / f"{split}.jsonl", rows)
    return {
        "examples": {split: sum(per_task.values()) for split, per_task in sizes.items()},
        "per_task": {task: {split: sizes[split][task] for split in sizes} for task in tasks},
        "audio_seconds": round(seconds, 1),
        "audio_hours": round(seconds / 3600, 3),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def _checked_tasks(tasks: Iterable[str], train_per_task: int, eval_per_task: int) -> tuple[str, ...]:
    tasks = tuple(dict.fromkeys(name.strip().lower() for name in tasks))
    unknown = [name for name in tasks if name not in SYNTH_TASKS]
    if unknown or not tasks:
        raise ConfigError(f"unknown synthetic task {', '.join(map(repr, unknown)) or '(none given)'} "
                          f"(known: {', '.join(SYNTH_TASKS)})")
    if train_per_task < 0 or eval_per_task < 0:
        raise ConfigError(f"examples per task must be >= 0, got train {train_per_task}, eval {eval_per_task}")
    return tasks


def _checked_train_sizes(tasks: tuple[str, ...], train_per_task: int,
                         train_sizes: Mapping[str, int]) -> dict[str, int]:
    """Each task's train count: its own in `train_sizes`, else `train_per_task`."""
    sizes = {name.strip().lower(): count for name, count in train_sizes.items()}
    strangers = [name for name in sizes if name not in tasks]
    if strangers:
        raise ConfigError(f"train sizes name {', '.join(map(repr, strangers))}, not among the corpus's tasks "
                          f"({', '.join(tasks)})")
    if any(count < 0 for count in sizes.values()):
        raise ConfigError(f"examples per task must be >= 0, got train sizes {sizes}")
    return {task: sizes.get(task, train_per_task) for task in tasks}


def _example(engine: _Espeak, out_dir: Path, split: str, task: str, index: int, rng: random.Random,
             sample_rate: int, snr_db: float | None) -> dict:
    """Draw, speak and write one example; return its manifest row."""
    voice = _voice(rng, split)
    utterance = _draw(_MAKERS[task], rng, split, voice)
    wpm, pitch = rng.randint(*WPM_RANGE), rng.randint(*PITCH_RANGE)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    speech = engine.speak(utterance.text, voice.name, wpm, pitch, seed=rng.getrandbits(31))
    if utterance.sound is None:
        wave = resample(torch.from_numpy(speech / np.float32(32768)), engine.sample_rate, sample_rate).numpy()
        if snr_db is not None:
            wave = _with_noise(wave, snr_db, noise_rng)
        peak = rng.uniform(0.25, 0.9)
    else:  # a sound as long as the sentence would have been
        frames = round(len(speech) * sample_rate / engine.sample_rate)
        wave = _non_speech(utterance.sound, frames, sample_rate, noise_rng)
        peak = rng.uniform(0.002, 0.01) if utterance.sound == "near silence" else rng.uniform(0.25, 0.9)
    wave = _peak_normalized(wave, peak)

    row_id = f"{split}-{task}-{index:05d}"
    audio = Path("audio") / split / f"{row_id}.wav"
    sf.write(out_dir / audio, wave.astype(np.float32), sample_rate, subtype="PCM_16")
    row = {"id": row_id, "audio": audio.as_posix(), "task": task, "target": utterance.target,
           "duration": round(len(wave) / sample_rate, 3)}
    if utterance.sound is None:
        row.update(transcript=utterance.text, voice=voice.name, wpm=wpm, pitch=pitch)
    return {**row, **utterance.fields}
