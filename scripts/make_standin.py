"""Write a local stand-in for a paper model (selfcorrect.standin): a Hugging Face model
directory with a Qwen2- or Llama-architecture causal LM (~2M parameters, random weights) and a
byte-level BPE tokenizer trained here on the tasks' traces, with a chat template. Nothing is
downloaded. Use it to run a paper preset end to end on a laptop before a cluster run:

    .venv/bin/python scripts/make_standin.py --arch qwen2 --out runs/standin-qwen2
    .venv/bin/python -m rayjobs.pipeline --config configs/paper-multiplication.yaml \\
        --output-dir runs/paper-toy $(.venv/bin/python scripts/make_standin.py --print-toy \\
        --out runs/standin-qwen2)
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selfcorrect.standin import ARCHS, make_standin, toy_overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen2")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--print-toy",
        action="store_true",
        help="print the overrides that run a paper preset at toy size on --out (writes nothing)",
    )
    args = ap.parse_args()
    if args.print_toy:
        print(" ".join(toy_overrides(os.path.abspath(args.out))))
        return
    out = make_standin(args.out, args.arch, seed=args.seed)
    print(f"stand-in ({args.arch}) written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
