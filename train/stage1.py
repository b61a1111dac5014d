"""``python -m train.stage1 -m reduce56``: train a ReduceNet teacher (or, with --expansion 0, a scratch student).

Defaults follow the ReduceNet CIFAR recipe: SGD, momentum 0.9, Nesterov, lr 0.1, weight decay 1e-4,
batch 128, cosine schedule over 200 epochs. ``--expansion 0`` trains the student from scratch: the honest
baseline for stage 2, to be trained for stage1 + stage2 epochs.
"""
from __future__ import annotations

from models import create_model
from models.errors import cli_errors

from .cli import common_parser, data_metadata, finish, load_data, make_run_dir, setup, size_line, train_config
from .distill import DistillLoss
from .engine import Trainer


def build_parser():
    p = common_parser("python -m train.stage1", __doc__, epochs=200, lr=0.1, warmup="0")
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", default="reduce56", help="registered model (python -m models lists them)")
    m.add_argument("--expansion", type=int, default=1, help="branch (b) width factor; 0 trains the student")
    m.add_argument("--width", type=float, default=1, help="channel multiplier (ReduceNet: 1, 2, 4)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    args.dataset = args.dataset or "cifar10"
    info, device = setup(args)
    role = "teacher" if args.expansion else "scratch"
    data = load_data(args, info, device)  # before the run directory: bad data must leave --out untouched
    run_dir = make_run_dir(args, info, f"{args.model}-{role}-e{args.expansion}-w{args.width:g}-s{args.seed}")
    model = create_model(args.model, num_classes=data.info.num_classes, width=args.width, expansion=args.expansion)
    metadata = {"stage": 1, "role": role, **data_metadata(data, args.data_dir)}
    trainer = Trainer(model, data, train_config(args, 0.0, stage=1), run_dir, DistillLoss("none"),
                      dist_info=info, device=device, metadata=metadata)
    if args.resume:
        trainer.resume()
    summary = trainer.fit()
    if info.is_main:
        print(size_line(f"{role} {args.model} (e{args.expansion})",
                        {"params": summary["params"], "macs": summary["macs"]}, summary["last_test_acc"]))
        print(f"data: {data.info.label}; best {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
              f"run: {run_dir}")
    finish(info)
    return summary


if __name__ == "__main__":
    main()
