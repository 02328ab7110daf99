"""Train the Llama AR model (§3.2, Eq. 6) on the tokens of a frozen sequential diffusion tokenizer.

    python train_ar.py                                          # tiny config on out/tiny/tokenizer.pt, CPU
    python train_ar.py --reverse --out out/tiny-reverse         # the fine-to-coarse ablation (Table 7)
    torchrun --nproc_per_node 8 train_ar.py --config L --tokenizer D-AR-tokenizer_v1.pt \\
        --data /imagenet/train --batch-size 128 --cache-codes /fast/codes   # the paper's D-AR-L

Each config brings its recipe (RECIPES below: the paper's values for B/L/XL/XXL); any flag overrides it.
The global batch is --batch-size x --grad-accum x the number of processes. Tokens are computed on the
fly by the tokenizer (EMA weights, float32), or once per augmentation view with --cache-codes.
"""
import argparse
import copy
import json
import math
import random
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dar

RECIPES = {
    # paper §4: batch 1024 for 300 epochs, AdamW lr 4e-4 (the release's script used its default 1e-4),
    # betas (0.9, 0.95), weight decay 0.05, linear decay to 1e-5 over the last 50 epochs
    **{name: dict(epochs=300, batch_size=64, grad_accum=16, lr=4e-4) for name in ("B", "L", "XL", "XXL")},
    # the laptop run on the built-in shapes: a higher lr for the small model and the short schedule
    "tiny": dict(epochs=2, batch_size=64, grad_accum=1, lr=1e-3),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=list(dar.AR_PRESETS))
    parser.add_argument("--tokenizer", default=None, help="tokenizer checkpoint, ours or the release's "
                        "(default for tiny: out/tiny/tokenizer.pt)")
    parser.add_argument("--data", default="builtin", help="'builtin' (procedural shapes) or an ImageNet-style folder")
    parser.add_argument("--builtin-size", type=int, default=10000, help="images in the built-in dataset")
    parser.add_argument("--cache-codes", default=None, help="folder for the tokens of every image and view "
                        "(default for tiny: <out>/codes; otherwise tokens are computed on the fly)")
    parser.add_argument("--reverse", action="store_true", help="train on the reversed (fine-to-coarse) order")
    parser.add_argument("--out", default=None, help="output folder (default out/<config>)")
    recipe = parser.add_argument_group("recipe (default: RECIPES[--config])")
    recipe.add_argument("--epochs", type=float)
    recipe.add_argument("--batch-size", type=int, help="per process")
    recipe.add_argument("--grad-accum", type=int)
    recipe.add_argument("--lr", type=float, help="paper: 4e-4 (release: 1e-4)")
    parser.add_argument("--final-lr", type=float, default=1e-5, help="lr at the end of the decay (paper: 1e-5)")
    parser.add_argument("--decay-fraction", type=float, default=50 / 300,
                        help="linear decay over this last fraction of training (paper: the last 50 of 300 epochs)")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas (paper)")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="on matrices only (paper: 0.05)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (release: 1.0)")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay; 0 = off (release: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes per training process")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=500, help="PNG of samples with their previews")
    parser.add_argument("--sample-cfg", type=float, default=4.0, help="guidance scale of those samples")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--resume", action="store_true", help="continue <out>/ar.pt")
    parser.add_argument("--export", metavar="PATH", help="at the end, also write the EMA weights alone in half "
                        "precision to PATH, a small file to share (with --resume at the last step: export only)")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "train_ar.py", *(sys.argv[1:] if argv is None else argv)])
    for key, value in RECIPES[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokenizer is None:
        if args.config != "tiny":
            parser.error("--tokenizer is required for the paper configs (e.g. the released D-AR-tokenizer_v1.pt)")
        args.tokenizer = "out/tiny/tokenizer.pt"
    args.out = Path(args.out or f"out/{args.config}")
    if args.cache_codes is None and args.config == "tiny":
        args.cache_codes = str(args.out / "codes")
    return args


class CachedCodes(torch.utils.data.Dataset):
    """The tokens of every (view, image), memory-mapped: codes (views, n, N), labels (n,)."""

    def __init__(self, codes, labels, num_classes):
        self.codes, self.labels, self.num_classes = codes, labels, num_classes

    def __len__(self):
        return self.codes.shape[1]

    def __getitem__(self, key):  # (index, augmentation seed): the seed picks the view
        index, seed = key
        view = random.Random(seed).randrange(self.codes.shape[0])
        return torch.from_numpy(self.codes[view, index].astype(np.int64)), int(self.labels[index])


def cache_codes(tokenizer, tokenizer_path, dataset, folder, rank, world_size, device, batch_size):
    """Encode every view of every image once into <folder>/codes.npy (sharded over the processes); a
    cache made by another tokenizer file or of another shape is rebuilt."""
    folder = Path(folder)
    shape = (dataset.views, len(dataset), tokenizer.cfg.num_tokens)
    codes_path, labels_path, source_path = folder / "codes.npy", folder / "labels.npy", folder / "source.json"
    stat = Path(tokenizer_path).stat()
    source = {"tokenizer": str(Path(tokenizer_path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "shape": list(shape)}
    if not codes_path.exists() or not source_path.exists() or json.loads(source_path.read_text()) != source:
        partial = folder / "codes.npy.partial"
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.int32, shape=shape)
            np.save(folder / "labels.partial.npy", np.zeros(len(dataset), dtype=np.int64))
        if world_size > 1:
            torch.distributed.barrier()
        codes = np.load(partial, mmap_mode="r+")
        labels = np.load(folder / "labels.partial.npy", mmap_mode="r+")
        keys = [(index, 0, view) for view in range(shape[0]) for index in range(rank, shape[1], world_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys)
        for batch_keys, (images, batch_labels) in zip(torch.utils.data.BatchSampler(keys, batch_size, False),
                                                     tqdm(loader, desc="caching codes", disable=rank != 0)):
            views, indices = [key[2] for key in batch_keys], [key[0] for key in batch_keys]
            codes[views, indices] = tokenizer.encode(images.to(device)).cpu().numpy()
            labels[indices] = batch_labels.numpy()
        codes.flush()
        labels.flush()
        if world_size > 1:
            torch.distributed.barrier()
        if rank == 0:
            (folder / "labels.partial.npy").replace(labels_path)
            partial.replace(codes_path)
            source_path.write_text(json.dumps(source))
        if world_size > 1:
            torch.distributed.barrier()
    return CachedCodes(np.load(codes_path, mmap_mode="r"), np.load(labels_path), dataset.num_classes)


def main(args):
    # ---- processes, device, precision
    rank, world_size, device = dar.setup_distributed(args.device)
    distributed = world_size > 1
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the initial weights; the training stream seeds itself per step

    # ---- the frozen tokenizer (EMA weights) and the data
    if not Path(args.tokenizer).exists():
        raise SystemExit(f"no tokenizer at {args.tokenizer}; train one with `python train_tokenizer.py` "
                         f"or pass the released D-AR-tokenizer_v1.pt with --tokenizer")
    tokenizer = dar.load_tokenizer(args.tokenizer, device).requires_grad_(False)
    size = tokenizer.cfg.image_size
    if args.data == "builtin":
        dataset = dar.BuiltinShapes(args.builtin_size, size, seed=args.seed)
    else:
        dataset = dar.ImageFolder(args.data, size, augment="ar")
    cached = args.cache_codes is not None
    if cached:
        dataset = cache_codes(tokenizer, args.tokenizer, dataset, args.cache_codes, rank, world_size, device,
                              args.batch_size)

    # ---- model, EMA, optimiser (weight decay on matrices and embeddings, not on norm weights)
    cfg = replace(dar.AR_PRESETS[args.config], vocab_size=tokenizer.cfg.codebook_size,
                  num_tokens=tokenizer.cfg.num_tokens, num_classes=dataset.num_classes, reverse=args.reverse)
    model = dar.LlamaAR(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    optimizer = dar.ar_optimizer(model, args.lr, args.betas, args.weight_decay)
    global_batch = args.batch_size * args.grad_accum * world_size
    total_steps = math.ceil(args.epochs * len(dataset) / global_batch)
    decay_start = round((1 - args.decay_fraction) * total_steps)
    checkpoint_path, start_step = args.out / "ar.pt", 0
    if args.resume:
        start_step = dar.resume_training(checkpoint_path, model, ema, optimizer)
        log(f"resumed {checkpoint_path} at step {start_step}")
    log(f"AR {args.config}{' (reversed order)' if args.reverse else ''}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {len(dataset)} images, global batch {global_batch}, {total_steps} steps ({args.epochs} epochs)")
    trained = dar.wrap_for_training(model, args.compile, world_size, device)
    stream = dar.TrainingStream(len(dataset), args.batch_size, args.grad_accum, world_size, rank, args.seed,
                                start_step, total_steps)
    batches = stream.batches(dataset, args.workers, pin_memory=device.type == "cuda")

    def save(step):
        if rank == 0:
            dar.save_checkpoint(dar.training_checkpoint("ar", cfg, model, ema, optimizer, step, args), checkpoint_path)

    @torch.no_grad()
    def save_samples(step):  # rows: samples; columns: the previews after each group, then the final image
        sampler_model = (ema or model).eval()
        labels = torch.arange(min(cfg.num_classes, 8), device=device)
        generator = torch.Generator(device).manual_seed(args.seed)
        steps = list(dar.sample(sampler_model, tokenizer, labels, cfg=args.sample_cfg, generator=generator))
        model.train()
        columns = [s.preview for s in steps] + [steps[-1].image]
        dar.save_grid(torch.stack(columns, dim=1), args.out / f"samples_{step:07d}.png")

    # ---- the loop
    model.train()
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0)
    window_start, window_tokens, loss_sum = time.time(), 0, None
    for step in progress:
        lr = args.lr if step < decay_start else \
            args.lr + (args.final_lr - args.lr) * (step - decay_start) / max(1, total_steps - decay_start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(args.grad_accum):
            inputs, labels = (tensor.to(device, non_blocking=True) for tensor in next(batches))
            tokens = inputs if cached else tokenizer.encode(inputs)                    # (B, N)
            if args.reverse:
                tokens = tokens.flip(1)
            # dropout and label dropout follow the samples, not the process layout
            torch.manual_seed(dar.stream_seed(args.seed, stream.first_position(step, micro), 1))
            sync = not distributed or micro == args.grad_accum - 1
            with (nullcontext() if sync else trained.no_sync()), autocast:
                loss = dar.next_token_loss(trained(tokens, labels), tokens)           # Eq. (6)
                (loss / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
        dar.optimizer_step(model, optimizer, ema, args.ema, args.grad_clip, step, loss_sum, checkpoint_path)
        done = step + 1

        window_tokens += tokens.numel() * args.grad_accum * world_size
        progress.set_postfix(loss=f"{loss_sum:.3f}")
        if done % args.log_every == 0 or done == total_steps:
            elapsed = time.time() - window_start
            log(f"step {done}: loss {loss_sum:.4f} lr {lr:.2e} {window_tokens / cfg.num_tokens / elapsed:.1f} img/s")
            window_start, window_tokens = time.time(), 0
        if rank == 0 and (done % args.sample_every == 0 or done == total_steps):
            save_samples(done)
        if done % args.save_every == 0 or done == total_steps:
            save(done)
    progress.close()
    log(f"saved {checkpoint_path}")
    if args.export and rank == 0:
        dar.export_weights(checkpoint_path, args.export, args.command)
        log(f"exported the weights to {args.export}")
    if distributed:
        torch.distributed.destroy_process_group()
    return model, loss_sum  # for notebooks and tests


if __name__ == "__main__":
    main(parse_args())
