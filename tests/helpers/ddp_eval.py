"""Run the evaluator on 2 CPU processes (strategy="ddp", gloo). Usage: ddp_eval.py DATA MODEL OUT.json.

Lightning's ddp launcher re-executes this script for rank 1, so it must be a standalone program."""

import sys

from perta_lightning.data.tofu import TofuSource
from perta_lightning.evaluate import evaluate_model

if __name__ == "__main__":
    data, model, out = sys.argv[1:4]
    evaluate_model(model, TofuSource(path=data), output_json=out, max_examples=5, batch_size=1, max_new_tokens=8,
                   accelerator="cpu", devices=2, strategy="ddp")
