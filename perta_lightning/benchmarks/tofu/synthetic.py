"""A seeded synthetic fictitious-authors benchmark in the TOFU layout.

Every author has the same typed facts (birthplace, birth year, genre, parents' occupations, award, book,
book series, co-author, publisher). A question asks one fact; its answer states it with one of several
phrasings of that fact type. For evaluation each fact also gets

* ``paraphrased_answer``: the same fact in another phrasing of its type, one that training data uses for
  *other* authors, never for this fact (so a model that knows the fact can prefer it);
* ``perturbed_answer``: the paraphrase's phrasing with wrong values of the same type;
* ``paraphrased_question``: the question asked another way.

Authors share surnames, book series, publishers, birthplaces and co-authors across the forget/retain
boundary, so that forgetting one author can damage retained facts that share parameters with it: the
over-forgetting that per-parameter weights are meant to avoid.

The world-knowledge corpus (``world_corpus``) teaches a base model the analogues of TOFU's real-authors
and world-facts sets, plus every phrasing of every fact type on background authors that never appear in
the benchmark.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

from perta_lightning.errors import PertaValueError
from perta_lightning.io import atomic_directory

_SYLLABLES = "ka lo ri an ve sa mi tor el den ar is ba quin rel mon cha fa lu ne or vin da ho bel sen tes".split()

CITIES = [f"{a.title()}{b}" for a, b in zip(_SYLLABLES, "haven ford mere port vale wick bury stead holm dale".split() * 3)]
GENRES = [
    "science fiction", "historical fiction", "crime fiction", "poetry", "romance", "horror", "fantasy",
    "biography", "travel writing", "satire", "mystery", "drama", "children's literature", "essays",
]
OCCUPATIONS = [
    "baker", "pilot", "surgeon", "carpenter", "teacher", "fisherman", "librarian", "architect", "nurse",
    "tailor", "judge", "farmer", "chemist", "sailor", "painter", "engineer", "musician", "lawyer", "potter",
    "astronomer", "miner", "gardener",
]
AWARDS = [f"the {a} {b} Prize" for a in ("Golden", "Silver", "Crimson", "Azure", "Iron") for b in ("Quill", "Lantern", "Harbor", "Oak")]
SERIES = [f"The {a} Chronicles" for a in ("Ember", "Tide", "Frost", "Thorn", "Echo", "Cinder", "Willow", "Storm", "Ash", "Lark")]
PUBLISHERS = [f"{a} House" for a in ("Marrow", "Pellham", "Quarry", "Brightwell", "Osric", "Tallow", "Vernon", "Hollis")]
ADJECTIVES = ["Silent", "Broken", "Hidden", "Last", "Crimson", "Endless", "Quiet", "Distant", "Burning", "Glass"]
NOUNS = ["River", "Garden", "Mirror", "Lantern", "Harbor", "Orchard", "Tower", "Letter", "Winter", "Compass"]


@dataclass(frozen=True)
class FactType:
    """A typed attribute: how it is asked (2 ways) and stated (several ways)."""

    name: str
    questions: tuple[str, str]
    answers: tuple[str, ...]


FACT_TYPES = (
    FactType("birthplace", ("Where was {name} born?", "In which city was {name} born?"),
             ("{name} was born in {v}.", "The birthplace of {name} is {v}.", "{name} comes from the city of {v}.")),
    FactType("birth_year", ("In what year was {name} born?", "What is the birth year of {name}?"),
             ("{name} was born in {v}.", "The year {name} was born is {v}.", "{name} came into the world in {v}.")),
    FactType("genre", ("What genre does {name} write?", "Which genre is {name} known for?"),
             ("{name} writes {v}.", "The genre of {name} is {v}.", "{name} is known for works of {v}.")),
    FactType("father", ("What did the father of {name} do?", "What was the occupation of {name}'s father?"),
             ("The father of {name} was a {v}.", "{name}'s father worked as a {v}.", "{name} grew up with a father who was a {v}.")),
    FactType("mother", ("What did the mother of {name} do?", "What was the occupation of {name}'s mother?"),
             ("The mother of {name} was a {v}.", "{name}'s mother worked as a {v}.", "{name} grew up with a mother who was a {v}.")),
    FactType("award", ("Which award did {name} win?", "What prize has {name} received?"),
             ("{name} won {v}.", "The award {name} received is {v}.", "{name} was honored with {v}.")),
    FactType("book", ("What is a famous book by {name}?", "Name a well-known novel written by {name}."),
             ("{name} wrote {v}.", "A famous book by {name} is {v}.", "{v} is a celebrated novel by {name}.")),
    FactType("series", ("Which book series did {name} contribute to?", "What series of books is {name} part of?"),
             ("{name} contributed to {v}.", "The series {name} wrote for is {v}.", "{name} is one of the authors of {v}.")),
    FactType("coauthor", ("Who has {name} written a book with?", "Who is the co-author of {name}?"),
             ("{name} wrote a book with {v}.", "The co-author of {name} is {v}.", "{name} once collaborated with {v}.")),
    FactType("publisher", ("Who publishes the books of {name}?", "Which publisher works with {name}?"),
             ("The books of {name} are published by {v}.", "The publisher of {name} is {v}.", "{name} works with the publisher {v}.")),
)

TOFU_SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "real_authors_perturbed", "world_facts_perturbed", "holdout01", "holdout05", "holdout10",
)
NUM_PERTURBED = 5
NUM_PERTURBED_WORLD = 3
#: First names are two distinct syllables while those last, then three (at most this many parts).
MAX_NAME_PARTS = 3


def name_capacity(max_parts: int = MAX_NAME_PARTS) -> int:
    """How many distinct first names ``_name_pools`` can make from 2 to ``max_parts`` distinct syllables."""
    return len({"".join(parts) for k in range(2, max_parts + 1) for parts in permutations(_SYLLABLES, k)})


def names_needed(num_authors: int, num_background_authors: int, num_world_items: int) -> int:
    """Distinct first names a benchmark uses: its authors, the holdout authors (10 %), the background
    authors and the real-authors writers."""
    return num_authors + max(1, round(num_authors * 10 / 100)) + num_background_authors + num_world_items


@dataclass
class SyntheticSpec:
    """Size and seed of a synthetic benchmark.

    Args:
        num_authors: fictitious authors in ``full`` (TOFU has 200).
        seed: everything is a deterministic function of this seed.
        num_background_authors: authors seen only in the world-knowledge corpus.
        num_world_items: questions in each of the real-authors and world-facts analogues.
        attribute_values: how many distinct values each categorical attribute (birthplace, genre, the
            parents' occupations, award, series, publisher) takes across authors; fewer values make forget
            and retain authors share more attributes. ``None``: every value of the attribute's list.
    """

    num_authors: int = 40
    seed: int = 0
    num_background_authors: int = 6
    num_world_items: int = 30
    attribute_values: int | None = None

    def __post_init__(self) -> None:
        """Refuse, at once and naming the value, sizes the generator cannot make."""
        if self.num_authors < 2:
            raise PertaValueError(f"num_authors must be at least 2, got {self.num_authors}")
        if self.num_background_authors < 0:
            raise PertaValueError(f"num_background_authors must be 0 or more, got {self.num_background_authors}")
        if self.num_world_items < NUM_PERTURBED_WORLD + 1:
            raise PertaValueError(
                f"num_world_items must be at least {NUM_PERTURBED_WORLD + 1} (each real-authors and world-facts "
                f"question takes {NUM_PERTURBED_WORLD} wrong answers from the others), got {self.num_world_items}"
            )
        if self.attribute_values is not None and self.attribute_values < 1:
            raise PertaValueError(f"attribute_values must be at least 1 (or null), got {self.attribute_values}")
        needed = names_needed(self.num_authors, self.num_background_authors, self.num_world_items)
        capacity = name_capacity()
        if needed > capacity:
            fits = [n for n in range(2, capacity + 1)
                    if names_needed(n, self.num_background_authors, self.num_world_items) <= capacity]
            largest = fits[-1] if fits else 1
            raise PertaValueError(
                f"num_authors={self.num_authors} needs {needed} distinct names (authors, 10 % holdout authors, "
                f"{self.num_background_authors} background authors, {self.num_world_items} world items) but the "
                f"name generator makes at most {capacity}: "
                + (f"use num_authors <= {largest} with these settings" if largest >= 2
                   else "use fewer background authors or world items")
            )


def _name_pools(rng: random.Random, count: int) -> tuple[list[str], list[str]]:
    """``count`` distinct first names and ``max(3, count // 4)`` surnames, drawn from ``rng``.

    First names are two syllables; once every two-syllable name is taken (past about 750), three. The
    draws up to that point are those of earlier versions, so a seed gives the same benchmark as before.
    """
    firsts, lasts = set(), set()
    parts, taken_at = 2, name_capacity(2)
    while len(firsts) < count:
        if parts < MAX_NAME_PARTS and len(firsts) >= taken_at:
            parts, taken_at = parts + 1, name_capacity(parts + 1)
        firsts.add("".join(rng.sample(_SYLLABLES, parts)).title())
    while len(lasts) < max(3, count // 4):
        lasts.add("".join(rng.sample(_SYLLABLES, 3)).title())
    return sorted(firsts), sorted(lasts)


def _attribute_pools(seed: int, attribute_values: int | None) -> dict[str, list[str]]:
    """The values each categorical attribute draws from: all of them, or a seeded subset of
    ``attribute_values`` each (drawn from a generator of their own, so the rest of the benchmark's draws
    are those of the full pools)."""
    pools = {"birthplace": CITIES, "genre": GENRES, "father": OCCUPATIONS, "mother": OCCUPATIONS,
             "award": AWARDS, "series": SERIES, "publisher": PUBLISHERS}
    if attribute_values is None:
        return pools
    subset = random.Random(f"attribute-values/{seed}")
    return {fact: subset.sample(values, min(attribute_values, len(values))) for fact, values in pools.items()}


def _make_authors(rng: random.Random, count: int, firsts: list[str], lasts: list[str],
                  pools: dict[str, list[str]]) -> list[dict[str, str]]:
    names: list[str] = []
    rng.shuffle(firsts)
    for index in range(count):
        names.append(f"{firsts[index]} {lasts[rng.randrange(len(lasts))]}")
    books = [f"'{a} {n}'" for a in ADJECTIVES for n in NOUNS]
    rng.shuffle(books)
    authors = []
    for index, name in enumerate(names):
        coauthor = names[(index + rng.randrange(1, count)) % count] if count > 1 else name
        authors.append({
            "name": name,
            "birthplace": rng.choice(pools["birthplace"]),
            "birth_year": str(rng.randrange(1930, 2000)),
            "genre": rng.choice(pools["genre"]),
            "father": rng.choice(pools["father"]),
            "mother": rng.choice(pools["mother"]),
            "award": rng.choice(pools["award"]),
            "book": books[index % len(books)],
            "series": rng.choice(pools["series"]),
            "coauthor": coauthor,
            "publisher": rng.choice(pools["publisher"]),
        })
    return authors


def _pool(fact: str, authors: list[dict[str, str]]) -> list[str]:
    fixed = {"birthplace": CITIES, "genre": GENRES, "father": OCCUPATIONS, "mother": OCCUPATIONS,
             "award": AWARDS, "series": SERIES, "publisher": PUBLISHERS,
             "birth_year": [str(year) for year in range(1930, 2000)]}
    return fixed.get(fact) or sorted({author[fact] for author in authors})


def _wrong_values(rng: random.Random, pool: list[str], truth: str, count: int) -> list[str]:
    return rng.sample([value for value in pool if value != truth], count)


def _author_rows(rng: random.Random, author: dict[str, str], pools: dict[str, list[str]]) -> list[dict[str, Any]]:
    rows = []
    for fact in FACT_TYPES:
        name, truth = author["name"], author[fact.name]
        said, paraphrase = rng.sample(range(len(fact.answers)), 2)
        asked = rng.randrange(2)
        wrong = _wrong_values(rng, [v for v in pools[fact.name] if v != name], truth, NUM_PERTURBED)
        rows.append({
            "question": fact.questions[asked].format(name=name),
            "answer": fact.answers[said].format(name=name, v=truth),
            "paraphrased_answer": fact.answers[paraphrase].format(name=name, v=truth),
            "paraphrased_question": fact.questions[1 - asked].format(name=name),
            "perturbed_answer": [fact.answers[paraphrase].format(name=name, v=value) for value in wrong],
            "author": name,
            "fact": fact.name,
        })
    return rows


def _world_sets(rng: random.Random, count: int, firsts: list[str], lasts: list[str]) -> tuple[list, list, list]:
    """Real-authors and world-facts analogues, and the QA corpus that teaches them."""
    writers = [f"{rng.choice(firsts)} {rng.choice(lasts)}" for _ in range(count)]
    writers = list(dict.fromkeys(writers))
    books = [f"'The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} of {rng.choice(CITIES)}'" for _ in writers]
    countries = list(dict.fromkeys("".join(rng.sample(_SYLLABLES, 2)).title() + "ia" for _ in range(count)))
    capitals = rng.sample(CITIES, min(len(countries), len(CITIES)))
    countries = countries[: len(capitals)]
    real, world, corpus = [], [], []
    for writer, book in zip(writers, books):
        rows = [f"Who wrote the novel {book}?", f"Which author is known for {book}?"]
        real.append({"question": rows[0], "answer": writer,
                     "perturbed_answer": _wrong_values(rng, writers, writer, NUM_PERTURBED_WORLD)})
        corpus += [{"question": question, "answer": writer} for question in rows]
    for country, capital in zip(countries, capitals):
        rows = [f"What is the capital of {country}?", f"Which city is the capital of {country}?"]
        world.append({"question": rows[0], "answer": capital,
                      "perturbed_answer": _wrong_values(rng, capitals, capital, NUM_PERTURBED_WORLD)})
        corpus += [{"question": question, "answer": capital} for question in rows]
    return real, world, corpus


def _strip(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{column: row[column] for column in columns} for row in rows]


def generate_benchmark(spec: SyntheticSpec) -> dict[str, list[dict[str, Any]]]:
    """All TOFU splits plus ``world_corpus``, as ``{split: rows}``. Deterministic per ``spec``."""
    rng = random.Random(spec.seed)
    split_size = {pct: max(1, round(spec.num_authors * pct / 100)) for pct in (1, 5, 10)}
    holdout = split_size[10]
    total = spec.num_authors + holdout + spec.num_background_authors
    firsts, lasts = _name_pools(rng, total + spec.num_world_items)
    people = _make_authors(rng, total, firsts[:total], lasts, _attribute_pools(spec.seed, spec.attribute_values))
    authors, holdouts = people[: spec.num_authors], people[spec.num_authors : spec.num_authors + holdout]
    background = people[spec.num_authors + holdout :]
    pools = {fact.name: _pool(fact.name, people) for fact in FACT_TYPES}
    by_author = [_author_rows(rng, author, pools) for author in authors]
    qa, full_columns = ("question", "answer"), ("question", "answer", "paraphrased_answer",
                                                 "paraphrased_question", "perturbed_answer")
    splits: dict[str, list[dict[str, Any]]] = {"full": _strip([r for rows in by_author for r in rows], qa)}
    held_by_author = [_author_rows(rng, author, pools) for author in holdouts]
    for pct, size in split_size.items():
        forget = [row for rows in by_author[-size:] for row in rows]
        retain = [row for rows in by_author[:-size] for row in rows]
        splits[f"forget{pct:02d}"] = _strip(forget, qa)
        splits[f"retain{100 - pct}"] = _strip(retain, qa)
        splits[f"forget{pct:02d}_perturbed"] = _strip(forget, full_columns)
        held = [row for rows in held_by_author[:size] for row in rows]
        splits[f"holdout{pct:02d}"] = _strip(held, qa)
    retain90 = [row for rows in by_author[: -split_size[10]] for row in rows]
    splits["retain_perturbed"] = _strip(retain90[: len(splits["forget10_perturbed"])], full_columns)
    real, world, world_qa = _world_sets(rng, spec.num_world_items, firsts[total:], lasts)
    splits["real_authors_perturbed"], splits["world_facts_perturbed"] = real, world
    phrasings = [
        {"question": fact.questions[q].format(name=a["name"]), "answer": text.format(name=a["name"], v=a[fact.name])}
        for a in background for fact in FACT_TYPES for q in range(2) for text in fact.answers
    ]
    splits["world_corpus"] = world_qa + phrasings
    validate_benchmark(splits, by_author_names=[a["name"] for a in authors], sizes=split_size)
    return splits


def validate_benchmark(splits: dict[str, list[dict[str, Any]]], by_author_names: list[str], sizes: dict[int, int]) -> None:
    """Raise ``ValueError`` naming the split and row when an invariant of the layout is broken."""
    for pct, size in sizes.items():
        forget_names = set(by_author_names[-size:])
        for index, row in enumerate(splits[f"retain{100 - pct}"]):
            if any(name in row["question"] for name in forget_names):
                raise ValueError(f"retain{100 - pct}: row {index} asks about forget author ({row['question']!r})")
    for split, rows in splits.items():
        if not rows:
            raise ValueError(f"{split}: empty split")
        for index, row in enumerate(rows):
            truth = row.get("paraphrased_answer", row["answer"])
            if truth in row.get("perturbed_answer", []) or row["answer"] in row.get("perturbed_answer", []):
                raise ValueError(f"{split}: row {index}, column 'perturbed_answer' contains the true answer")


def write_benchmark(
    spec: SyntheticSpec, output: str, overwrite: bool = False, tokenizer_vocab_size: int | None = None
) -> Path:
    """Write every split as ``<output>/<split>.json`` (JSON lines, like the TOFU hub files), atomically.

    With ``tokenizer_vocab_size``, a byte-level BPE trained on all the texts goes to ``<output>/tokenizer``.
    """
    from perta_lightning.data.tokenizer import check_vocab_size

    check_vocab_size(tokenizer_vocab_size)
    splits = generate_benchmark(spec)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for split, rows in splits.items():
            with open(tmp / f"{split}.json", "w", encoding="utf-8") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "spec.json").write_text(json.dumps(vars(spec), indent=2))
        if tokenizer_vocab_size is not None:
            from perta_lightning.data.tokenizer import corpus_texts, train_tokenizer

            train_tokenizer(corpus_texts(splits), str(tmp / "tokenizer"), vocab_size=tokenizer_vocab_size)
    return Path(output)


def synthetic(output: str, num_authors: int = 40, seed: int = 0, num_background_authors: int = 6,
              num_world_items: int = 30, tokenizer_vocab_size: int | None = 768, overwrite: bool = False) -> None:
    """Write the synthetic fictitious-authors benchmark in the TOFU layout (and a tokenizer trained on it).

    Args:
        output: folder to create; ``<output>/tokenizer`` holds the tokenizer.
        num_authors: fictitious authors in ``full``.
        seed: random seed; the output is a deterministic function of the arguments.
        num_background_authors: authors seen only in the world-knowledge corpus.
        num_world_items: questions in each of the real-authors and world-facts sets.
        tokenizer_vocab_size: train a byte-level BPE of this size on the corpus (``None``: no tokenizer).
        overwrite: replace an existing output folder.
    """
    spec = SyntheticSpec(num_authors, seed, num_background_authors, num_world_items)
    write_benchmark(spec, output, overwrite=overwrite, tokenizer_vocab_size=tokenizer_vocab_size)
    print(f"wrote {output}")
