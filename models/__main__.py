"""``python -m models``: print the zoo with params and MACs of teacher, student and fused student."""
from __future__ import annotations

import argparse

from . import complexity, create_model, list_models
from .errors import ConfigError, cli_errors


def zoo_table(num_classes: int = 10, expansion: int = 1, lora_rank: int = 8) -> str:
    """A markdown table of every registered model at 32x32 input.

    Raises:
        ConfigError: ``expansion`` < 1 (a teacher has branch (b)), or another value its models refuse.
    """
    if isinstance(expansion, bool) or not isinstance(expansion, int) or expansion < 1:
        raise ConfigError(f"--expansion {expansion!r} is the teacher's branch (b) width factor: pass 1 or more "
                          "(the student columns show expansion 0)")
    rows = ["| model | teacher params | teacher MACs | student params | student MACs "
            "| student+LoRA params | fused params | fused MACs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in list_models(reducible=True):
        lora = create_model(name, num_classes=num_classes, expansion=0, lora_rank=lora_rank)  # first: a bad rank stops
        teacher = complexity(create_model(name, num_classes=num_classes, expansion=expansion))
        student = complexity(create_model(name, num_classes=num_classes, expansion=0))
        fused = complexity(create_model(name, num_classes=num_classes, expansion=0, inference_mode=True))
        rows.append(f"| {name} | {teacher['params']:,} | {teacher['macs'] / 1e6:.1f}M | {student['params']:,} "
                    f"| {student['macs'] / 1e6:.1f}M | {complexity(lora)['params']:,} | {fused['params']:,} "
                    f"| {fused['macs'] / 1e6:.1f}M |")
    return "\n".join(rows)


@cli_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--expansion", type=int, default=1, help="teacher's branch (b) width factor")
    p.add_argument("--lora-rank", type=int, default=8)
    args = p.parse_args(argv)
    table = zoo_table(args.num_classes, args.expansion, args.lora_rank)  # bad values stop before the heading
    print(f"Zoo at 32x32 input, {args.num_classes} classes, teacher expansion {args.expansion}, "
          f"LoRA rank {args.lora_rank}; MACs counted with torch.utils.flop_counter.")
    print(table)
    print("\nOther zoo models (no teacher branch; `python -m train.pyramid` builds their chains):")
    print("| model | params | MACs |\n|---|---:|---:|")
    for name in list_models(reducible=False):
        size = complexity(create_model(name, num_classes=args.num_classes))
        print(f"| {name} | {size['params']:,} | {size['macs'] / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
