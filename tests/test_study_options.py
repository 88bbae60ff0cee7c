"""The study's options are checked before anything runs, and refused in one line naming the value."""

import pytest

from perta_lightning.cli import main
from perta_lightning.study_types import PertaVariant, resolve_preset


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
