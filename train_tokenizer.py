"""Train the sequential diffusion tokenizer (§3.1) with the loss of Eq. (7).

    python train_tokenizer.py                                   # tiny config, built-in shapes, CPU, < 2 min
    python train_tokenizer.py --config v1 --data /imagenet/train --batch-size 64 --grad-accum 2 \\
        --grad-checkpointing --compile                          # the paper's run on one GPU
    torchrun --nproc_per_node 8 train_tokenizer.py --config v1 --data /imagenet/train --batch-size 128

Each config brings its recipe (RECIPES below: the paper's values for v1 and ablation); any flag overrides
it. The global batch is --batch-size x --grad-accum x the number of processes. The checkpoint
`<out>/tokenizer.pt` is rewritten atomically every --save-every steps and at the end; --resume continues it.
The tiny config is the CPU miniature (dar.MiniatureRecipe): it first trains the code path alone against a
code head (--code-path-steps), then Eq. (7) on the frozen encoder.
"""
import argparse
import copy
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dar

RECIPES = {
    # paper §4: 210K iterations at batch 1024, lr 2e-4, EMA 0.999, lambda_1 = lambda_2 = 0.5; release: AdamW
    # betas (0.9, 0.95), weight decay 0, 500 warmup steps, grad clip 1.0 (OFFICIAL_FORMAT §4.2)
    "v1": dict(steps=210_000, batch_size=64, grad_accum=16, lr=2e-4, warmup=500, ema=0.999, weight_decay=0.0,
               lpips_weight=0.5, repa_weight=0.5, code_path_steps=0, teacher_weight=0.0, freeze="none"),
    # appendix A.4: the lightweight ablation tokenizer, 50K iterations at batch 256
    "ablation": dict(steps=50_000, batch_size=64, grad_accum=4, lr=2e-4, warmup=500, ema=0.999, weight_decay=0.0,
                     lpips_weight=0.5, repa_weight=0.5, code_path_steps=0, teacher_weight=0.0, freeze="none"),
    # the CPU miniature's quickstart, within 3 minutes on 2 cores: the code path first (pixels only: the layout
    # needs no teacher), then D_FM on the frozen encoder, in small batches (more updates for the images it has
    # time to see). No LPIPS or REPA: their pretrained networks cannot be downloaded offline and do not suit
    # 32 x 32 images
    "tiny": dict(steps=800, batch_size=8, grad_accum=1, lr=3e-4, warmup=100, ema=0.99, weight_decay=0.0,
                 lpips_weight=0.0, repa_weight=0.0, code_path_steps=150, teacher_weight=0.0, freeze="encoder"),
}


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    recipe = dar.add_training_flags(parser, RECIPES)
    recipe.add_argument("--steps", type=dar.SIZE, help="optimizer steps")
    recipe.add_argument("--warmup", type=dar.COUNT, help="linear warm-up steps (release: 500)")
    recipe.add_argument("--lpips-weight", type=dar.WEIGHT, help="lambda_1 of Eq. (7) (paper: 0.5; needs VGG16 weights)")
    recipe.add_argument("--repa-weight", type=dar.WEIGHT, help="lambda_2 of Eq. (7) (paper: 0.5; needs DINOv2-B/14)")
    tiny = parser.add_argument_group("the CPU miniature (--config tiny; dar.MiniatureRecipe)")
    tiny.add_argument("--conv-stem", action=argparse.BooleanOptionalAction, help="embed patches with a small CNN "
                      "(default: on; release: one strided convolution)")
    tiny.add_argument("--codebook-restart", type=dar.COUNT, help="re-seed unused codebook rows every N steps (default: 100; "
                      "0: never, as released)")
    tiny.add_argument("--code-path-steps", type=dar.COUNT, help="first train the encoder -> VQ -> causal decoder path "
                      "alone for N steps, against the code head, no diffusion")
    tiny.add_argument("--teacher-weight", type=dar.WEIGHT, help="in those steps the code head also predicts the pooled "
                      "features of a small CNN trained on built-in shapes, with this weight (0: pixels only)")
    tiny.add_argument("--freeze", choices=["none", "encoder"], help="after the code-path steps, hold the encoder and "
                      "the codebook fixed")
    tiny.add_argument("--target-blur", type=dar.WEIGHT, help="the code head's target for group c(t): the image blurred by "
                      "sigma = S (1 - t) / t px (dar.time_blur), so each group learns what its step can see (default 0)")
    tiny.add_argument("--teacher-from", choices=["group", "last"], help="the teacher's features are predicted from "
                      "c(t) (default) or from the last group")
    tiny.add_argument("--own-step", action=argparse.BooleanOptionalAction, help="in the code-path steps, c(t) of group "
                      "k reads the earlier groups' tokens detached: each group learns what its own step adds")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    watch = parser.add_argument_group("watching it learn (built-in data)")
    watch.add_argument("--eval-every", type=dar.COUNT, default=None, help="every N steps and at the end, the EMA "
                       "weights' reconstructions of held-out images: both colours kept, centroid offset, toy accuracy, "
                       "MSE, codebook use; logged, appended to <out>/learning_curve.tsv and drawn to "
                       "<out>/reconstructions_STEP.png (default for tiny: 200; 0: never)")
    watch.add_argument("--eval-images", type=dar.SIZE, default=100, help="held-out images of --eval-every")
    watch.add_argument("--probe-images", type=dar.COUNT, default=0, help="--eval-every also fits linear probes of the "
                       "first and last group (dar.group_probes) on all but 500 (or a quarter) of this many held-out "
                       "images (0: no probes)")
    watch.add_argument("--evaluator", default=str(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval-every's toy evaluator (shipped; trained and written there if missing); the "
                       "accuracy logged is its members' mean")
    args = dar.finish_training_flags(parser, argv, RECIPES, "train_tokenizer.py")
    miniature_flags = [flag for flag in MINIATURE_FLAGS if getattr(args, flag) is not None]
    if args.config != "tiny" and (miniature_flags or args.code_path_steps):
        parser.error("--conv-stem, --codebook-restart and --code-path-steps belong to the CPU miniature (--config tiny)")
    if not args.code_path_steps and (args.freeze != "none" or args.teacher_weight > 0):
        parser.error("--freeze and --teacher-weight act on the code-path stage: give --code-path-steps N")
    if args.eval_every is None:
        args.eval_every = 200 if args.config == "tiny" and args.data in dar.BUILTIN_DATA else 0
    if args.eval_every and args.data not in dar.BUILTIN_DATA:
        parser.error("--eval-every measures the built-in shapes (--data builtin)")
    if args.probe_images == 1:
        parser.error("--probe-images: 0 (no probes) or at least 2 (to fit and to score)")
    return args


MINIATURE_FLAGS = ("conv_stem", "codebook_restart", "target_blur", "teacher_from", "own_step")  # dar.MiniatureRecipe's fields


def miniature_recipe(args):
    """--config tiny: the MiniatureRecipe with the flags' overrides; None (the release's tokenizer) otherwise."""
    if args.config != "tiny":
        return None
    recipe = dar.MiniatureRecipe(teacher_features=dar.ShapeClassifier.widths[-1] if args.teacher_weight > 0 else 0)
    overrides = {name: getattr(args, name) for name in MINIATURE_FLAGS if getattr(args, name) is not None}
    return replace(recipe, **overrides)


def load_lpips(device):
    """LPIPS-VGG from the `lpips` package, as released (its VGG16 backbone comes from torchvision)."""
    try:
        import lpips
        metric = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as error:  # no network, no cached weights
        raise SystemExit(f"LPIPS needs torchvision's ImageNet VGG16 weights (vgg16-397923af.pth in "
                         f"{torch.hub.get_dir()}/checkpoints) and could not load them: {error}\n"
                         f"Download them once with network access, or turn the term off with --lpips-weight 0.")
    return metric.to(device)  # release: left in train mode, so the dropout of its linear heads is active


def load_repa_target(device):
    """REPA targets: DINOv2-B/14 patch tokens (OFFICIAL_FORMAT §4.1 preprocessing), from torch.hub."""
    try:
        dino = torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14", trust_repo=True, skip_validation=True)
    except Exception as error:
        raise SystemExit(f"REPA needs DINOv2-B/14 from torch.hub (facebookresearch/dinov2, dinov2_vitb14, cached in "
                         f"{torch.hub.get_dir()}) and could not load it: {error}\n"
                         f"Download it once with network access, or turn the term off with --repa-weight 0.")
    dino = dino.to(device).eval().requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    def target(images):  # [-1, 1] -> ImageNet-normalised, then bicubic to 224 (normalised first, as released)
        x = F.interpolate((images * 0.5 + 0.5 - mean) / std, size=224, mode="bicubic", align_corners=False)
        return dino.forward_features(x)["x_norm_patchtokens"]                # (B, 256, 768)
    return target


def loss_networks(args, cfg, device, rank):
    """The frozen networks the run reads: LPIPS, the REPA target, the miniature's teacher (each None when its weight
    is 0), and --eval-every's held-out set (None when off, and on every rank but 0)."""
    perceptual = load_lpips(device) if args.lpips_weight > 0 else None
    repa_target = load_repa_target(device) if args.repa_weight > 0 else None
    teacher = dar.load_teacher(args.out / "teacher.pt", cfg.image_size, device, args.data) \
        if args.teacher_weight > 0 else None
    held_out = HeldOut(args, cfg.image_size, device) if args.eval_every and rank == 0 else None
    return perceptual, repa_target, teacher, held_out


# linear probes of groups 1, 2, 4 and K (dar.group_probes), logged with every evaluation
PROBES = ((0, "class"), (0, "background"), (0, "object colour"), (0, "position"), (1, "class"), (3, "class"), (-1, "class"))
PROBE_COLUMNS = tuple(f"g{group + 1 if group >= 0 else 'K'}_{what.replace(' ', '_')}" for group, what in PROBES)


class HeldOut:
    """--eval-every: held-out built-in images, their noise x_0, the toy evaluator, the probes' images, the curve file."""

    def __init__(self, args, image_size, device):
        self.data = args.data
        self.images, self.labels = dar.builtin_images(args.eval_images, image_size, dar.EVALUATOR_REFERENCE_SEED,
                                                      args.data)
        self.images = self.images.to(device)
        self.noise = torch.randn(len(self.images), 3, image_size, image_size,
                                 generator=torch.Generator().manual_seed(0)).to(device)
        self.evaluator = dar.load_toy_evaluator(args.evaluator, image_size, args.data).to(device)
        self.probes = args.probe_images
        if self.probes:
            self.probe_images, self.probe_labels = dar.builtin_images(self.probes, image_size, dar.PROBE_SEED,
                                                                      args.data)
            self.probe_images, self.probe_train = self.probe_images.to(device), self.probes - min(500, self.probes // 4)
        self.out = args.out
        self.curve = args.out / "learning_curve.tsv"
        if not self.curve.exists():
            self.curve.parent.mkdir(parents=True, exist_ok=True)
            self.curve.write_text("\t".join(CURVE_COLUMNS + PROBE_COLUMNS) + "\n")

    @torch.no_grad()
    def evaluate(self, tokenizer, head, step, images_seen, log):
        """Reconstructions of the held-out images by the EMA weights; in the code-path stage (head given) D_FM is
        untrained, so the code head's output from the last group is judged."""
        codes = tokenizer.encode(self.images)
        if head is not None:
            reconstructions = head(tokenizer.conditions(codes)[:, -tokenizer.cfg.group_size:])
        else:
            reconstructions = tokenizer.decode(codes, noise=self.noise)
        background, colours, offset = dar.layout_agreement(self.images, reconstructions)
        accuracy = (dar.toy_judgement(self.evaluator, reconstructions, self.labels)[1] / len(self.images)).mean().item()
        figures = dict(background_kept=background.float().mean().item(), colours_kept=colours.float().mean().item(),
                       centroid_px=offset.mean().item(), accuracy=accuracy,
                       mse=F.mse_loss(reconstructions, self.images).item(),
                       codebook_use=codes.unique().numel() / tokenizer.cfg.codebook_size)
        stage = "code path" if head is not None else "diffusion"
        probed = [float("nan")] * len(PROBES)
        if self.probes:  # fitted on probe_train images, scored on the rest
            probes = dar.group_probes(tokenizer, self.probe_images, self.probe_labels, self.probe_train)
            probed = [probes[group % tokenizer.cfg.num_groups][what] for group, what in PROBES]
        log(f"eval step {step} ({images_seen:,} images, {'the code head' if head is not None else 'D_FM'}): background "
            f"kept {figures['background_kept']:.1%}, both colours {figures['colours_kept']:.1%}, centroid off by "
            f"{figures['centroid_px']:.2f} px, toy accuracy "
            f"{accuracy:.1%}, mse {figures['mse']:.4f}, codebook use {figures['codebook_use']:.1%}"
            + "".join(f", {c} {v:.3f}" for c, v in zip(PROBE_COLUMNS, probed) if self.probes))
        with open(self.curve, "a") as file:
            file.write("\t".join([str(step), str(images_seen), stage] + [f"{figures[c]:.4f}" for c in CURVE_COLUMNS[3:]]
                                 + [f"{v:.4f}" for v in probed]) + "\n")
        shown = slice(0, 10)  # one image of each class
        names = [dar.BUILTIN_DATA[self.data].class_names[label] for label in self.labels[shown].tolist()]
        rows = ["held out", "code head" if head is not None else "reconstructed"]
        dar.labelled_grid(torch.stack([self.images[shown], reconstructions[shown]]), rows, names).save(
            self.out / f"reconstructions_{step:07d}.png")


CURVE_COLUMNS = ("step", "images", "stage", "background_kept", "colours_kept", "centroid_px", "accuracy", "mse",
                 "codebook_use")


def build(args, cfg, device):
    """-> the miniature's recipe (or None), the tokenizer, the code head (or None), the learner (every trained
    parameter: the tokenizer's, then the head's) and its EMA, AdamW, the codebook restarts (or None)."""
    recipe = miniature_recipe(args)
    model = (dar.miniature_tokenizer(cfg, recipe) if recipe else dar.Tokenizer(cfg)).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    head = dar.CodeHead(cfg, recipe.teacher_features).to(device) if args.code_path_steps else None
    learner = dar.CodePath(model, head, recipe.target_blur, recipe.teacher_from, recipe.own_step) \
        if head is not None else model
    learner_ema = copy.deepcopy(learner).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay)
    restarts = dar.CodebookRestarts(model.quantizer) if recipe and recipe.codebook_restart else None
    return recipe, model, head, learner, learner_ema, optimizer, restarts


def main(args):
    checkpoint_path, start_step = args.out / "tokenizer.pt", 0
    rank, world_size, device, autocast, log = dar.training_setup(args, checkpoint_path)

    # ---- data and model; a run without REPA builds no REPA head (nothing untrained is saved)
    cfg = dar.TOKENIZER_PRESETS[args.config]
    cfg = replace(cfg, repa_dim=0) if args.repa_weight == 0 else cfg
    dataset = dar.training_images(args, cfg.image_size, "tokenizer")
    recipe, model, head, learner, learner_ema, optimizer, restarts = build(args, cfg, device)
    ema = learner_ema.tokenizer if head is not None else learner_ema
    if args.resume:
        start_step = resume(checkpoint_path, learner, learner_ema, optimizer, restarts)
        log(f"resumed {checkpoint_path} at step {start_step}")
    log(f"tokenizer {args.config}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"global batch {args.batch_size * args.grad_accum * world_size}, {args.steps} steps")
    perceptual, repa_target, teacher, held_out = loss_networks(args, cfg, device, rank)
    stream = dar.TrainingStream(len(dataset), args.batch_size, args.grad_accum, world_size, rank, args.seed,
                                start_step, args.steps)
    batches = stream.batches(dataset, args.workers, pin_memory=device.type == "cuda")
    shown = torch.stack([dataset[i][0] for i in range(8)]).to(device)               # the pictures' inputs

    # ---- the loop
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=rank != 0)
    step_log, trained, terms = dar.StepLog(log, args.log_every, args.steps), None, {}
    for step in progress:
        code_path = step < args.code_path_steps
        if trained is None or step == args.code_path_steps:  # a stage begins: what the step trains
            if not code_path and args.freeze == "encoder":
                dar.freeze_encoder(model, ema)
            trained = dar.wrap_for_training(learner if code_path else model, args.compile, world_size, device,
                                            find_unused_parameters=recipe is not None)
        for group in optimizer.param_groups:  # release: linear warm-up from 0, then constant
            group["lr"] = args.lr * min(1.0, step / args.warmup) if args.warmup else args.lr

        def compute(micro):
            images = next(batches)[0].to(device, non_blocking=True)
            # the time u and noise x_0 of Eq. (3) follow the samples, not the process layout
            torch.manual_seed(dar.stream_seed(args.seed, stream.first_position(step, micro), 1))
            if code_path:
                return trained(images, teacher, args.teacher_weight)
            return trained(images, perceptual, repa_target, args.lpips_weight, args.repa_weight)
        terms = dar.accumulate_gradients(trained, args.grad_accum, autocast, compute)
        dar.optimizer_step(learner, optimizer, learner_ema, args.ema, args.grad_clip, step, terms["loss"])
        done = step + 1
        codebook_frozen = not code_path and args.freeze == "encoder"
        if restarts and done % recipe.codebook_restart == 0 and not codebook_frozen:
            terms["restarted"] = restarts.restart()

        progress.set_postfix({name: f"{value:.3f}" for name, value in terms.items()})
        step_log(done, args.batch_size * args.grad_accum * world_size, terms, optimizer.param_groups[0]["lr"])
        if held_out and (done % args.eval_every == 0 or done == args.steps):
            held_out.evaluate(ema, learner_ema.head if code_path else None, done,
                              done * args.batch_size * args.grad_accum * world_size, log)
        if rank == 0 and (done % args.sample_every == 0 or done == args.steps) and not code_path and not held_out:
            dar.labelled_grid(torch.stack([shown, ema.decode(ema.encode(shown))]), ["training image", "reconstructed"],
                              [f"image {i}" for i in range(len(shown))]).save(args.out / f"reconstructions_{done:07d}.png")
        if rank == 0 and (done % args.save_every == 0 or done == args.steps):
            entries = miniature_entries(recipe, head, learner_ema, restarts)
            dar.save_checkpoint(dar.training_checkpoint("tokenizer", cfg, model, ema, optimizer, done, args, **entries),
                                checkpoint_path)
    progress.close()
    dar.finish_training(args, checkpoint_path, rank, world_size, log)
    return model, terms  # for notebooks and tests


def miniature_entries(recipe, head, learner_ema, restarts):
    """What a checkpoint of the CPU miniature holds besides the tokenizer: how to build it, and for an exact resume
    the code head (and its EMA) and the codebook use since the last restart."""
    entries = {"builder": "miniature", "recipe": asdict(recipe)} if recipe else {}
    if head is not None:
        entries.update(code_head=head.state_dict(), code_head_ema=learner_ema.head.state_dict())
    if restarts is not None:
        entries.update(codebook_use=restarts.use)
    return entries


def resume(path, learner, learner_ema, optimizer, restarts):
    """--resume: the tokenizer, its EMA, the optimizer, and the miniature's code head and codebook use; -> the step."""
    two_stage = isinstance(learner, dar.CodePath)
    try:
        checkpoint = dar.resume_training(path, "tokenizer", learner.tokenizer if two_stage else learner,
                                         learner_ema.tokenizer if two_stage else learner_ema, optimizer)
    except ValueError as error:
        raise dar.BadInput(str(error)) from None
    if two_stage:
        learner.head.load_state_dict(checkpoint["code_head"])
        learner_ema.head.load_state_dict(checkpoint["code_head_ema"])
    if restarts is not None:
        restarts.use.copy_(checkpoint["codebook_use"])
    return checkpoint["step"]


if __name__ == "__main__":
    dar.command_line(lambda: main(parse_args()))
