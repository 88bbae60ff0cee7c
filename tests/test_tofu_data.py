import json

import pytest
import torch

from perta_lightning.benchmarks.tofu.source import TofuSource, load_split
from perta_lightning.data.datamodule import TofuDataModule, subsample
from perta_lightning.data.formatting import (
    IGNORE_INDEX,
    PromptFormat,
    QAFormatter,
    check_disjoint,
    collate_examples,
    load_tokenizer,
    pad_batch,
)
from perta_lightning.errors import PertaFileNotFoundError, PertaValueError


@pytest.fixture(scope="module")
def tokenizer(tiny_benchmark):
    return load_tokenizer(str(tiny_benchmark / "tokenizer"))


def test_plain_template_masks_the_prompt(tokenizer):
    formatter = QAFormatter(tokenizer, use_chat_template=False)
    encoded = formatter.encode("Where was Ana born?", "In Kahaven.")
    prompt = tokenizer("Question: Where was Ana born?\nAnswer: ")["input_ids"]
    answer = tokenizer("In Kahaven.", add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == prompt + answer + [tokenizer.eos_token_id]
    assert encoded["labels"] == [IGNORE_INDEX] * len(prompt) + answer + [tokenizer.eos_token_id]
    assert tokenizer.decode(encoded["input_ids"]) == "Question: Where was Ana born?\nAnswer: In Kahaven.<|eos|>"


def test_chat_template_with_system_prompt(tokenizer):
    formatter = QAFormatter(tokenizer, system_prompt="Be brief.")
    assert formatter.use_chat_template
    assert formatter.prompt_text("Who?") == "<|system|>Be brief.\n<|user|>Who?\n<|assistant|>"
    encoded = formatter.encode("Who?", "Ana.")
    labelled = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Ana.<|eos|>"
    prompt_tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"][: -len(labelled)])
    assert prompt_tokens[0] == "<|system|>" and prompt_tokens[-1] == "<|assistant|>"


def test_max_length_cuts_the_answer_not_the_prompt(tokenizer):
    prompt = QAFormatter(tokenizer, system_prompt=None).prompt_ids("Where was the author born?")
    formatter = QAFormatter(tokenizer, system_prompt=None, max_length=len(prompt) + 4)
    encoded = formatter.encode("Where was the author born?", "A long answer " * 10)
    assert len(encoded["input_ids"]) == len(prompt) + 4
    assert encoded["input_ids"][-1] == tokenizer.eos_token_id
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert sum(label != IGNORE_INDEX for label in encoded["labels"]) == 4


def test_padding_sides():
    assert pad_batch([[1, 2, 3], [4]], 0, "right").tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_batch([[1, 2, 3], [4]], 0, "left").tolist() == [[1, 2, 3], [0, 0, 4]]
    batch = collate_examples([{"input_ids": [5, 6], "labels": [-100, 6]}, {"input_ids": [7], "labels": [7]}], 0, "left")
    assert batch["attention_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["labels"].tolist() == [[-100, 6], [-100, 7]]


def write_rows(folder, name, rows):
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text("\n".join(json.dumps(row) for row in rows))


def test_errors_name_the_file_and_column(tmp_path):
    write_rows(tmp_path, "bad", [{"question": "q"}])
    with pytest.raises(ValueError, match=r"bad\.json: column 'answer' is missing"):
        load_split(TofuSource(path=str(tmp_path)), "bad")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(ValueError, match=r"empty\.json: the split is empty"):
        load_split(TofuSource(path=str(tmp_path)), "empty")
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_split(TofuSource(path=str(tmp_path)), "nothere")
    with pytest.raises(ValueError, match="column 'question'"):
        check_disjoint([{"question": "q1"}], [{"question": "q1"}], "forget vs retain")
    with pytest.raises(ValueError, match="exactly one of"):
        TofuSource(path="a", hub="b")


def test_subsample_is_seeded_and_ordered():
    rows = [{"i": i} for i in range(50)]
    picked = subsample(rows, 10, seed=1)
    assert picked == subsample(rows, 10, seed=1) and picked != subsample(rows, 10, seed=2)
    assert [row["i"] for row in picked] == sorted(row["i"] for row in picked)
    assert subsample(rows, None, 0) == rows


def test_datamodule_batches(tiny_benchmark):
    prompt = PromptFormat(tokenizer=str(tiny_benchmark / "tokenizer"))
    dm = TofuDataModule(TofuSource(path=str(tiny_benchmark)), prompt,
                        train_split="forget10", paired_split="retain90", batch_size=4, shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [0, 1, 2, 3]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert "paired_input_ids" in batch and batch["paired_index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="also appear"):
        bad = TofuDataModule(TofuSource(path=str(tiny_benchmark)), prompt, train_split="forget10",
                             paired_split="full")
        bad.setup("fit")


def test_tokenizer_has_specials_and_roundtrips(tokenizer):
    assert tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    text = "Kari Lusada was born in 1980."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert torch.tensor(tokenizer("x")["input_ids"]).dtype == torch.long


# ---- PromptFormat: one group of formatting options for every DataModule

PROMPT_DATAMODULES = [
    "perta_lightning.data.datamodule.TofuDataModule",
    "perta_lightning.benchmarks.tofu.evaluation.TofuEvalDataModule",
    "perta_lightning.data.importance.ImportanceDataModule",
]


@pytest.mark.parametrize("class_path", PROMPT_DATAMODULES)
def test_nested_prompt_block_in_yaml_reaches_the_formatter(class_path, tiny_benchmark, tmp_path):
    """``prompt: {...}`` in a YAML config is parsed into a PromptFormat and used by the DataModule's setup."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    config = {"data": {"class_path": class_path, "init_args": {
        "source": {"path": str(tiny_benchmark)},
        "prompt": {"tokenizer": str(tiny_benchmark / "tokenizer"), "system_prompt": "Answer briefly.",
                   "date_string": "1 Jan 2000", "max_length": 40, "use_chat_template": True}}}}
    if class_path.endswith("TofuEvalDataModule"):
        config["data"]["init_args"].update(forget_split="forget10_perturbed", holdout_split=None,
                                           real_authors_split=None, world_facts_split=None)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(config))
    parser = ArgumentParser()
    parser.add_subclass_arguments(LightningDataModule, "data")
    parser.add_argument("--config", action="config")
    data = parser.instantiate_classes(parser.parse_args(["--config", str(tmp_path / "data.yaml")])).data
    assert data.prompt == PromptFormat(str(tiny_benchmark / "tokenizer"), 40, "Answer briefly.", "1 Jan 2000", True)
    formatter = data.prompt.formatter()
    assert formatter.system_prompt == "Answer briefly." and formatter.max_length == 40 and formatter.use_chat_template
    data.setup("fit")
    examples = {
        "TofuDataModule": lambda: data.datasets["train"].examples,
        "TofuEvalDataModule": lambda: [{"input_ids": item["prompt"]} for item in data.sets["forget"].items],
        "ImportanceDataModule": lambda: [{"input_ids": row} for batch in data.batches
                                         for row in batch["input_ids"].tolist()],
    }[class_path.rsplit(".", 1)[1]]()
    system = formatter.tokenizer.convert_tokens_to_ids("<|system|>")
    assert examples and all(example["input_ids"][0] == system for example in examples)
    if class_path.endswith("TofuDataModule"):  # every option made it: the same ids as this formatter's
        first = load_split(TofuSource(path=str(tiny_benchmark)), "full")[0]
        assert examples[0]["input_ids"] == formatter.encode(first["question"], first["answer"])["input_ids"]


def test_prompt_defaults_are_no_system_turn_and_the_models_tokenizer(tiny_benchmark):
    prompt = PromptFormat()
    assert prompt.tokenizer is None and prompt.system_prompt is None and prompt.date_string == "10 Apr 2025"
    formatter = prompt.formatter(str(tiny_benchmark / "tokenizer"))  # the model directory, when the run has one
    assert "<|system|>" not in formatter.prompt_text("Who?")
    assert QAFormatter(formatter.tokenizer).prompt_text("Who?") == formatter.prompt_text("Who?")


def test_prompt_without_tokenizer_or_model_is_refused(tiny_benchmark):
    from perta_lightning.errors import PertaValueError

    with pytest.raises(PertaValueError, match="prompt.tokenizer is not set"):
        TofuDataModule(TofuSource(path=str(tiny_benchmark))).setup("fit")
    with pytest.raises(PertaValueError, match="prompt.max_length"):
        PromptFormat(max_length=0)


def test_eval_datamodule_tokenizer_defaults_to_the_evaluated_model(tiny_model_dir, tiny_benchmark, tmp_path):
    """No ``prompt.tokenizer``: the evaluation data is tokenized with the evaluated model's tokenizer."""
    import shutil

    from lightning.pytorch import Trainer

    from perta_lightning.benchmarks.tofu.evaluation import TofuEvalDataModule
    from perta_lightning.benchmarks.tofu.evaluator import TofuEvaluator

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")  # a tokenizer no other folder has
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 99}))
    data = TofuEvalDataModule(TofuSource(path=str(tiny_benchmark)), holdout_split=None, real_authors_split=None,
                              world_facts_split=None, retain_split=None, max_examples=2)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        TofuEvaluator(str(model), max_new_tokens=2), datamodule=data, verbose=False)
    assert data.tokenizer.model_max_length == 99


def test_run_model_dir_prefers_the_modules_tokenizer():
    from types import SimpleNamespace

    from perta_lightning.data.formatting import run_model_dir

    def trainer(**hparams):
        return SimpleNamespace(lightning_module=SimpleNamespace(hparams=hparams))

    assert run_model_dir(trainer(model="m", tokenizer="t")) == "t"
    assert run_model_dir(trainer(model="m", tokenizer=None)) == "m"
    assert run_model_dir(trainer()) is None and run_model_dir(None) is None


# ---- TofuSource.files: a path per split

def test_a_file_per_split_alone_or_beside_a_folder(tmp_path):
    write_rows(tmp_path / "a", "forget_set", [{"question": "qf", "answer": "af"}])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "retain.jsonl").write_text(json.dumps([{"question": "qr", "answer": "ar"}]))
    write_rows(tmp_path / "c", "holdout10", [{"question": "qh", "answer": "ah"}])
    files = {"forget10": str(tmp_path / "a" / "forget_set.json"), "retain90": str(tmp_path / "b" / "retain.jsonl")}
    alone = TofuSource(files=files)
    assert load_split(alone, "forget10") == [{"question": "qf", "answer": "af"}]
    assert load_split(alone, "retain90") == [{"question": "qr", "answer": "ar"}]
    assert alone.describe("retain90") == str(tmp_path / "b" / "retain.jsonl")
    with pytest.raises(PertaValueError, match=r"split 'holdout10' is not in files= .*'forget10', 'retain90'"):
        load_split(alone, "holdout10")
    beside = TofuSource(path=str(tmp_path / "c"), files=files)
    assert load_split(beside, "holdout10") == [{"question": "qh", "answer": "ah"}]
    assert load_split(beside, "forget10") == [{"question": "qf", "answer": "af"}]


def test_a_file_per_split_errors_name_the_split(tmp_path):
    missing = r"split 'forget10' not found: no file .*gone\.json \(files\['forget10'\]\)"
    with pytest.raises(PertaFileNotFoundError, match=missing):
        load_split(TofuSource(files={"forget10": str(tmp_path / "gone.json")}), "forget10")
    with pytest.raises(PertaValueError, match="files= goes alone or beside path=, not beside hub="):
        TofuSource(hub="locuslab/TOFU", files={"forget10": "f.json"})
    with pytest.raises(PertaValueError, match=r"files\['forget10'\] must be a non-empty path"):
        TofuSource(files={"forget10": ""})
    with pytest.raises(PertaValueError, match="must map split names to files"):
        TofuSource(files={})


def test_files_block_in_yaml(tmp_path):
    """``source: {files: {split: file}}`` in a DataModule's YAML reaches TofuSource."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--source", type=TofuSource)
    parsed = parser.instantiate_classes(parser.parse_args(["--source", json.dumps({"files": {"forget10": "/x/f.json"}})]))
    assert parsed.source.files == {"forget10": "/x/f.json"} and parsed.source.path is None


# ---- a split whose answers are all empty scores only EOS: refused, naming the split

def test_split_with_only_empty_answers_is_refused(tiny_benchmark, tmp_path):
    from perta_lightning.data.importance import ImportanceDataModule

    write_rows(tmp_path, "forget10", [{"question": f"Who is author {i}?", "answer": ""} for i in range(3)])
    write_rows(tmp_path, "retain90", [{"question": "Who is Ana?", "answer": "A poet."}])
    prompt = PromptFormat(tokenizer=str(tiny_benchmark / "tokenizer"))
    source = TofuSource(path=str(tmp_path))
    with pytest.raises(PertaValueError, match=r"forget10\.json: no answer tokens in the split, only EOS"):
        TofuDataModule(source, prompt, train_split="forget10").setup("fit")
    with pytest.raises(PertaValueError, match=r"forget10\.json: no answer tokens in the split, only EOS"):
        ImportanceDataModule(source, prompt).setup("fit")
    TofuDataModule(source, prompt, train_split="retain90").setup("fit")  # one real answer token is enough


# ---- one formatter per tokenizer and options, each text tokenized once

def test_formatters_are_shared_by_tokenizer_contents_and_options(tiny_benchmark, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_benchmark / "tokenizer", tmp_path / "another_model_dir")
    first = PromptFormat().formatter(str(tiny_benchmark / "tokenizer"))
    assert PromptFormat().formatter(str(copy)) is first  # the same files in another model's folder
    assert PromptFormat(system_prompt="Be brief.").formatter(str(copy)) is not first
    assert PromptFormat(max_length=64).formatter(str(copy)) is not first
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    changed = PromptFormat().formatter(str(copy))
    assert changed is not first and changed.tokenizer.model_max_length == 77


def test_cached_encodings_equal_fresh_ones_and_cannot_be_corrupted(tokenizer):
    formatter, fresh = QAFormatter(tokenizer), QAFormatter(tokenizer)
    pairs = [("Where was Ana born?", "In Lima."), ("Where was Ana born?", "In Quito."), ("Who?", "In Lima.")]
    for _ in range(2):
        for question, answer in pairs:
            assert formatter.encode(question, answer) == fresh.encode(question, answer)
    ids = formatter.prompt_ids("Who?")
    ids.append(-5)  # a caller changing its list must not change the next caller's
    assert formatter.prompt_ids("Who?") == fresh.prompt_ids("Who?")
    assert len(formatter._prompt_ids) == 2 and len(formatter._answer_ids) == 2
