"""Train the sequential diffusion tokenizer (§3.1) with the loss of Eq. (7).

    python train_tokenizer.py                                   # tiny config, built-in shapes, CPU, ~2 min
    python train_tokenizer.py --config v1 --data /imagenet/train --batch-size 64 --grad-accum 2 \\
        --grad-checkpointing --compile                          # the paper's run on one GPU
    torchrun --nproc_per_node 8 train_tokenizer.py --config v1 --data /imagenet/train --batch-size 128

Each config brings its recipe (RECIPES below: the paper's values for v1 and ablation); any flag overrides
it. The global batch is --batch-size x --grad-accum x the number of processes. The checkpoint
`<out>/tokenizer.pt` is rewritten atomically every --save-every steps and at the end; --resume continues it.
"""
import argparse
import copy
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import dar

RECIPES = {
    # paper §4: 210K iterations at batch 1024, lr 2e-4, EMA 0.999, lambda_1 = lambda_2 = 0.5; release: AdamW
    # betas (0.9, 0.95), weight decay 0, 500 warmup steps, grad clip 1.0 (OFFICIAL_FORMAT §4.2)
    "v1": dict(steps=210_000, batch_size=64, grad_accum=16, lr=2e-4, warmup=500, ema=0.999,
               lpips_weight=0.5, repa_weight=0.5, code_path_steps=0, freeze="none", teacher_weight=0.0),
    # appendix A.4: the lightweight ablation tokenizer, 50K iterations at batch 256
    "ablation": dict(steps=50_000, batch_size=64, grad_accum=4, lr=2e-4, warmup=500, ema=0.999,
                     lpips_weight=0.5, repa_weight=0.5, code_path_steps=0, freeze="none", teacher_weight=0.0),
    # the laptop run on the built-in shapes, in two stages (measured in the README): the code path alone
    # against the code head, pixels + a teacher CNN's features (trained as one piece, its codes never
    # learned the shapes on a CPU budget), then D_FM on the frozen codes (--freeze encoder gave MSE 0.46 after
    # 32K images, --freeze conditions 0.60). These defaults are the 5-minute quickstart; the shipped
    # tokenizer is the same recipe for longer (README). No LPIPS or REPA: their pretrained networks are
    # not available offline and do not fit 32 x 32 images.
    "tiny": dict(steps=500, batch_size=32, grad_accum=1, lr=1e-3, warmup=100, ema=0.99,
                 lpips_weight=0.0, repa_weight=0.0, code_path_steps=300, freeze="encoder", teacher_weight=1.0),
}
# what --freeze holds fixed after the code-path stage (parameter-name prefixes of dar.Tokenizer)
ENCODER_PARTS = ("patchify.", "query_embedding.", "query_linear.", "encoder_layers.", "quant_in.", "quantizer.")
FROZEN_PARTS = {"none": (), "encoder": ENCODER_PARTS,
                "conditions": ENCODER_PARTS + ("quant_out.", "decoder_embedding.", "decoder_layers.")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=list(dar.TOKENIZER_PRESETS))
    parser.add_argument("--data", default="builtin", help="'builtin' (procedural shapes) or an ImageNet-style folder")
    parser.add_argument("--builtin-size", type=int, default=10000, help="images in the built-in dataset")
    parser.add_argument("--out", default=None, help="output folder (default out/<config>)")
    recipe = parser.add_argument_group("recipe (default: RECIPES[--config])")
    recipe.add_argument("--steps", type=int)
    recipe.add_argument("--batch-size", type=int, help="per process")
    recipe.add_argument("--grad-accum", type=int)
    recipe.add_argument("--lr", type=float)
    recipe.add_argument("--warmup", type=int, help="linear warm-up steps (release: 500)")
    recipe.add_argument("--ema", type=float, help="EMA decay (paper: 0.999)")
    recipe.add_argument("--lpips-weight", type=float, help="lambda_1 of Eq. (7) (paper: 0.5; needs VGG16 weights)")
    recipe.add_argument("--repa-weight", type=float, help="lambda_2 of Eq. (7) (paper: 0.5; needs DINOv2-B/14)")
    model = parser.add_argument_group("tiny-only departures from the release (default: the --config preset)")
    model.add_argument("--prediction", choices=["velocity", "data"], help="what D_FM outputs (release: velocity)")
    model.add_argument("--codebook-restart", type=int, help="re-seed unused codebook rows every N steps (release: 0)")
    model.add_argument("--conv-stem", action=argparse.BooleanOptionalAction, help="embed patches with a small CNN "
                       "(release: one strided convolution)")
    model.add_argument("--code-path-steps", type=int, help="first train the encoder -> VQ -> causal decoder path "
                       "alone for N steps, against the training-only code head, no diffusion (release: 0)")
    model.add_argument("--teacher-weight", type=float, help="in the code-path steps, the code head also predicts "
                       "the pooled features of a small CNN trained on built-in shapes, with this weight (release: 0)")
    model.add_argument("--freeze", choices=list(FROZEN_PARTS), help="after the code-path steps, hold fixed the "
                       "encoder and codebook, or everything up to the conditions z' (release: none)")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="AdamW betas (release)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="(release: 0)")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (release: 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes per training process")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--sample-every", type=int, default=500, help="PNG of inputs above reconstructions")
    parser.add_argument("--eval-every", type=int, default=0, help="built-in data: every N steps, the EMA weights' "
                        "reconstructions of held-out images -> toy-evaluator accuracy, MSE and codebook use, "
                        "logged and appended to <out>/learning_curve.tsv (0: never)")
    parser.add_argument("--eval-images", type=int, default=200, help="held-out images of --eval-every")
    parser.add_argument("--evaluator", default=str(dar.SHIPPED_TINY / "evaluator.pt"),
                        help="--eval-every's classifier (shipped; trained and written there if missing)")
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--resume", action="store_true", help="continue <out>/tokenizer.pt")
    parser.add_argument("--export", metavar="PATH", help="at the end, also write the EMA weights alone in half "
                        "precision to PATH, a small file to share (with --resume at the last step: export only)")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "train_tokenizer.py", *(sys.argv[1:] if argv is None else argv)])
    for key, value in RECIPES[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = Path(args.out or f"out/{args.config}")
    if not args.code_path_steps and (args.freeze != "none" or args.teacher_weight > 0):
        parser.error("--freeze and --teacher-weight act on the code-path stage: give --code-path-steps N")
    if args.eval_every and args.data != "builtin":
        parser.error("--eval-every measures the built-in shapes (--data builtin)")
    return args


@torch.no_grad()
def evaluate(tokenizer, images, labels, noise, classifier, use_code_head):
    """Toy-evaluator accuracy and MSE of the reconstructions of held-out images, and the fraction of the
    codebook their codes use. During the code-path steps D_FM is untrained: the code head's output is judged."""
    codes = tokenizer.encode(images)
    if use_code_head:
        reconstructions = tokenizer.code_head(tokenizer.conditions(codes)[:, -tokenizer.cfg.group_size:])
    else:
        reconstructions = tokenizer.decode(codes, noise=noise)
    accuracy = (classifier(reconstructions.clamp(-1, 1)).argmax(-1) == labels).float().mean().item()
    return {"accuracy": accuracy, "mse": F.mse_loss(reconstructions, images).item(),
            "codebook_use": codes.unique().numel() / tokenizer.cfg.codebook_size}


def freeze(model, ema, prefixes):
    """Hold the parameters under `prefixes` fixed from now on, at their EMA values (what the codes were
    judged by): no gradient, so AdamW and the EMA leave them as they are."""
    for name, param in model.named_parameters():
        if name.startswith(prefixes):
            param.data.copy_(ema.get_parameter(name))
            param.requires_grad_(False)


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


def load_teacher(path, image_size, device):
    """The code head's teacher: a `dar.ShapeClassifier` trained once on built-in images of its own seed (not
    the toy evaluator's), cached at `path`; -> images -> its pooled features."""
    if not path.is_file():
        tqdm.write(f"training the code head's teacher once -> {path}")
        classifier = dar.train_shape_classifier(image_size, seed=dar.TEACHER_TRAIN_SEED, data_seed=dar.TEACHER_TRAIN_SEED)
        dar.save_checkpoint({"kind": "teacher", "image_size": image_size, "model": classifier.state_dict()}, path)
    classifier = dar.ShapeClassifier()
    classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return classifier.to(device).eval().requires_grad_(False).features


def main(args):
    # ---- processes, device, precision
    rank, world_size, device = dar.setup_distributed(args.device)
    distributed = world_size > 1
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(args.seed)  # the initial weights; the training stream seeds itself per step

    # ---- data
    cfg = dar.TOKENIZER_PRESETS[args.config]
    cfg = replace(cfg, **{name: getattr(args, name) for name in ("prediction", "codebook_restart", "conv_stem")
                          if getattr(args, name) is not None})
    if args.teacher_weight > 0:
        cfg = replace(cfg, code_head_features=dar.ShapeClassifier.widths[-1])
    if args.data == "builtin":
        dataset = dar.BuiltinShapes(args.builtin_size, cfg.image_size, seed=args.seed)
    else:
        dataset = dar.ImageFolder(args.data, cfg.image_size, augment="tokenizer")

    # ---- model, EMA, optimiser; a run without REPA builds no REPA head (nothing untrained is saved)
    if args.repa_weight == 0:
        cfg = replace(cfg, repa_dim=0)
    model = dar.Tokenizer(cfg).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay)
    checkpoint_path, start_step = args.out / "tokenizer.pt", 0
    if args.resume:
        start_step = dar.resume_training(checkpoint_path, model, ema, optimizer)
        log(f"resumed {checkpoint_path} at step {start_step}")
    log(f"tokenizer {args.config}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"global batch {args.batch_size * args.grad_accum * world_size}, {args.steps} steps")
    perceptual = load_lpips(device) if args.lpips_weight > 0 else None
    repa_target = load_repa_target(device) if args.repa_weight > 0 else None
    teacher = load_teacher(args.out / "teacher.pt", cfg.image_size, device) if args.teacher_weight > 0 else None
    trained = dar.wrap_for_training(model, args.compile, world_size, device, find_unused_parameters=cfg.code_head)
    if args.code_path_steps and not cfg.code_head:
        raise SystemExit("--code-path-steps needs a config with code_head=True (the tiny preset)")
    if args.eval_every and rank == 0:
        held_out = dar.BuiltinShapes(args.eval_images, cfg.image_size, seed=dar.EVALUATOR_REFERENCE_SEED)
        held_out_images = torch.stack([held_out[i][0] for i in range(len(held_out))]).to(device)
        held_out_labels = (torch.arange(len(held_out)) % held_out.num_classes).to(device)
        eval_noise = torch.randn(len(held_out), 3, cfg.image_size, cfg.image_size,
                                 generator=torch.Generator().manual_seed(0)).to(device)
        classifier = dar.load_toy_evaluator(args.evaluator, cfg.image_size).to(device)
        curve = args.out / "learning_curve.tsv"
        if not curve.exists():
            curve.parent.mkdir(parents=True, exist_ok=True)
            curve.write_text("step\timages\tstage\taccuracy\tmse\tcodebook_use\n")
    stream = dar.TrainingStream(len(dataset), args.batch_size, args.grad_accum, world_size, rank, args.seed,
                                start_step, args.steps)
    batches = stream.batches(dataset, args.workers, pin_memory=device.type == "cuda")

    def save(step):
        if rank == 0:
            dar.save_checkpoint(dar.training_checkpoint("tokenizer", cfg, model, ema, optimizer, step, args),
                                checkpoint_path)

    # ---- the loop
    progress = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=rank != 0)
    window_start, window_images, terms = time.time(), 0, {}
    for step in progress:
        code_path_only = step < args.code_path_steps
        if step == max(start_step, args.code_path_steps) and FROZEN_PARTS[args.freeze]:
            freeze(model, ema, FROZEN_PARTS[args.freeze])
        for group in optimizer.param_groups:  # release: linear warm-up from 0, then constant
            group["lr"] = args.lr * min(1.0, step / args.warmup) if args.warmup else args.lr
        terms = {}
        for micro in range(args.grad_accum):
            images = next(batches)[0].to(device, non_blocking=True)
            # the time u and noise x_0 of Eq. (3) follow the samples, not the process layout
            torch.manual_seed(dar.stream_seed(args.seed, stream.first_position(step, micro), 1))
            sync = not distributed or micro == args.grad_accum - 1
            with (nullcontext() if sync else trained.no_sync()), autocast:
                losses = trained(images, perceptual, repa_target, args.lpips_weight, args.repa_weight,
                                 code_path_only=code_path_only, teacher=teacher, teacher_weight=args.teacher_weight)
                (losses["loss"] / args.grad_accum).backward()
            for name, value in losses.items():
                value = value.detach().item() if torch.is_tensor(value) else value
                terms[name] = terms.get(name, 0.0) + value / args.grad_accum
        dar.optimizer_step(model, optimizer, ema, args.ema, args.grad_clip, step, terms["loss"], checkpoint_path)
        done = step + 1
        codebook_frozen = not code_path_only and "quantizer." in FROZEN_PARTS[args.freeze]
        if cfg.codebook_restart and done % cfg.codebook_restart == 0 and not codebook_frozen:  # tiny only
            terms["restarted"] = model.quantizer.restart_dead_codes()

        window_images += images.shape[0] * args.grad_accum * world_size
        progress.set_postfix({name: f"{value:.3f}" for name, value in terms.items()})
        if done % args.log_every == 0 or done == args.steps:
            rate = window_images / (time.time() - window_start)
            log(f"step {done}: " + " ".join(f"{name} {value:.4f}" for name, value in terms.items())
                + f" lr {optimizer.param_groups[0]['lr']:.2e} {rate:.1f} img/s")
            window_start, window_images = time.time(), 0
        if rank == 0 and args.eval_every and (done % args.eval_every == 0 or done == args.steps):
            scores = evaluate(ema, held_out_images, held_out_labels, eval_noise, classifier, code_path_only)
            stage = "code path" if code_path_only else "diffusion"
            seen = done * args.batch_size * args.grad_accum * world_size
            log(f"eval step {done} ({seen:,} images, {stage}): " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            with open(curve, "a") as file:
                file.write(f"{done}\t{seen}\t{stage}\t{scores['accuracy']:.4f}\t{scores['mse']:.4f}\t"
                           f"{scores['codebook_use']:.4f}\n")
        if rank == 0 and (done % args.sample_every == 0 or done == args.steps) and not code_path_only:
            shown = images[:8]
            recon = ema.decode(ema.encode(shown.float()))
            dar.save_grid(torch.stack([shown, recon]), args.out / f"tokenizer_{done:07d}.png")
        if done % args.save_every == 0 or done == args.steps:
            save(done)
    progress.close()
    log(f"saved {checkpoint_path}")
    if args.export and rank == 0:
        dar.export_weights(checkpoint_path, args.export, args.command)
        log(f"exported the weights to {args.export}")
    if distributed:
        torch.distributed.destroy_process_group()
    return model, terms  # for notebooks and tests


if __name__ == "__main__":
    main(parse_args())
