"""Load a DiffusionGemma with transformers, switch it to dgplug's kernels, generate with a live draft.

    python examples/transformers_generate.py [CHECKPOINT_DIR] [--fused]

Without a checkpoint argument it uses dgplug's embedded default model. On a terminal,
`TextDiffusionStreamer` prints the argmax draft after every denoising step (transformers' own
streamer class, which redraws with escape codes); into a pipe or a file, `TextStreamer` prints each
committed canvas once.
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    DiffusionGemmaForBlockDiffusion,
    TextDiffusionStreamer,
    TextStreamer,
)

import dgplug  # noqa: E402  (registers dgplug's formats with transformers)
from dgplug.assets import default_model_path  # noqa: E402


PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def default_prompt(tok) -> str:
    """The embedded Sudoku model's prompt format (one token per cell; its tokenizer adds <bos>) for a
    classic puzzle; for any other checkpoint, a few of its tokens."""
    if tok.convert_tokens_to_ids("r1c1=5") != tok.unk_token_id:
        return " ".join(f"r{i // 9 + 1}c{i % 9 + 1}={ch}" for i, ch in enumerate(PUZZLE))
    return tok.decode(list(range(5, 12)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", default=None)
    ap.add_argument("--prompt", default=None)
    ap.add_argument("--fused", action="store_true", help="also use dgplug's streaming head + sampler")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    path = args.checkpoint or str(default_model_path())
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    dgplug.patch(model, sampler="fused" if args.fused else "transformers")
    prompt = args.prompt or default_prompt(tok)
    ids = tok(prompt, return_tensors="pt").input_ids
    streamer = TextDiffusionStreamer(tokenizer=tok) if sys.stdout.isatty() else TextStreamer(tok)
    torch.manual_seed(0)
    kw = {"max_denoising_steps": args.steps} if args.steps else {}
    out = model.generate(ids, streamer=streamer, **kw)
    print("\ntokens per forward:", out.tokens_per_forward.tolist())


if __name__ == "__main__":
    main()
