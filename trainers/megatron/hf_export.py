"""Write HF-named tensor buckets as a standard sharded HF directory that transformers and vLLM load."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

# Files copied from the source model so the export is a complete, loadable directory.
_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vime_model.json",
)


def write_hf_dir(buckets: Iterable[list[tuple[str, torch.Tensor]]], out_dir: str | Path, source_dir: str | Path) -> str:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    files = []
    total = 0
    for i, bucket in enumerate(buckets):
        fname = f"model-{i + 1:05d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in bucket}, str(out / fname), metadata={"format": "pt"})
        files.append(fname)
        for k, v in bucket:
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if len(files) == 1:  # a single shard keeps the plain name
        (out / files[0]).rename(out / "model.safetensors")
        weight_map = dict.fromkeys(weight_map, "model.safetensors")
    else:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
        )
    for name in _SIDE_FILES:
        src = Path(source_dir) / name
        if src.exists():
            shutil.copy(src, out / name)
    return str(out)
