"""A ResNet on PNG images read with Ray Data: the script draws its own images (three classes of patterns) into
PNG files, reads them with `ray.data.read_images`, turns them into channels-first tensors with a `map_batches`
of its own, and trains a residual network from a factory sized by the data, on 2 DDP workers. Then it loads the
trained model back and classifies the validation files by hand.

    python examples/image_resnet.py                       # writes ./runs/examples/
    python examples/image_resnet.py --output-dir /tmp/img --images-per-class 60 --epochs 6

The network is a small ResNet (basic residual blocks, as in He et al. 2015, with GroupNorm) defined here, so the example needs
nothing beyond rayscale. With torchvision installed, its models are factories too:
`model=lambda num_classes: torchvision.models.resnet18(num_classes=num_classes)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rayscale

CLASSES = ("stripes_across", "stripes_down", "square")


def draw(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB image (size, size, 3) of class `kind`, in a random colour on a noisy background."""
    image = rng.integers(0, 60, (size, size, 3))
    colour = rng.integers(120, 256, 3)
    period, phase = int(rng.integers(3, 6)), int(rng.integers(0, 3))
    if kind == 0:
        image[(np.arange(size) + phase) % period == 0, :] = colour
    elif kind == 1:
        image[:, (np.arange(size) + phase) % period == 0] = colour
    else:
        side = int(rng.integers(size // 3, size // 2 + 1))
        top, left = rng.integers(0, size - side, 2)
        image[top:top + side, left:left + side] = colour
    return image.astype(np.uint8)


def write_images(root: Path, per_class: int, size: int, seed: int = 0) -> None:
    """root/{train,val}/<class>/<n>.png: per_class images of each class for training, a quarter as many for
    validation."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", max(1, per_class // 4))):
        for kind, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                Image.fromarray(draw(kind, size, rng)).save(folder / f"{n:04d}.png")


def to_tensors(batch: dict) -> dict:
    """Ray Data's images (n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [0, 1]; the label from the folder name.
    Only the columns the model trains on are kept (a `path` column is not a feature)."""
    images = batch["image"].astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    labels = np.array([CLASSES.index(Path(path).parent.name) for path in batch["path"]], dtype=np.int64)
    return {"image": images, "label": labels}


def _norm(channels: int) -> nn.Module:
    """GroupNorm where torchvision's ResNet has BatchNorm: the same in training and evaluation, so a short run's
    validation is not judged by running statistics of a few dozen steps (and DDP needs no SyncBatchNorm)."""
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels, 3, stride, 1, bias=False)
        self.bn1 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm(channels)
        self.shortcut = nn.Sequential() if stride == 1 and channels_in == channels else nn.Sequential(
            nn.Conv2d(channels_in, channels, 1, stride, bias=False), _norm(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """The factory: rayscale hands it the data's sizes (input_shape (3, H, W), num_classes) by name."""
    channels = (width, 2 * width, 4 * width)
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], width, 3, 1, 1, bias=False), _norm(width), nn.ReLU()]
    for stage, (before, now) in enumerate(zip((width, *channels), channels, strict=False)):
        layers.append(BasicBlock(before, now, stride=1 if stage == 0 else 2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes)]
    return nn.Sequential(*layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/examples"),
                        help="the images and the run directory image_resnet/ are written under here")
    parser.add_argument("--images-per-class", type=int, default=120)
    parser.add_argument("--size", type=int, default=24, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: local mode, no Ray workers)")
    args = parser.parse_args(argv)
    output_dir = args.output_dir.resolve()
    images_dir = output_dir / "image_resnet_pngs"
    write_images(images_dir, args.images_per_class, args.size)

    import ray.data

    rayscale.connect()  # the Datasets run on the Ray that trains (else Ray Data starts a default one)

    def images(split: str):
        return ray.data.read_images(str(images_dir / split), mode="RGB", size=(args.size, args.size),
                                    include_paths=True).map_batches(to_tensors)

    config = {
        "data": {"features": ["image"], "label": "label"},
        "batch": {"global_batch_size": 32, "micro_batch_size": None},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"warmup_samples": 0},
        "scaling": {"num_workers": args.workers},
        "train": {"epochs": args.epochs},
        "run": {"output_dir": str(output_dir), "name": "image_resnet", "progress": "lines"},
    }
    result = rayscale.train(config, model=resnet, train_data=images("train"), val_data=images("val"))
    print(f"run directory: {result.run_dir}")
    print(f"val_loss: {result.final['val_loss']:.4f}")
    print(f"val_accuracy: {result.final['val_accuracy']:.4f}")

    # The trained model, loaded back, on the validation files read by hand (PIL, not Ray Data).
    from PIL import Image

    model = result.load_model(model=resnet)
    files = sorted((images_dir / "val").glob("*/*.png"))
    batch = {"image": np.stack([np.asarray(Image.open(path).convert("RGB")) for path in files]),
             "path": np.array([str(path) for path in files])}
    tensors = to_tensors(batch)
    with torch.no_grad():
        predicted = model(torch.from_numpy(tensors["image"])).argmax(dim=1).numpy()
    print(f"by hand over {len(files)} validation files: accuracy {(predicted == tensors['label']).mean():.4f}")


if __name__ == "__main__":
    main()
