"""The text zoo's tasks: four questions about the same kind of generated sentence, each answered by its structure.

Every task reads sentences of one template, drawn from one distribution,

    "yesterday the farmers near the horse were pleased with seven apples and four cups"
    (time adverb first or last; subject and attractor nouns singular or plural; is/are/was/were; two numbers)

and asks something else about them:

- ``agreement``: does the verb agree in number with the subject (not with the attractor noun beside it)?
- ``tense``: does the verb's tense (is/are: present, was/were: past) match the time adverb's?
- ``parity``: is the sum of the two numbers even?
- ``comparison``: is the first number larger than the second?

A sentence-embedding model such as all-MiniLM-L6-v2 separates sentences by topic and wording, and here the words
alone do not give any label away: every word choice is drawn independently of the label, and three labels are an
exclusive-or of two word choices (subject number and verb number; adverb tense and verb tense; the two numbers'
parities). A linear probe on the pretrained features is near chance, while a fine-tuned body, which attends across
positions, learns the rule. And because all tasks read the same sentences, their fine-tuned models compete for
the same features, which is what makes merging them lose (an earlier design with one template per task let
WUDI, a data-free merge, recover 97 % of four near-perfect models).

Each builder returns ``(train, test, class_names)`` with ``(sentences, int64 labels)`` splits, classes balanced,
no sentence in both splits; every random choice comes from the generator it is given, so :func:`make_text_task`
is a pure function of its arguments.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

TextSplit = tuple[list[str], np.ndarray]  # sentences, int64 labels

# (singular, plural)
NOUNS = [("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("child", "children"), ("farmer", "farmers"),
         ("girl", "girls"), ("boy", "boys"), ("doctor", "doctors"), ("bird", "birds"), ("student", "students"),
         ("painter", "painters"), ("neighbour", "neighbours"), ("baker", "bakers"), ("pilot", "pilots"),
         ("singer", "singers"), ("king", "kings"), ("horse", "horses"), ("woman", "women"), ("man", "men"),
         ("nurse", "nurses"), ("driver", "drivers"), ("soldier", "soldiers"), ("writer", "writers"), ("key", "keys")]
PREPOSITIONS = ["near", "behind", "beside", "next to", "under", "above", "by", "around"]
# the copula by (past, plural)
COPULA = {(False, False): "is", (False, True): "are", (True, False): "was", (True, True): "were"}
ADJECTIVES = ["pleased", "happy", "busy", "content", "bored", "satisfied", "careful", "generous"]
PAST_ADVERBS = ["yesterday", "last week", "last year", "two days ago", "last night", "long ago", "last summer",
                "once"]
PRESENT_ADVERBS = ["now", "right now", "at the moment", "these days", "nowadays", "currently", "at present",
                   "for now"]
# zero..eleven: as many odd as even numbers, so no number word hints at the parity label
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
THINGS = ["apples", "boxes", "chairs", "coins", "books", "cups", "stones", "shells", "cards", "pens"]


@dataclass(frozen=True)
class Scene:
    """Every choice a sentence is made of; the labels are functions of these."""

    subject: int
    subject_plural: bool
    preposition: int
    attractor: int
    attractor_plural: bool
    verb_plural: bool
    verb_past: bool
    adjective: int
    adverb: int
    adverb_past: bool
    adverb_first: bool
    first: int
    second: int
    first_things: int
    second_things: int

    def sentence(self) -> str:
        adverb = (PAST_ADVERBS if self.adverb_past else PRESENT_ADVERBS)[self.adverb]
        clause = (f"the {NOUNS[self.subject][self.subject_plural]} {PREPOSITIONS[self.preposition]} "
                  f"the {NOUNS[self.attractor][self.attractor_plural]} {COPULA[self.verb_past, self.verb_plural]} "
                  f"{ADJECTIVES[self.adjective]} with {NUMBERS[self.first]} {THINGS[self.first_things]} and "
                  f"{NUMBERS[self.second]} {THINGS[self.second_things]}")
        return f"{adverb} {clause}" if self.adverb_first else f"{clause} {adverb}"


def random_scene(rng: np.random.Generator) -> Scene:
    """Every choice drawn uniformly and independently (two different numbers, two different things)."""
    def pick(n: int) -> int:
        return int(rng.integers(n))

    def coin() -> bool:
        return bool(rng.integers(2))

    first, second = (int(i) for i in rng.choice(len(NUMBERS), size=2, replace=False))
    things = [int(i) for i in rng.choice(len(THINGS), size=2, replace=False)]
    return Scene(subject=pick(len(NOUNS)), subject_plural=coin(), preposition=pick(len(PREPOSITIONS)),
                 attractor=pick(len(NOUNS)), attractor_plural=coin(), verb_plural=coin(), verb_past=coin(),
                 adjective=pick(len(ADJECTIVES)), adverb=pick(len(PAST_ADVERBS)), adverb_past=coin(),
                 adverb_first=coin(), first=first, second=second, first_things=things[0], second_things=things[1])


# Each task: the label of a scene, and how to give a scene a wanted label by changing one choice. Both changes
# keep the scene's distribution the same for every task (a uniform bit flipped by a uniform label stays uniform;
# numbers re-drawn or swapped keep their joint distribution), so all tasks read sentences of one distribution.
def _agreement(scene: Scene) -> int:
    return int(scene.verb_plural == scene.subject_plural)


def _tense(scene: Scene) -> int:
    return int(scene.verb_past == scene.adverb_past)


def _parity(scene: Scene) -> int:
    return int((scene.first + scene.second) % 2 == 0)


def _comparison(scene: Scene) -> int:
    return int(scene.first > scene.second)


def _with_label(task: str, scene: Scene, label: int, rng: np.random.Generator) -> Scene:
    if task == "agreement":
        return replace(scene, verb_plural=scene.subject_plural == bool(label))
    if task == "tense":
        return replace(scene, verb_past=scene.adverb_past == bool(label))
    if task == "parity":
        if _parity(scene) == label:
            return scene
        choices = [n for n in range(len(NUMBERS)) if n != scene.first and (n + scene.first) % 2 == (1 - label)]
        return replace(scene, second=choices[int(rng.integers(len(choices)))])
    if task == "comparison":
        return scene if _comparison(scene) == label else replace(scene, first=scene.second, second=scene.first)
    raise ValueError(f"unknown text task {task!r}; available: {list(TEXT_TASKS)}")


LabelRule = Callable[[Scene], int]
TEXT_TASKS: dict[str, tuple[LabelRule, list[str]]] = {
    "agreement": (_agreement, ["disagrees", "agrees"]),
    "tense": (_tense, ["inconsistent", "consistent"]),
    "parity": (_parity, ["odd", "even"]),
    "comparison": (_comparison, ["first smaller", "first larger"]),
}


def _split(task: str, n: int, rng: np.random.Generator, seen: set[str]) -> TextSplit:
    """``n`` new sentences (none in ``seen``, which grows), the two labels in turn so they are balanced."""
    rule, names = TEXT_TASKS[task]
    labels = np.arange(n, dtype=np.int64) % len(names)
    sentences = []
    for label in labels:
        for _ in range(1000):
            scene = _with_label(task, random_scene(rng), int(label), rng)
            sentence = scene.sentence()
            if sentence not in seen:
                break
        else:
            raise ValueError(f"could not draw {n} distinct sentences: the vocabulary is too small")
        assert rule(scene) == label
        seen.add(sentence)
        sentences.append(sentence)
    order = rng.permutation(n)
    return [sentences[i] for i in order], labels[order]


def make_text_task(task: str, train_size: int, test_size: int, seed: int) -> tuple[TextSplit, TextSplit, list[str]]:
    """(train, test, class names) for one text task; seeded per task so adding a task changes no other."""
    if task not in TEXT_TASKS:
        raise ValueError(f"unknown text task {task!r}; available: {list(TEXT_TASKS)}")
    seed_seq = np.random.SeedSequence([seed, int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)])
    rng = np.random.default_rng(seed_seq)
    seen: set[str] = set()
    train = _split(task, train_size, rng, seen)
    test = _split(task, test_size, rng, seen)
    return train, test, list(TEXT_TASKS[task][1])
