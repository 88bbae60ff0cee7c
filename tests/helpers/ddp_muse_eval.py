"""Run the MUSE evaluator on 2 CPU processes (strategy="ddp", gloo). Usage: ddp_muse_eval.py DATA MODEL OUT.json.

Lightning's ddp launcher re-executes this script for rank 1, so it must be a standalone program."""

import sys

from perta_lightning.data.muse import MuseSource
from perta_lightning.muse_evaluate import evaluate_muse_model

if __name__ == "__main__":
    data, model, out = sys.argv[1:4]
    evaluate_muse_model(model, MuseSource(path=data), output_json=out, max_examples=5, batch_size=1,
                        verbmem_max_new_tokens=8, knowmem_max_new_tokens=4, accelerator="cpu", devices=2,
                        strategy="ddp")
