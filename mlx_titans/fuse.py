"""Fuse memory adapters into a standalone TitansQwen folder (as mlx_lm.fuse does for LoRA).

    python -m mlx_titans.fuse --model qwen-titans --adapter-path adapters --save-path qwen-titans-fused

The trained memory goes into the folder's titans_memory.safetensors and LoRA (if any) is merged into the base's
linears; the folder loads with `mlx_titans.qwen.load` alone, and in stock mlx-lm as the plain Qwen (LoRA merged).
Written to a temporary folder renamed into place: nothing is left on an error; an existing --save-path is refused.
"""

import argparse
import sys
from pathlib import Path

from .files import command_name, run_reporting_errors
from .qwen import load
from .qwen.adapters import fuse_lora
from .qwen.convert import save_folder


def fuse(model_path, adapter_path, save_path) -> None:
    out = Path(save_path)
    if out.exists():
        raise ValueError(f"{out} already exists; give a new --save-path")
    model, tokenizer, config = load(model_path, adapter_path=adapter_path)
    fuse_lora(model)
    save_folder(out, Path(model_path), model, tokenizer, config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=command_name("mlx_titans.fuse"), description="Fuse memory adapters into a standalone TitansQwen folder."
    )
    parser.add_argument("--model", required=True, help="the TitansQwen folder the adapters were trained on")
    parser.add_argument(
        "--adapter-path",
        default="adapters",
        help="the adapters folder (mlx_titans.adapt's output) (default: %(default)s)",
    )
    parser.add_argument(
        "--save-path", default="fused_model", help="output folder, must not exist (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    code = run_reporting_errors(lambda: fuse(args.model, args.adapter_path, args.save_path))
    if code == 0:
        print(f"wrote {args.save_path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
