"""Train the Llama AR model (§3.2, Eq. 6) on the tokens of a frozen sequential diffusion tokenizer.

    python train_ar.py                                  # tiny config, CPU, under 3 min: the codes
                                                        # of out/tiny/tokenizer.pt, else the shipped
    python train_ar.py --reverse --out out/tiny-reverse # the fine-to-coarse ablation (Table 7)
    torchrun --nproc_per_node 8 train_ar.py --config L --tokenizer D-AR-tokenizer_v1.pt \\
        --data /imagenet/train --batch-size 128 --cache-codes /fast/codes   # the paper's D-AR-L

Each config brings its recipe (RECIPES below: the paper's values for B/L/XL/XXL); any flag overrides
it. The global batch is --batch-size x --grad-accum x the number of processes. Tokens are computed
on the fly by the tokenizer (EMA weights, float32), or once per augmentation view with
--cache-codes. The checkpoint records the tokenizer file (path and SHA-256) and the data's class
names, which sample.py then uses.
"""
import copy
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dar

RECIPES = {
    # paper §4: batch 1024 for 300 epochs, AdamW lr 4e-4 (the release's script used its default
    # 1e-4), betas (0.9, 0.95), weight decay 0.05, linear decay to 1e-5 over the last 50 epochs; no
    # EMA (release); dropout 0.1 on tokens, residuals and FFNs (release)
    **{name: dict(epochs=300, batch_size=64, grad_accum=16, lr=4e-4, ema=0.0, weight_decay=0.05,
                  dropout=0.1)
       for name in ("B", "L", "XL", "XXL")},
    # the laptop run on the built-in textures, within 3 minutes on 2 cores: a higher lr for the
    # small model, and no dropout, which slows a short run (guidance's class-label dropout stays)
    "tiny": dict(epochs=3.5, batch_size=64, grad_accum=1, lr=3e-3, ema=0.0, weight_decay=0.05,
                 dropout=0.0),
}


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    recipe = dar.add_training_flags(parser, RECIPES)
    recipe.add_argument("--epochs", type=dar.flag_type(0, 10 ** 6, low_open=True))
    recipe.add_argument("--dropout", type=dar.flag_type(0, 1, high_open=True),
                        help="dropout on the tokens, residuals "
                        "and FFNs (release: 0.1); the class label's dropout (for guidance) stays "
                        "0.1")
    model = parser.add_argument_group("the tokens")
    model.add_argument("--tokenizer", default=None,
                       help="tokenizer checkpoint, ours or the release's "
                       "(default for tiny: out/tiny/tokenizer.pt)")
    model.add_argument("--cache-codes", default=None,
                       help="folder for the tokens of every image and view "
                       "(default for tiny: <out>/codes; otherwise tokens are computed on the fly)")
    model.add_argument("--reverse", action="store_true",
                       help="train on the reversed (fine-to-coarse) order")
    schedule = parser.add_argument_group("the learning-rate decay (paper)")
    schedule.add_argument("--final-lr", type=dar.WEIGHT, default=1e-5,
                          help="lr at the end of the decay (paper: 1e-5)")
    schedule.add_argument("--decay-fraction", type=dar.flag_type(0, 1), default=50 / 300,
                          help="linear decay over this last fraction of training (paper: the last "
                               "50 of 300 epochs)")
    watch = parser.add_argument_group("watching it learn")
    watch.add_argument("--sample-guidance", type=dar.SCALE, default=4.0,
                       help="guidance scale of the --sample-every "
                       "pictures and --eval-samples")
    watch.add_argument("--eval-samples", type=dar.COUNT, default=None,
                       help="built-in data: at every picture, the toy "
                       "accuracy of this many samples (default 100 for tiny, 0 otherwise: off)")
    watch.add_argument("--evaluator", default=os.path.relpath(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval-samples' toy evaluator (shipped; trained and written there if "
                            "missing)")
    args = dar.finish_training_flags(parser, argv, RECIPES, "train_ar.py", "ar.pt")
    if args.tokenizer is None and args.config != "tiny":
        parser.error("--tokenizer is required for the paper configs (e.g. the released "
                     "D-AR-tokenizer_v1.pt)")
    args.tokenizer, args.tokenizer_choice = choose_tokenizer(args.tokenizer, args.out)
    if not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer: no checkpoint at {args.tokenizer}; train one with `python "
                     f"train_tokenizer.py` or pass the released D-AR-tokenizer_v1.pt")
    cache = args.cache_codes
    if cache is not None and Path(cache).exists() and not Path(cache).is_dir():
        parser.error(f"--cache-codes {args.cache_codes} is a file, not a folder")
    if args.eval_samples is None:
        args.eval_samples = 100 if args.config == "tiny" and args.data in dar.BUILTIN_DATA else 0
    if "evaluator" in args.given and not args.eval_samples:
        parser.error("--evaluator acts only with --eval-samples N: leave it out")
    if args.eval_samples and args.data not in dar.BUILTIN_DATA:
        parser.error("--eval-samples measures the built-in textures (--data textures)")
    if args.cache_codes is None and args.config == "tiny":  # one cache per tokenizer file
        args.cache_codes = str(args.out / f"codes-{dar.cached_digest(args.tokenizer)[:12]}")
    return args


def choose_tokenizer(given, out):
    """--config tiny without --tokenizer: yours (<out>/tokenizer.pt, from `python
    train_tokenizer.py`) if it exists, else the shipped one; -> its path and a line naming it."""
    own, shipped = Path(out) / "tokenizer.pt", os.path.relpath(dar.SHIPPED_TINY / "tokenizer.pt")
    if given is not None:
        return given, f"the tokens of {given}"
    if own.is_file():
        return str(own), f"the tokens of your tokenizer {own} (--tokenizer chooses another)"
    return shipped, (f"the tokens of the shipped tokenizer {shipped} (you have none in {out}: "
                     f"`python train_tokenizer.py`)")


class CachedCodes(torch.utils.data.Dataset):
    """The tokens of every (view, image), memory-mapped: codes (views, n, N), labels (n,)."""

    def __init__(self, codes, labels, class_names):
        self.codes, self.labels, self.class_names = codes, labels, class_names
        self.num_classes = len(class_names)

    def __len__(self):
        return self.codes.shape[1]

    def __getitem__(self, key):  # (index, augmentation seed): the seed picks the view
        index, seed = key
        view = random.Random(seed).randrange(self.codes.shape[0])
        return torch.from_numpy(self.codes[view, index].astype(np.int64)), int(self.labels[index])


def cache_codes(tokenizer, tokenizer_path, dataset, folder, rank, world_size, device, batch_size,
                data):
    """Encode every view of every image once into <folder>/codes.npy (sharded over the processes).
    The folder records what made it (the tokenizer file's SHA-256, the data: `data`, the shape); a
    cache of other settings is refused with one line naming the difference, an interrupted one is
    rebuilt, and one being built by another live process is refused."""
    folder = Path(folder)
    shape = (dataset.views, len(dataset), tokenizer.cfg.num_tokens)
    codes_path, labels_path = folder / "codes.npy", folder / "labels.npy"
    source_path = folder / "source.json"
    source = {"tokenizer_sha256": dar.cached_digest(tokenizer_path), "data": data,
              "shape": list(shape)}
    if source_path.exists():
        dar.check_record(source_path, source, f"--cache-codes {folder}")
    if not codes_path.exists() or not source_path.exists():
        partial = folder / "codes.npy.partial"
        # one process builds a cache: a second run into the same folder is refused, not mixed in
        if rank == 0:
            release = dar.lock_folder(folder, "--cache-codes")
            np.lib.format.open_memmap(partial, mode="w+", dtype=np.int32, shape=shape)
            np.save(folder / "labels.partial.npy", np.zeros(len(dataset), dtype=np.int64))
        if world_size > 1:
            torch.distributed.barrier()
        codes = np.load(partial, mmap_mode="r+")
        labels = np.load(folder / "labels.partial.npy", mmap_mode="r+")
        shard = range(rank, shape[1], world_size)
        keys = [(index, 0, view) for view in range(shape[0]) for index in shard]
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=keys)
        batched_keys = torch.utils.data.BatchSampler(keys, batch_size, False)
        progress = tqdm(loader, desc="caching codes", disable=rank != 0)
        for batch_keys, (images, batch_labels) in zip(batched_keys, progress):
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
            release()
        if world_size > 1:
            torch.distributed.barrier()
    try:
        codes, labels = np.load(codes_path, mmap_mode="r"), np.load(labels_path)
    except (OSError, ValueError) as error:
        raise dar.BadInput(f"--cache-codes: {codes_path} is damaged ({error}); delete {folder} to "
                           "rebuild it") from None
    if codes.shape != shape or labels.shape != (shape[1],):
        raise dar.BadInput(f"--cache-codes: {codes_path} holds {codes.shape}, not {shape}; delete "
                           f"{folder} to rebuild it")
    return CachedCodes(codes, labels, list(dataset.class_names))


def tokenizer_and_data(args, rank, world_size, device):
    """The frozen tokenizer (EMA weights) and the data: images (their range checked once here: the
    training step does not sync for it), or with --cache-codes their tokens; -> tokenizer, dataset,
    whether the dataset holds tokens."""
    try:
        tokenizer = dar.load_tokenizer(args.tokenizer, device).requires_grad_(False)
    except (ValueError, KeyError, OSError) as error:
        raise dar.BadInput(f"--tokenizer {args.tokenizer} cannot be loaded: "
                           f"{str(error).splitlines()[0]}") from None
    dataset = dar.training_images(args, tokenizer.cfg.image_size, "ar")
    if args.cache_codes is None:
        tokenizer.encode(torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))]))
        return tokenizer, dataset, False
    # a folder is known by its content (each file's path, size and time), not by its name
    data = ({"source": args.data, "size": args.builtin_size, "seed": args.seed}
            if args.data in dar.BUILTIN_DATA
            else {"source": args.data, "content": dataset.fingerprint()})
    return tokenizer, cache_codes(tokenizer, args.tokenizer, dataset, args.cache_codes, rank,
                                  world_size, device, args.batch_size, data), True


def main(args):
    if os.environ.get("RANK", "0") == "0":
        print(args.tokenizer_choice)
    checkpoint_path = args.out / "ar.pt"
    rank, world_size, device, autocast, log = dar.training_setup(args, checkpoint_path)
    tokenizer, dataset, cached = tokenizer_and_data(args, rank, world_size, device)
    learned = dar.tokenizer_record(args.tokenizer, checkpoint_path)  # whose codes it learns
    evaluator = dar.load_toy_evaluator(args.evaluator, tokenizer.cfg.image_size,
                                       flag="--evaluator").to(device) \
        if args.eval_samples and rank == 0 else None

    # ---- model, EMA (the paper keeps none), AdamW (weight decay on matrices, not on norm weights)
    cfg = ar_config(args, tokenizer, dataset.num_classes)
    model = dar.LlamaAR(cfg).to(device)
    model.class_names = list(dataset.class_names)  # recorded in the checkpoint
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    optimizer = dar.ar_optimizer(model, args.lr, args.betas, args.weight_decay)
    global_batch = args.batch_size * args.grad_accum * world_size
    total_steps = math.ceil(args.epochs * len(dataset) / global_batch)
    decay_start = round((1 - args.decay_fraction) * total_steps)
    start_step = resume(args, checkpoint_path, model, ema, optimizer, learned, log)
    log(f"AR {args.config}{' (reversed order)' if args.reverse else ''}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {total_steps} steps")
    trained = dar.wrap_for_training(model, args.compile, world_size, device)
    stream, batches = dar.training_batches(args, dataset, world_size, rank, start_step, total_steps)
    # ---- the loop (the model is in training mode: dropout and label dropout)
    step_log, loss = dar.StepLog(log, args.log_every, start_step, total_steps, rank != 0), None
    for step in range(start_step, total_steps):
        # paper: constant, then a linear decay to --final-lr over the last --decay-fraction
        decay = max(0.0, (step - decay_start) / max(1, total_steps - decay_start))
        lr = args.lr + (args.final_lr - args.lr) * decay
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for micro in range(args.grad_accum):
            inputs, labels = (tensor.to(device, non_blocking=True) for tensor in next(batches))
            tokens = inputs if cached else tokenizer.encode(inputs, values=False)      # (B, N)
            tokens = tokens.flip(1) if args.reverse else tokens
            # dropout and label dropout follow the samples, not the process layout
            torch.manual_seed(dar.stream_seed(args.seed, stream.first_position(step, micro), 1))
            with dar.gradient_sync(trained, micro == args.grad_accum - 1):  # DDP: the last one
                with autocast:
                    loss = dar.next_token_loss(trained(tokens, labels), tokens)         # Eq. (6)
                (loss / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            dar.update_ema(ema, model, args.ema)
        done = step + 1

        # ---- log (the last micro-batch's loss), draw and measure samples, save
        step_log(done, global_batch, {"loss": loss.detach()}, lr)
        if rank == 0 and (done % args.sample_every == 0 or done == total_steps):
            watch(ema or model, tokenizer, evaluator, args, done, done * global_batch, log)
        if rank == 0 and (done % args.save_every == 0 or done == total_steps):
            dar.save_training_checkpoint(checkpoint_path, "ar", cfg, model, ema, optimizer, done,
                                         args, tokenizer=learned, classes=model.class_names)
    step_log.close()
    dar.finish_training(args, checkpoint_path, rank, world_size, log)
    return model, loss  # for notebooks and tests (the last loss; None if no step ran)


def resume(args, path, model, ema, optimizer, learned, log):
    """--resume: the model, its EMA and the optimizer, if the checkpoint learned this tokenizer's
    codes; -> the step to continue from (0 without --resume)."""
    if not args.resume:
        return 0
    try:
        checkpoint = dar.training_checkpoint(path, "ar", args)
        if checkpoint.get("tokenizer", learned)["sha256"] != learned["sha256"]:
            raise dar.BadInput(f"--resume: {path} learned the codes of "
                               f"{checkpoint['tokenizer']['path']}, not of --tokenizer "
                               f"{args.tokenizer}")
        dar.resume_training(checkpoint, path, model, ema, optimizer)
    except ValueError as error:
        raise dar.BadInput(str(error)) from None
    log(f"resumed {path} at step {checkpoint['step']}")
    return checkpoint["step"]


def ar_config(args, tokenizer, num_classes):
    """The preset, sized to the tokenizer's V and N and to the data's classes, with the recipe's
    dropout and the token order (--reverse)."""
    return replace(dar.AR_PRESETS[args.config], vocab_size=tokenizer.cfg.codebook_size,
                   num_tokens=tokenizer.cfg.num_tokens, num_classes=num_classes,
                   reverse=args.reverse, token_dropout=args.dropout, residual_dropout=args.dropout,
                   ffn_dropout=args.dropout)


def watch(model, tokenizer, evaluator, args, done, images_seen, log):
    """Every --sample-every steps: a picture of samples, and with an evaluator their toy accuracy;
    then the model back in training mode."""
    save_samples(model, tokenizer, args, args.out / f"samples_{done:07d}.png")
    if evaluator is not None:
        accuracy = toy_accuracy(model, tokenizer, evaluator, args)
        log(f"step {done} ({images_seen:,} images): {accuracy}")
    model.train()


@torch.no_grad()
def save_samples(model, tokenizer, args, path):
    """A picture: a row per class (up to 10), the previews after each group, the last
    being the image."""
    device = tokenizer.sampling_times.device
    labels = torch.arange(min(model.cfg.num_classes, 10), device=device)
    generator = torch.Generator(device).manual_seed(args.seed)
    sampled_groups = list(dar.sample(model.eval(), tokenizer, labels, guidance=args.sample_guidance,
                                     generator=generator))
    names = [model.class_names[label] for label in labels.tolist()]
    previews = torch.stack([sampled.preview for sampled in sampled_groups], dim=1)
    columns = dar.preview_names(tokenizer.cfg.num_groups, tokenizer.cfg.group_size)
    dar.save_picture(dar.labelled_grid(previews, names, columns), path)


@torch.no_grad()
def toy_accuracy(model, tokenizer, evaluator, args):
    """The built-in data's toy accuracy of --eval-samples class-balanced guided samples
    (the evaluators' mean)."""
    make = dar.class_balanced_samples(model.eval(), tokenizer, seed=args.seed,
                                      guidance=args.sample_guidance)
    correct = dar.toy_judgement(evaluator, *make(list(range(args.eval_samples))))[1]
    accuracy = dar.spread(correct / args.eval_samples)
    return (f"toy accuracy of {args.eval_samples} samples {accuracy['mean']:.1%} "
            f"[{accuracy['low']:.1%}, {accuracy['high']:.1%}] (guidance {args.sample_guidance})")


if __name__ == "__main__":
    dar.command_line(lambda: main(parse_args()))
