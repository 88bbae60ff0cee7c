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
