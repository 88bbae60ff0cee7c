"""Benchmark the streaming PerTA merge against the I/O floor and a naive in-memory merge.

    PYTHONPATH=. python bench/bench_merge.py --params 1.1e9 --repeats 3 --dir /tmp/perta_bench

Creates a synthetic bf16 Llama-like checkpoint (TinyLlama-1.1B shapes, layers scaled to
``--params``) sharded like a real one: target, reinforced and float32 forget / retain importance
(sharded, with an index). Then runs, each in its own subprocess, interleaved per repeat:

* ``floor``  read every byte of every tensor of the four inputs, 2 MiB at a time, into one
             reused buffer (plain positioned reads from the page cache, no compute) and write
             the target's tensors as the output shards (same writer), nothing else;
* ``floor_mmap`` the floor as first defined: ``safe_open(...).get_tensor`` of the four inputs and
             the same writes. ``get_tensor`` maps the file without copying, so only the target's
             bytes are ever touched (by the writer): it skips reading ~5/6 of the input and is
             kept only to compare with earlier figures;
* ``stream`` :func:`perta_lightning.merge.merge_checkpoints` with ``method="perta"``;
* ``stream_base`` the same call to the code in ``--baseline_src`` (e.g. an export of main), to
             time a change side by side;
* ``naive``  load all four inputs into dicts, compute per tensor, ``save_file`` each shard
             (one intra-op thread, like the streaming merge);
* ``stream_bf16imp`` ``stream`` with the importances stored in bf16 (8 bytes read per parameter);
* ``stream_weighted`` ``method="weighted"`` from ``θ_t`` and the float32 ``v = w ⊙ τ`` written once
             (untimed) by ``save_weighted_task_vector`` (6 bytes read per parameter).

The table gives the bytes of input files each mode reads per parameter.

Before every timed run all input files are read once, so every run starts with warm page cache.

Wall time and peak RSS (``VmHWM``, which counts touched pages of memory-mapped files too) are
measured inside the child. The data directory is deleted at the end unless ``--keep``;
``--reuse`` times an existing one instead of generating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000
FLOOR_CHUNK_BYTES = 2 << 20  # the floor reads in 2 MiB pieces into one reused buffer


def layer_shapes(i: int) -> dict[str, tuple[int, ...]]:
    p = f"model.layers.{i}."
    return {p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,)}


def model_shapes(params: float) -> dict[str, tuple[int, ...]]:
    per_layer = sum(math.prod(s) for s in layer_shapes(0).values())
    layers = max(1, round((params - 2 * VOCAB * HIDDEN) / per_layer))
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(layer_shapes(i))
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def write_checkpoint(directory: Path, shapes, dtype, make, shard_bytes: int, prefix: str = "model") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * torch.tensor([], dtype=dtype).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: make(shapes[n]).to(dtype) for n in names}, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
    (directory / f"{prefix}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def generate(root: Path, params: float, shard_bytes: int) -> int:
    shapes = model_shapes(params)
    torch.manual_seed(0)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_hidden_layers": len(shapes) // 9, "vocab_size": VOCAB,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    for name in ("target", "reinforced"):
        write_checkpoint(root / name, shapes, torch.bfloat16, lambda s: torch.randn(s) * 0.02, shard_bytes)
        (root / name / "config.json").write_text(json.dumps(config))
    for name in ("forget", "retain"):
        write_checkpoint(root / name, shapes, torch.float32, lambda s: torch.rand(s) * 1e-6, shard_bytes, name)
    return sum(math.prod(s) for s in shapes.values())


def sources(root: Path) -> list[Path]:
    return [root / "target/model.safetensors.index.json", root / "reinforced/model.safetensors.index.json",
            root / "forget/forget.safetensors.index.json", root / "retain/retain.safetensors.index.json"]


def weight_map(index: Path) -> dict[str, Path]:
    return {n: index.parent / f for n, f in json.loads(index.read_text())["weight_map"].items()}


def run_floor(root: Path, out: Path, shard_bytes: int) -> None:
    import os

    from perta_lightning.checkpoints import (
        StreamingSafetensorsWriter,
        TensorSource,
        plan_shards,
        shard_file_names,
    )

    srcs = [TensorSource.from_path(i) for i in sources(root)]
    target = srcs[0]
    buffer = torch.empty(FLOOR_CHUNK_BYTES, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    files = {}
    shards = plan_shards([(n, i.nbytes) for n, i in target.infos.items()], shard_bytes)
    out.mkdir()
    for shard, file in zip(shards, shard_file_names(len(shards))):
        writer = StreamingSafetensorsWriter(out / file, {n: (target.infos[n].dtype, target.infos[n].shape)
                                                         for n in shard}, {"format": "pt"})
        for name in shard:
            for src in reversed(srcs):  # the target last: its chunks are written from the buffer
                info = src.infos[name]
                if info.file not in files:
                    files[info.file] = os.open(info.file, os.O_RDONLY)
                for begin in range(0, info.nbytes, FLOOR_CHUNK_BYTES):
                    size = min(FLOOR_CHUNK_BYTES, info.nbytes - begin)
                    done = 0
                    while done < size:
                        done += os.preadv(files[info.file], [view[done:size]], info.offset + begin + done)
                    if src is target:
                        writer.write(name, buffer[:size])
        writer.close()
    for fd in files.values():
        os.close(fd)


def run_floor_mmap(root: Path, out: Path, shard_bytes: int) -> None:
    from perta_lightning.checkpoints import (
        StreamingSafetensorsWriter,
        TensorSource,
        plan_shards,
        shard_file_names,
    )

    maps = [weight_map(i) for i in sources(root)]
    handles = {}
    target = TensorSource.from_path(sources(root)[0])
    shards = plan_shards([(n, i.nbytes) for n, i in target.infos.items()], shard_bytes)
    out.mkdir()
    for shard, file in zip(shards, shard_file_names(len(shards))):
        writer = StreamingSafetensorsWriter(out / file, {n: (target.infos[n].dtype, target.infos[n].shape)
                                                         for n in shard}, {"format": "pt"})
        for name in shard:
            tensors = []
            for m in maps:
                if m[name] not in handles:
                    handles[m[name]] = safe_open(str(m[name]), framework="pt")
                tensors.append(handles[m[name]].get_tensor(name))
            writer.write(name, tensors[0])
            del tensors
        writer.close()


def run_stream(root: Path, out: Path, shard_bytes: int) -> None:
    from perta_lightning.merge import merge_checkpoints

    merge_checkpoints(root / "target", root / "reinforced", out, alpha=1.0, method="perta",
                      forget_importance=sources(root)[2], retain_importance=sources(root)[3],
                      max_shard_size=shard_bytes, progress=False)


def run_stream_bf16imp(root: Path, out: Path, shard_bytes: int) -> None:
    from perta_lightning.merge import merge_checkpoints

    merge_checkpoints(root / "target", root / "reinforced", out, alpha=1.0, method="perta",
                      forget_importance=root / "forget_bf16/forget.safetensors.index.json",
                      retain_importance=root / "retain_bf16/retain.safetensors.index.json",
                      max_shard_size=shard_bytes, progress=False)


def run_stream_weighted(root: Path, out: Path, shard_bytes: int) -> None:
    from perta_lightning.merge import merge_checkpoints

    merge_checkpoints(root / "target", None, out, alpha=1.0, method="weighted", task_vector=root / "weighted",
                      max_shard_size=shard_bytes, progress=False)


def prepare(mode: str, root: Path, shard_bytes: int) -> None:
    """Untimed inputs of a mode: bf16 copies of the importances, or the weighted task vector."""
    from perta_lightning.checkpoints import write_safetensors_sharded
    from perta_lightning.merge import merge_checkpoints

    if mode == "stream_bf16imp":
        for name in ("forget", "retain"):
            if not (root / f"{name}_bf16").exists():
                tensors = {}
                for file in sorted(set(weight_map(root / name / f"{name}.safetensors.index.json").values())):
                    tensors.update({n: v.bfloat16() for n, v in load_file(file).items()})
                write_safetensors_sharded(iter(tensors.items()), root / f"{name}_bf16", name, {"format": "pt"},
                                          shard_bytes // 2)
    if mode == "stream_weighted" and not (root / "weighted").exists():
        merge_checkpoints(root / "target", root / "reinforced", root / "prepare_out", alpha=1.0, method="perta",
                          forget_importance=sources(root)[2], retain_importance=sources(root)[3],
                          max_shard_size=shard_bytes, progress=False, save_weighted_task_vector=root / "weighted")
        shutil.rmtree(root / "prepare_out")


def bytes_read(mode: str, root: Path) -> int:
    """Bytes of the input files that ``mode`` reads."""
    folders = {"stream_weighted": ["target", "weighted"],
               "stream_bf16imp": ["target", "reinforced", "forget_bf16", "retain_bf16"]}
    return sum(f.stat().st_size for d in folders.get(mode, ["target", "reinforced", "forget", "retain"])
               for f in (root / d).glob("*.safetensors"))


def run_naive(root: Path, out: Path, shard_bytes: int) -> None:
    torch.set_num_threads(1)  # same intra-op threads as the streaming merge, so only the strategy differs
    from perta_lightning.checkpoints import plan_shards, shard_file_names
    from perta_lightning.functional.task_vectors import unlearn
    from perta_lightning.functional.weights import perta_weights

    t, r, f, s = ({} for _ in range(4))
    for d, index in zip((t, r, f, s), sources(root)):
        for file in sorted(set(weight_map(index).values())):
            d.update(load_file(file))
    merged = {n: unlearn(t[n], r[n], 1.0, weight=perta_weights(f[n], s[n])) for n in t}
    shards = plan_shards([(n, v.numel() * v.element_size()) for n, v in merged.items()], shard_bytes)
    out.mkdir()
    for shard, file in zip(shards, shard_file_names(len(shards))):
        save_file({n: merged[n] for n in shard}, out / file, metadata={"format": "pt"})


def child(mode: str, root: Path, shard_bytes: int) -> None:
    out = root / f"out_{mode}"
    start = time.perf_counter()
    runs = {"floor": run_floor, "floor_mmap": run_floor_mmap, "stream": run_stream, "stream_base": run_stream,
            "naive": run_naive, "stream_bf16imp": run_stream_bf16imp, "stream_weighted": run_stream_weighted}
    runs[mode](root, out, shard_bytes)
    wall = time.perf_counter() - start
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(json.dumps({"wall": wall, "hwm_kib": int(status["VmHWM"].split()[0])}))


def warm_cache(root: Path) -> None:
    """Read every input file once so each timed run starts with the inputs in the page cache."""
    for file in sorted(root.glob("*/*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def measure(mode: str, root: Path, shard_bytes: int, baseline_src: Path | None = None) -> tuple[float, float]:
    shutil.rmtree(root / f"out_{mode}", ignore_errors=True)
    warm_cache(root)
    env = None
    if mode == "stream_base":
        if baseline_src is None:
            raise SystemExit("mode stream_base needs --baseline_src")
        env = {**os.environ, "PYTHONPATH": str(baseline_src)}
    done = subprocess.run([sys.executable, __file__, "--child", mode, "--dir", str(root),
                           "--shard_bytes", str(shard_bytes)], stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed with status {done.returncode}")
    shutil.rmtree(root / f"out_{mode}", ignore_errors=True)
    # Peak RSS is the child's own VmHWM: ru_maxrss from wait4 would include the parent's peak
    # (generation) inherited across fork + exec.
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["wall"], result["hwm_kib"] / 2**20  # GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1.1e9, help="model size in parameters")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/perta_bench"))
    parser.add_argument("--shard_bytes", type=int, default=5 * 10**9)
    parser.add_argument("--modes", default="floor,stream,naive")
    parser.add_argument("--baseline_src", type=Path, help="package root timed by mode stream_base")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    parser.add_argument("--reuse", action="store_true", help="time checkpoints already in --dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.shard_bytes)
        return
    if args.dir.exists() and not args.reuse:
        raise SystemExit(f"{args.dir} exists; remove it, pick another --dir or pass --reuse")
    try:
        start = time.perf_counter()
        if args.reuse:
            n = sum(math.prod(s) for s in model_shapes(args.params).values())
        else:
            n = generate(args.dir, args.params, args.shard_bytes)
        model_gib = 2 * n / 2**30
        how = "reused" if args.reuse else f"generated in {time.perf_counter() - start:.0f} s"
        print(f"{n / 1e9:.2f}B params ({model_gib:.2f} GiB bf16), {how}", flush=True)
        results = {m: [] for m in args.modes.split(",")}
        for mode in results:
            prepare(mode, args.dir, args.shard_bytes)
        for repeat in range(args.repeats):
            for mode in results:
                wall, rss = measure(mode, args.dir, args.shard_bytes, args.baseline_src)
                results[mode].append((wall, rss))
                print(f"repeat {repeat} {mode:6s} wall {wall:7.1f} s  peak RSS {rss:6.2f} GiB", flush=True)
        floor = statistics.median(w for w, _ in results["floor"]) if "floor" in results else float("nan")
        print(f"\nload average at the end: {os.getloadavg()}")
        print("\n| run | bytes read / param | walls (s) | median wall (s) | x I/O floor | peak RSS (GiB) | RSS / model |")
        print("|---|---|---|---|---|---|---|")
        for mode, runs in results.items():
            wall = statistics.median(w for w, _ in runs)
            rss = max(r for _, r in runs)
            walls = ", ".join(f"{w:.1f}" for w, _ in runs)
            per_param = bytes_read(mode, args.dir) / n
            print(f"| {mode} | {per_param:.2f} | {walls} | {wall:.1f} | {wall / floor:.2f} | {rss:.2f} "
                  f"| {rss / model_gib:.1%} |")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
