import json
import signal
from contextlib import contextmanager

import pytest

from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
from perta_lightning.benchmarks.tofu.synthetic import (
    FACT_TYPES,
    TOFU_SPLITS,
    SyntheticSpec,
    generate_benchmark,
)

SPEC = SyntheticSpec(num_authors=40, seed=3, num_background_authors=4, num_world_items=10)
PER_AUTHOR = len(FACT_TYPES)


@pytest.fixture(scope="module")
def splits():
    return generate_benchmark(SPEC)


def authors_of(rows):
    return {row["author"] for row in rows} if rows and "author" in rows[0] else None


def names_in(rows, names):
    return {name for name in names for row in rows if name in row["question"]}


def test_every_tofu_split_is_written(tiny_benchmark):
    for split in TOFU_SPLITS:
        assert (tiny_benchmark / f"{split}.json").is_file(), split
    first = json.loads((tiny_benchmark / "forget10_perturbed.json").read_text().splitlines()[0])
    assert list(first) == ["question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer"]
    assert list(json.loads((tiny_benchmark / "full.json").read_text().splitlines()[0])) == ["question", "answer"]


def test_split_sizes_follow_tofu_percentages(splits):
    assert len(splits["full"]) == 40 * PER_AUTHOR
    for pct, authors in ((1, 1), (5, 2), (10, 4)):
        assert len(splits[f"forget{pct:02d}"]) == authors * PER_AUTHOR
        assert len(splits[f"retain{100 - pct}"]) == (40 - authors) * PER_AUTHOR
        assert len(splits[f"forget{pct:02d}_perturbed"]) == authors * PER_AUTHOR
        assert len(splits[f"holdout{pct:02d}"]) == authors * PER_AUTHOR
    # forget sets are nested, like TOFU's (forget01 is part of forget05 is part of forget10)
    questions = {pct: {r["question"] for r in splits[f"forget{pct:02d}"]} for pct in (1, 5, 10)}
    assert questions[1] < questions[5] < questions[10]


def test_forget_retain_and_holdout_authors_are_disjoint(splits):
    full_questions = {row["question"] for row in splits["full"]}
    for pct in (1, 5, 10):
        forget = {row["question"] for row in splits[f"forget{pct:02d}"]}
        retain = {row["question"] for row in splits[f"retain{100 - pct}"]}
        assert not forget & retain
        assert forget | retain == full_questions
        assert not {row["question"] for row in splits[f"holdout{pct:02d}"]} & full_questions


def test_perturbed_answers_are_wrong_and_counted(splits):
    for split, count in (("forget10_perturbed", 5), ("retain_perturbed", 5),
                         ("real_authors_perturbed", 3), ("world_facts_perturbed", 3)):
        for row in splits[split]:
            assert len(row["perturbed_answer"]) == count == len(set(row["perturbed_answer"]))
            truth = row.get("paraphrased_answer", row["answer"])
            assert truth not in row["perturbed_answer"] and row["answer"] not in row["perturbed_answer"]


def test_paraphrase_phrasing_is_seen_in_training_but_not_for_this_fact(splits):
    training_answers = {row["answer"] for row in splits["full"]}
    for row in splits["forget10_perturbed"] + splits["retain_perturbed"]:
        assert row["paraphrased_answer"] != row["answer"]
        assert row["paraphrased_answer"] not in training_answers
        assert row["paraphrased_question"] != row["question"]
    # every phrasing of every fact type is trained on for some author
    for fact in FACT_TYPES:
        for template in fact.answers:
            prefix = template.split("{")[0]
            assert any(a.startswith(prefix) or prefix == "" for a in training_answers), template


def test_authors_share_surnames_across_forget_and_retain(splits):
    def surnames(rows):
        return {row["question"].split("?")[0].split()[-1].removesuffix("'s") for row in rows}

    assert surnames(splits["forget10"]) & surnames(splits["retain90"])


def test_deterministic_per_seed():
    assert generate_benchmark(SPEC) == generate_benchmark(SPEC)
    other = generate_benchmark(SyntheticSpec(num_authors=40, seed=4, num_background_authors=4, num_world_items=10))
    assert other["full"] != generate_benchmark(SPEC)["full"]


def test_synthetic_source_equals_written_files(tiny_benchmark):
    spec = SyntheticSpec(**json.loads((tiny_benchmark / "spec.json").read_text()))
    for split in ("forget10_perturbed", "retain90", "world_facts_perturbed"):
        assert load_split(TofuSource(synthetic=spec), split) == load_split(TofuSource(path=str(tiny_benchmark)), split)


def test_cli_writes_the_layout(tmp_path, capsys):
    from perta_lightning.cli import main

    main(["data", "synthetic", "--output", str(tmp_path / "d"), "--num_authors", "12", "--seed", "1",
          "--tokenizer_vocab_size", "300"])
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").is_file()
    assert len(load_split(TofuSource(path=str(tmp_path / "d")), "full")) == 12 * PER_AUTHOR
    with pytest.raises(SystemExit) as exit_info:  # a rerun: refused in one line, the folder kept
        main(["data", "synthetic", "--output", str(tmp_path / "d"), "--tokenizer_vocab_size", "null"])
    assert exit_info.value.code == 2 and "already exists" in capsys.readouterr().err
    assert (tmp_path / "d" / "tokenizer" / "tokenizer.json").is_file()


# ---- sizes the generator cannot make are refused at once; large ones are made

@contextmanager
def deadline(seconds: int, what: str):
    """Raise TimeoutError in the test when ``what`` takes longer than ``seconds`` (the name loop used to hang)."""
    def too_slow(signum, frame):
        raise TimeoutError(f"{what} did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_hundreds_of_authors_do_not_exhaust_the_names():
    """700 authors used to hang: the two-syllable first names (702) ran out. Now names grow a syllable."""
    with deadline(60, "generate_benchmark(num_authors=700)"):
        splits = generate_benchmark(SyntheticSpec(num_authors=700, seed=0, num_background_authors=6,
                                                  num_world_items=30))
    assert len(splits["full"]) == 700 * PER_AUTHOR
    assert len({row["question"] for row in splits["full"]}) == 700 * PER_AUTHOR  # 700 distinct authors


def test_too_many_authors_is_refused_with_the_maximum():
    from perta_lightning.benchmarks.tofu.synthetic import name_capacity, names_needed
    from perta_lightning.errors import PertaValueError

    capacity = name_capacity()
    largest = max(n for n in range(2, capacity) if names_needed(n, 6, 30) <= capacity)
    SyntheticSpec(num_authors=largest)  # accepted
    with pytest.raises(PertaValueError, match=rf"at most {capacity}: use num_authors <= {largest}"), \
            deadline(30, "SyntheticSpec(num_authors=largest + 1)"):
        generate_benchmark(SyntheticSpec(num_authors=largest + 1))


@pytest.mark.parametrize("option, value, message", [
    ("--num_background_authors", "-1", "num_background_authors must be 0 or more, got -1"),
    ("--num_world_items", "0", "num_world_items must be at least 4"),
    ("--num_authors", "1", "num_authors must be at least 2, got 1"),
    ("--num_authors", "1000000", "use num_authors <= "),
])
def test_cli_refuses_bad_sizes_in_one_line(option, value, message, tmp_path, capsys):
    from perta_lightning.cli import main

    with pytest.raises(SystemExit) as exit_info, deadline(30, f"perta data synthetic {option} {value}"):
        main(["data", "synthetic", "--output", str(tmp_path / "d"), option, value, "--tokenizer_vocab_size", "null"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("perta data: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()


def test_attribute_values_make_authors_share_attributes_and_default_is_unchanged():
    import hashlib
    import json

    from perta_lightning.benchmarks.tofu.synthetic import SyntheticSpec, generate_benchmark

    def digest(splits):
        return hashlib.sha256(json.dumps(splits, sort_keys=True).encode()).hexdigest()

    default = generate_benchmark(SyntheticSpec(num_authors=20, seed=3))
    assert digest(default) == digest(generate_benchmark(SyntheticSpec(num_authors=20, seed=3, attribute_values=None)))
    shared = generate_benchmark(SyntheticSpec(num_authors=20, seed=3, attribute_values=2))
    from perta_lightning.benchmarks.tofu.synthetic import AWARDS, GENRES, PUBLISHERS, SERIES

    def used(splits, values):
        text = "\n".join(row["answer"] for row in splits["full"])
        return {value for value in values if value in text}

    for values in (GENRES, AWARDS, SERIES, PUBLISHERS):
        assert len(used(shared, values)) <= 2 < len(used(default, values))
    for row in shared["forget10_perturbed"]:
        assert row["answer"] not in row["perturbed_answer"]
