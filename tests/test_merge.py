"""End-to-end tests of the streaming merge on tiny sharded Llama checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perta_lightning.merge import MergeError, cli_main, merge_checkpoints

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-20


def _tiny_llama(seed: int, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _state(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for file in files:
        state.update(load_file(directory / file))
    return state


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """target (sharded), reinforced (sharded), forget importance (one file, with the tied alias
    lm_head.weight that is absent from the model), retain importance (sharded with an index)."""
    root = tmp_path_factory.mktemp("models")
    _tiny_llama(0).save_pretrained(root / "target", max_shard_size="20KB")
    (root / "target" / "tokenizer_config.json").write_text('{"model_max_length": 32}')
    _tiny_llama(1).save_pretrained(root / "reinforced", max_shard_size="20KB")
    assert len(list((root / "target").glob("model-*.safetensors"))) > 1
    names = list(_state(root / "target"))
    torch.manual_seed(2)
    s_f = {n: torch.rand(_state(root / "target")[n].shape) for n in names}
    save_file({**s_f, "lm_head.weight": s_f["model.embed_tokens.weight"].clone()}, root / "forget.safetensors")
    s_r = {n: torch.rand(s_f[n].shape) for n in names}
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"retain-{i}.safetensors"
        save_file({n: s_r[n] for n in part}, root / file)
        weight_map.update({n: file for n in part})
    (root / "retain.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root, s_f, s_r


def _expected(t, r, alpha, s_f=None, s_r=None, power=1.0, beta=1.0):
    """θ_t − α (w ⊙ (θ_r − θ_t)) written out directly, w = 1 without importance."""
    w = 1.0 if s_f is None else s_f**power / (s_f**power + beta * s_r**power + EPS)
    return (t.float() - alpha * (w * (r.float() - t.float()))).to(t.dtype)


def _no_leftovers(parent: Path, before: set[str]) -> None:
    assert set(os.listdir(parent)) == before, f"left behind: {set(os.listdir(parent)) - before}"


def test_perta_end_to_end_reload_and_generate(models, tmp_path):
    from transformers import AutoModelForCausalLM

    root, s_f, s_r = models
    out = merge_checkpoints(root / "target", root / "reinforced", tmp_path / "out", alpha=0.7, method="perta",
                            forget_importance=root / "forget.safetensors",
                            retain_importance=root / "retain.safetensors.index.json",
                            power=2.0, beta=0.5, max_shard_size="20KB", progress=False)
    assert out == {0.7: tmp_path / "out"}
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"model_max_length": 32}'
    assert (tmp_path / "out" / "generation_config.json").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    t, r, merged = _state(root / "target"), _state(root / "reinforced"), _state(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    assert set(merged) == set(t)
    for name in t:
        torch.testing.assert_close(merged[name], _expected(t[name], r[name], 0.7, s_f[name], s_r[name], 2.0, 0.5),
                                   rtol=1e-6, atol=1e-7)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, param in model.named_parameters():
        assert torch.equal(param.detach(), merged[name]), name
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def test_tv_alpha_list_writes_one_model_per_value(models, tmp_path):
    root, _, _ = models
    outs = merge_checkpoints(root / "target", root / "reinforced", tmp_path / "sweep", alpha=[0.0, 0.5, 1.0],
                             method="tv", progress=False)
    assert outs == {a: tmp_path / "sweep" / f"alpha_{a}" for a in (0.0, 0.5, 1.0)}
    t, r = _state(root / "target"), _state(root / "reinforced")
    for alpha, out in outs.items():
        merged = _state(out)
        assert (out / "model.safetensors").exists()  # fits one default-size shard
        assert json.loads((out / "perta_merge.json").read_text())["alpha"] == alpha
        for name in t:
            if alpha == 0.0:
                assert torch.equal(merged[name], t[name])
            else:
                torch.testing.assert_close(merged[name], _expected(t[name], r[name], alpha), rtol=1e-6, atol=1e-7)


def test_uniform_importance_merge_equals_tv_with_rescaled_alpha(models, tmp_path):
    root, s_f, _ = models
    save_file({n: torch.full_like(v, 0.25) for n, v in s_f.items()}, tmp_path / "u.safetensors")
    perta = merge_checkpoints(root / "target", root / "reinforced", tmp_path / "p", alpha=0.9, beta=2.0,
                              forget_importance=tmp_path / "u.safetensors",
                              retain_importance=tmp_path / "u.safetensors", progress=False)[0.9]
    tv = merge_checkpoints(root / "target", root / "reinforced", tmp_path / "tv", alpha=0.3, method="tv",
                           progress=False)[0.3]
    a, b = _state(perta), _state(tv)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_cli_with_yaml_config_and_base(models, tmp_path):
    root, _, _ = models
    config = tmp_path / "merge.yaml"
    config.write_text(f"target: {root / 'target'}\nreinforced: {root / 'reinforced'}\nbase: {root / 'reinforced'}\n"
                      f"method: tv\nalpha: [2.0, 3.0]\noutput: {tmp_path / 'cli'}\nprogress: false\n")
    cli_main(["--config", str(config)])  # in-process; the subprocess entry point is tested with pickles
    cli_main(["--config", str(config), "--overwrite"])  # a bare switch is accepted
    merged, t = _state(tmp_path / "cli" / "alpha_2.0"), _state(root / "target")
    for name in t:  # base = reinforced: τ = 0, so the target comes back unchanged
        assert torch.equal(merged[name], t[name])


# ---------------------------------------------------------------- raw checkpoints for edge cases


def _raw_dir(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"architectures": ["Toy"], "model_type": "toy"}))
    return path


def _raw_pair(tmp_path: Path, **changes):
    torch.manual_seed(3)
    t = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(5).bfloat16(), "c.index": torch.arange(4)}
    r = {k: (v + torch.randn(v.shape).to(v.dtype) if v.is_floating_point() else v) for k, v in t.items()}
    r.update(changes)
    return t, r, _raw_dir(tmp_path / "t", t), _raw_dir(tmp_path / "r", r)


def test_blocks_nonfloat_dtypes_and_shard_size(tmp_path):
    t, r, td, rd = _raw_pair(tmp_path)
    # a 35-entry tensor in blocks of 10 entries (2 rows) must give the same numbers as whole tensors
    whole = merge_checkpoints(td, rd, tmp_path / "whole", alpha=0.5, method="tv", progress=False)[0.5]
    blocks = merge_checkpoints(td, rd, tmp_path / "blocks", alpha=0.5, method="tv", chunk_numel=10,
                               max_shard_size=100, progress=False)[0.5]
    assert len(list(blocks.glob("model-*-of-*.safetensors"))) == 3
    a, b = _state(whole), _state(blocks)
    for name in t:
        assert torch.equal(a[name], b[name]) and a[name].dtype == t[name].dtype
    assert torch.equal(a["c.index"], t["c.index"])
    torch.testing.assert_close(a["a.weight"], _expected(t["a.weight"], r["a.weight"], 0.5))
    torch.testing.assert_close(a["b.bias"], _expected(t["b.bias"], r["b.bias"], 0.5), rtol=0, atol=0)


def test_missing_importance_policies(tmp_path):
    t, r, td, rd = _raw_pair(tmp_path)
    save_file({"a.weight": torch.full((7, 5), 2.0)}, tmp_path / "sf.safetensors")
    save_file({"a.weight": torch.full((7, 5), 6.0)}, tmp_path / "sr.safetensors")
    kw = dict(method="perta", alpha=1.0, forget_importance=tmp_path / "sf.safetensors",
              retain_importance=tmp_path / "sr.safetensors", progress=False)
    before = set(os.listdir(tmp_path))
    with pytest.raises(MergeError, match=r"sf\.safetensors.*no importance for 'b\.bias'"):
        merge_checkpoints(td, rd, tmp_path / "o", **kw)
    _no_leftovers(tmp_path, before)
    keep = _state(merge_checkpoints(td, rd, tmp_path / "keep", missing_importance="keep", **kw)[1.0])
    tv = _state(merge_checkpoints(td, rd, tmp_path / "tv", missing_importance="tv", **kw)[1.0])
    assert torch.equal(keep["b.bias"], t["b.bias"])
    assert torch.equal(tv["b.bias"], _expected(t["b.bias"], r["b.bias"], 1.0))
    for out in (keep, tv):  # w = 2 / (2 + 6) = 0.25 on a.weight
        torch.testing.assert_close(out["a.weight"], _expected(t["a.weight"], r["a.weight"], 0.25))


def test_tied_alias_present_in_checkpoint(tmp_path):
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True}
    emb_t, emb_r = torch.randn(6, 4), torch.randn(6, 4)
    td = _raw_dir(tmp_path / "t", {"model.embed_tokens.weight": emb_t, "lm_head.weight": emb_t.clone()}, config)
    rd = _raw_dir(tmp_path / "r", {"model.embed_tokens.weight": emb_r, "lm_head.weight": emb_r.clone()}, config)
    save_file({"model.embed_tokens.weight": torch.rand(6, 4)}, tmp_path / "s.safetensors")
    out = _state(merge_checkpoints(td, rd, tmp_path / "o", alpha=1.0, forget_importance=tmp_path / "s.safetensors",
                                   retain_importance=tmp_path / "s.safetensors", progress=False)[1.0])
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    bad = _raw_dir(tmp_path / "bad", {"model.embed_tokens.weight": emb_r, "lm_head.weight": emb_t}, config)
    with pytest.raises(MergeError, match="tied tensors 'lm_head.weight' and 'model.embed_tokens.weight' differ"):
        merge_checkpoints(td, bad, tmp_path / "o2", alpha=1.0, method="tv", progress=False)
    assert not (tmp_path / "o2").exists()


BAD_CASES = {
    "missing key": (lambda t, r: r.pop("b.bias"), r"keys differ.*'b\.bias'"),
    "shape": (lambda t, r: r.update({"a.weight": torch.randn(5, 7)}), r"'a\.weight' has shape \(5, 7\)"),
    "nan in reinforced": (lambda t, r: r["a.weight"].__setitem__((2, 3), float("nan")), r"/r: tensor 'a\.weight'.*NaN"),
    "inf in target": (lambda t, r: t["b.bias"].__setitem__(1, float("inf")), r"/t: tensor 'b\.bias'.*NaN or inf"),
    "int vs float": (lambda t, r: r.update({"c.index": torch.arange(4.0)}), r"'c\.index' has dtype F32"),
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_models_raise_and_leave_nothing(tmp_path, case):
    change, message = BAD_CASES[case]
    torch.manual_seed(3)
    t = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(5), "c.index": torch.arange(4)}
    r = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in t.items()}
    change(t, r)
    td, rd = _raw_dir(tmp_path / "t", t), _raw_dir(tmp_path / "r", r)
    before = set(os.listdir(tmp_path))
    with pytest.raises(MergeError, match=message):
        merge_checkpoints(td, rd, tmp_path / "out", alpha=[0.5, 1.0], method="tv", progress=False)
    _no_leftovers(tmp_path, before)


def test_bad_importance_and_configs_raise_and_leave_nothing(tmp_path):
    t, r, td, rd = _raw_pair(tmp_path)
    full = {n: torch.rand(v.shape) for n, v in t.items() if v.is_floating_point()}
    files = {
        "extra": ({**full, "z.weight": torch.rand(2)}, r"extra\.safetensors: importance for parameters not in the model: 'z\.weight'"),
        "shape": ({**full, "a.weight": torch.rand(5, 7)}, r"shape\.safetensors: importance 'a\.weight' has shape \(5, 7\)"),
        "negative": ({**full, "a.weight": -torch.rand(7, 5)}, r"negative\.safetensors: importance 'a\.weight' is negative"),
        "nan": ({**full, "b.bias": torch.full((5,), float("nan"))}, r"nan\.safetensors: importance 'b\.bias' is negative, NaN"),
    }
    save_file(full, tmp_path / "good.safetensors")
    # finite inputs whose merge overflows float32: θ_t − 2 (3e38 − θ_t) ≈ −6e38
    _, _, _, huge = _raw_pair(tmp_path / "huge", **{"a.weight": torch.full((7, 5), 3e38)})
    for name, (tensors, _) in files.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
    before = set(os.listdir(tmp_path))
    for name, (_, message) in files.items():
        with pytest.raises(MergeError, match=message):
            merge_checkpoints(td, rd, tmp_path / "out", alpha=1.0, forget_importance=tmp_path / f"{name}.safetensors",
                              retain_importance=tmp_path / "good.safetensors", progress=False)
        _no_leftovers(tmp_path, before)
    with pytest.raises(MergeError, match=r"merged tensor \(alpha=2\.0\) 'a\.weight' contains NaN or inf"):
        merge_checkpoints(td, huge, tmp_path / "out", alpha=2.0, method="tv", progress=False)
    _no_leftovers(tmp_path, before)
    (rd / "config.json").write_text(json.dumps({"architectures": ["Other"], "model_type": "toy"}))
    with pytest.raises(MergeError, match=r"r/config\.json: architectures \['Other'\] differs"):
        merge_checkpoints(td, rd, tmp_path / "out", alpha=1.0, method="tv", progress=False)
    _no_leftovers(tmp_path, before)


def test_existing_output_needs_overwrite(tmp_path):
    _, _, td, rd = _raw_pair(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(MergeError, match="output exists"):
        merge_checkpoints(td, rd, tmp_path / "out", method="tv", progress=False)
    assert (tmp_path / "out" / "old.txt").exists()
    merge_checkpoints(td, rd, tmp_path / "out", method="tv", overwrite=True, progress=False)
    assert not (tmp_path / "out" / "old.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out", "r", "t"]
    with pytest.raises(MergeError, match="must not be, or contain, an input"):
        merge_checkpoints(td, rd, td, method="tv", overwrite=True, progress=False)
    assert (td / "model.safetensors").exists()


def test_pickle_refused_unless_allowed(tmp_path):
    t, r, td, rd = _raw_pair(tmp_path)
    (rd / "model.safetensors").unlink()
    torch.save(r, rd / "pytorch_model.bin")
    before = set(os.listdir(tmp_path))
    done = subprocess.run([sys.executable, "-m", "perta_lightning", "merge", "--target", str(td), "--reinforced",
                           str(rd), "--method", "tv", "--alpha", "0.5", "--output", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode != 0 and "pytorch_model.bin: pickle checkpoint refused" in done.stderr
    _no_leftovers(tmp_path, before)
    out = _state(merge_checkpoints(td, rd, tmp_path / "o", alpha=0.5, method="tv", allow_pickle=True,
                                   progress=False)[0.5])
    torch.testing.assert_close(out["a.weight"], _expected(t["a.weight"], r["a.weight"], 0.5))


def test_progress_bar_on_stderr_and_truncated_file_named(tmp_path, capfd):
    _, _, td, rd = _raw_pair(tmp_path)
    merge_checkpoints(td, rd, tmp_path / "o", method="tv", progress=True)
    err = capfd.readouterr().err
    assert "perta merge" in err and "tensors 3/3" in err
    data = (rd / "model.safetensors").read_bytes()
    (rd / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(MergeError, match=r"r/model\.safetensors: tensor '.*' has inconsistent offsets or the file is truncated"):
        merge_checkpoints(td, rd, tmp_path / "o2", method="tv", progress=False)
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------- in-place fast path against the functional


def _perta_dirs(tmp_path: Path, dtype: torch.dtype, base: bool):
    torch.manual_seed(4)
    t = {k: torch.randn(shape).to(dtype) for k, shape in (("a.weight", (9, 6)), ("b.bias", (6,)), ("c.scale", ()))}
    r = {k: (v.double() + 0.1 * torch.randn(v.shape, dtype=torch.float64)).to(dtype) for k, v in t.items()}
    b = {k: (v.double() - 0.1 * torch.randn(v.shape, dtype=torch.float64)).to(dtype) for k, v in t.items()}
    s_f = {k: torch.rand(v.shape) for k, v in t.items()}
    s_r = {k: torch.rand(v.shape) for k, v in t.items()}
    s_f["a.weight"][0, :3] = 0  # w = 0 entries
    s_r["a.weight"][1, :3] = 0  # w close to 1 entries
    save_file(s_f, tmp_path / "sf.safetensors")
    save_file(s_r, tmp_path / "sr.safetensors")
    dirs = [_raw_dir(tmp_path / k, v) for k, v in (("t", t), ("r", r), ("b", b)) if base or k != "b"]
    return (t, r, b if base else None, s_f, s_r), dirs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("power,beta,eps",
                         [(1.0, 1.0, EPS), (2.0, 0.5, EPS), (1.0, 0.0, EPS), (1.0, 1.0, 0.0), (0.5, 3.0, 1e-3)])
@pytest.mark.parametrize("base", [False, True])
def test_fast_path_equals_functional_bit_for_bit(tmp_path, dtype, power, beta, eps, base):
    from perta_lightning.functional.task_vectors import unlearn
    from perta_lightning.functional.weights import perta_weights

    (t, r, b, s_f, s_r), dirs = _perta_dirs(tmp_path, dtype, base)
    alphas = [0.0, 0.7, -1.5]
    for method in ("perta", "tv"):
        imp = {}
        if method == "perta":
            imp = dict(forget_importance=tmp_path / "sf.safetensors",
                       retain_importance=tmp_path / "sr.safetensors", power=power, beta=beta, eps=eps)
        outs = merge_checkpoints(dirs[0], dirs[1], tmp_path / f"o_{method}", alpha=alphas, method=method,
                                 base=dirs[2] if base else None, chunk_numel=12, progress=False, **imp)
        for alpha, out in outs.items():
            merged = _state(out)
            for name in t:
                w = perta_weights(s_f[name], s_r[name], power, beta, eps) if method == "perta" else None
                expected = unlearn(t[name], r[name], alpha, base=None if b is None else b[name], weight=w)
                assert merged[name].dtype == dtype, (method, alpha, name)
                assert torch.equal(merged[name], expected), (method, alpha, name)


NON_FINITE = {  # each culprit sits where s_f = 0, so w = 0 there: only NaN propagation can reveal it
    "target": (lambda t, r, b, s_f, s_r: t["a.weight"].__setitem__((0, 1), float("inf")),
               r"/t: tensor 'a\.weight'"),
    "reinforced": (lambda t, r, b, s_f, s_r: r["a.weight"].__setitem__((0, 2), float("nan")),
                   r"/r: tensor 'a\.weight'"),
    "base": (lambda t, r, b, s_f, s_r: b["b.bias"].__setitem__(0, float("-inf")), r"/b: tensor 'b\.bias'"),
    "retain +inf": (lambda t, r, b, s_f, s_r: s_r["a.weight"].__setitem__((2, 2), float("inf")),
                    r"sr\.safetensors: importance 'a\.weight' is negative, NaN or inf"),
    "forget +inf": (lambda t, r, b, s_f, s_r: s_f["c.scale"].fill_(float("inf")),
                    r"sf\.safetensors: importance 'c\.scale' is negative, NaN or inf"),
    "task vector overflow": (lambda t, r, b, s_f, s_r: (r["a.weight"].__setitem__((3, 3), 3e38),
                                                        b["a.weight"].__setitem__((3, 3), -3e38)),
                             r"task vector 'a\.weight' contains NaN or inf \(float32 overflow\)"),
    "0/0 weight": (lambda t, r, b, s_f, s_r: s_r["a.weight"].__setitem__((0, 0), 0.0),
                   r"PerTA weight 'a\.weight' contains NaN"),
}


@pytest.mark.parametrize("case", NON_FINITE)
def test_non_finite_anywhere_raises_naming_the_key(tmp_path, case):
    torch.manual_seed(5)
    t = {"a.weight": torch.randn(7, 5), "b.bias": torch.randn(5), "c.scale": torch.randn(())}
    r, b = ({k: v + torch.randn(v.shape) for k, v in t.items()} for _ in range(2))
    s_f, s_r = ({k: torch.rand(v.shape) + 0.1 for k, v in t.items()} for _ in range(2))
    s_f["a.weight"][0] = 0
    s_f["b.bias"][0] = 0
    NON_FINITE[case][0](t, r, b, s_f, s_r)
    save_file(s_f, tmp_path / "sf.safetensors")
    save_file(s_r, tmp_path / "sr.safetensors")
    td, rd, bd = (_raw_dir(tmp_path / k, v) for k, v in (("t", t), ("r", r), ("b", b)))
    before = set(os.listdir(tmp_path))
    with pytest.raises(MergeError, match=NON_FINITE[case][1]):
        merge_checkpoints(td, rd, tmp_path / "out", alpha=[1.0, 0.5], base=bd, chunk_numel=10,
                          eps=0.0 if case == "0/0 weight" else EPS, progress=False,
                          forget_importance=tmp_path / "sf.safetensors",
                          retain_importance=tmp_path / "sr.safetensors")
    _no_leftovers(tmp_path, before)
