import json
import re

import pytest

from perta_lightning.benchmarks.muse.source import MuseSource
from perta_lightning.benchmarks.muse.splits import (
    KNOWMEM_FORGET,
    KNOWMEM_RETAIN,
    MUSE_SPLITS,
    PRETRAIN_BACKGROUND,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    SPLIT_COLUMNS,
    VERBMEM,
    check_prompt_length,
)
from perta_lightning.benchmarks.muse.synthetic import (
    MuseSyntheticSpec,
    generate_muse_articles,
    generate_muse_benchmark,
    write_muse_benchmark,
)
from perta_lightning.cli import main as perta_main
from perta_lightning.data.formatting import IGNORE_INDEX, collate_examples, load_tokenizer
from perta_lightning.data.text import EncodedText
from perta_lightning.errors import PertaFileNotFoundError, PertaValueError

#: MUSE's hub layout (muse-bench/MUSE-News, MUSE-Books), written out from its published configs and splits.
PUBLISHED_LAYOUT = {
    "raw/forget": ("text",), "raw/retain1": ("text",), "raw/retain2": ("text",), "raw/holdout": ("text",),
    "verbmem/forget": ("prompt", "gt"),
    "knowmem/forget_qa": ("question", "answer"), "knowmem/retain_qa": ("question", "answer"),
    "knowmem/forget_qa_icl": ("question", "answer"), "knowmem/retain_qa_icl": ("question", "answer"),
    "privleak/forget": ("text",), "privleak/retain": ("text",), "privleak/holdout": ("text",),
}

SPEC = MuseSyntheticSpec(num_articles=8, num_retain_articles=8, num_holdout_articles=8, num_background_articles=8,
                         questions_per_article=3, icl_questions=2, seed=5)
#: The unique part of every entity name: three consonant-vowel syllables, capitalised ("Bakilo").
STEM = re.compile(r"\b[BDFGKLMNPRSTVZ][aeiou](?:[bdfgklmnprstvz][aeiou]){2}")
CORPUS_SPLIT = {"forget": "raw/forget", "retain1": "raw/retain1", "retain2": "raw/retain2",
                "holdout": "raw/holdout", "background": PRETRAIN_BACKGROUND}


@pytest.fixture(scope="module")
def splits():
    return generate_muse_benchmark(SPEC)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_muse_benchmark(SPEC, str(tmp_path_factory.mktemp("muse") / "data"))


def test_layout_is_muses_plus_the_background_corpus(splits):
    assert MUSE_SPLITS == PUBLISHED_LAYOUT
    assert SPLIT_COLUMNS == {**PUBLISHED_LAYOUT, "pretrain/background": ("text",)}
    assert (VERBMEM, KNOWMEM_FORGET, KNOWMEM_RETAIN, PRIVLEAK_FORGET, PRIVLEAK_HOLDOUT) == (
        "verbmem/forget", "knowmem/forget_qa", "knowmem/retain_qa", "privleak/forget", "privleak/holdout")
    assert set(splits) == set(PUBLISHED_LAYOUT) | {"pretrain/background"}
    for split, rows in splits.items():
        assert rows, split
        for row in rows:
            assert tuple(row) == SPLIT_COLUMNS[split], split
            assert all(isinstance(value, str) and value for value in row.values()), split


def test_sizes_follow_the_spec(splits):
    sizes = {split: len(rows) for split, rows in splits.items()}
    assert sizes == {
        "raw/forget": 16, "raw/retain1": 16, "raw/retain2": 16, "raw/holdout": 16, "pretrain/background": 16,
        "verbmem/forget": 8, "knowmem/forget_qa": 24, "knowmem/retain_qa": 24,
        "knowmem/forget_qa_icl": 2, "knowmem/retain_qa_icl": 2,
        "privleak/forget": 8, "privleak/retain": 8, "privleak/holdout": 8,
    }
    # each corpus: its 8 articles, then their 8 fact boxes; PrivLeak scores the articles
    assert splits["privleak/forget"] == splits["raw/forget"][:8]
    assert splits["privleak/holdout"] == splits["raw/holdout"][:8]
    assert splits["privleak/retain"] == splits["raw/retain2"][:8]
    assert all(row["text"].startswith("Question: ") for corpus in CORPUS_SPLIT.values() for row in splits[corpus][8:])
    words = [len(row["text"].split()) for corpus in CORPUS_SPLIT.values() for row in splits[corpus][:8]]
    assert 55 <= min(words) and max(words) <= 120


def test_default_spec_is_valid_and_sized_as_documented():
    spec = MuseSyntheticSpec()
    splits = generate_muse_benchmark(spec)
    assert (len(splits["raw/forget"]), len(splits["raw/retain1"]), len(splits["raw/holdout"]),
            len(splits["pretrain/background"])) == (48, 48, 48, 2 * 96)  # articles and their fact boxes
    assert len(splits["knowmem/forget_qa"]) == len(splits["knowmem/retain_qa"]) == 72


def test_same_spec_same_benchmark_other_seed_other(splits):
    assert generate_muse_benchmark(SPEC) == splits
    other = generate_muse_benchmark(MuseSyntheticSpec(**{**vars(SPEC), "seed": 6}))
    for split in ("raw/forget", "raw/holdout", "knowmem/forget_qa", "verbmem/forget"):
        assert other[split] != splits[split], split


def test_corpora_are_about_disjoint_entities():
    corpora = generate_muse_articles(SPEC)
    rows = generate_muse_benchmark(SPEC)["raw/forget"]
    assert [article.text for article in corpora["forget"]] == [row["text"] for row in rows[: len(corpora["forget"])]]
    entities = {corpus: {name for article in articles for name in article.entities}
                for corpus, articles in corpora.items()}
    names = list(entities)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not entities[a] & entities[b], (a, b)
    # and no corpus's text names another corpus's entity (the stem, e.g. 'Bakilo', is what is unique)
    stems = {}
    for corpus, names_ in entities.items():
        found = [STEM.findall(name) for name in names_]
        assert all(len(one) == 1 for one in found), corpus
        stems[corpus] = {one[0] for one in found}
    for corpus, articles in corpora.items():
        text = " ".join(article.text for article in articles)
        for other, other_stems in stems.items():
            if other != corpus:
                assert not [stem for stem in other_stems if stem in text], (corpus, other)
    # within a corpus, each article has its own entities too
    for articles in corpora.values():
        seen = [name for article in articles for name in article.entities]
        assert len(seen) == len(set(seen))
    # the kinds are mixed alike in forget and holdout (same distribution)
    kinds = {corpus: sorted(article.kind for article in articles) for corpus, articles in corpora.items()}
    assert kinds["forget"] == kinds["holdout"] == kinds["retain1"]


def test_every_answer_is_stated_in_its_article():
    corpora = generate_muse_articles(SPEC)
    for articles in corpora.values():
        for article in articles:
            assert len(article.facts) == 8
            for fact in article.facts:
                assert fact.answer in article.text, (fact, article.text)
    splits = generate_muse_benchmark(SPEC)
    for qa, corpus in (("knowmem/forget_qa", "forget"), ("knowmem/forget_qa_icl", "forget"),
                       ("knowmem/retain_qa", "retain2"), ("knowmem/retain_qa_icl", "retain2")):
        facts = {(fact.question, fact.answer): article.text for article in corpora[corpus] for fact in article.facts}
        for row in splits[qa]:
            assert (row["question"], row["answer"]) in facts, (qa, row)
            assert row["answer"] in facts[(row["question"], row["answer"])]
    # few-shot pairs are never test questions, and every question is asked once
    for test, icl in (("knowmem/forget_qa", "knowmem/forget_qa_icl"), ("knowmem/retain_qa", "knowmem/retain_qa_icl")):
        questions = [row["question"] for row in splits[test]]
        assert len(questions) == len(set(questions))
        assert not {row["question"] for row in splits[icl]} & set(questions)


def test_verbmem_is_a_prefix_of_a_forget_article_cut_by_words(splits):
    texts = [row["text"] for row in splits["raw/forget"][:8]]  # the articles (the fact boxes follow)
    for row, text in zip(splits["verbmem/forget"], texts, strict=True):
        assert text.startswith(row["prompt"] + " " + row["gt"])
        assert len(row["prompt"].split()) == SPEC.prompt_words
        assert len(row["gt"].split()) == SPEC.continuation_words


def test_folder_round_trips_what_was_written(written, splits):
    for split in SPLIT_COLUMNS:
        file = written / f"{split}.json"
        assert file.is_file(), split
        assert len(file.read_text().splitlines()) == len(splits[split])
    assert json.loads((written / "spec.json").read_text()) == vars(SPEC)
    source = MuseSource(path=str(written))
    for split in SPLIT_COLUMNS:
        assert source.rows(split) == splits[split], split
    assert MuseSource(synthetic=SPEC).rows(KNOWMEM_FORGET) == splits[KNOWMEM_FORGET]
    assert source.describe(VERBMEM) == str(written / "verbmem" / "forget.json")


def test_files_override_path(written, tmp_path):
    other = tmp_path / "forget.json"
    other.write_text(json.dumps([{"text": "a different forget corpus of a few words"}]))
    source = MuseSource(path=str(written), files={"raw/forget": str(other)})
    assert source.rows("raw/forget") == [{"text": "a different forget corpus of a few words"}]
    assert source.rows("raw/holdout") == MuseSource(path=str(written)).rows("raw/holdout")
    alone = MuseSource(files={"raw/forget": str(other)})
    with pytest.raises(PertaValueError, match=r"'raw/holdout' is not in files= .* no path= folder"):
        alone.rows("raw/holdout")


def test_source_needs_exactly_one_origin(written):
    with pytest.raises(PertaValueError, match="exactly one of"):
        MuseSource()
    with pytest.raises(PertaValueError, match="exactly one of"):
        MuseSource(path=str(written), synthetic=SPEC)
    with pytest.raises(PertaValueError, match="files= goes alone or beside path=, not beside hub="):
        MuseSource(hub="muse-bench/MUSE-News", files={"raw/forget": "x.json"})
    with pytest.raises(PertaValueError, match="unknown MUSE split 'raw/forgt'"):
        MuseSource(files={"raw/forgt": "x.json"})


def _folder(tmp_path, split, rows):
    file = tmp_path / f"{split}.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return MuseSource(path=str(tmp_path))


def test_refusals_name_the_file_split_and_column(tmp_path, written):
    with pytest.raises(PertaFileNotFoundError, match=r"MUSE split 'raw/retain1' not found: no file .*raw/retain1\.json \(path=\)"):
        MuseSource(path=str(tmp_path)).rows("raw/retain1")
    with pytest.raises(PertaValueError, match=r"unknown MUSE split 'forget10'; known splits: raw/forget, .*pretrain/background"):
        MuseSource(path=str(written)).rows("forget10")
    with pytest.raises(PertaValueError, match=r"knowmem/forget_qa\.json: column 'answer' is missing \(first in row 1\)"):
        _folder(tmp_path, "knowmem/forget_qa", [{"question": "q", "answer": "a"}, {"question": "q2"}]).rows("knowmem/forget_qa")
    with pytest.raises(PertaValueError, match=r"retain_qa\.json: row 0, column 'answer' is empty \(a question set with no answers\)"):
        _folder(tmp_path, "knowmem/retain_qa", [{"question": "q", "answer": " "}]).rows("knowmem/retain_qa")
    with pytest.raises(PertaValueError, match=r"verbmem/forget\.json: row 1, column 'gt' is empty"):
        _folder(tmp_path, "verbmem/forget", [{"prompt": "p", "gt": "g"}, {"prompt": "p", "gt": ""}]).rows("verbmem/forget")
    with pytest.raises(PertaValueError, match=r"privleak/holdout\.json: the split is empty"):
        _folder(tmp_path, "privleak/holdout", []).rows("privleak/holdout")
    with pytest.raises(PertaValueError, match=r"raw/holdout\.json: row 0, column 'text' must be a string, got NoneType"):
        _folder(tmp_path, "raw/holdout", [{"text": None}]).rows("raw/holdout")
    with pytest.raises(PertaValueError, match="synthetic generator only; the MUSE hub datasets have no such split"):
        MuseSource(hub="muse-bench/MUSE-News").rows(PRETRAIN_BACKGROUND)


def test_a_corpus_shorter_than_the_prompt_length_is_refused():
    rows = [{"text": "one two three four five six"}, {"text": "one two three"}]
    check_prompt_length(rows[:1], 3, "x", continuation_length=3)  # exactly long enough
    with pytest.raises(PertaValueError, match=r"x: row 1, column 'text' has 3 words, fewer than the prompt's 3 plus 1 "
                                              r"to continue \(a corpus shorter than the prompt length\)"):
        check_prompt_length(rows, 3, "x")
    with pytest.raises(PertaValueError, match=r"y: row 0, column 'text' has 6 tokens, fewer than the prompt's 8"):
        check_prompt_length(rows, 8, "y", tokenizer=WordTokenizer())
    with pytest.raises(PertaValueError, match=r"muse-synthetic raw/forget \(prompt_words=200, continuation_words=30\): "
                                              r"row 0, column 'text' has \d+ words, fewer than the prompt's 200 plus 30"):
        generate_muse_benchmark(MuseSyntheticSpec(num_articles=2, num_retain_articles=2, num_holdout_articles=2,
                                                  num_background_articles=2, icl_questions=1, prompt_words=200))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_articles", 0, "num_articles must be a positive integer, got 0"),
    ("num_background_articles", -1, "num_background_articles must be a positive integer"),
    ("questions_per_article", 8, "questions_per_article must be 1 to 7"),
    ("icl_questions", 9, "icl_questions=9 exceeds the articles"),
    ("prompt_words", 0, "prompt_words must be a positive integer"),
    ("num_background_articles", 2000, "distinct entity names"),
])
def test_spec_refuses_impossible_sizes(field, value, message):
    with pytest.raises(PertaValueError, match=message):
        MuseSyntheticSpec(**{**vars(SPEC), field: value})


class WordTokenizer:
    """A fake Hugging Face tokenizer: one id per word (new words get the next id, from 10), BOS 1, EOS 2."""

    def __init__(self, bos_token_id=1, eos_token_id=2):
        self.bos_token_id, self.eos_token_id, self.vocab = bos_token_id, eos_token_id, {}

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens  # EncodedText adds BOS and EOS itself
        return {"input_ids": [self.vocab.setdefault(word, 10 + len(self.vocab)) for word in text.split()]}


def test_encoded_text_chunks_by_hand():
    rows = [{"text": "a b c d e"}, {"text": "f"}, {"text": "g h"}]
    # ids: [1 10 11 12 13 14 2], [1 15 2], [1 16 17 2]; chunks of 3, a last piece of 1 token dropped
    data = EncodedText(rows, WordTokenizer(), 3, "here")
    assert [example["input_ids"] for example in data] == [[1, 10, 11], [12, 13, 14], [1, 15, 2], [1, 16, 17]]
    assert [example["labels"] for example in data] == [example["input_ids"] for example in data]
    assert [example["index"] for example in data] == [0, 1, 2, 3]
    assert data.row_of == [0, 0, 1, 2]
    # chunks of 4: [1 10 11 12] [13 14 2]; no BOS: [10 11 12 13] [14 2] and [15 2]
    assert [e["input_ids"] for e in EncodedText(rows[:1], WordTokenizer(), 4, "here")] == [[1, 10, 11, 12], [13, 14, 2]]
    no_bos = EncodedText(rows[:2], WordTokenizer(bos_token_id=None), 4, "here")
    assert [e["input_ids"] for e in no_bos] == [[10, 11, 12, 13], [14, 2], [15, 2]]
    batch = collate_examples([data[0], data[2], data[3]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11], [1, 15, 2], [1, 16, 17]]
    short = collate_examples([no_bos[0], no_bos[1]], pad_token_id=0)
    assert short["labels"].tolist() == [[10, 11, 12, 13], [14, 2, IGNORE_INDEX, IGNORE_INDEX]]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert short["index"].tolist() == [0, 1]


def test_encoded_text_refusals():
    with pytest.raises(PertaValueError, match=r"here: no text to train on \(1 row\(s\), none with 2 tokens or more\)"):
        EncodedText([{"text": ""}], WordTokenizer(bos_token_id=None), 8, "here")
    with pytest.raises(PertaValueError, match="here: the tokenizer has no EOS token"):
        EncodedText([{"text": "a b"}], WordTokenizer(eos_token_id=None), 8, "here")
    with pytest.raises(PertaValueError, match="here: row 1 has no string column 'text'"):
        EncodedText([{"text": "a b"}, {"question": "q"}], WordTokenizer(), 8, "here")
    with pytest.raises(PertaValueError, match="here: max_length must be at least 2"):
        EncodedText([{"text": "a b"}], WordTokenizer(), 1, "here")


def test_cli_writes_the_layout_and_a_tokenizer(tmp_path, capsys):
    out = tmp_path / "muse"
    perta_main(["data", "muse-synthetic", "--output", str(out), "--num_articles", "4", "--num_retain_articles", "4",
                "--num_holdout_articles", "4", "--num_background_articles", "4", "--icl_questions", "2",
                "--tokenizer_vocab_size", "300", "--seed", "1"])
    assert f"wrote {out}" in capsys.readouterr().out
    spec = MuseSyntheticSpec(num_articles=4, num_retain_articles=4, num_holdout_articles=4, num_background_articles=4,
                             icl_questions=2, seed=1)
    assert json.loads((out / "spec.json").read_text()) == vars(spec)
    source, expected = MuseSource(path=str(out)), generate_muse_benchmark(spec)
    for split in SPLIT_COLUMNS:
        assert source.rows(split) == expected[split], split
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    data = EncodedText(source.rows("raw/forget"), tokenizer, 64, "cli")
    assert all(2 <= len(example["input_ids"]) <= 64 for example in data)
    assert tokenizer.decode([i for e in data if data.row_of[e["index"]] == 0 for i in e["input_ids"]],
                            skip_special_tokens=True) == expected["raw/forget"][0]["text"]
    # a refusal is one line and exit status 2
    with pytest.raises(SystemExit) as exit_info:
        perta_main(["data", "muse-synthetic", "--output", str(tmp_path / "bad"), "--prompt_words", "500",
                    "--tokenizer_vocab_size", "null"])
    assert exit_info.value.code == 2
    assert "perta data: error: muse-synthetic raw/forget (prompt_words=500" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_knowmem_questions_are_the_boxed_facts_and_shots_are_not(splits):
    """Each forget (retain) question is answered verbatim in the fact box of a forget (retain2) article, in the
    KnowMem prompt's format; no few-shot question is in any box."""
    from perta_lightning.benchmarks.muse.evaluation import knowmem_prompt

    for qa, corpus in (("knowmem/forget_qa", "raw/forget"), ("knowmem/retain_qa", "raw/retain2")):
        boxes = [row["text"] for row in splits[corpus][8:]]
        for row in splits[qa]:
            assert sum(knowmem_prompt(row["question"]) + row["answer"] + "\n\n" in box for box in boxes) == 1
        every_box = "".join(boxes)
        for shot in splits[f"{qa}_icl"]:
            assert shot["question"] not in every_box
