"""Export consolidated fp32 tokenizer weights + config from a stage-1 run into one file.

    python launch/export_tokenizer.py --run-dir runs/demo --out tokenizer.pt [--tag step_00001000]

The file loads without DeepSpeed: ``vitvq.models.tokenizer.Tokenizer.load_export("tokenizer.pt")``. The flags are
the fields of ``trainer.export.ExportConfig``; the job is ``trainer.export.export``.
"""

from __future__ import annotations

from pathlib import Path

from vitvq.configs.cli import ConfigParser
from vitvq.trainer.export import ExportConfig, export


def main(argv: list[str] | None = None) -> Path:
    parser = ConfigParser(ExportConfig, prog="launch/export_tokenizer.py", description=__doc__)
    path = Path(export(parser.config(argv))["path"])
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
