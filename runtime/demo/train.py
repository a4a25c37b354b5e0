"""`tta train-demo`: train the built-in demo model (ResNet-20, BN) on Fashion-MNIST, on CPU.

Writes into runtime/assets/demo/ (or --out):
  demo_resnet.pt   state dict of runtime.demo.model.ResNetCifar (normalisation included)
  demo_slice.npz   a class-balanced, deterministic subset of the test split (uint8 28×28 + labels)
  prototypes.pt    class prototypes (10 × 64) for the mean-teacher adapter (ADAPTERS.md §3.6 step 5)
  TRAINING.md      the command, wall time and accuracy of this run

Recipe: SGD (Nesterov, momentum 0.9, weight decay 5e-4), one-cycle learning rate, batch 128,
random ±2 px shifts and horizontal flips. Seeded: the same command gives the same weights on
the same torch build and thread count.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.console import Progress
from runtime.demo.model import DEMO_ASSETS, ResNetCifar
from runtime.lab import datasets

EXAMPLES = """examples:
  tta train-demo                          # full run (~25 min on 2 CPU cores), writes runtime/assets/demo/
  tta train-demo --epochs 1 --out /tmp/d  # a quick look, somewhere else
  tta train-demo --prototypes-only        # recompute prototypes.pt from the shipped weights
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.15, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--slice-size", type=int, default=2000, help="test images in the demo slice (≤ 2000)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX folder (default: $TTA_FASHION_MNIST_DIR "
                                                         "or /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--out", type=Path, default=DEMO_ASSETS, help="output folder (default: %(default)s)")
    parser.add_argument("--limit-batches", type=int, default=None, help="stop each epoch after this many batches "
                                                                        "(smoke tests)")
    parser.add_argument("--prototypes-only", action="store_true",
                        help="load the weights from --out and only recompute prototypes.pt")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to ±2 px (zero fill, like the padding border) and horizontal flip."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), generator=g)
    dy = torch.randint(0, 5, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        logits = model(torch.from_numpy(datasets.to_model_input(x[i:i + batch])))
        correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


@torch.no_grad()
def compute_prototypes(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int = 0, batch: int = 200,
                       cap: int = 100_000, show: bool = True) -> torch.Tensor:
    """ADAPTERS.md §3.6 step 5: per-class mean of the features at the final Linear's input, with the
    model configured for batch statistics (BN normalises each shuffled batch of 200 by its own
    stats), over the train split. Works on a copy: the shipped model's running stats stay as they are."""
    net = copy.deepcopy(model).eval()
    for m in net.modules():  # "configured for batch stats", as the reference does before building them
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    captured: list[torch.Tensor] = []
    hook = linears[-1].register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    order = np.random.default_rng(seed).permutation(len(x))[:cap]
    feats, labels = [], []
    bar = Progress(total=len(order), desc="prototypes", disable=not show)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        captured.clear()
        net(torch.from_numpy(datasets.to_model_input(x[idx])))
        feats.append(captured[0])
        labels.append(torch.from_numpy(y[idx]))
        bar.update(len(idx))
    bar.close()
    hook.remove()
    feats_all, labels_all = torch.cat(feats), torch.cat(labels)
    classes = int(labels_all.max()) + 1
    return torch.stack([feats_all[labels_all == k].mean(0) for k in range(classes)]).float()


def demo_slice_indices(y: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A class-balanced subset of `size` indices (size/10 per class), drawn with a fixed seed, in test order."""
    classes = int(y.max()) + 1
    per_class = size // classes
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(y == k), per_class, replace=False) for k in range(classes)]
    return np.sort(np.concatenate(picked))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, args, log) -> None:
    g = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = (len(x) + args.batch_size - 1) // args.batch_size
    if args.limit_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_batches)
    params_decay = [p for n, p in model.named_parameters() if p.ndim > 1]  # no decay on BN and biases
    params_other = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": params_decay, "weight_decay": args.weight_decay},
                           {"params": params_other, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, epochs=args.epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    x_all = torch.from_numpy(datasets.to_model_input(x))
    y_all = torch.from_numpy(y)
    model.to(memory_format=torch.channels_last)  # ~20 % faster convolutions on CPU
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        bar = Progress(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}")
        seen = correct = 0
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            xb = augment(x_all[idx], g).contiguous(memory_format=torch.channels_last)
            logits = model(xb)
            loss = F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=loss_sum / seen, acc=correct / seen)
            bar.update(1)
        bar.close()
        log(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, train acc (augmented) {correct / seen:.4f}")
    model.to(memory_format=torch.contiguous_format)
    model.eval()


def run(args) -> int:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - start:7.1f}s] {msg}", flush=True)

    try:
        x_train, y_train = datasets.load_split("train", args.data_dir)
        x_test, y_test = datasets.load_split("test", args.data_dir)
    except datasets.DatasetMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    model = ResNetCifar()
    if args.prototypes_only:
        model.load_state_dict(torch.load(out / "demo_resnet.pt", map_location="cpu", weights_only=True))
        model.eval()
    else:
        log(f"training ResNet-20 ({sum(p.numel() for p in model.parameters())} parameters) on "
            f"{len(x_train)} images, {args.epochs} epochs, {args.threads} threads")
        train(model, x_train, y_train, args, log)
        torch.save(model.state_dict(), out / "demo_resnet.pt")
    train_seconds = time.monotonic() - start

    test_acc = accuracy(model, x_test, y_test)
    log(f"clean test accuracy: {test_acc * 100:.2f} %")

    protos = compute_prototypes(model, x_train, y_train, seed=args.seed)
    torch.save(protos, out / "prototypes.pt")
    log(f"prototypes {tuple(protos.shape)} -> {out / 'prototypes.pt'}")

    idx = demo_slice_indices(y_test, min(args.slice_size, 2000), seed=args.seed)
    np.savez_compressed(out / "demo_slice.npz", x=x_test[idx], y=y_test[idx], test_index=idx)
    slice_acc = accuracy(model, x_test[idx], y_test[idx])
    log(f"demo slice: {len(idx)} images, accuracy {slice_acc * 100:.2f} %")

    if not args.prototypes_only:
        total = time.monotonic() - start
        command = "tta train-demo " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 1 else ""
        (out / "TRAINING.md").write_text(
            "# Demo model training run\n\n"
            f"- command: `{command.strip() or 'tta train-demo'}`\n"
            f"- recipe: ResNet-20 (CIFAR style, BN, option-A shortcuts), {args.epochs} epochs, batch "
            f"{args.batch_size}, SGD Nesterov momentum 0.9, one-cycle peak lr {args.lr}, weight decay "
            f"{args.weight_decay}, ±2 px shifts + horizontal flips, seed {args.seed}, {args.threads} CPU threads\n"
            f"- machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}\n"
            f"- training time: {train_seconds / 60:.1f} min; whole command {total / 60:.1f} min\n"
            f"- clean Fashion-MNIST test accuracy (10 000 images): **{test_acc * 100:.2f} %**\n"
            f"- demo slice ({len(idx)} images, {len(idx) // 10} per class): {slice_acc * 100:.2f} %\n"
            f"- prototypes: {tuple(protos.shape)}, per-class mean of the final Linear's input, BN in "
            "batch-statistics mode over shuffled train batches of 200\n")
    log("done")
    return 0
