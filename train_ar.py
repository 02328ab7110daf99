"""Train the Llama AR model (§3.2, Eq. 6) on the tokens of a frozen sequential diffusion tokenizer.

    python train_ar.py                                          # tiny config, CPU, under 3 min: the codes of
                                                                # out/tiny/tokenizer.pt, else the shipped one
    python train_ar.py --reverse --out out/tiny-reverse         # the fine-to-coarse ablation (Table 7)
    torchrun --nproc_per_node 8 train_ar.py --config L --tokenizer D-AR-tokenizer_v1.pt \\
        --data /imagenet/train --batch-size 128 --cache-codes /fast/codes   # the paper's D-AR-L

Each config brings its recipe (RECIPES below: the paper's values for B/L/XL/XXL); any flag overrides it.
The global batch is --batch-size x --grad-accum x the number of processes. Tokens are computed on the
fly by the tokenizer (EMA weights, float32), or once per augmentation view with --cache-codes. The
checkpoint records the tokenizer file (path and SHA-256), which sample.py then uses.
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
    # paper §4: batch 1024 for 300 epochs, AdamW lr 4e-4 (the release's script used its default 1e-4),
    # betas (0.9, 0.95), weight decay 0.05, linear decay to 1e-5 over the last 50 epochs; no EMA (release);
    # dropout 0.1 on tokens, residuals and FFNs (release)
    **{name: dict(epochs=300, batch_size=64, grad_accum=16, lr=4e-4, ema=0.0, weight_decay=0.05, dropout=0.1)
       for name in ("B", "L", "XL", "XXL")},
    # the laptop run on the built-in shapes, within 3 minutes on 2 cores: a higher lr for the small model, and
    # no dropout, which slows a short run (the class-label dropout of guidance stays)
    "tiny": dict(epochs=3.5, batch_size=64, grad_accum=1, lr=3e-3, ema=0.0, weight_decay=0.05, dropout=0.0),
}


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    recipe = dar.add_training_flags(parser, RECIPES)
    recipe.add_argument("--epochs", type=dar.RATE)
    recipe.add_argument("--dropout", type=dar.flag_type(0, 1, high_open=True), help="dropout on the tokens, residuals "
                        "and FFNs (release: 0.1); the class label's dropout (for guidance) stays 0.1")
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
    watch = parser.add_argument_group("watching it learn")
    watch.add_argument("--sample-guidance", type=dar.WEIGHT, default=4.0, help="guidance scale of the --sample-every "
                       "pictures and --eval-samples")
    watch.add_argument("--eval-samples", type=dar.COUNT, default=None, help="built-in data: at every picture, the toy "
                       "accuracy of this many samples (default 100 for tiny, 0 otherwise: off)")
    watch.add_argument("--evaluator", default=str(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval-samples' toy evaluator (shipped; trained and written there if missing)")
    args = dar.finish_training_flags(parser, argv, RECIPES, "train_ar.py")
    if args.tokenizer is None and args.config != "tiny":
        parser.error("--tokenizer is required for the paper configs (e.g. the released D-AR-tokenizer_v1.pt)")
    args.tokenizer, args.tokenizer_choice = choose_tokenizer(args.tokenizer, args.out)
    if not Path(args.tokenizer).is_file():
        parser.error(f"--tokenizer: no checkpoint at {args.tokenizer}; train one with `python train_tokenizer.py` "
                     f"or pass the released D-AR-tokenizer_v1.pt")
    if args.cache_codes is not None and Path(args.cache_codes).exists() and not Path(args.cache_codes).is_dir():
        parser.error(f"--cache-codes {args.cache_codes} is a file, not a folder")
    if args.eval_samples is None:
        args.eval_samples = 100 if args.config == "tiny" and args.data == "builtin" else 0
    if args.eval_samples and args.data != "builtin":
        parser.error("--eval-samples measures the built-in shapes (--data builtin)")
    if args.cache_codes is None and args.config == "tiny":  # one cache per tokenizer file
        args.cache_codes = str(args.out / f"codes-{dar.cached_digest(args.tokenizer)[:12]}")
    return args


def choose_tokenizer(given, out):
    """--config tiny without --tokenizer: yours (<out>/tokenizer.pt, from `python train_tokenizer.py`) if it
    exists, else the shipped one; -> the path and the line that says which."""
    own, shipped = Path(out) / "tokenizer.pt", os.path.relpath(dar.SHIPPED_TINY / "tokenizer.pt")
    if given is not None:
        return given, f"the tokens of {given}"
    if own.is_file():
        return str(own), f"the tokens of your tokenizer {own} (--tokenizer chooses another)"
    return shipped, f"the tokens of the shipped tokenizer {shipped} (you have none in {out}: `python train_tokenizer.py`)"


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
    refused with one line naming the difference, an interrupted one is rebuilt, and one being built by another live
    process is refused."""
    folder = Path(folder)
    shape = (dataset.views, len(dataset), tokenizer.cfg.num_tokens)
    codes_path, labels_path, source_path = folder / "codes.npy", folder / "labels.npy", folder / "source.json"
    source = {"tokenizer_sha256": dar.cached_digest(tokenizer_path), "data": data, "shape": list(shape)}
    if source_path.exists():
        dar.check_record(source_path, source, f"--cache-codes {folder}")
    if not codes_path.exists() or not source_path.exists():
        partial = folder / "codes.npy.partial"
        if rank == 0:  # one process builds a cache: a second run into the same folder is refused, not mixed in
            release = dar.lock_folder(folder, "--cache-codes")
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
            release()
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
    if os.environ.get("RANK", "0") == "0":
        print(args.tokenizer_choice)
    rank, world_size, device, autocast, log = dar.training_setup(args, args.out / "ar.pt")
    tokenizer, dataset, cached = tokenizer_and_data(args, rank, world_size, device)
    learned = dar.tokenizer_record(args.tokenizer, args.out / "ar.pt")  # the pair: which tokenizer's codes
    evaluator = dar.load_toy_evaluator(args.evaluator, tokenizer.cfg.image_size).to(device) \
        if args.eval_samples and rank == 0 else None

    # ---- model, EMA, optimiser (weight decay on matrices and embeddings, not on norm weights)
    cfg, model, ema, optimizer = build(args, tokenizer, dataset.num_classes, device)
    global_batch = args.batch_size * args.grad_accum * world_size
    total_steps = math.ceil(args.epochs * len(dataset) / global_batch)
    decay_start = round((1 - args.decay_fraction) * total_steps)
    checkpoint_path, start_step = args.out / "ar.pt", 0
    if args.resume:
        start_step = resume(checkpoint_path, model, ema, optimizer, learned, args.tokenizer)
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
            if evaluator is not None:
                log(f"step {done} ({done * global_batch:,} images): {toy_accuracy(ema or model, tokenizer, evaluator, args)}")
            model.train()
        if rank == 0 and (done % args.save_every == 0 or done == total_steps):
            dar.save_checkpoint(dar.training_checkpoint("ar", cfg, model, ema, optimizer, done, args, tokenizer=learned),
                                checkpoint_path)
    progress.close()
    dar.finish_training(args, checkpoint_path, rank, world_size, log)
    return model, terms["loss"]  # for notebooks and tests


def build(args, tokenizer, num_classes, device):
    """-> the AR config (the preset, sized to the tokenizer and the data), the model, its EMA (or None), AdamW."""
    cfg = replace(dar.AR_PRESETS[args.config], vocab_size=tokenizer.cfg.codebook_size, num_tokens=tokenizer.cfg.num_tokens,
                  num_classes=num_classes, reverse=args.reverse, token_dropout=args.dropout,
                  residual_dropout=args.dropout, ffn_dropout=args.dropout)
    model = dar.LlamaAR(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if args.ema > 0 else None
    return cfg, model, ema, dar.ar_optimizer(model, args.lr, args.betas, args.weight_decay)


def resume(path, model, ema, optimizer, learned, tokenizer_path):
    """--resume: the model, its EMA and the optimizer, if the checkpoint learned this tokenizer's codes; -> the step."""
    try:
        checkpoint = dar.resume_training(path, "ar", model, ema, optimizer)
    except ValueError as error:
        raise dar.BadInput(str(error)) from None
    if checkpoint.get("tokenizer", learned)["sha256"] != learned["sha256"]:
        raise dar.BadInput(f"--resume: {path} learned the codes of {checkpoint['tokenizer']['path']}, "
                           f"not of --tokenizer {tokenizer_path}")
    return checkpoint["step"]


@torch.no_grad()
def save_samples(model, tokenizer, args, path):
    """A picture: a row per class (up to 10), the previews after each group, the last being the image."""
    device = tokenizer.sampling_times.device
    labels = torch.arange(min(model.cfg.num_classes, 10), device=device)
    groups = list(dar.sample(model.eval(), tokenizer, labels, guidance=args.sample_guidance,
                             generator=torch.Generator(device).manual_seed(args.seed)))
    names = [dar.SHAPE_CLASSES[label] if args.data == "builtin" else f"class {label}" for label in labels.tolist()]
    previews = torch.stack([group.preview for group in groups], dim=1)
    dar.labelled_grid(previews, names, dar.preview_names(tokenizer.cfg.num_groups, tokenizer.cfg.group_size)).save(path)


@torch.no_grad()
def toy_accuracy(model, tokenizer, evaluator, args):
    """The built-in data's toy accuracy of --eval-samples class-balanced guided samples (the evaluators' mean)."""
    make = dar.class_balanced_samples(model.eval(), tokenizer, seed=args.seed, guidance=args.sample_guidance)
    correct = dar.toy_judgement(evaluator, *make(list(range(args.eval_samples))))[1]
    accuracy = dar.spread(correct / args.eval_samples)
    return (f"toy accuracy of {args.eval_samples} samples {accuracy['mean']:.1%} [{accuracy['low']:.1%}, "
            f"{accuracy['high']:.1%}] (guidance {args.sample_guidance})")


if __name__ == "__main__":
    dar.command_line(lambda: main(parse_args()))
