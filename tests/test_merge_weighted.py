"""The weighted task vector ``v = w ⊙ τ``: written once by a TV / PerTA merge, merged later from ``θ_t`` and
``v`` alone (issue 10, item 2), bit for bit the model of the direct merge."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from perta_lightning import cli
from perta_lightning.functional.task_vectors import task_vector
from perta_lightning.functional.weights import perta_weights
from perta_lightning.merge import MergeError, merge_checkpoints


def _raw_dir(path, tensors, model_type="toy"):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"architectures": ["Toy"], "model_type": model_type}))
    return path


def _state(directory):
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(directory / file))
    return state


def _task_vector_state(directory):
    index = directory / "task_vector.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "task_vector.safetensors")
    state = {}
    for file in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(directory / file))
    return state


@pytest.fixture
def inputs(tmp_path):
    torch.manual_seed(7)
    t = {"a.weight": torch.randn(40, 6).bfloat16(), "b.bias": torch.randn(6).bfloat16(),
         "c.index": torch.arange(4), "d.kept": torch.randn(3, 2).bfloat16()}
    r = {k: (v.float() + 0.1 * torch.randn(v.shape)).bfloat16() if v.is_floating_point() else v for k, v in t.items()}
    s_f = {k: torch.rand(t[k].shape).bfloat16() for k in ("a.weight", "b.bias")}  # bf16 importance
    s_r = {k: torch.rand(t[k].shape) for k in ("a.weight", "b.bias")}
    s_f["a.weight"][0] = 0
    save_file(s_f, tmp_path / "sf.safetensors")
    save_file(s_r, tmp_path / "sr.safetensors")
    return tmp_path, t, r, s_f, s_r, _raw_dir(tmp_path / "t", t), _raw_dir(tmp_path / "r", r)


def test_weighted_merge_equals_direct_perta_bit_for_bit(inputs):
    tmp_path, t, r, s_f, s_r, td, rd = inputs
    alphas = [0.0, 0.7, -1.5]
    kw = dict(forget_importance=tmp_path / "sf.safetensors", retain_importance=tmp_path / "sr.safetensors",
              power=2.0, beta=0.5, missing_importance="keep", chunk_numel=48, max_shard_size=500, progress=False)
    direct = merge_checkpoints(td, rd, tmp_path / "direct", alpha=alphas, save_weighted_task_vector=tmp_path / "v",
                               **kw)
    v = _task_vector_state(tmp_path / "v")
    assert sorted(v) == ["a.weight", "b.bias"] and all(x.dtype == torch.float32 for x in v.values())
    assert len(list((tmp_path / "v").glob("task_vector-*-of-*.safetensors"))) == 2  # 960 + 24 bytes, 500 a shard
    for name in v:  # w from the exact upcast of the bf16 importance
        w = perta_weights(s_f[name].float(), s_r[name], power=2.0, beta=0.5)
        assert torch.equal(v[name], w * task_vector(r[name], t[name])), name
    record = json.loads((tmp_path / "v" / "perta_task_vector.json").read_text())
    assert record["method"] == "perta" and record["beta"] == 0.5 and record["model_type"] == "toy"
    weighted = merge_checkpoints(td, None, tmp_path / "weighted", alpha=alphas, method="weighted",
                                 task_vector=tmp_path / "v", chunk_numel=48, progress=False)
    assert list(weighted) == alphas
    for alpha in alphas:
        a, b = _state(direct[alpha]), _state(weighted[alpha])
        assert set(a) == set(b) == set(t)
        for name in t:
            assert torch.equal(a[name], b[name]) and a[name].dtype == t[name].dtype, (alpha, name)
        assert torch.equal(b["d.kept"], t["d.kept"]) and torch.equal(b["c.index"], t["c.index"])
        merge_record = json.loads((weighted[alpha] / "perta_merge.json").read_text())
        assert merge_record["method"] == "weighted" and merge_record["task_vector"]["beta"] == 0.5


def test_task_vector_is_written_even_when_every_alpha_is_zero(inputs):
    tmp_path, t, r, _, _, td, rd = inputs
    merge_checkpoints(td, rd, tmp_path / "o", alpha=0.0, method="tv", save_weighted_task_vector=tmp_path / "v",
                      progress=False)
    v = _task_vector_state(tmp_path / "v")
    assert sorted(v) == ["a.weight", "b.bias", "d.kept"]
    for name in v:
        assert torch.equal(v[name], task_vector(r[name], t[name]))


def test_weighted_merge_through_the_cli(inputs, capsys):
    tmp_path, t, _, _, _, td, rd = inputs
    cli.main(["merge", "--target", str(td), "--reinforced", str(rd), "--method", "tv", "--alpha", "1.0",
              "--output", str(tmp_path / "tv"), "--save_weighted_task_vector", str(tmp_path / "v"),
              "--progress", "false"])
    cli.main(["merge", "--target", str(td), "--method", "weighted", "--task_vector", str(tmp_path / "v"),
              "--alpha", "1.0", "--output", str(tmp_path / "w"), "--progress", "false"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "tv"), str(tmp_path / "w")]
    a, b = _state(tmp_path / "tv"), _state(tmp_path / "w")
    assert all(torch.equal(a[name], b[name]) for name in t)


def test_weighted_merge_refuses_what_does_not_fit(inputs):
    tmp_path, t, _, _, _, td, rd = inputs
    merge_checkpoints(td, rd, tmp_path / "o", method="tv", save_weighted_task_vector=tmp_path / "v", progress=False)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(MergeError, match="method weighted takes --target and --task_vector"):
        merge_checkpoints(td, rd, tmp_path / "x", method="weighted", task_vector=tmp_path / "v", progress=False)
    with pytest.raises(MergeError, match=r"/r: no task_vector\.safetensors"):
        merge_checkpoints(td, None, tmp_path / "x", method="weighted", task_vector=rd, progress=False)
    other = _raw_dir(tmp_path / "other", t, model_type="llama")
    with pytest.raises(MergeError, match=r"v/perta_task_vector\.json: model_type 'toy' differs from 'llama'"):
        merge_checkpoints(other, None, tmp_path / "x", method="weighted", task_vector=tmp_path / "v", progress=False)
    save_file({"a.weight": torch.zeros(3, 3)}, tmp_path / "v" / "task_vector.safetensors")
    with pytest.raises(MergeError, match=r"task_vector\.safetensors: task vector 'a\.weight' \(F32, shape \(3, 3\)\)"):
        merge_checkpoints(td, None, tmp_path / "x", method="weighted", task_vector=tmp_path / "v", progress=False)
    with pytest.raises(MergeError, match="--task_vector is read by --method weighted only"):
        merge_checkpoints(td, rd, tmp_path / "x", method="tv", task_vector=tmp_path / "v", progress=False)
    with pytest.raises(MergeError, match="task vector folder must be apart from output"):
        merge_checkpoints(td, rd, tmp_path / "x", method="tv", save_weighted_task_vector=tmp_path / "x" / "v",
                          progress=False)
    assert sorted(set(os.listdir(tmp_path)) - {"other"}) == before
