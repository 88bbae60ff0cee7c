"""What a merge leaves behind and what it refuses: SIGTERM, stale temporaries, permissions, bad inputs,
and the one-line errors of ``perta merge`` (issue 9, items 4 to 6)."""

import errno
import fcntl
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from perta_lightning import cli
from perta_lightning.merge import MergeError, build_parser, merge_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _raw_dir(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architectures": ["Toy"], "model_type": "toy"}))
    return path


def _pair(tmp_path: Path, rows: int = 7) -> tuple[Path, Path]:
    torch.manual_seed(0)
    t = {"a.weight": torch.randn(rows, 5), "b.bias": torch.randn(5)}
    r = {k: v + 1 for k, v in t.items()}
    return _raw_dir(tmp_path / "t", t), _raw_dir(tmp_path / "r", r)


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _run_cli(capsys, args: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["merge", *args])
    err = capsys.readouterr().err
    return exit_info.value.code, err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("perta merge: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---------------------------------------------------------------- temporary folders


def test_sigterm_mid_merge_leaves_no_temporary_folder(tmp_path):
    td, rd = _pair(tmp_path, rows=400_000)  # 2M entries in blocks of 5 rows: seconds of work
    proc = subprocess.Popen([sys.executable, "-m", "perta_lightning", "merge", "--target", str(td), "--reinforced",
                             str(rd), "--method", "tv", "--output", str(tmp_path / "out"), "--chunk_numel", "25",
                             "--progress", "false"], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _temporaries(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and _temporaries(tmp_path), "the merge ended before it could be interrupted"
    time.sleep(0.5)  # well inside the stream of blocks
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert _temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


def test_sigterm_handler_is_restored_after_a_merge(tmp_path):
    td, rd = _pair(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    merge_checkpoints(td, rd, tmp_path / "out", method="tv", progress=False)
    assert signal.getsignal(signal.SIGTERM) is before


def test_stale_leftover_is_reported_and_removed_while_a_live_one_is_kept(tmp_path, capsys):
    td, rd = _pair(tmp_path)
    stale = tmp_path / ".out.tmp-k1ll3d00"  # what a SIGKILLed merge leaves
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 4096)
    stale_file = tmp_path / ".report.json.tmp-k1ll3d01"  # a SIGKILLed atomic_write_text
    stale_file.write_text("{")
    (tmp_path / ".cache").mkdir()  # not named like a temporary of this package: never touched
    (tmp_path / ".forget.tmp-abc").mkdir()
    live = tmp_path / ".other.tmp-runn1ng0"  # another run, still writing: it holds the lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        merge_checkpoints(td, rd, tmp_path / "out", method="tv", progress=False)
        err = capsys.readouterr().err
        assert _temporaries(tmp_path) == [".forget.tmp-abc", ".other.tmp-runn1ng0"]
        assert (tmp_path / ".cache").is_dir()
        assert err.count("\n") == 1 and "2 temporary output(s) left by an interrupted run" in err, err
        assert f"{stale} (0.0 MiB)" in err and str(stale_file) in err and str(live) not in err
    finally:
        os.close(fd)
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(tmp_path, umask):
    from perta_lightning.checkpoints import write_safetensors_sharded
    from perta_lightning.io import atomic_write_text

    previous = os.umask(umask)
    try:
        td, rd = _pair(tmp_path)
        one = merge_checkpoints(td, rd, tmp_path / "one", method="tv", max_shard_size=100, progress=False)
        many = merge_checkpoints(td, rd, tmp_path / "many", alpha=[0.5, 1.0], method="tv", progress=False)
        atomic_write_text(tmp_path / "report.json", "{}")
        index = write_safetensors_sharded(iter([("x", torch.ones(40)), ("y", torch.ones(40))]), tmp_path / "imp",
                                          "forget", {}, max_shard_bytes=100)
    finally:
        os.umask(previous)
    folders = [one[1.0], tmp_path / "many", *many.values()]
    files = [p for d in folders for p in d.iterdir() if p.is_file()] + [tmp_path / "report.json"]
    files += list(index.parent.iterdir())
    assert len(files) > 10 and {p.name for p in one[1.0].iterdir()} >= {"model.safetensors.index.json",
                                                                        "model-00001-of-00002.safetensors"}
    for folder in folders:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file


# ---------------------------------------------------------------- inputs refused up front


def test_all_zero_importance_is_refused_naming_the_file(tmp_path):
    td, rd = _pair(tmp_path)
    save_file({"a.weight": torch.zeros(7, 5), "b.bias": torch.zeros(5)}, tmp_path / "zero.safetensors")
    save_file({"a.weight": torch.rand(7, 5), "b.bias": torch.rand(5)}, tmp_path / "good.safetensors")
    before = sorted(os.listdir(tmp_path))
    for forget, retain in (("zero", "good"), ("good", "zero")):
        with pytest.raises(MergeError, match=r"zero\.safetensors: importance is zero for every parameter merged"):
            merge_checkpoints(td, rd, tmp_path / "out", alpha=[0.5, 1.0], chunk_numel=10, progress=False,
                              forget_importance=tmp_path / f"{forget}.safetensors",
                              retain_importance=tmp_path / f"{retain}.safetensors")
        assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("inside", ["t", "r", "b"])
def test_output_inside_an_input_model_folder_is_refused(tmp_path, inside):
    td, rd = _pair(tmp_path)
    bd = _raw_dir(tmp_path / "b", {"a.weight": torch.zeros(7, 5), "b.bias": torch.zeros(5)})
    with pytest.raises(MergeError, match=rf"output must not be inside the input model folder .*/{inside}\b"):
        merge_checkpoints(td, rd, tmp_path / inside / "unlearned", base=bd, method="tv", progress=False)
    assert not (tmp_path / inside / "unlearned").exists()


def test_help_says_negative_alpha_is_legitimate():
    assert "Negative values are legitimate" in " ".join(build_parser().format_help().split())


# ---------------------------------------------------------------- one-line errors of perta merge


def test_cli_threads_zero(tmp_path, capsys):
    td, rd = _pair(tmp_path)
    code, err = _run_cli(capsys, ["--target", str(td), "--reinforced", str(rd), "--method", "tv",
                                  "--output", str(tmp_path / "o"), "--threads", "0"])
    _assert_one_line_error(code, err, "threads=0")
    assert sorted(os.listdir(tmp_path)) == ["r", "t"]


def test_cli_output_dot(tmp_path, capsys, monkeypatch):
    td, rd = _pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = _run_cli(capsys, ["--target", str(td), "--reinforced", str(rd), "--method", "tv",
                                  "--output", ".", "--overwrite"])
    _assert_one_line_error(code, err, "output '.'", "not the current folder")
    assert sorted(os.listdir(tmp_path)) == ["r", "t"]


def test_cli_header_without_dtype(tmp_path, capsys):
    td, rd = _pair(tmp_path)
    header = json.dumps({"a.weight": {"shape": [7, 5], "data_offsets": [0, 140]},
                         "b.bias": {"dtype": "F32", "shape": [5], "data_offsets": [140, 160]}}).encode()
    (rd / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(160))
    code, err = _run_cli(capsys, ["--target", str(td), "--reinforced", str(rd), "--method", "tv",
                                  "--output", str(tmp_path / "o")])
    _assert_one_line_error(code, err, f"{rd / 'model.safetensors'}: header entry of tensor 'a.weight' has no 'dtype'")


def test_cli_legacy_bin_without_allow_pickle(tmp_path, capsys):
    td, rd = _pair(tmp_path)
    (rd / "model.safetensors").unlink()
    torch.save({"a.weight": torch.zeros(7, 5), "b.bias": torch.zeros(5)}, rd / "pytorch_model.bin")
    code, err = _run_cli(capsys, ["--target", str(td), "--reinforced", str(rd), "--method", "tv",
                                  "--output", str(tmp_path / "o")])
    _assert_one_line_error(code, err, f"{rd / 'pytorch_model.bin'}: pickle checkpoint refused", "--allow_pickle")


def test_cli_full_disk_names_the_file(tmp_path, capsys, monkeypatch):
    from perta_lightning import checkpoints

    class FullDisk:
        def __init__(self, path):
            self.path = path

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    real_open = open
    monkeypatch.setattr(checkpoints, "open",
                        lambda path, mode="r", *a, **k: FullDisk(path) if "w" in mode else real_open(path, mode, *a, **k),
                        raising=False)
    td, rd = _pair(tmp_path)
    code, err = _run_cli(capsys, ["--target", str(td), "--reinforced", str(rd), "--method", "tv",
                                  "--output", str(tmp_path / "o"), "--progress", "false"])
    _assert_one_line_error(code, err, f"{tmp_path}/.o.tmp-", "/model.safetensors: No space left on device")
    assert sorted(os.listdir(tmp_path)) == ["r", "t"]


def test_cli_corrupt_bin_with_allow_pickle(tmp_path, capsys):
    td, rd = _pair(tmp_path)
    (rd / "model.safetensors").unlink()
    (rd / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    code, err = _run_cli(capsys, ["--target", str(td), "--reinforced", str(rd), "--method", "tv", "--allow_pickle",
                                  "--output", str(tmp_path / "o")])
    _assert_one_line_error(code, err, f"{rd / 'pytorch_model.bin'}: not a loadable weights-only pickle checkpoint")


def test_a_figure_that_fails_midway_leaves_the_old_one_and_no_temporary(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from perta_lightning.io import atomic_save_figure

    figure, axis = plt.subplots()
    axis.plot([0, 1], [1, 0])
    path = tmp_path / "tradeoff.png"
    atomic_save_figure(figure, path, dpi=50)
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG")

    class Broken:
        def savefig(self, handle, **options):
            handle.write(b"\x89PNG half")  # a write cut short, as a full disk would
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_save_figure(Broken(), path)
    assert path.read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tradeoff.png"]
    plt.close(figure)
