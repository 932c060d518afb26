"""ResNet-20 for CIFAR-10 (He et al. 2016, section 4.2), in the module layout of the widely shared
pytorch_resnet_cifar10 checkpoints (Yerlan Idelbayev), so that they load as they are.

Layout: ``conv1`` (3 -> 16, 3x3) and ``bn1``; ``layer1``, ``layer2``, ``layer3``, each three
``BasicBlock``s (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``shortcut``) of 16, 32, 64 channels at
32x32, 16x16, 8x8; global average pooling; ``linear`` 64 -> 10. Where a block halves the
resolution and doubles the channels, its shortcut is option A: the input subsampled by 2 and
zero-padded with the new channels (no parameters). 0.27M parameters.

Checkpoints are dicts whose ``state_dict`` holds the weights under ``module.`` names (the model
was wrapped in ``nn.DataParallel`` when saved); ``load_resnet20`` also takes them without the
prefix or without the wrapper. ``features(model, images)`` is the 64-d pooled output before
``linear``: the input of the k-path network on CIFAR-10 (experiments.cifar_features).

Normalisation. The images (pixels / 255) are normalised per channel before the first layer, with
the mean and std a checkpoint was trained with: ``cifar10`` (CIFAR-10's training-set statistics;
what ``train`` below uses and records in its checkpoints) or ``imagenet`` (ImageNet's; the
trainer of pytorch_resnet_cifar10 normalises with these, so its published checkpoints want them).
A checkpoint that records none is taken as ``cifar10`` unless told otherwise.

    python -m experiments.resnet20 train --data-dir DIR --out resnet20.th   # 200 epochs
    python -m experiments.resnet20 eval --checkpoint resnet20.th --data-dir DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .configs import OneLineParser, _parse_bool, usage_error
from .data import DataError, load_dataset, to_float

# experiments.kpath (atomic writes, the progress bar, the device) is imported where it is used:
# it needs the compiled gated_ops, which the model and the checkpoint loader do not.

__all__ = ["NORMALIZATIONS", "BasicBlock", "ResNet", "ResNetCheckpointError", "TrainConfig",
           "features", "file_sha256", "load_resnet20", "main", "normalize", "resnet20",
           "save_resnet20"]

log = logging.getLogger("experiments.resnet20")
PROG = "python -m experiments.resnet20"
FEATURE_DIM = 64

#: Per-channel (mean, std) of the pixels / 255. CIFAR-10: over the 50,000 training images (the
#: population std of each channel's pixels; 0.2023, 0.1994, 0.2010, also in circulation, are the
#: std of the per-image means). ImageNet: torchvision's constants.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Names the pytorch_resnet_cifar10 code used for some time for the same layers.
_RENAMED = {"compressible_conv1": "conv1", "compressible_conv2": "conv2",
            "compressible_linear": "linear"}


class ResNetCheckpointError(DataError):
    """A checkpoint that cannot be read, or is not a ResNet-20 of this layout."""


# ------------------------------------------------------------------------------------- model
class _PadShortcut(nn.Module):
    """Option A: x subsampled by 2, zero channels added on both sides (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = (_PadShortcut(planes) if stride != 1 or in_planes != planes
                                    else nn.Sequential())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """forward(x (N, 3, 32, 32), normalised) -> logits (N, 10); forward_features -> (N, 64).

    ``normalization`` (not a weight: the state dict keeps the checkpoints' keys) names the
    mean / std that ``features`` applies to pixels / 255."""

    def __init__(self, num_blocks: tuple[int, int, int] = (3, 3, 3), num_classes: int = 10,
                 normalization: str = "cifar10"):
        super().__init__()
        self.normalization = normalization
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        for i, (planes, n) in enumerate(zip((16, 32, 64), num_blocks)):
            blocks = []
            for s in [1 if i == 0 else 2] + [1] * (n - 1):
                blocks.append(BasicBlock(planes_in, planes, s))
                planes_in = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))  # (N, 64, 8, 8)
        return out.mean((2, 3))  # global average pooling: (N, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.forward_features(x))


def resnet20(normalization: str = "cifar10", generator: torch.Generator | None = None) -> ResNet:
    """A ResNet-20, He-initialised (Kaiming normal, as pytorch_resnet_cifar10) from generator."""
    model = ResNet((3, 3, 3), normalization=normalization)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, generator=generator)
    return model


def normalize(images: Tensor, name: str) -> Tensor:
    """(N, 3, H, W) pixels / 255 -> (images - mean) / std per channel, NORMALIZATIONS[name]."""
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
                 for v in NORMALIZATIONS[name])
    return (images - mean) / std


@torch.no_grad()
def features(model: ResNet, images: Tensor) -> Tensor:
    """(N, 3, 32, 32) float pixels / 255 (rotated or not) -> (N, 64) float32 features: normalised
    with ``model.normalization``, the global-average-pooled output of ``layer3`` (the input of
    ``linear``), the model in eval mode (BatchNorm's running statistics)."""
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"images: expected a float (N, 3, H, W) tensor, got {images.dtype} "
                         f"{tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        return model.forward_features(normalize(images, model.normalization)).float()
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------- checkpoints
def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _read_checkpoint(path: Path) -> dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise ResNetCheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})"
                                    ) from None
    except Exception as e:  # a damaged or foreign file can raise almost any type
        reason = next(iter(str(e).strip().splitlines()), "")[:200]
        raise ResNetCheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}"
                                    f": {reason})") from None
    if not isinstance(ck, dict):
        raise ResNetCheckpointError(f"{path}: expected a dict (a state dict, or one under "
                                    f"'state_dict'), got {type(ck).__name__}")
    return ck


def load_resnet20(path: str | os.PathLike[str], normalization: str | None = None) -> ResNet:
    """The ResNet-20 of a checkpoint, in eval mode on the CPU.

    Accepts a dict with the weights under ``state_dict`` (pytorch_resnet_cifar10, this module's
    ``train``) or the bare state dict, each key with or without the ``module.`` prefix of
    ``nn.DataParallel``. BatchNorm's ``num_batches_tracked`` may be missing (checkpoints of
    PyTorch < 0.4.1; it does not enter eval mode). ``normalization``: as recorded in the
    checkpoint when None, else ``cifar10``. ResNetCheckpointError (one message naming the file,
    the missing and unexpected keys or the wrong shapes) for anything else.
    """
    path = Path(path)
    ck = _read_checkpoint(path)
    state = ck.get("state_dict", ck)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ResNetCheckpointError(f"{path}: its 'state_dict' is not a dict of tensors")
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        parts = [_RENAMED.get(p, p) for p in key.split(".")]
        renamed[".".join(parts)] = value
    if normalization is None:
        recorded = ck.get("normalization")
        normalization = recorded if isinstance(recorded, str) else "cifar10"
    if normalization not in NORMALIZATIONS:
        raise ResNetCheckpointError(f"{path}: unknown normalization {normalization!r}; expected "
                                    f"one of {', '.join(NORMALIZATIONS)}")
    model = resnet20(normalization)
    expected = model.state_dict()
    missing = [k for k in expected if k not in renamed and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in renamed if k not in expected]
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        raise ResNetCheckpointError(
            f"{path}: not a ResNet-20 checkpoint of the pytorch_resnet_cifar10 layout: "
            f"missing keys [{show(missing)}], unexpected keys [{show(unexpected)}]")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
             for k, v in renamed.items() if v.shape != expected[k].shape]
    if wrong:
        raise ResNetCheckpointError(f"{path}: not a ResNet-20 checkpoint: wrong shapes "
                                    f"{', '.join(wrong[:4])}")
    for k in expected:
        if k.endswith("num_batches_tracked") and k not in renamed:
            renamed[k] = expected[k]
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in renamed.items()})
    return model.eval()


def save_resnet20(model: ResNet, path: str | os.PathLike[str], **extra: Any) -> None:
    """Write ``model`` as pytorch_resnet_cifar10 does ({"state_dict": module.* weights, ...}),
    with its normalisation and ``extra`` beside; atomically (a reader never sees half a file)."""
    from .kpath import atomic_write
    state = {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(Path(path), lambda p: torch.save(
        {"state_dict": state, "normalization": model.normalization, **extra}, p))


# ---------------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """The standard CIFAR ResNet recipe (He et al. 2016, section 4.2; pytorch_resnet_cifar10):
    SGD, lr 0.1 divided by 10 at epochs 100 and 150 of 200, momentum 0.9, weight decay 1e-4,
    batch 128; random 32x32 crops of the image zero-padded by 4, random horizontal flips."""

    data_dir: str | None = None
    out: str = "resnet20.th"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: list[int] = dataclasses.field(default_factory=lambda: [100, 150])
    normalization: str = "cifar10"
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    verify_data: bool = True
    download: bool = False
    progress: bool = True


def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random crop (zero padding 4) and horizontal flip of (B, 3, 32, 32) pixels / 255; the
    random numbers are drawn on the CPU so that a run does not depend on the device."""
    B, _, H, W = x.shape
    offsets = torch.randint(0, 9, (2, B), generator=g).to(x.device)
    flip = (torch.rand(B, generator=g) < 0.5).to(x.device)
    padded = F.pad(x, (4, 4, 4, 4))
    rows = (offsets[0, :, None] + torch.arange(H, device=x.device))  # (B, H)
    cols = (offsets[1, :, None] + torch.arange(W, device=x.device))  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(B, 3, H, W + 8))
    return out.gather(3, cols[:, None, None, :].expand(B, 3, H, W))


@torch.no_grad()
def evaluate(model: ResNet, x: Tensor, y: Tensor, batch_size: int = 500) -> tuple[float, float]:
    """(mean loss, accuracy) of the model, in eval mode, on uint8 images x and labels y."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb = normalize(to_float(x[i:i + batch_size]), model.normalization)
        logits = model(xb)
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum").item()
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    n = max(len(y), 1)
    return loss / n, correct / n


def train(cfg: TrainConfig) -> dict:
    """Train a ResNet-20 on CIFAR-10 and write it to cfg.out (with OUT's stem + .config.json and
    .metrics.jsonl beside it). Returns the last epoch's metrics."""
    from .kpath import Progress, machine_info, resolve_device, write_text
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    ds = load_dataset("cifar10", cfg.data_dir, cfg.download, expect_counts=cfg.verify_data,
                      verify_checksums=cfg.verify_data)
    n = cfg.limit
    train_x, train_y = ds.train_x[:n].to(device), ds.train_y[:n].to(device)
    test_x, test_y = ds.test_x[:n].to(device), ds.test_y[:n].to(device)
    if cfg.batch_size > len(train_y):
        raise _UsageError(f"--batch-size: expected at most the {len(train_y)} training images, "
                          f"got {cfg.batch_size}")
    g = torch.Generator().manual_seed(cfg.seed)
    model = resnet20(cfg.normalization, generator=g).to(device)
    # weight decay on every parameter (BatchNorm's too), as the recipe has it
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=0.1)
    out = Path(cfg.out)
    stem = out.with_suffix("")
    config_path, metrics_path = (Path(f"{stem}.config.json"), Path(f"{stem}.metrics.jsonl"))
    write_text(config_path, json.dumps({"config": dataclasses.asdict(cfg),
                                        "data_source": ds.source,
                                        "n_train": len(train_y), "n_test": len(test_y),
                                        "machine": machine_info(device)}, indent=1) + "\n")
    write_text(metrics_path, "")
    steps = len(train_y) // cfg.batch_size  # the last partial batch is dropped
    row: dict = {}
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=g).to(device)
        bar = Progress(steps, f"resnet20 epoch {epoch + 1}/{cfg.epochs}", 0, cfg.progress)
        t0, seen = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        correct = torch.zeros((), dtype=torch.int64, device=device)
        lr = opt.param_groups[0]["lr"]
        for s in range(steps):
            idx = order[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb = normalize(_augment(to_float(train_x[idx]), g), cfg.normalization)
            logits = model(xb)
            loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == train_y[idx]).sum()
            seen += len(idx)
            bar.update(s + 1, lambda: f"loss {loss_sum.item() / max(seen, 1):.3f}")
        bar.close()
        sched.step()
        test_loss, test_acc = evaluate(model, test_x, test_y)
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum.item() / max(seen, 1),
               "train_acc": int(correct) / max(seen, 1), "test_loss": test_loss,
               "test_acc": test_acc, "time_s": time.perf_counter() - t0}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("epoch %d/%d: train loss %.3f acc %.3f, test loss %.3f acc %.3f (%.1f s)",
                 epoch + 1, cfg.epochs, row["train_loss"], row["train_acc"], test_loss,
                 test_acc, row["time_s"])
    save_resnet20(model.cpu(), out, epoch=cfg.epochs, test_acc=row.get("test_acc"),
                  config=dataclasses.asdict(cfg))
    log.info("wrote %s (sha256 %s)", out, file_sha256(out))
    return row


# ------------------------------------------------------------------------------------ CLI
class _UsageError(ValueError):
    """A flag that cannot be satisfied (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, allow_abbrev=False,
                      description="ResNet-20 on CIFAR-10: train one, or evaluate a checkpoint.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    d = TrainConfig()
    t = sub.add_parser("train", allow_abbrev=False, help="train with the standard recipe",
                       description=TrainConfig.__doc__)
    t.add_argument("--data-dir", default=None, help="where to look for CIFAR-10 first "
                   "(experiments.data): cifar-10-batches-py/ or cifar-10-python.tar.gz")
    t.add_argument("--out", default=d.out, help=f"checkpoint to write (default: {d.out}); "
                   "its stem + .config.json and .metrics.jsonl are written beside it")
    for name, typ, help_ in (("epochs", int, "epochs"), ("batch-size", int, "images per step"),
                             ("lr", float, "initial learning rate"),
                             ("momentum", float, "SGD momentum"),
                             ("weight-decay", float, "L2 weight decay"),
                             ("seed", int, "seeds the init, the order and the augmentation"),
                             ("threads", int, "CPU threads of torch (0: torch's default)")):
        default = getattr(d, name.replace("-", "_"))
        t.add_argument(f"--{name}", type=typ, default=default, help=f"{help_} (default: {default})")
    t.add_argument("--milestones", type=int, nargs="*", default=d.milestones,
                   help=f"epochs after which the lr is divided by 10 (default: {d.milestones})")
    t.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default=d.normalization,
                   help="mean / std of the inputs, recorded in the checkpoint (default: cifar10)")
    t.add_argument("--limit", type=int, default=None,
                   help="use only the first LIMIT images of each split (tests, smoke runs)")
    t.add_argument("--device", default=d.device, help="auto | cpu | cuda | cuda:N (default: auto)")
    t.add_argument("--verify-data", type=_parse_bool, default=True, metavar="BOOL",
                   help="require the canonical sizes and MD5s (default: true)")
    t.add_argument("--download", type=_parse_bool, default=False, metavar="BOOL",
                   help="download CIFAR-10 if it is not found (default: false)")
    t.add_argument("--progress", type=_parse_bool, default=True, metavar="BOOL",
                   help="progress bar on stderr (default: true)")
    e = sub.add_parser("eval", allow_abbrev=False, help="test accuracy of a checkpoint")
    e.add_argument("--checkpoint", required=True, help="the checkpoint to evaluate")
    e.add_argument("--data-dir", default=None, help="where to look for CIFAR-10 first")
    e.add_argument("--normalization", choices=sorted(NORMALIZATIONS), default=None,
                   help="override the checkpoint's (default: as recorded, else cifar10)")
    e.add_argument("--limit", type=int, default=None, help="only the first LIMIT test images")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--verify-data", type=_parse_bool, default=True, metavar="BOOL",
                   help="require the canonical sizes and MD5s (default: true)")
    return p


def _check_train(cfg: TrainConfig) -> None:
    for name, ok, what in (
            ("--epochs", cfg.epochs >= 1, "an integer >= 1"),
            ("--batch-size", cfg.batch_size >= 1, "an integer >= 1"),
            ("--lr", math.isfinite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
            ("--momentum", math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1,
             "a finite number >= 0 and < 1"),
            ("--weight-decay", math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
             "a finite number >= 0"),
            ("--milestones", all(m >= 1 for m in cfg.milestones), "integers >= 1"),
            ("--limit", cfg.limit is None or cfg.limit >= 1, "an integer >= 1"),
            ("--threads", cfg.threads >= 0, "an integer >= 0"),
            ("--seed", cfg.seed >= 0, "an integer >= 0")):
        if not ok:
            value = getattr(cfg, name[2:].replace("-", "_"))
            raise _UsageError(f"{name}: expected {what}, got {value!r}")
    _check_device(cfg.device)
    out = Path(cfg.out)
    if out.is_dir():
        raise _UsageError(f"--out: {cfg.out} is a directory; expected a checkpoint file name")
    if cfg.data_dir is not None and not Path(cfg.data_dir).is_dir():
        raise _UsageError(f"--data-dir: {cfg.data_dir} is not an existing directory")


def _check_device(device: str) -> None:
    import re
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", device):
        raise _UsageError(f"--device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise _UsageError(f"--device: {device}: CUDA is not available on this machine")


def main(argv: list[str] | None = None) -> dict:
    """The CLI. A bad flag: one line on stderr, exit status 2; missing data or an unreadable
    checkpoint: one line, exit status 1."""
    args = vars(_parser().parse_args(argv))
    command = args.pop("command")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if command == "train":
            cfg = TrainConfig(**args)
            _check_train(cfg)
            return train(cfg)
        _check_device(args["device"])
        if args["limit"] is not None and args["limit"] < 1:
            raise _UsageError(f"--limit: expected an integer >= 1, got {args['limit']}")
        from .kpath import resolve_device
        device = resolve_device(args["device"])
        model = load_resnet20(args["checkpoint"], args["normalization"]).to(device)
        ds = load_dataset("cifar10", args["data_dir"], expect_counts=args["verify_data"],
                          verify_checksums=args["verify_data"])
        n = args["limit"]
        loss, acc = evaluate(model, ds.test_x[:n].to(device), ds.test_y[:n].to(device))
        result = {"checkpoint": args["checkpoint"], "normalization": model.normalization,
                  "test_loss": loss, "test_acc": acc, "n_test": len(ds.test_y[:n])}
        print(json.dumps(result))
        return result
    except _UsageError as e:
        usage_error(str(e), PROG)
    except DataError as e:
        sys.stderr.write(f"{PROG}: error: {' '.join(str(e).splitlines())}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
