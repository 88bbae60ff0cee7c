"""User errors print one line naming what is wrong and exit 2; bugs keep their traceback."""

import errno

import pytest

from perta_lightning.cli import run_command
from perta_lightning.errors import PertaValueError


def test_user_error_is_one_line_and_exit_2(capsys):
    def bad():
        raise PertaValueError("runs/x/eval.json: key 'forget'\n  is missing")

    with pytest.raises(SystemExit) as exit_info:
        run_command("summarize", bad)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "perta summarize: error: runs/x/eval.json: key 'forget' is missing\n"


def test_full_disk_names_the_file(capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "runs/x/model.safetensors")

    with pytest.raises(SystemExit):
        run_command("merge", full)
    assert capsys.readouterr().err == "perta merge: error: runs/x/model.safetensors: No space left on device\n"


def test_bug_keeps_its_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command("merge", lambda: 1 / 0)


def test_debug_shows_user_error_traceback(monkeypatch):
    monkeypatch.setenv("PERTA_DEBUG", "1")

    def bad():
        raise PertaValueError("bad value")

    with pytest.raises(PertaValueError):
        run_command("merge", bad)


def test_a_user_error_wrapped_by_a_library_is_still_one_line(capsys):
    """jsonargparse wraps what a class raises while it is built (a missing model folder) in its own error."""
    def wrapped():
        try:
            raise PertaValueError("runs/x: no such model directory")
        except PertaValueError as error:
            raise ValueError("Does not validate against any of the Union subtypes") from error

    with pytest.raises(SystemExit):
        run_command("fit", wrapped)
    assert capsys.readouterr().err == "perta fit: error: runs/x: no such model directory\n"


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, None),
    ({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}, "local rank 1 of node 0 (2 in all)"),  # Lightning
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, "rank 3 of 4"),  # torchrun
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, "rank 1 of 2"),  # srun
])
def test_the_rank_of_a_process_from_its_launchers_variables(environ, expected):
    from perta_lightning.cli import rank_of_process

    assert rank_of_process(environ) == expected


def test_a_failure_on_a_rank_names_it(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def bad():
        raise PertaValueError("runs/x/eval.json: key 'forget' is missing")

    with pytest.raises(SystemExit):
        run_command("test", bad)
    assert capsys.readouterr().err == "perta test: error: rank 1 of 2: runs/x/eval.json: key 'forget' is missing\n"
    with pytest.raises(ZeroDivisionError):
        run_command("test", lambda: 1 / 0)
    assert capsys.readouterr().err == "perta test: error: rank 1 of 2: ZeroDivisionError: division by zero\n"
