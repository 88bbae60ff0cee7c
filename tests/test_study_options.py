"""The study's options are checked before anything runs, and refused in one line naming the value."""

import pytest

from perta_lightning.cli import main
from perta_lightning.study.options import PertaVariant, resolve_preset


def test_overlapping_seeds_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--preset", "tiny", "--validation_seeds", "[1, 2]", "--test_seeds", "[2, 3]",
              "--output", str(tmp_path / "s")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "validation_seeds [1, 2] and test_seeds [2, 3] overlap" in err
    assert not (tmp_path / "s").exists()


def test_unknown_preset_override_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["pipeline", "--preset", "tiny", "--preset_overrides", "{finetune_epoch: 3}",
              "--output", str(tmp_path / "p")])
    assert "unknown field(s) ['finetune_epoch']" in capsys.readouterr().err


def test_preset_overrides_apply():
    assert resolve_preset("demo", {"finetune_epochs": 40}).finetune_epochs == 40
    assert resolve_preset("demo").finetune_epochs == 20


def test_variant_labels_name_what_differs_from_the_paper():
    assert PertaVariant("grad").label == "perta_grad"
    assert PertaVariant("fisher", beta=16.0, power=2.0, importance_at="base", granularity="batch",
                        num_examples=20).label == "perta_fisher_b16_p2_at_base_batch_n20"


def _graph(eval_files):
    from perta_lightning.study.graph import seed_graph
    from perta_lightning.study.options import BaselineVariant, RunOptions

    run = RunOptions(preset="tiny", eval_files=eval_files).resolve()
    return seed_graph(run, 0, "forget10", [PertaVariant("grad")], [BaselineVariant("grad_diff")])


def test_eval_files_reach_the_evaluations_only(tmp_path):
    from perta_lightning.benchmarks.tofu.source import load_split

    file = tmp_path / "real.json"
    file.write_text('{"question": "Who wrote Hamlet?", "answer": "Shakespeare", "perturbed_answer": ["Dickens"]}\n')
    graph = _graph({"real_authors_perturbed": str(file)})
    plain = _graph(None)
    # training stages read the synthetic data only: their settings (and so their records) do not change
    assert graph.full.settings() == plain.full.settings()
    evaluation = graph.target.settings()["data"]
    assert evaluation["synthetic"] is True and set(evaluation["files"]) == {"real_authors_perturbed"}
    assert plain.target.settings()["data"] == "synthetic"
    before = evaluation["files"]["real_authors_perturbed"]
    file.write_text(file.read_text().replace("Dickens", "Austen"))
    assert _graph({"real_authors_perturbed": str(file)}).target.settings()["data"]["files"] != {
        "real_authors_perturbed": before}  # a changed file re-runs the evaluations

    class Runner:
        def path(self, product):
            return tmp_path / "synthetic"

    source = graph.target.data.source(Runner())
    assert load_split(source, "real_authors_perturbed")[0]["answer"] == "Shakespeare"
    assert source.split_file("world_facts_perturbed") == tmp_path / "synthetic" / "world_facts_perturbed.json"


def test_eval_files_errors_name_the_key(capsys, tmp_path):
    from perta_lightning.errors import PertaFileNotFoundError, PertaValueError

    with pytest.raises(PertaValueError, match=r"eval_files: key 'forget10_perturbed' is not one of"):
        _graph({"forget10_perturbed": str(tmp_path)})
    with pytest.raises(PertaFileNotFoundError, match=r"eval_files\[world_facts_perturbed\]: no such file: .*gone"):
        _graph({"world_facts_perturbed": str(tmp_path / "gone.json")})
    with pytest.raises(SystemExit):
        main(["pipeline", "--preset", "tiny", "--eval_files", "{real_authors_perturbed: missing.json}",
              "--output", str(tmp_path / "p")])
    assert "eval_files[real_authors_perturbed]: no such file" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_the_tradeoff_plot_takes_any_number_of_methods(tmp_path):
    """A validation seed of the replication plots twenty methods (candidates, variants, baseline settings)."""
    from perta_lightning.benchmarks.registry import benchmark
    from perta_lightning.study.split_report import plot_tradeoff

    rows = [{"method": f"method_{i}", "alpha": float(a), "forget_quality": 0.1 * a, "model_utility": 0.5}
            for i in range(20) for a in (1, 2)]
    plot_tradeoff(rows, tmp_path / "tradeoff.png", benchmark("tofu").axes)
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
