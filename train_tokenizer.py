"""Train the sequential diffusion tokenizer (§3.1) with the loss of Eq. (7).

    python train_tokenizer.py                   # tiny config, built-in textures, CPU, < 2 min
    python train_tokenizer.py --config v1 --data /imagenet/train --batch-size 64 --grad-accum 2 \\
        --grad-checkpointing --compile          # the paper's run on one GPU
    torchrun --nproc_per_node 8 train_tokenizer.py --config v1 --data /imagenet/train \\
        --batch-size 128                        # ... on 8 GPUs

Each config brings its recipe (RECIPES below: the paper's values for v1 and ablation); any flag
overrides it. The global batch is --batch-size x --grad-accum x the number of processes. The
checkpoint `<out>/tokenizer.pt` is rewritten atomically every --save-every steps and at the end;
--resume continues it. The tiny config is the CPU miniature (dar.MiniatureRecipe).
"""
import argparse
import copy
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import dar

RECIPES = {
    # paper §4: 210K iterations at batch 1024, lr 2e-4, EMA 0.999, lambda_1 = lambda_2 = 0.5;
    # release: AdamW betas (0.9, 0.95), weight decay 0, 500 warmup steps, grad clip 1.0
    # (OFFICIAL_FORMAT §4.2)
    "v1": dict(steps=210_000, batch_size=64, grad_accum=16, lr=2e-4, warmup=500, ema=0.999,
               weight_decay=0.0,
               lpips_weight=0.5, repa_weight=0.5),
    # appendix A.4: the lightweight ablation tokenizer, 50K iterations at batch 256
    "ablation": dict(steps=50_000, batch_size=64, grad_accum=4, lr=2e-4, warmup=500, ema=0.999,
                     weight_decay=0.0,
                     lpips_weight=0.5, repa_weight=0.5),
    # the CPU miniature's quickstart, within 3 minutes on 2 cores: Eq. (7) in one piece, in small
    # batches (more updates for the images it has time to see). No LPIPS or REPA: their pretrained
    # networks cannot be downloaded offline and do not suit 32 x 32 images
    "tiny": dict(steps=800, batch_size=8, grad_accum=1, lr=3e-4, warmup=100, ema=0.99,
                 weight_decay=0.0,
                 lpips_weight=0.0, repa_weight=0.0),
}


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    recipe = dar.add_training_flags(parser, RECIPES)
    recipe.add_argument("--steps", type=dar.SIZE, help="optimizer steps")
    recipe.add_argument("--warmup", type=dar.COUNT, help="linear warm-up steps (release: 500)")
    recipe.add_argument("--lpips-weight", type=dar.WEIGHT,
                        help="lambda_1 of Eq. (7) (paper: 0.5; needs VGG16 weights; tiny: "
                        "LPIPS's form on a toy teacher, toy_perceptual)")
    recipe.add_argument("--repa-weight", type=dar.WEIGHT,
                        help="lambda_2 of Eq. (7) (paper: 0.5; needs DINOv2-B/14)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute activations in backward")
    add_miniature_flags(parser)
    add_watch_flags(parser)
    args = dar.finish_training_flags(parser, argv, RECIPES, "train_tokenizer.py",
                                     "tokenizer.pt")
    miniature_flags = [flag for flag in MINIATURE_FLAGS + ("lpips_from_group",)
                       if getattr(args, flag) is not None]
    if args.config != "tiny" and miniature_flags:
        parser.error("--conv-stem, --codebook-restart and --lpips-from-group belong to the CPU "
                     "miniature (--config tiny)")
    if args.lpips_from_group is not None and args.lpips_weight == 0:
        parser.error("--lpips-from-group acts only with --lpips-weight > 0")
    if args.eval_every is None:
        args.eval_every = 200 if args.config == "tiny" and args.data in dar.BUILTIN_DATA else 0
    if args.eval_every and args.data not in dar.BUILTIN_DATA:
        parser.error("--eval-every measures the built-in textures (--data textures)")
    if args.probe_images == 1:
        parser.error("--probe-images: 0 (no probes) or at least 2 (to fit and to score)")
    # no flag is silently ignored: these act only with --eval-every N
    for flag, needs in (("eval_images", "eval_every"), ("probe_images", "eval_every"),
                        ("evaluator", "eval_every")):
        if flag in args.given and not getattr(args, needs):
            flag, needs = (f"--{name.replace('_', '-')}" for name in (flag, needs))
            parser.error(f"{flag} acts only with {needs} N: leave it out")
    return args


def add_miniature_flags(parser):
    """The CPU miniature's recipe flags (dar.MiniatureRecipe); the paper's configs refuse them."""
    tiny = parser.add_argument_group("the CPU miniature (--config tiny; dar.MiniatureRecipe)")
    tiny.add_argument("--conv-stem", action=argparse.BooleanOptionalAction,
                      help="embed patches with a small CNN "
                      "(default: on; release: one strided convolution)")
    tiny.add_argument("--codebook-restart", type=dar.COUNT,
                      help="re-seed unused codebook rows every N steps (default: 100; "
                      "0: never, as released)")
    tiny.add_argument("--lpips-from-group", type=dar.flag_type(1, TINY_GROUPS, integer=True),
                      help="read the perceptual term only on the steps of groups k..K, so that "
                      "the first groups' steps ask for no detail (default: 1, every step, as "
                      "released)")


def add_watch_flags(parser):
    """What a run on built-in data measures and draws as it learns."""
    watch = parser.add_argument_group("watching it learn (built-in data)")
    watch.add_argument("--eval-every", type=dar.COUNT, default=None,
                       help="every N steps and at the end, the EMA "
                       "weights' reconstructions of held-out images: both colours kept, centroid "
                       "offset, toy accuracy, MSE, codebook use; logged and appended to "
                       "<out>/learning_curve.tsv (default for tiny: 200; 0: never; --sample-every "
                       "draws them)")
    watch.add_argument("--eval-images", type=dar.SIZE, default=100,
                       help="held-out images of --eval-every")
    watch.add_argument("--probe-images", type=dar.COUNT, default=0,
                       help="--eval-every also fits linear probes of the "
                       "first and last group (group_probes) on all but 500 (or a quarter) of "
                       "this many held-out images (0: no probes)")
    watch.add_argument("--evaluator", default=os.path.relpath(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval-every's toy evaluator (shipped; trained and written there if "
                       "missing); the accuracy logged is its members' mean")


# dar.MiniatureRecipe's fields
MINIATURE_FLAGS = ("conv_stem", "codebook_restart")
TINY_GROUPS = dar.TOKENIZER_PRESETS["tiny"].num_groups


def miniature_recipe(args):
    """--config tiny: the MiniatureRecipe with the flags' overrides; else None (the release's)."""
    if args.config != "tiny":
        return None
    overrides = {name: getattr(args, name) for name in MINIATURE_FLAGS
                 if getattr(args, name) is not None}
    return dar.MiniatureRecipe(**overrides)


def load_lpips(device):
    """LPIPS-VGG from the `lpips` package, as released (its VGG16 backbone
    comes from torchvision)."""
    try:
        import lpips
        metric = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as error:  # no network, no cached weights
        raise SystemExit(f"LPIPS needs torchvision's ImageNet VGG16 weights (vgg16-397923af.pth in "
                         f"{torch.hub.get_dir()}/checkpoints) and could not load them: {error}\n"
                         "Download them once with network access, or turn the term off with "
                         "--lpips-weight 0.")
    # release: left in train mode, so the dropout of its linear heads is active
    return metric.to(device)


def toy_perceptual(teacher):
    """The miniature's LPIPS (release: LPIPS-VGG): the same form on its toy teacher, a
    `ToyClassifier` of the data: the feature maps of its four stages, unit-normalised over
    channels, their squared differences summed over channels and averaged over positions and
    stages. -> (images, fakes) -> per-image distances (B,)."""
    def distance(images, fakes):
        stages, x, y = [], images, fakes
        for layer in teacher.body:
            x, y = layer(x), layer(y)
            if isinstance(layer, nn.GELU):  # the end of a stage
                stages.append((F.normalize(x, dim=1) - F.normalize(y, dim=1)).square().sum(1))
        return torch.stack([stage.mean((1, 2)) for stage in stages]).mean(0)
    return distance


def load_repa_target(device):
    """REPA targets: DINOv2-B/14 patch tokens (OFFICIAL_FORMAT §4.1
    preprocessing), from torch.hub."""
    try:
        dino = torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14", trust_repo=True,
                              skip_validation=True)
    except Exception as error:
        raise SystemExit("REPA needs DINOv2-B/14 from torch.hub (facebookresearch/dinov2, "
                         f"dinov2_vitb14, cached in {torch.hub.get_dir()}) and could not load it: "
                         f"{error}\nDownload it once with network access, or turn the term off "
                         "with --repa-weight 0.")
    dino = dino.to(device).eval().requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    # [-1, 1] -> ImageNet-normalised, then bicubic to 224 (normalised first, as released)
    def target(images):
        x = F.interpolate((images * 0.5 + 0.5 - mean) / std, size=224, mode="bicubic",
                          align_corners=False)
        return dino.forward_features(x)["x_norm_patchtokens"]                # (B, 256, 768)
    return target


def loss_networks(args, cfg, device, rank, start_step):
    """The frozen networks the run reads: LPIPS (the miniature's: on its teacher), the REPA target
    (each None when its weight is 0), and --eval-every's held-out set (None when off, and on
    every rank but 0)."""
    perceptual = None if args.lpips_weight == 0 else load_lpips(device) if args.config != "tiny" \
        else toy_perceptual(load_teacher(args.out / "teacher.pt", cfg.image_size, device,
                                         args.data))
    repa_target = load_repa_target(device) if args.repa_weight > 0 else None
    held_out = HeldOut(args, cfg.image_size, device, start_step) if args.eval_every and rank == 0 \
        else None
    return perceptual, repa_target, held_out


# linear probes of groups 1, 2, 4 and K (group_probes), logged with every evaluation
PROBES = ((0, "class"), (0, "background"), (0, "object colour"), (0, "position"), (1, "class"),
          (3, "class"), (-1, "class"))
PROBE_COLUMNS = tuple(f"g{group + 1 if group >= 0 else 'K'}_{what.replace(' ', '_')}"
                      for group, what in PROBES)


class HeldOut:
    """--eval-every: held-out built-in images, their noise x_0, the toy evaluator, the probes'
    images, the curve file."""

    def __init__(self, args, image_size, device, start_step):
        self.data = args.data
        self.images, self.labels = dar.builtin_images(args.eval_images, image_size,
                                                      dar.EVALUATOR_REFERENCE_SEED, args.data)
        self.images = self.images.to(device)
        self.noise = torch.randn(len(self.images), 3, image_size, image_size,
                                 generator=torch.Generator().manual_seed(0)).to(device)
        self.evaluator = dar.load_toy_evaluator(args.evaluator, image_size, args.data,
                                                flag="--evaluator").to(device)
        self.probes = args.probe_images
        if self.probes:
            probes = dar.builtin_images(self.probes, image_size, PROBE_SEED, args.data)
            self.probe_images, self.probe_labels = probes
            self.probe_images = self.probe_images.to(device)
            self.probe_train = self.probes - min(500, self.probes // 4)
        self.out = args.out
        # the curve so far: a resumed run keeps the rows up to its step (a killed run wrote more)
        self.curve = args.out / "learning_curve.tsv"
        rows = self.curve.read_text().splitlines()[1:] if self.curve.exists() else []
        self.rows = [row for row in rows if row.split("\t")[0].isdigit()
                     and int(row.split("\t")[0]) <= start_step]
        self.header = "\t".join(CURVE_COLUMNS + PROBE_COLUMNS)
        self.curve.parent.mkdir(parents=True, exist_ok=True)
        dar.write_atomically(self.curve, "\n".join([self.header, *self.rows]) + "\n")

    @torch.no_grad()
    def evaluate(self, tokenizer, step, images_seen, log):
        """Reconstructions of the held-out images by the EMA weights: figures logged and appended
        to the learning curve."""
        codes = tokenizer.encode(self.images)
        reconstructions = tokenizer.decode(codes, noise=self.noise)
        background, colours, offset = dar.layout_agreement(self.images, reconstructions)
        accuracy = (dar.toy_judgement(self.evaluator, reconstructions,
                                      self.labels)[1] / len(self.images)).mean().item()
        figures = dict(background_kept=background.float().mean().item(),
                       colours_kept=colours.float().mean().item(),
                       centroid_px=offset.mean().item(), accuracy=accuracy,
                       mse=F.mse_loss(reconstructions, self.images).item(),
                       codebook_use=codes.unique().numel() / tokenizer.cfg.codebook_size)
        probed = [float("nan")] * len(PROBES)
        if self.probes:  # fitted on probe_train images, scored on the rest
            probes = group_probes(tokenizer, self.probe_images, self.probe_labels,
                                  self.probe_train)
            probed = [probes[group % tokenizer.cfg.num_groups][what] for group, what in PROBES]
        log(f"eval step {step} ({images_seen:,} images): background kept "
            f"{figures['background_kept']:.1%}, both colours {figures['colours_kept']:.1%}, "
            f"centroid off by {figures['centroid_px']:.2f} px, toy accuracy {accuracy:.1%}, mse "
            f"{figures['mse']:.4f}, codebook use {figures['codebook_use']:.1%}"
            + "".join(f", {c} {v:.3f}" for c, v in zip(PROBE_COLUMNS, probed) if self.probes))
        values = [f"{figures[c]:.4f}" for c in CURVE_COLUMNS[2:]] + [f"{v:.4f}" for v in probed]
        self.rows.append("\t".join([str(step), str(images_seen)] + values))
        dar.write_atomically(self.curve, "\n".join([self.header, *self.rows]) + "\n")


def watch(args, done, global_batch, tokenizer, held_out, shown, log):
    """Every --eval-every steps the held-out figures, every --sample-every the picture (`draw`)."""
    if held_out and (done % args.eval_every == 0 or done == args.steps):
        held_out.evaluate(tokenizer, done, done * global_batch, log)
    if done % args.sample_every == 0 or done == args.steps:
        draw(tokenizer, held_out, shown, args, done)


def draw(tokenizer, held_out, shown, args, step):
    """<out>/reconstructions_STEP.png: held-out built-in images, one of each class, and their
    reconstructions; for an image folder, the first training images."""
    if held_out is not None:
        images, noise = held_out.images[:10], held_out.noise[:10]
        names = [dar.BUILTIN_DATA[args.data].class_names[label]
                 for label in held_out.labels[:10].tolist()]
    else:
        images, noise, names = shown, None, [f"image {i}" for i in range(len(shown))]
    rows = ["held out" if held_out is not None else "training image", "reconstructed"]
    picture = torch.stack([images, tokenizer.decode(tokenizer.encode(images), noise=noise)])
    dar.save_picture(dar.labelled_grid(picture, rows, names),
                     args.out / f"reconstructions_{step:07d}.png")


CURVE_COLUMNS = ("step", "images", "background_kept", "colours_kept", "centroid_px",
                 "accuracy", "mse", "codebook_use")


# ---- what the codes hold: linear probes of one group of conditions

PROBE_SEED = 4  # the linear probes of what a group of conditions holds (`group_probes`)


@torch.no_grad()
def group_probes(tokenizer, images, labels, train=3000, ridge=10.0, groups=None):
    """Linear probes of what one group of conditions z' holds: ridge regressions on the first
    `train` images, scored on the rest, for each 0-based group in `groups` (default: groups 1, 2, 4
    and K, counted from 1). -> {group: {"class", "background", "object colour" (accuracies),
    "position" (the fraction whose centroid is read within 3 px)}}."""
    cfg = tokenizer.cfg
    groups = groups or sorted({0, min(1, cfg.num_groups - 1), min(3, cfg.num_groups - 1),
                               cfg.num_groups - 1})
    cond = torch.cat([tokenizer.conditions(tokenizer.encode(images[i:i + 500]))
                      for i in range(0, len(images), 500)])
    where, background, colour = dar.object_layout(images.cpu())
    index = lambda colours: torch.cdist(colours, dar.PALETTE).argmin(-1)
    targets = {"class": F.one_hot(labels.cpu(), 10).float(),
               "background": F.one_hot(index(background), 8).float(),
               "object colour": F.one_hot(index(colour), 8).float(),
               "position": where.nan_to_num(cfg.image_size / 2)}
    results = {}
    for group in groups:
        x = cond[:, group * cfg.group_size:(group + 1) * cfg.group_size].flatten(1).double().cpu()
        x = (x - x[:train].mean(0)) / x[:train].std(0).clamp(min=1e-6)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram = x[:train].T @ x[:train] + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        solve = lambda y: torch.linalg.solve(gram, x[:train].T @ y[:train].double())
        scores = {}
        for what, y in targets.items():
            predicted = x[train:] @ solve(y)
            if what == "position":
                scores[what] = ((predicted - y[train:]).norm(dim=-1) <= 3).float().mean().item()
            else:
                scores[what] = (predicted.argmax(-1) == y[train:].argmax(-1)).float().mean().item()
        results[group] = scores
    return results


def load_teacher(path, image_size, device, data="textures"):
    """The miniature's teacher (of the toy perceptual term), a
    `ToyClassifier` trained once on images of its own seed (never the evaluator's) and cached at
    `path` in float32."""
    path = Path(path)
    if not path.is_file():
        tqdm.write(f"training the miniature's teacher once -> {path}")
        classifier = dar.train_toy_classifier(image_size, seed=dar.TEACHER_TRAIN_SEED,
                                              data_seed=dar.TEACHER_TRAIN_SEED, data=data)
        dar.save_checkpoint({"kind": "teacher", "image_size": image_size, "data": data,
                             "model": classifier.state_dict()}, path)
    checkpoint = dar.load_checkpoint_file(path)
    if checkpoint.get("kind") != "teacher" or checkpoint.get("image_size") != image_size \
            or checkpoint.get("data") != data:
        raise ValueError(f"{path} is not the miniature's teacher for {image_size}-pixel --data "
                         f"{data} images")
    classifier = dar.ToyClassifier()
    classifier.load_state_dict(checkpoint["model"])
    return classifier.to(device).eval().requires_grad_(False)


def main(args):
    checkpoint_path = args.out / "tokenizer.pt"
    rank, world_size, device, autocast, log = dar.training_setup(args, checkpoint_path)

    # ---- data, model, the networks of the loss
    cfg = dar.TOKENIZER_PRESETS[args.config]
    cfg = replace(cfg, repa_dim=0) if args.repa_weight == 0 else cfg  # no REPA: no untrained head
    dataset = dar.training_images(args, cfg.image_size, "tokenizer")
    recipe = miniature_recipe(args)
    model, restarts, shown = build(args, cfg, recipe, dataset, device, log)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    checkpoint, start_step = resumed_checkpoint(args, checkpoint_path)
    perceptual, repa_target, held_out = loss_networks(args, cfg, device, rank, start_step)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay)
    if checkpoint:
        resume(checkpoint, checkpoint_path, model, ema, optimizer, restarts, log)
    trained = dar.wrap_for_training(model, args.compile, world_size, device)
    stream, batches = dar.training_batches(args, dataset, world_size, rank, start_step, args.steps)
    global_batch = args.batch_size * args.grad_accum * world_size

    # ---- the loop of Eq. (7)
    step_log, losses = dar.StepLog(log, args.log_every, start_step, args.steps, rank != 0), {}
    for step in range(start_step, args.steps):
        lr = args.lr * min(1.0, step / args.warmup) if args.warmup else args.lr  # release: warm-up
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        for micro in range(args.grad_accum):
            images = next(batches)[0].to(device, non_blocking=True)
            # the time u and noise x_0 of Eq. (3) follow the samples, not the process layout
            torch.manual_seed(dar.stream_seed(args.seed, stream.first_position(step, micro), 1))
            # DDP all-reduces the gradients in the last micro-step only
            with dar.gradient_sync(trained, micro == args.grad_accum - 1):
                with autocast:
                    losses = trained(images, perceptual, repa_target, args.lpips_weight,
                                     args.repa_weight, lpips_from_group=args.lpips_from_group or 1)
                (losses["loss"] / args.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dar.update_ema(ema, model, args.ema)
        done = step + 1
        if restarts and done % recipe.codebook_restart == 0:
            restarts.restart()

        # ---- log (the last micro-batch's losses), evaluate and draw (the EMA weights), save
        step_log(done, global_batch, losses, lr)
        if rank == 0:
            watch(args, done, global_batch, ema, held_out, shown, log)
        if rank == 0 and (done % args.save_every == 0 or done == args.steps):
            save(args, checkpoint_path, cfg, model, ema, optimizer, done, recipe, restarts)
    step_log.close()
    dar.finish_training(args, checkpoint_path, rank, world_size, log)
    return model, losses  # for notebooks and tests


def build(args, cfg, recipe, dataset, device, log):
    """-> the tokenizer (the release's, or built by the CPU miniature's recipe), the miniature's
    codebook restarts (or None), and the first 8
    images, the pictures' inputs. Their range is checked here, once per run: the training step
    does not sync for it."""
    model = (dar.miniature_tokenizer(cfg, recipe) if recipe else dar.Tokenizer(cfg)).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    shown = torch.stack([dataset[i][0] for i in range(8)]).to(device)
    model.encode(shown)  # checks the images, once per run
    restarts = dar.CodebookRestarts(model.quantizer) if recipe and recipe.codebook_restart else None
    log(f"tokenizer {args.config}: {sum(p.numel() for p in model.parameters()):,} parameters")
    return model, restarts, shown


def save(args, path, cfg, model, ema, optimizer, done, recipe, restarts):
    """The training checkpoint. The CPU miniature's also says how to build it, and holds for an
    exact resume the codebook use since the last restart."""
    entries = {"builder": "miniature", "recipe": asdict(recipe)} if recipe else {}
    if restarts is not None:
        entries.update(codebook_use=restarts.use)
    dar.save_training_checkpoint(path, "tokenizer", cfg, model, ema, optimizer, done, args,
                                 **entries)


def resumed_checkpoint(args, path):
    """--resume: the checkpoint to continue (`dar.training_checkpoint`), read once, and its step;
    else (None, 0). `resume` loads it once the optimizer exists."""
    try:
        checkpoint = dar.training_checkpoint(path, "tokenizer", args) if args.resume else None
        return checkpoint, checkpoint["step"] if checkpoint else 0
    except ValueError as error:
        raise dar.BadInput(str(error)) from None


def resume(checkpoint, path, model, ema, optimizer, restarts, log):
    """--resume: the tokenizer, its EMA, the optimizer and the codebook use, from the checkpoint
    read at the start."""
    try:
        dar.resume_training(checkpoint, path, model, ema, optimizer)
    except ValueError as error:
        raise dar.BadInput(str(error)) from None
    if restarts is not None:
        restarts.use.copy_(checkpoint["codebook_use"])
    log(f"resumed {path} at step {checkpoint['step']}")


if __name__ == "__main__":
    dar.command_line(lambda: main(parse_args()))
