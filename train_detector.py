"""Train the defect detector of ``detect_defects.py`` on synthetic cracks and folds.

    python train_detector.py --snemi $SNEMI_DIR --isbi $ISBI_DIR [--minutes 18] [--out pt/defects_new.pt]

(``--out`` is ``pt/defects.pt`` by default, the shipped detector: an existing ``--out`` is replaced only with
``--overwrite``.)

Training sections: the demo's truth (its ``aligned`` layer) in its training range 0..69, and the
registered real sections SNEMI3D 0..59 and ISBI 2012 0..19 (their held-out ranges, 60..99 and
20..29, and the demo's 70..99 are left for ``bench/detect_quality.py``). Each is damaged and
misaligned by ``misalign.misalign`` as the demo is, but with a crack and a fold each drawn with
probability 1/2 (seeds from 1000 on; the benchmark draws seeds 0..2), ``--draws`` times; the
network learns per-pixel class-weighted cross-entropy on ``--crop`` px crops (flipped and turned),
Adam, until ``--minutes`` of wall time or ``--steps``, writing ``--out`` every 100 steps. A crop is
random, or with probability ``--fold_share`` placed over a random fold pixel: the folds' bands
(2-10 px wide) are ~0.5 % of the training pixels, too few for random crops to teach them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import misalign
from detect_defects import ARCHIVE, DefectNet, load_detector, save_detector
from helpers import HelpFormatter, UserError, check_device, check_writable, finite_float, folder, random_seed, run_main

PAD = 48  # margin generated around each canvas, as the benchmarks' stacks
SIDE = 512  # px: the training stacks' side at most (the centre of larger sections)
TRAIN_PARAMS = misalign.MisalignParams(crack_prob=0.5, fold_prob=0.5)
RANGES = {"demo": (0, 70), "snemi": (0, 60), "isbi": (0, 20)}


def demo_sections(z_range: tuple[int, int]) -> np.ndarray:
    """The demo's truth (``aligned``, before misalignment) ``[Z, 512, 512]`` uint8 in ``z_range``."""
    import demo
    import volume

    vol = volume.open_volume(demo.ensure_demo()["aligned"])
    return volume.read(vol, (0, 0, z_range[0]), (512, 512, z_range[1] - z_range[0]))[:, 0]


def damaged(sections: np.ndarray, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A training stack ``(image, defects, folds)``: ``image`` and ``defects`` ``[Z, 1, size, size]`` uint8, the centre
    ``size + 2 PAD`` px of ``sections`` (at most the whole section) put through ``misalign.misalign(TRAIN_PARAMS)``
    with ``seed``, and ``folds`` ``[K, 3]`` long, the ``(z, y, x)`` of its fold pixels."""
    h, w = sections.shape[1:]
    side = min(size + 2 * PAD, h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    canvas = torch.from_numpy(np.ascontiguousarray(sections[:, y0:y0 + side, x0:x0 + side]))[:, None]
    image, defects, _ = misalign.misalign(canvas, TRAIN_PARAMS, torch.Generator().manual_seed(seed), pad=PAD)
    return image, defects, (defects[:, 0] == misalign.FOLD).nonzero()


def pool(args) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every training stack (``damaged``): each source ``args.draws`` times, seeds 1000, 1001, ...; a ``UserError``
    if a source's stacks are smaller than ``args.crop``."""
    from import_stack import read_registered

    sources = {"demo": demo_sections(RANGES["demo"])}
    sources.update({name: read_registered(folder, *RANGES[name]) for name, folder in (("snemi", args.snemi),
                                                                                      ("isbi", args.isbi)) if folder})
    for name, sections in sources.items():
        room = min(SIDE + 2 * PAD, *sections.shape[1:]) - 2 * PAD  # damaged's stacks' side
        if room < args.crop:
            raise UserError(f"--crop {args.crop}: the {name} sections ({sections.shape[2]} x {sections.shape[1]} px) "
                            f"leave {max(room, 0)} px within a margin of {PAD} px on each side")
    seeds = iter(range(1000, 10 ** 6))
    return [damaged(s, SIDE, next(seeds)) for s in sources.values() for _ in range(args.draws)]


def blank_edge(pair: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``pair`` ``[2, S, S]`` (image, classes) with its rows above a random wavy line made missing data (image 0, class
    none): the line's mean depth is 1/8 to 1/2 of the way down, its waves half that depth high at most."""
    side = pair.shape[-1]
    u = torch.rand(4, generator=gen).tolist()
    depth = side * (1 + 3 * u[0]) / 8
    amplitude, wavelength, phase = depth * u[1] / 2, side * (0.5 + u[2]), 2 * np.pi * u[3]
    x = torch.arange(side, dtype=torch.float32)
    edge = depth + amplitude * torch.sin(2 * np.pi * x / wavelength + phase)
    return pair.masked_fill(torch.arange(side, dtype=torch.float32)[:, None] < edge, 0)


def batch(stacks, crop: int, size: int, gen: torch.Generator, fold_share: float = 0.0,
          blank_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` crops ``(images [B, 1, crop, crop] float 0..1, classes [B, crop, crop] long)`` of ``pool``'s stacks,
    flipped and turned at random: each from a random stack, with probability ``fold_share`` over one of its fold
    pixels (at a random place in the crop), else from a random section at a random place; with probability
    ``blank_share`` one side of it is missing data (``blank_edge``), as at a volume's edges, where the tissue's
    border is no fold."""
    images, labels = [], []
    for _ in range(size):
        image, defects, folds = stacks[int(torch.randint(len(stacks), (1,), generator=gen))]
        limits = [n - crop for n in image.shape[-2:]]
        if len(folds) and torch.rand(1, generator=gen) < fold_share:
            z, fy, fx = folds[int(torch.randint(len(folds), (1,), generator=gen))].tolist()
            y, x = (min(max(f - int(torch.randint(crop, (1,), generator=gen)), 0), m)
                    for f, m in ((fy, limits[0]), (fx, limits[1])))
        else:
            z = int(torch.randint(len(image), (1,), generator=gen))
            y, x = (int(torch.randint(m + 1, (1,), generator=gen)) for m in limits)
        pair = torch.cat([image[z, :, y:y + crop, x:x + crop], defects[z, :, y:y + crop, x:x + crop]])
        if torch.rand(1, generator=gen) < blank_share:
            pair = blank_edge(pair, gen)
        pair = torch.rot90(pair, int(torch.randint(4, (1,), generator=gen)), (1, 2))
        if torch.rand(1, generator=gen) < 0.5:
            pair = pair.flip(2)
        images.append(pair[:1].float() / 255)
        labels.append(pair[1].long())
    return torch.stack(images), torch.stack(labels)


def check_args(args) -> None:
    """One-line ``UserError``s for flags out of range, an ``--out`` that exists (without ``--overwrite``) or cannot be
    written, and an unreadable ``--init``: before any data is built."""
    small = [f"--{name} {getattr(args, name)}" for name in ("draws", "crop", "batch_size", "steps")
             if getattr(args, name) < 1]
    small += [f"--{name} {getattr(args, name):g}" for name in ("lr", "minutes") if getattr(args, name) <= 0]
    if small:
        raise UserError(f"{', '.join(small)}: must be positive")
    for name in ("fold_share", "blank_share"):
        if not 0 <= getattr(args, name) <= 1:
            raise UserError(f"--{name} {getattr(args, name):g}: a share, between 0 and 1")
    if min(args.class_weights) < 0 or max(args.class_weights) <= 0:
        raise UserError(f"--class_weights {' '.join(f'{w:g}' for w in args.class_weights)}: must be >= 0, one > 0")
    out = check_writable(args.out, "--out")
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out} exists (a trained detector?): pass --overwrite to replace it, or name another")
    args.device = check_device(args.device)
    if args.init:
        load_detector(args.init)


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--snemi", type=folder, help="folder of the registered SNEMI3D sections")
    p.add_argument("--isbi", type=folder, help="folder of the registered ISBI 2012 sections")
    p.add_argument("--draws", type=int, default=2, help="damaged copies of each source")
    p.add_argument("--crop", type=int, default=160, help="training crop, px")
    p.add_argument("--batch_size", type=int, default=6)
    p.add_argument("--lr", type=finite_float, default=3e-3)
    p.add_argument("--minutes", type=finite_float, default=18.0, help="wall-time budget of the training loop")
    p.add_argument("--steps", type=int, default=100000, help="at most this many steps")
    p.add_argument("--class_weights", type=finite_float, nargs=3, default=[1.0, 3.0, 6.0],
                   metavar=("NONE", "CRACK", "FOLD"), help="weights of the classes in the cross-entropy (defects are rare)")
    p.add_argument("--fold_share", type=finite_float, default=0.5, help="share of the crops placed over a fold pixel")
    p.add_argument("--blank_share", type=finite_float, default=0.25,
                   help="share of the crops with one side missing data (0), as at a volume's edges")
    p.add_argument("--init", help="start from this detector archive (a run continued); None: from scratch")
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--out", default=str(ARCHIVE))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (e.g. the shipped detector)")
    p.add_argument("--device", help="cpu or cuda (cuda:N); None: cuda if this machine has it (the crops are made on the "
                                    "CPU)")
    args = p.parse_args(argv)
    check_args(args)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    stacks = pool(args)
    print(f"{sum(len(s[0]) for s in stacks)} damaged sections from {len(stacks)} stacks")
    net = (load_detector(args.init).train() if args.init else DefectNet()).to(args.device)
    weights = torch.tensor(args.class_weights, device=args.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    recipe = " ".join(f"--{k} {v}" for k, v in vars(args).items())
    start, step, running, budget = time.time(), 0, None, 60 * args.minutes
    while step < args.steps and (step == 0 or time.time() - start < budget):  # a saved detector trained at least once
        for group in optimizer.param_groups:  # cosine decay over the wall-time budget
            group["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * min(1.0, (time.time() - start) / budget)))
        images, labels = batch(stacks, args.crop, args.batch_size, gen, args.fold_share, args.blank_share)
        loss = F.cross_entropy(net(images.to(args.device)), labels.to(args.device), weight=weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        step += 1
        if step % 100 == 0:  # a checkpoint: the run can be stopped at any time
            save_detector(args.out, net, recipe=recipe, steps=step, seconds=round(time.time() - start))
            print(f"step {step}  loss {running:.4f}  {time.time() - start:.0f} s", flush=True)
    out = save_detector(args.out, net, recipe=recipe, steps=step, seconds=round(time.time() - start))
    print(f"{step} steps in {time.time() - start:.0f} s: {out}")
    return out


if __name__ == "__main__":
    run_main(main)
