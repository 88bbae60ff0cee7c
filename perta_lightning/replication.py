"""Moved: the replication table is rewritten by ``perta replication STUDY_DIR`` (``perta_lightning.study.replication``).

``python -m perta_lightning.replication`` is refused in one line naming the command that replaced it."""

if __name__ == "__main__":
    import sys

    print("perta replication: error: python -m perta_lightning.replication has moved: run perta replication "
          "STUDY_DIR (or python -m perta_lightning.study.replication STUDY_DIR)", file=sys.stderr)
    raise SystemExit(2)
