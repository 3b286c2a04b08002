"""Tokenize + detokenize throughput vs a plain flatten-and-concatenate of the same tensors, in one run.

python benchmarks/tokenizer.py            # ViT-S/16 (22M parameters) and the whole bundled zoo
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from vitzoo.tokenizer import TokenSpec, detokenize, tokenize, tokenize_batch
from vitzoo.zoo_builder import Zoo


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def report(label: str, megabytes: float, copy: float, tok: float, detok: float) -> None:
    print(f"{label}: {megabytes:.1f} MB")
    print(f"  flatten+cat baseline : {megabytes / copy:8.0f} MB/s")
    print(f"  tokenize             : {megabytes / tok:8.0f} MB/s   ({tok / copy:.2f}x the baseline's time)")
    print(f"  detokenize           : {megabytes / detok:8.0f} MB/s   ({detok / copy:.2f}x the baseline's time)")


def sane_layout(state_dict: dict[str, torch.Tensor], width: int) -> tuple[int, int]:
    """(tokens, real values) of SANE's scheme, for comparison: every tensor whose name holds "weight" becomes
    [out, -1] with its bias appended as a column, rows cut into `width` tokens; other tensors (cls_token,
    pos_embed) are dropped. LayerNorms become one 2-value token per channel."""
    tokens = values = 0
    for key, tensor in state_dict.items():
        if "weight" not in key:
            continue
        rows = tensor.shape[0]
        row_length = tensor.numel() // rows + (1 if key.replace("weight", "bias") in state_dict else 0)
        tokens += rows * -(-row_length // width)
        values += rows * row_length
    return tokens, values


def padding_report(label: str, state_dict: dict[str, torch.Tensor], spec: TokenSpec) -> None:
    total = sum(v.numel() for v in state_dict.values())
    ours = 1 - total / (spec.num_tokens * spec.width)
    sane_tokens, sane_values = sane_layout(state_dict, spec.width)
    sane = 1 - sane_values / (sane_tokens * spec.width)
    print(
        f"{label}, width {spec.width}: ours {spec.num_tokens} tokens, {ours:.1%} padding, every tensor kept; "
        f"SANE's scheme {sane_tokens} tokens, {sane:.1%} padding, {total - sane_values} values dropped"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=288)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    state_dict = timm.create_model("vit_small_patch16_224", pretrained=False).state_dict()
    spec = TokenSpec.from_state_dict(state_dict, width=args.width)
    megabytes = sum(v.numel() * 4 for v in state_dict.values()) / 1e6
    values = tokenize(state_dict, spec).values
    report(
        f"vit_small_patch16_224, width {args.width}",
        megabytes,
        best_of(args.repeats, lambda: torch.cat([v.reshape(-1) for v in state_dict.values()])),
        best_of(args.repeats, lambda: tokenize(state_dict, spec)),
        best_of(args.repeats, lambda: detokenize(values, spec)),
    )

    padding_report("vit_small_patch16_224", state_dict, spec)

    zoo = Zoo.open("bundled")
    state_dicts = [e.state_dict() for e in zoo.filter(stage="finetune", head="linear")]
    spec = TokenSpec.from_state_dict(state_dicts[0], width=16, num_heads=zoo.architecture.num_heads)
    megabytes = sum(v.numel() * 4 for sd in state_dicts for v in sd.values()) / 1e6
    values = tokenize_batch(state_dicts, spec).values
    for width in (16, 25, 32):
        padding_report("bundled ViT", state_dicts[0], TokenSpec.from_state_dict(state_dicts[0], width, num_heads=2))
    report(
        f"bundled zoo, {len(state_dicts)} linear-head checkpoints, width 16, batched",
        megabytes,
        best_of(args.repeats, lambda: torch.cat([v.reshape(-1) for sd in state_dicts for v in sd.values()])),
        best_of(args.repeats, lambda: tokenize_batch(state_dicts, spec)),
        best_of(args.repeats, lambda: detokenize(values, spec)),
    )


if __name__ == "__main__":
    main()
