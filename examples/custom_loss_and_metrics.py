"""Your own loss and metrics, from a plain script: a label-smoothed cross-entropy that counts some classes
double (one loss per sample, with weights), torchmetrics' macro F1 and a plain function (top-2 accuracy), on
the real 8x8 handwritten digits that ship with scikit-learn.

    pip install 'rayscale[metrics]'          # torchmetrics
    python examples/custom_loss_and_metrics.py            # writes ./runs/examples/
    python examples/custom_loss_and_metrics.py --output-dir /tmp/digits --workers 2 --epochs 6
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassF1Score

import rayscale

LABEL_SMOOTHING = 0.1  # the target puts 0.9 + 0.1 / 10 on the true class and 0.1 / 10 on each other one
CLASS_WEIGHTS = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0])  # 3, 8 and 9 count double


def smoothed_weighted_cross_entropy(output: torch.Tensor, batch: dict[str, torch.Tensor]):
    """One loss per sample (never their mean) and one weight per sample. rayscale multiplies the weights by the
    row weights it knows (0 on padding rows), sums losses x weights over the micro-batches and workers of a step,
    and divides by the sum of the weights: every step is the weighted mean over its global batch, exactly."""
    labels = batch["y"]
    losses = F.cross_entropy(output, labels, reduction="none", label_smoothing=LABEL_SMOOTHING)
    return losses, CLASS_WEIGHTS.to(output.device)[labels]


def top2_hit(output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """1.0 where the label is among the two highest logits, per sample; rayscale averages it over the real rows
    of every worker's validation shard."""
    return (output.topk(2, dim=-1).indices == batch["y"][:, None]).any(dim=-1).float()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/examples"),
                        help="the run directory custom_loss_and_metrics/ is written under here")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: local mode, no Ray workers)")
    args = parser.parse_args(argv)

    config = {
        "data": {"source": "digits"},  # 1797 images of 8x8 pixels, 10 classes; 20% held out for validation
        "model": {"name": "mlp"},  # the built-in MLP, sized by the data
        "batch": {"global_batch_size": 128},
        "scaling": {"num_workers": args.workers},
        "train": {"epochs": args.epochs},
        "run": {"output_dir": str(args.output_dir.resolve()), "name": "custom_loss_and_metrics",
                "progress": "lines"},
    }
    result = rayscale.train(
        config,
        loss=smoothed_weighted_cross_entropy,
        # Each logged at every validation as val_<name>. A torchmetrics object is updated with the predictions
        # of the real rows of every worker and gathered across them by its own compute().
        metrics={"f1": MulticlassF1Score(num_classes=10, average="macro"), "top2": top2_hit},
    )

    print(f"run directory: {result.run_dir}")
    for name in ("val_loss", "val_accuracy", "val_f1", "val_top2"):
        print(f"{name}: {result.final[name]:.4f}")


if __name__ == "__main__":
    main()
