"""Train the Llama AR model (§3.2, Eq. 6) on the tokens of a frozen sequential diffusion tokenizer.

    python train_ar.py                                          # tiny config on out/tiny/tokenizer.pt, CPU
    python train_ar.py --reverse --out out/tiny-reverse         # the fine-to-coarse ablation (Table 7)
    torchrun --nproc_per_node 8 train_ar.py --config L --tokenizer D-AR-tokenizer_v1.pt \\
        --data /imagenet/train --batch-size 128 --cache-codes /fast/codes   # the paper's D-AR-L

Each config brings its recipe (RECIPES below: the paper's values for B/L/XL/XXL); any flag overrides it.
The global batch is --batch-size x --grad-accum x the number of processes. Tokens are computed on the
fly by the tokenizer (EMA weights, float32), or once per augmentation view with --cache-codes.
"""
import copy
import math
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dar

RECIPES = {
    # paper §4: batch 1024 for 300 epochs, AdamW lr 4e-4 (the release's script used its default 1e-4),
    # betas (0.9, 0.95), weight decay 0.05, linear decay to 1e-5 over the last 50 epochs; no EMA (release)
    **{name: dict(epochs=300, batch_size=64, grad_accum=16, lr=4e-4, ema=0.0, weight_decay=0.05)
       for name in ("B", "L", "XL", "XXL")},
    # the laptop run on the built-in shapes: a higher lr for the small model and the short schedule
    "tiny": dict(epochs=2, batch_size=64, grad_accum=1, lr=1e-3, ema=0.0, weight_decay=0.05),
}


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    recipe = dar.add_training_flags(parser, RECIPES)
    recipe.add_argument("--epochs", type=dar.RATE)
    model = parser.add_argument_group("the tokens")
    model.add_argument("--tokenizer", default=None, help="tokenizer checkpoint, ours or the release's "
                       "(default for tiny: out/tiny/tokenizer.pt)")
    model.add_argument("--cache-codes", default=None, help="folder for the tokens of every image and view "
                       "(default for tiny: <out>/codes; otherwise tokens are computed on the fly)")
    model.add_argument("--reverse", action="store_true", help="train on the reversed (fine-to-coarse) order")
    schedule = parser.add_argument_group("the learning-rate decay (paper)")
    schedule.add_argument("--final-lr", type=dar.WEIGHT, default=1e-5, help="lr at the end of the decay (paper: 1e-5)")
    schedule.add_argument("--decay-fraction", type=dar.flag_type(0, 1), default=50 / 300,
                          help="linear decay over this last fraction of training (paper: the last 50 of 300 epochs)")
    parser.add_argument("--sample-guidance", type=dar.WEIGHT, default=4.0, help="guidance scale of the --sample-every "
                        "pictures")
    args = dar.finish_training_flags(parser, argv, RECIPES, "train_ar.py")
    if args.tokenizer is None:
        if args.config != "tiny":
            parser.error("--tokenizer is required for the paper configs (e.g. the released D-AR-tokenizer_v1.pt)")
        args.tokenizer = "out/tiny/tokenizer.pt"
    if not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer: no checkpoint at {args.tokenizer}; train one with `python train_tokenizer.py` "
                     f"or pass the released D-AR-tokenizer_v1.pt")
    if args.cache_codes is not None and Path(args.cache_codes).exists() and not Path(args.cache_codes).is_dir():
        parser.error(f"--cache-codes {args.cache_codes} is a file, not a folder")
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


def cache_codes(tokenizer, tokenizer_path, dataset, folder, rank, world_size, device, batch_size, data):
    """Encode every view of every image once into <folder>/codes.npy (sharded over the processes). The folder
    records what made it (the tokenizer file's SHA-256, the data: `data`, the shape); a cache of other settings is
    refused with one line naming the difference, and an interrupted one is rebuilt."""
    folder = Path(folder)
    shape = (dataset.views, len(dataset), tokenizer.cfg.num_tokens)
    codes_path, labels_path, source_path = folder / "codes.npy", folder / "labels.npy", folder / "source.json"
    source = {"tokenizer_sha256": dar.file_digest(tokenizer_path), "data": data, "shape": list(shape)}
    if source_path.exists():
        dar.check_record(source_path, source, f"--cache-codes {folder}")
    if not codes_path.exists() or not source_path.exists():
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
            dar.check_record(source_path, source, f"--cache-codes {folder}")
        if world_size > 1:
            torch.distributed.barrier()
    try:
        codes, labels = np.load(codes_path, mmap_mode="r"), np.load(labels_path)
    except (OSError, ValueError) as error:
        raise dar.BadInput(f"--cache-codes: {codes_path} is damaged ({error}); delete {folder} to rebuild it") from None
    if codes.shape != shape or labels.shape != (shape[1],):
        raise dar.BadInput(f"--cache-codes: {codes_path} holds {codes.shape}, not {shape}; delete {folder} to rebuild it")
    return CachedCodes(codes, labels, dataset.num_classes)


def tokenizer_and_data(args, rank, world_size, device):
    """The frozen tokenizer (EMA weights) and the data: images, or with --cache-codes their tokens; -> tokenizer,
    dataset, whether the dataset holds tokens."""
    try:
        tokenizer = dar.load_tokenizer(args.tokenizer, device).requires_grad_(False)
    except (ValueError, KeyError, OSError) as error:
        raise dar.BadInput(f"--tokenizer {args.tokenizer} cannot be loaded: {str(error).splitlines()[0]}") from None
    dataset = dar.training_images(args, tokenizer.cfg.image_size, "ar")
    if args.cache_codes is None:
        return tokenizer, dataset, False
    data = ({"source": "builtin", "size": args.builtin_size, "seed": args.seed} if args.data == "builtin"
            else {"source": str(Path(args.data).resolve()), "files": len(dataset)})
    return tokenizer, cache_codes(tokenizer, args.tokenizer, dataset, args.cache_codes, rank, world_size, device,
                                  args.batch_size, data), True


def main(args):
    rank, world_size, device, autocast, log = dar.training_setup(args, args.out / "ar.pt")
    tokenizer, dataset, cached = tokenizer_and_data(args, rank, world_size, device)

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
        try:
            start_step = dar.resume_training(checkpoint_path, "ar", model, ema, optimizer)["step"]
        except ValueError as error:
            raise dar.BadInput(str(error)) from None
        log(f"resumed {checkpoint_path} at step {start_step}")
    log(f"AR {args.config}{' (reversed order)' if args.reverse else ''}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {len(dataset)} images, global batch {global_batch}, {total_steps} steps ({args.epochs} epochs)")
    trained = dar.wrap_for_training(model, args.compile, world_size, device)
    stream = dar.TrainingStream(len(dataset), args.batch_size, args.grad_accum, world_size, rank, args.seed,
                                start_step, total_steps)
    batches = stream.batches(dataset, args.workers, pin_memory=device.type == "cuda")

    # ---- the loop
    model.train()
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=rank != 0)
    step_log, terms = dar.StepLog(log, args.log_every, total_steps), {}
    for step in progress:
        lr = args.lr if step < decay_start else \
            args.lr + (args.final_lr - args.lr) * (step - decay_start) / max(1, total_steps - decay_start)
        for group in optimizer.param_groups:
            group["lr"] = lr

        def compute(micro):
            inputs, labels = (tensor.to(device, non_blocking=True) for tensor in next(batches))
            tokens = inputs if cached else tokenizer.encode(inputs)                    # (B, N)
            tokens = tokens.flip(1) if args.reverse else tokens
            # dropout and label dropout follow the samples, not the process layout
            torch.manual_seed(dar.stream_seed(args.seed, stream.first_position(step, micro), 1))
            return {"loss": dar.next_token_loss(trained(tokens, labels), tokens)}    # Eq. (6)
        terms = dar.accumulate_gradients(trained, args.grad_accum, autocast, compute)
        dar.optimizer_step(model, optimizer, ema, args.ema, args.grad_clip, step, terms["loss"])
        done = step + 1
        progress.set_postfix(loss=f"{terms['loss']:.3f}")
        step_log(done, global_batch, terms, lr)
        if rank == 0 and (done % args.sample_every == 0 or done == total_steps):
            save_samples(ema or model, tokenizer, args, args.out / f"samples_{done:07d}.png")
            model.train()
        if rank == 0 and (done % args.save_every == 0 or done == total_steps):
            dar.save_checkpoint(dar.training_checkpoint("ar", cfg, model, ema, optimizer, done, args), checkpoint_path)
    progress.close()
    dar.finish_training(args, checkpoint_path, rank, world_size, log)
    return model, terms["loss"]  # for notebooks and tests


@torch.no_grad()
def save_samples(model, tokenizer, args, path):
    """A picture: a row per class (up to 8), the previews after each group, the last being the image."""
    device = tokenizer.sampling_times.device
    labels = torch.arange(min(model.cfg.num_classes, 8), device=device)
    groups = list(dar.sample(model.eval(), tokenizer, labels, guidance=args.sample_guidance,
                             generator=torch.Generator(device).manual_seed(args.seed)))
    dar.save_grid(torch.stack([group.preview for group in groups] + [groups[-1].image], dim=1), path)


if __name__ == "__main__":
    dar.command_line(lambda: main(parse_args()))
