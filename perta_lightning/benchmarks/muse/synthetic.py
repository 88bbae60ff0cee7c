"""A seeded synthetic news benchmark in the MUSE layout, small enough for a from-scratch model on a CPU.

A fictitious world of people, towns, companies and sports teams, and four kinds of news event: a company
opens a site, a team wins a cup final, a town elects a mayor, a town holds its festival. Each article is five
or six short sentences (about 60 words; 90 to 120 tokens of a 768-token BPE trained on the corpus, so an article
fits a 128-token context) stating specific facts of one event: who, where, how many, when. Every
article has entities of its own: their names are built on a three-syllable stem (``Bakilo``: the person
``Ana Bakilo``, the town ``Bakiloford``, the company ``Bakilo Foods``, the team ``Bakilo Rovers``) that no
other article uses, so the forget, retain, holdout and background corpora are about disjoint entities while
being written with the same templates and word lists: holdout articles are the forget articles' distribution,
never trained on. First names, months, numbers and the template words are shared.

Splits (see :data:`perta_lightning.benchmarks.muse.splits.MUSE_SPLITS`):

* ``raw/forget``, ``raw/retain1``, ``raw/retain2``, ``raw/holdout``: the articles, ``{"text"}``;
* ``verbmem/forget``: for each forget article its first ``prompt_words`` words and the next
  ``continuation_words`` (MUSE cuts by tokens; no tokenizer exists when the benchmark is generated, so we cut
  by whitespace-separated words);
* ``knowmem/forget_qa`` / ``knowmem/retain_qa``: ``questions_per_article`` questions about each forget / retain2
  article (MUSE's retain questions are about its retain corpus), each answer a short phrase of the article;
* ``knowmem/forget_qa_icl`` / ``knowmem/retain_qa_icl``: ``icl_questions`` few-shot pairs about other facts of
  those articles (never a test question);
* ``privleak/forget``, ``privleak/retain``, ``privleak/holdout``: the forget, retain2 and holdout articles;
* ``pretrain/background``: other articles, to pre-train a θ0 that knows the templates and the question format
  (not part of MUSE).

Every article of every corpus has a *fact box*, a row of its own after the articles: some of its facts asked
and answered in KnowMem's prompt format (:func:`fact_box`); the KnowMem questions of the forget and retain sets
are the boxed facts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path
from typing import Any

from perta_lightning.benchmarks.muse.splits import (
    PRETRAIN_BACKGROUND,
    SPLIT_COLUMNS,
    check_prompt_length,
    check_rows,
)
from perta_lightning.errors import PertaValueError
from perta_lightning.io import atomic_directory

#: Consonant-vowel syllables: every stem is three of them, six letters, so no stem is a prefix of another.
_SYLLABLES = "ba da fe ga ki lo ma ne po ri sa tu vo ze mi ro la ke nu te".split()
FIRST_NAMES = "Ana Bela Dario Elin Farah Goran Ines Jonas Kira Lena Marco Nora Oskar Petra Rafael Sofia".split()
TOWN_SUFFIXES = "ford dale port field wick ton".split()
SECTORS = {"Foods": "bread", "Motors": "engines", "Textiles": "coats", "Paper": "boxes", "Glass": "bottles",
           "Steel": "pipes"}
SITES = ("factory", "plant", "workshop", "mill")
MASCOTS = ("Rovers", "Eagles", "Wolves", "Lions", "Rangers", "United")
CUPS = ("Northern", "Coastal", "Valley", "River", "Highland")
JOBS = ("teacher", "nurse", "farmer", "baker", "builder", "lawyer", "driver", "doctor")
PROJECTS = ("library", "bridge", "school", "hospital", "swimming pool", "bus station")
FESTIVALS = ("music", "film", "food", "flower", "book", "harvest")
SHOPS = ("bakery", "bookshop", "cafe", "flower shop", "bike shop")
ITEMS = ("cake", "painting", "photo", "song", "garden", "poem")
CAUSES = ("school", "hospital", "fire station", "library", "sports club")
ORDINALS = ("second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

KINDS = ("company", "sports", "election", "festival")
#: Facts every article states (each kind has this many); a test question and the few-shot ones never share one.
FACTS_PER_ARTICLE = 8
#: Stems (distinct entities) one article uses at most (a cup final: two teams, two towns, two people).
STEMS_PER_ARTICLE = 6
STEM_CAPACITY = len(_SYLLABLES) ** 3


@dataclass(frozen=True)
class MuseSyntheticSpec:
    """Sizes and seed of the synthetic news benchmark.

    Args:
        num_articles: articles in the forget corpus (``raw/forget``; one VerbMem item each).
        num_retain_articles: articles in each of ``raw/retain1`` and ``raw/retain2``.
        num_holdout_articles: articles in ``raw/holdout`` (same templates, never trained on).
        num_background_articles: articles in ``pretrain/background``, for pre-training θ0.
        questions_per_article: KnowMem questions per forget and per retain2 article (of 8 facts, at most 7:
            one is kept for the few-shot sets).
        icl_questions: few-shot pairs in each ``*_qa_icl`` split, each about a different article.
        prompt_words: VerbMem prompt length in words.
        continuation_words: VerbMem true-continuation length in words.
        seed: everything is a deterministic function of the spec.
    """

    num_articles: int = 24
    num_retain_articles: int = 24
    num_holdout_articles: int = 24
    num_background_articles: int = 96
    questions_per_article: int = 3
    icl_questions: int = 3
    prompt_words: int = 20
    continuation_words: int = 30
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse, naming the field, sizes the generator cannot make."""
        for field in ("num_articles", "num_retain_articles", "num_holdout_articles", "num_background_articles",
                      "questions_per_article", "icl_questions", "prompt_words", "continuation_words"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PertaValueError(f"MuseSyntheticSpec.{field} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise PertaValueError(f"MuseSyntheticSpec.seed must be an integer, got {self.seed!r}")
        if self.questions_per_article >= FACTS_PER_ARTICLE:
            raise PertaValueError(
                f"MuseSyntheticSpec.questions_per_article must be 1 to {FACTS_PER_ARTICLE - 1} (an article states "
                f"{FACTS_PER_ARTICLE} facts and keeps one for the few-shot sets), got {self.questions_per_article}"
            )
        smallest = min(self.num_articles, self.num_retain_articles)
        if self.icl_questions > smallest:
            raise PertaValueError(
                f"MuseSyntheticSpec.icl_questions={self.icl_questions} exceeds the articles to ask them about "
                f"(num_articles and num_retain_articles, the smaller is {smallest})"
            )
        total = self.total_articles()
        if total * STEMS_PER_ARTICLE > STEM_CAPACITY:
            raise PertaValueError(
                f"MuseSyntheticSpec: {total} articles need up to {total * STEMS_PER_ARTICLE} distinct entity names "
                f"but the name generator makes {STEM_CAPACITY}: use at most {STEM_CAPACITY // STEMS_PER_ARTICLE} "
                "articles in all (num_articles + 2 * num_retain_articles + num_holdout_articles + "
                "num_background_articles)"
            )

    def total_articles(self) -> int:
        """Articles of all corpora: forget, retain1, retain2, holdout and background."""
        return (self.num_articles + 2 * self.num_retain_articles + self.num_holdout_articles
                + self.num_background_articles)


@dataclass(frozen=True)
class NewsFact:
    """A fact an article states: a question that names the article's event, and its short answer."""

    question: str
    answer: str


@dataclass(frozen=True)
class NewsArticle:
    """One article: its kind, text, the named entities it is about (people, towns, companies, teams; no other
    article names them) and the facts it states, in the order of :data:`FACTS_PER_ARTICLE`."""

    kind: str
    text: str
    entities: tuple[str, ...]
    facts: tuple[NewsFact, ...]


def _date(rng: random.Random) -> tuple[str, str, str, str]:
    return rng.choice(WEEKDAYS), str(rng.randrange(1, 29)), rng.choice(MONTHS), str(rng.randrange(2005, 2024))


def _company(rng: random.Random, stem: Callable[[], str]) -> NewsArticle:
    sector = rng.choice(sorted(SECTORS))
    company, town = f"{stem()} {sector}", stem() + rng.choice(TOWN_SUFFIXES)
    ceo, mayor = f"{rng.choice(FIRST_NAMES)} {stem()}", f"{rng.choice(FIRST_NAMES)} {stem()}"
    site, product_ = rng.choice(SITES), SECTORS[sector]
    weekday, day, month, year = _date(rng)
    workers, cost = str(rng.randrange(120, 990)), str(rng.randrange(3, 90))
    later, next_year = rng.choice(MONTHS), str(int(year) + rng.randrange(1, 4))
    opened = rng.choice((f"{company} opened a new {site} in {town} on {weekday}, {day} {month} {year}.",
                         f"On {weekday}, {day} {month} {year}, {company} opened a new {site} in {town}."))
    text = " ".join((
        opened,
        f"The {site} will make {product_} and employ {workers} people.",
        f"Chief executive {ceo} said it had cost {cost} million.",
        f"The first {product_} will leave the {site} in {later}.",
        f"The mayor of {town}, {mayor}, called it a good day for the town.",
        f"A second {site} is planned for {next_year}.",
    ))
    facts = (
        (f"In which town did {company} open a new {site}?", town),
        (f"How many people will the new {site} of {company} employ?", workers),
        (f"Who is the chief executive of {company}?", ceo),
        (f"How much did the new {site} of {company} cost?", f"{cost} million"),
        (f"What will the new {site} of {company} make?", product_),
        (f"Who is the mayor of the town where {company} opened a new {site}?", mayor),
        (f"When is a second {site} of {company} planned?", next_year),
        (f"In which year did {company} open a new {site} in {town}?", year),
    )
    return NewsArticle("company", text, (company, town, ceo, mayor), tuple(NewsFact(q, a) for q, a in facts))


def _sports(rng: random.Random, stem: Callable[[], str]) -> NewsArticle:
    team, rival = f"{stem()} {rng.choice(MASCOTS)}", f"{stem()} {rng.choice(MASCOTS)}"
    town, rival_town = stem() + rng.choice(TOWN_SUFFIXES), stem() + rng.choice(TOWN_SUFFIXES)
    player, coach = f"{rng.choice(FIRST_NAMES)} {stem()}", f"{rng.choice(FIRST_NAMES)} {stem()}"
    cup, weekday, month = rng.choice(CUPS), rng.choice(WEEKDAYS), rng.choice(MONTHS)
    ours = rng.randrange(2, 6)
    theirs, goals = rng.randrange(0, ours), rng.randrange(2, ours + 1)
    crowd, weeks, year = str(rng.randrange(800, 9000)), str(rng.randrange(3, 12)), str(rng.randrange(1960, 2020))
    score = f"{ours} to {theirs}"
    won = rng.choice((f"{team} beat {rival} {score} in the final of the {cup} Cup on {weekday}.",
                      f"On {weekday}, {team} won the final of the {cup} Cup, beating {rival} {score}."))
    text = " ".join((
        won,
        f"The match was played in {town} in front of {crowd} fans.",
        f"{player} scored {goals} goals, including the winner.",
        f"Coach {coach} said the team had trained for {weeks} weeks.",
        f"It is their first {cup} Cup since {year}.",
        f"The two teams meet again in {month} in {rival_town}.",
    ))
    facts = (
        (f"Which team did {team} beat in the final of the {cup} Cup?", rival),
        (f"What was the score when {team} beat {rival}?", score),
        (f"In which town was the {cup} Cup final between {team} and {rival} played?", town),
        (f"How many fans watched {team} play {rival} in the {cup} Cup final?", crowd),
        (f"Who scored the winner for {team} in the {cup} Cup final?", player),
        (f"Who is the coach of {team}?", coach),
        (f"For how many weeks did {team} train for the {cup} Cup final?", weeks),
        (f"Since which year had {team} not won the {cup} Cup?", year),
    )
    return NewsArticle("sports", text, (team, rival, town, rival_town, player, coach),
                       tuple(NewsFact(q, a) for q, a in facts))


def _election(rng: random.Random, stem: Callable[[], str]) -> NewsArticle:
    mayor, rival, former = (f"{rng.choice(FIRST_NAMES)} {stem()}" for _ in range(3))
    town = stem() + rng.choice(TOWN_SUFFIXES)
    weekday, month, job, project = rng.choice(WEEKDAYS), rng.choice(MONTHS), rng.choice(JOBS), rng.choice(PROJECTS)
    votes = rng.randrange(1500, 9000)
    runner_up, age = str(rng.randrange(400, votes)), str(rng.randrange(31, 70))
    by_year, years = str(rng.randrange(2025, 2031)), str(rng.randrange(4, 20))
    elected = rng.choice((f"{mayor} was elected mayor of {town} on {weekday} with {votes} votes.",
                          f"On {weekday} the voters of {town} elected {mayor} as mayor, with {votes} votes."))
    text = " ".join((
        elected,
        f"{mayor}, who is {age} years old, used to work as a {job}.",
        f"{rival} came second with {runner_up} votes.",
        f"{mayor} promised to build a new {project} by {by_year}.",
        f"{mayor} will take office in {month}, replacing {former}, who led the town for {years} years.",
    ))
    facts = (
        (f"Who was elected mayor of {town}?", mayor),
        (f"How many votes did {mayor} win in the election in {town}?", str(votes)),
        (f"What did {mayor} work as before becoming mayor?", job),
        (f"Who came second in the election for mayor of {town}?", rival),
        (f"What did {mayor} promise to build in {town}?", f"a new {project}"),
        (f"In which month will {mayor} take office as mayor of {town}?", month),
        (f"How old is {mayor}, the new mayor of {town}?", age),
        (f"Who did {mayor} replace as mayor of {town}?", former),
    )
    return NewsArticle("election", text, (mayor, rival, former, town), tuple(NewsFact(q, a) for q, a in facts))


def _festival(rng: random.Random, stem: Callable[[], str]) -> NewsArticle:
    town, village = stem() + rng.choice(TOWN_SUFFIXES), stem() + rng.choice(TOWN_SUFFIXES)
    opener, winner = f"{rng.choice(FIRST_NAMES)} {stem()}", f"{rng.choice(FIRST_NAMES)} {stem()}"
    festival, nth, shop, item = rng.choice(FESTIVALS), rng.choice(ORDINALS), rng.choice(SHOPS), rng.choice(ITEMS)
    cause, month = rng.choice(CAUSES), rng.choice(MONTHS)
    previous = rng.randrange(1000, 20000)
    visitors, money = str(previous + rng.randrange(100, 5000)), str(rng.randrange(5, 95))
    held = rng.choice((f"The town of {town} held its {nth} {festival} festival last weekend.",
                       f"Last weekend {town} held its {festival} festival for the {nth} time."))
    text = " ".join((
        held,
        f"Organisers said {visitors} visitors came, up from {previous} last year.",
        f"It was opened by {opener}, who runs a {shop} in {town}.",
        f"The prize for the best {item} went to {winner} from {village}.",
        f"The event raised {money} thousand for the {cause} of {town}.",
        f"Next year it will be held in {month}.",
    ))
    facts = (
        (f"How many visitors came to the {festival} festival in {town}?", visitors),
        (f"Who opened the {festival} festival in {town}?", opener),
        (f"Who won the prize for the best {item} at the {festival} festival in {town}?", winner),
        (f"Where does {winner}, a prize winner at the {festival} festival in {town}, come from?", village),
        (f"How much money did the {festival} festival in {town} raise?", f"{money} thousand"),
        (f"For what did the {festival} festival in {town} raise money?", f"the {cause} of {town}"),
        (f"In which month will the next {festival} festival in {town} be held?", month),
        (f"What does {opener} run in {town}?", f"a {shop}"),
    )
    return NewsArticle("festival", text, (town, village, opener, winner), tuple(NewsFact(q, a) for q, a in facts))


_WRITERS = {"company": _company, "sports": _sports, "election": _election, "festival": _festival}

#: The corpora of the benchmark, in the order their articles are drawn.
CORPORA = ("forget", "retain1", "retain2", "holdout", "background")


def _corpus_sizes(spec: MuseSyntheticSpec) -> dict[str, int]:
    return {"forget": spec.num_articles, "retain1": spec.num_retain_articles, "retain2": spec.num_retain_articles,
            "holdout": spec.num_holdout_articles, "background": spec.num_background_articles}


def _articles(rng: random.Random, spec: MuseSyntheticSpec) -> dict[str, list[NewsArticle]]:
    stems = ["".join(parts).title() for parts in product(_SYLLABLES, repeat=3)]
    rng.shuffle(stems)
    unused: Iterator[str] = iter(stems)  # each stem is drawn once: no two articles share an entity

    def stem() -> str:
        return next(unused)

    corpora = {}
    for corpus, size in _corpus_sizes(spec).items():
        kinds = [KINDS[index % len(KINDS)] for index in range(size)]  # every corpus mixes the kinds alike
        rng.shuffle(kinds)
        corpora[corpus] = [_WRITERS[kind](rng, stem) for kind in kinds]
    return corpora


def generate_muse_articles(spec: MuseSyntheticSpec) -> dict[str, list[NewsArticle]]:
    """The articles of each corpus (:data:`CORPORA`), with their entities and facts; those
    :func:`generate_muse_benchmark` writes."""
    return _articles(random.Random(spec.seed), spec)


def fact_box(article: NewsArticle, box: list[int]) -> str:
    """The article's fact box, a corpus row of its own: the facts of ``box`` asked and answered in the KnowMem
    prompt's format (``Question: q\nAnswer: a\n\n``, :func:`perta_lightning.benchmarks.muse.evaluation.knowmem_prompt`).

    The box is how a small model trained from scratch can know an article's facts when asked: such a model does
    not turn facts read in prose into answers to questions (that takes a pretrained model's scale), so without it
    KnowMem would be near zero for every model. It is a row apart from the prose, not appended to it: after the
    prose a model answers by copying from the text just read, and would not have to remember anything. With it,
    KnowMem measures recall of the article's facts in the question format; VerbMem continues the prose."""
    return "".join(
        f"Question: {article.facts[index].question}\nAnswer: {article.facts[index].answer}\n\n" for index in box)


def _boxes(rng: random.Random, articles: list[NewsArticle], per_article: int) -> list[list[int]]:
    """The boxed facts of each article: ``per_article`` of its facts, drawn at random."""
    return [rng.sample(range(FACTS_PER_ARTICLE), per_article) for _ in articles]


def _qa(rng: random.Random, articles: list[NewsArticle], boxes: list[list[int]],
        icl: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Test questions (the boxed facts of each article) and ``icl`` few-shot pairs, each from an unboxed fact of a
    different article (so that a shot is never a question the corpus answers verbatim)."""
    test = [asdict(article.facts[index]) for article, box in zip(articles, boxes) for index in box]
    left = [[index for index in range(FACTS_PER_ARTICLE) if index not in box] for box in boxes]
    shots = [asdict(articles[a].facts[rng.choice(left[a])]) for a in rng.sample(range(len(articles)), icl)]
    return test, shots


def generate_muse_benchmark(spec: MuseSyntheticSpec) -> dict[str, list[dict[str, Any]]]:
    """Every split of the MUSE layout plus ``pretrain/background``, as ``{split: rows}``. Deterministic per
    ``spec``.

    Raises:
        PertaValueError: when a forget article is shorter than ``prompt_words + continuation_words`` words.
    """

    rng = random.Random(spec.seed)
    corpora = _articles(rng, spec)
    boxes = {corpus: _boxes(rng, articles, spec.questions_per_article) for corpus, articles in corpora.items()}
    prose = {corpus: [{"text": article.text} for article in articles] for corpus, articles in corpora.items()}
    # every corpus: its articles, then their fact boxes; PrivLeak scores the articles alone, as MUSE's texts are
    texts = {corpus: prose[corpus] + [{"text": fact_box(article, box)} for article, box in zip(articles, boxes[corpus])]
             for corpus, articles in corpora.items()}
    where = (f"muse-synthetic raw/forget (prompt_words={spec.prompt_words}, "
             f"continuation_words={spec.continuation_words})")
    check_prompt_length(prose["forget"], spec.prompt_words, where, continuation_length=spec.continuation_words)
    verbmem = []
    for row in prose["forget"]:
        words = row["text"].split(" ")
        verbmem.append({"prompt": " ".join(words[: spec.prompt_words]),
                        "gt": " ".join(words[spec.prompt_words : spec.prompt_words + spec.continuation_words])})
    forget_qa, forget_icl = _qa(rng, corpora["forget"], boxes["forget"], spec.icl_questions)
    retain_qa, retain_icl = _qa(rng, corpora["retain2"], boxes["retain2"], spec.icl_questions)
    splits = {
        "raw/forget": texts["forget"], "raw/retain1": texts["retain1"], "raw/retain2": texts["retain2"],
        "raw/holdout": texts["holdout"],
        "verbmem/forget": verbmem,
        "knowmem/forget_qa": forget_qa, "knowmem/retain_qa": retain_qa,
        "knowmem/forget_qa_icl": forget_icl, "knowmem/retain_qa_icl": retain_icl,
        "privleak/forget": prose["forget"], "privleak/retain": prose["retain2"],
        "privleak/holdout": prose["holdout"],
        PRETRAIN_BACKGROUND: texts["background"],
    }
    for split, rows in splits.items():
        check_rows(rows, split, f"muse-synthetic {split}")
    if set(splits) != set(SPLIT_COLUMNS):
        raise AssertionError(f"the generator writes {sorted(splits)}, the layout is {sorted(SPLIT_COLUMNS)}")
    return splits


def muse_texts(splits: dict[str, list[dict[str, Any]]]) -> Iterator[str]:
    """Every string value of every row (texts, prompts, continuations, questions, answers)."""
    for rows in splits.values():
        for row in rows:
            yield from (value for value in row.values() if isinstance(value, str))


def write_muse_benchmark(spec: MuseSyntheticSpec, output: str, overwrite: bool = False,
                         tokenizer_vocab_size: int | None = None) -> Path:
    """Write every split as ``<output>/<config>/<split>.json`` (JSON lines) and the spec as
    ``<output>/spec.json``, atomically.

    With ``tokenizer_vocab_size``, a byte-level BPE trained on all the texts goes to ``<output>/tokenizer``.
    """
    from perta_lightning.data.tokenizer import check_vocab_size

    check_vocab_size(tokenizer_vocab_size)
    splits = generate_muse_benchmark(spec)
    with atomic_directory(output, overwrite=overwrite) as tmp:
        for split, rows in splits.items():
            file = tmp / f"{split}.json"
            file.parent.mkdir(exist_ok=True)
            file.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n", encoding="utf-8")
        if tokenizer_vocab_size is not None:
            from perta_lightning.data.tokenizer import train_tokenizer

            train_tokenizer(muse_texts(splits), str(tmp / "tokenizer"), vocab_size=tokenizer_vocab_size)
    return Path(output)


def muse_synthetic(output: str, num_articles: int = 24, num_retain_articles: int = 24,
                   num_holdout_articles: int = 24, num_background_articles: int = 96,
                   questions_per_article: int = 3, icl_questions: int = 3, prompt_words: int = 20,
                   continuation_words: int = 30, seed: int = 0, tokenizer_vocab_size: int | None = 768,
                   overwrite: bool = False) -> Path:
    """Write the synthetic news benchmark in the MUSE layout (and a tokenizer trained on it).

    Args:
        output: folder to create, holding ``<config>/<split>.json``, ``spec.json`` and ``tokenizer/``.
        num_articles: articles in the forget corpus.
        num_retain_articles: articles in each of the two retain corpora.
        num_holdout_articles: articles in the holdout corpus.
        num_background_articles: articles in ``pretrain/background`` (for pre-training θ0; not part of MUSE).
        questions_per_article: KnowMem questions per forget and per retain2 article (1 to 7).
        icl_questions: few-shot pairs in each ``*_qa_icl`` split.
        prompt_words: VerbMem prompt length in words.
        continuation_words: VerbMem continuation length in words.
        seed: random seed; the output is a deterministic function of the arguments.
        tokenizer_vocab_size: train a byte-level BPE of this size on the corpus (``None``: no tokenizer).
        overwrite: replace an existing output folder.

    Returns:
        The output folder.
    """
    spec = MuseSyntheticSpec(num_articles, num_retain_articles, num_holdout_articles, num_background_articles,
                             questions_per_article, icl_questions, prompt_words, continuation_words, seed)
    path = write_muse_benchmark(spec, output, overwrite=overwrite, tokenizer_vocab_size=tokenizer_vocab_size)
    print(f"wrote {output}")
    return path
