"""A Hugging Face causal language model, built from a small config (nothing downloaded), trained by rayscale on
token sequences in Parquet, with the unpredictable tokens masked by -100.

    pip install 'rayscale[examples]'          # transformers
    python examples/hf_causal_lm.py            # writes ./runs/examples/
    python examples/hf_causal_lm.py --output-dir /tmp/lm --workers 0 --epochs 3   # local mode, smaller

The language: every sequence is a prompt, BOS and a token naming a step of 1, 2 or 3, then symbols counting
around a ring of 12 from a random start by that step (`BOS, +2, 5, 7, 9, 11, 1, 3`). The labels are the next
tokens, with -100 (masked) where nobody could predict them: the step and the start that follow BOS and the
step token, and after the last token. rayscale counts a masked token in neither the loss, its normaliser nor
the accuracy, so val_accuracy can reach 1.0 and val_loss 0.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import rayscale

BOS = 0  # the first token of every sequence
SYMBOLS = 12  # tokens 1..12: the ring the sequences count around
STEPS = (1, 2, 3)  # tokens 13, 14, 15 name them: the second token of every sequence
IGNORE_INDEX = -100  # PyTorch's and Hugging Face's "not a label": rayscale masks it too


def sequence(step: int, start: int, length: int) -> list[int]:
    """`length` tokens: BOS, the step's token, then symbols counting around the ring from `start` by `step`."""
    step_token = 1 + SYMBOLS + STEPS.index(step)
    return [BOS, step_token] + [1 + (start + k * step) % SYMBOLS for k in range(length - 2)]


def next_token_labels(tokens: list[int]) -> list[int]:
    """The label at position i is token i + 1. The prompt's (BOS -> the step, the step -> the first symbol)
    are random, so they are masked with -100, and so is the last token's, which has no next token."""
    labels = tokens[1:] + [IGNORE_INDEX]
    labels[0] = labels[1] = IGNORE_INDEX
    return labels


def write_sequences(path: Path, rows: int, max_length: int, seed: int) -> Path:
    """`rows` sequences of 5..max_length tokens as Parquet: `tokens` and `labels`, each a list<int64> per row."""
    rng = np.random.default_rng(seed)
    tokens = [sequence(int(rng.choice(STEPS)), int(rng.integers(SYMBOLS)), int(rng.integers(5, max_length + 1)))
              for _ in range(rows)]
    table = pa.table({"tokens": pa.array(tokens, pa.list_(pa.int64())),
                      "labels": pa.array([next_token_labels(t) for t in tokens], pa.list_(pa.int64()))})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def build_causal_lm(vocab_size: int, max_length: int, n_layer: int = 2, n_embd: int = 64, n_head: int = 4):
    """rayscale calls this on every worker with the sizes it read from the data: vocab_size (the largest token
    + 1) and max_length (the longest sequence). Hugging Face's GPT-2, from a config: nothing is downloaded.
    The output layer is the vocabulary (GPT-2 ties it to the token embedding), not num_classes: that would be
    the largest label + 1, 13 here, since the step tokens are only ever masked labels.

    rayscale pads each micro-batch's sequences at the end and calls `model(tokens, attention_mask=mask)` (it
    passes the mask by name because GPT2LMHeadModel.forward names `attention_mask`). Padding only at the end is
    harmless for a causal LM anyway: a real token attends only to the tokens before it, never to the padding
    after it, and its position ids are 0, 1, 2, ... either way. rayscale reads the returned CausalLMOutput's
    `.logits` and computes the loss itself, so no `labels` go into the model (the Parquet labels are already
    the next tokens: nothing is shifted)."""
    config = GPT2Config(vocab_size=vocab_size, n_positions=max_length, n_layer=n_layer, n_embd=n_embd,
                        n_head=n_head, bos_token_id=BOS, eos_token_id=BOS,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: a short, noiseless run
    return GPT2LMHeadModel(config)


@torch.no_grad()
def loss_by_hand(model, path: Path) -> tuple[float, float, int]:
    """(mean loss, accuracy, tokens) over the unmasked labels of a Parquet file, one sequence at a time: what
    rayscale's val_loss and val_accuracy should be."""
    table = pq.read_table(path)
    loss_sum, hits, count = 0.0, 0, 0
    for tokens, labels in zip(table["tokens"].to_pylist(), table["labels"].to_pylist(), strict=True):
        logits = model(input_ids=torch.tensor([tokens])).logits[0]
        target = torch.tensor(labels)
        loss_sum += F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum").item()
        real = target != IGNORE_INDEX
        hits += int((logits.argmax(-1)[real] == target[real]).sum())
        count += int(real.sum())
    return loss_sum / count, hits / count, count


@torch.no_grad()
def greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The prompt continued by the model's most likely next token, `new_tokens` times."""
    tokens = torch.tensor([prompt])
    for _ in range(new_tokens):
        next_token = model(input_ids=tokens).logits[0, -1].argmax()
        tokens = torch.cat([tokens, next_token.view(1, 1)], dim=1)
    return tokens[0].tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/examples"),
                        help="everything is written under here: data/ and the run directory hf_causal_lm/")
    parser.add_argument("--rows", type=int, default=2000, help="training sequences (validation: a quarter)")
    parser.add_argument("--max-length", type=int, default=16, help="longest sequence, in tokens")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: local mode, no Ray workers)")
    args = parser.parse_args(argv)

    output_dir = args.output_dir.resolve()
    train_path = write_sequences(output_dir / "data" / "train.parquet", args.rows, args.max_length, seed=0)
    val_path = write_sequences(output_dir / "data" / "val.parquet", max(args.rows // 4, 1), args.max_length, seed=1)

    config = {
        "seed": 0,
        "data": {
            "source": str(train_path),
            "val_source": str(val_path),  # a file of its own, so the loss can be checked by hand below
            "sequence": "tokens",  # list<int> token ids
            "label": "labels",  # one label per token: the next token, or -100 (masked)
        },
        "batch": {"global_batch_size": 32, "micro_batch_size": None},  # 32 sequences per step, no accumulation
        "scaling": {"num_workers": args.workers, "cpus_per_worker": 1.0},
        "train": {"epochs": args.epochs, "grad_clip": 1.0, "log_every_samples": args.rows // 2},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_samples": 640},  # 20 steps of warmup
        "run": {"output_dir": str(output_dir), "name": "hf_causal_lm", "progress": "lines"},
    }
    # The factory is defined in this script, so rayscale pickles it and sends it to the workers.
    result = rayscale.train(config, model=build_causal_lm)

    first = next(line for line in result.metrics if "val_loss" in line)
    print(f"run directory: {result.run_dir}")
    print(f"val_loss: first {first['val_loss']:.4f}, final {result.final['val_loss']:.4f} "
          f"(uniform guess over {result.summary['data_spec']['vocab_size']} tokens: "
          f"{math.log(result.summary['data_spec']['vocab_size']):.4f})")
    print(f"val_accuracy: final {result.final['val_accuracy']:.4f} (over unmasked tokens only)")

    # The trained model back: a GPT2LMHeadModel with the run's weights, in eval mode. The factory was handed
    # in as an object, so it is handed in again.
    model = result.load_model(model=build_causal_lm)
    loss, accuracy, tokens = loss_by_hand(model, val_path)
    print(f"by hand over {tokens} unmasked validation tokens: loss {loss:.4f}, accuracy {accuracy:.4f}")
    prompt = sequence(step=3, start=4, length=3)  # BOS, +3, 5
    print(f"greedy: {prompt} -> {greedy(model, prompt, 6)} (expected {sequence(3, 4, 9)})")


if __name__ == "__main__":
    main()
