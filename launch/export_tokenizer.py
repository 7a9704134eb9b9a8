"""Export consolidated fp32 tokenizer weights + config from a stage-1 run into one file.

    python launch/export_tokenizer.py --run-dir runs/demo --out tokenizer.pt [--tag step_00001000]

The file loads without DeepSpeed: ``vitvq.models.tokenizer.Tokenizer.load_export("tokenizer.pt")``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitvq.trainer.export import export_checkpoint


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="train.out_dir of the run")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--tag", default=None, help="checkpoint folder name (default: latest complete)")
    args = p.parse_args(argv)
    path = export_checkpoint(args.run_dir, args.out, args.tag)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
