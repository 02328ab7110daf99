"""Sample from a trained D-AR pair (§3.3): images forming group by group, layout control, the files
the paper's FIDs are computed from, the toy metric of the built-in shapes and the sampler's speed.

    python sample.py                              # a row per class, the preview after each group
    python sample.py --stream --labels plus       # one line per group, as its tokens arrive
    python sample.py --layout-from builtin:4 --prefix-tokens 8,16,32 --labels 0,1,2,3   # Fig. 5
    python sample.py --eval                       # toy accuracy and toy FID of the pair's samples
    python sample.py --eval --preview-groups 2    # ... of the previews after 2 groups (Table 5)
    python sample.py --eval --layout-from builtin --prefix-tokens 0,8,16   # layout control measured
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --ar D-AR-L-360K.pt --guidance 1.1,8.0 \\
        --fid 50000 --out samples/L               # 50,000 PNGs + samples/L.npz for ADM's evaluator
    torchrun --nproc_per_node 8 sample.py ...     # the same files, shared out over 8 GPUs
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --reconstruct /imagenet/val --out recon/v1
        # rFID: recon/v1.npz and recon/v1-reference.npz, the centre crops it encoded (the real side)
    python sample.py --benchmark 1,4,16 --compile # images/s, ms per token and per step
    python sample.py --benchmark 1,64 --config ablation:B         # random weights, no download

Without --ar: the AR model `python train_ar.py` wrote to out/tiny when it exists, else the shipped
one in weights/tiny; without --tokenizer: the tokenizer whose codes that AR model learned (its
checkpoint records the file and its SHA-256; another tokenizer is refused). One printed line says
which. Sample i of --fid and --eval asks for class i mod C and draws its noise and tokens from its
own generator, seeded with --seed + i, so the set is the same whatever the batch size or the
number of processes.
"""
import argparse
import os
import tempfile
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dar

# DiT's sample classes, shown for 1000-class models
DIT_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)
QUICKSTART = Path("out/tiny")  # where `python train_tokenizer.py && python train_ar.py` write


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    pair = parser.add_argument_group("the pair")
    pair.add_argument("--tokenizer",
                      help="ours or the release's (default: the tiny pair, see above)")
    pair.add_argument("--ar",
                      help="ours or the release's (D-AR-L-360K.pt, ...); default: the tiny pair")
    pair.add_argument("--config", metavar="PRESET",
                      help="the AR preset of a release AR file (default: inferred "
                      f"from its shapes; {', '.join(dar.AR_PRESETS)}), or with --benchmark "
                      "TOKENIZER:AR, random weights of two presets instead of files, e.g. "
                      f"ablation:B or v1:L (tokenizer: {', '.join(dar.TOKENIZER_PRESETS)})")
    pair.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pair.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                      help="the AR model's weights on CUDA (release: bf16; the tokenizer runs in "
                           "fp32/TF32)")
    pair.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                      help="TF32 matmuls on CUDA (release: on)")
    add_sampling_flags(parser)
    add_mode_flags(parser)
    args = parser.parse_args(argv)
    check_paths(parser, args)
    return args




def add_sampling_flags(parser):
    """The flags of dar.sample, read in every mode."""
    sampling = parser.add_argument_group("sampling, every mode (release defaults)")
    sampling.add_argument("--labels",
                          help="comma-separated class ids (or shape names, for the built-in data)")
    sampling.add_argument("--guidance", type=guidance_flag, default=4.0,
                          help="classifier-free guidance scale, or 'start,end' for "
                          "the linear schedule (paper: 1.1,8.0 for D-AR-L, 1.1,10.0 for D-AR-XL)")
    sampling.add_argument("--temperature", type=dar.WEIGHT, default=1.0)
    sampling.add_argument("--top-k", type=dar.COUNT, default=0, help="0: off")
    sampling.add_argument("--top-p", type=dar.flag_type(0, 1, low_open=True), default=1.0,
                          help="in (0, 1]; 1: off")
    sampling.add_argument("--solver", default="adams2", choices=dar.SOLVERS)
    sampling.add_argument("--denoising-steps", type=dar.SIZE, metavar="S",
                          help="diffusion steps of a decode (default: "
                          "the tokenizer's, K = 8 as released); with S > K a token group drives "
                          "several (Eq. 5)")
    sampling.add_argument("--seed", type=dar.SEED, default=0)
    sampling.add_argument("--compile", action="store_true",
                          help="compile the one-token AR step and the "
                          "denoising step (torch.compile; CUDA graphs on a GPU); the same numbers "
                          "as eager")
    sampling.add_argument("--batch-size", type=dar.SIZE, default=64,
                          help="--fid, --reconstruct, --eval: images per "
                          "batch and process (release FID run: 64)")
    sampling.add_argument("--n", type=dar.SIZE,
                          help="how many images: the picture's rows (default: one per label), "
                          "--eval's samples (default 1000) or references (default 50), "
                          "--reconstruct's (default: all)")
    sampling.add_argument("--out",
                          help="where the mode writes: the PNG of a picture, the folder of --fid "
                          "and --reconstruct (default for a picture: next to the AR checkpoint)")


def add_mode_flags(parser):
    """The modes and their own flags."""
    modes = parser.add_argument_group("modes (default: a picture of previews)")
    modes.add_argument("--stream", action="store_true",
                       help="picture: print a line per group as it arrives")
    modes.add_argument("--gif", action="store_true",
                       help="picture: also write it as an animated GIF of the "
                       "samples forming, a frame per group (same name, .gif)")
    modes.add_argument("--layout-from", metavar="IMAGE",
                       help="keep this image's first tokens (Fig. 5): a file, or "
                       "'builtin:I' (held-out built-in image I); with --eval, 'builtin' measures "
                       "--n references")
    modes.add_argument("--prefix-tokens", default="8,16,32",
                       help="--layout-from: counts of kept tokens, one row each")
    modes.add_argument("--fid", type=dar.SIZE, metavar="N",
                       help="write N class-balanced samples as PNGs and an .npz")
    modes.add_argument("--reconstruct", metavar="FOLDER",
                       help="write reconstructions of an image folder "
                       "('builtin': held-out built-in images) as PNGs and an .npz (rFID)")
    modes.add_argument("--eval", action="store_true",
                       help="built-in data: toy accuracy and toy FID of the samples "
                       "(with --reconstruct builtin: of the reconstructions; with --layout-from "
                       "builtin: Fig. 5)")
    modes.add_argument("--preview-groups", type=dar.SIZE, metavar="k",
                       help="--fid, --eval: the preview after k groups "
                       "instead of the image (Table 5)")
    modes.add_argument("--evaluator", default=str(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval's toy evaluator, an ensemble (shipped; trained and written "
                            "there if missing)")
    modes.add_argument("--benchmark", metavar="BATCHES", nargs="?", const="1,16,64",
                       help="time the sampler at "
                       "these comma-separated batch sizes (default 1,16,64): images/s, AR ms per "
                       "token, D_FM ms per step, their shares, peak memory on CUDA")
    modes.add_argument("--repeat", type=dar.SIZE, default=3,
                       help="--benchmark: timed runs per batch size after a warm-up")


def guidance_flag(text):
    """--guidance: a scale or 'start,end', each a finite number >= 0."""
    parts = text.split(",")
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"expected a scale or 'start,end', got {text!r}")
    try:
        scales = [dar.check_number(part, "each scale", 0) for part in parts]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{error} (in {text!r})") from None
    return scales[0] if len(scales) == 1 else tuple(scales)


def check_paths(parser, args):
    """What a mode reads must exist and what it writes must not be in the way; --labels only where
    it is read."""
    picture = mode_of(args) in ("picture", "--layout-from")
    if args.out and picture and (Path(args.out).is_dir()
                                 or Path(args.out).suffix.lower() != ".png"):
        parser.error(f"--out {args.out}: a picture is written to a file name ending in .png")
    if args.out and not picture and Path(args.out).is_file():
        parser.error(f"--out {args.out} is a file: --fid and --reconstruct write a folder")
    if args.out and any(parent.is_file() for parent in Path(args.out).parents):
        parser.error(f"--out {args.out}: a parent of it is a file")
    if args.out and not writable(Path(args.out) if not picture else Path(args.out).parent):
        parser.error(f"--out {args.out}: its folder cannot be created or written")
    for flag in ("tokenizer", "ar", "evaluator"):
        path = getattr(args, flag)
        if path and Path(path).is_dir():
            parser.error(f"--{flag} {path} is a folder, not a checkpoint")
    if args.reconstruct not in (None, "builtin") and not Path(args.reconstruct).is_dir():
        parser.error(f"--reconstruct: no folder {args.reconstruct}")


def writable(folder):
    """Can this run create `folder` (if need be) and write a file in it? Tried, not guessed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def fail(message):
    """Bad input ends the run with one line, no traceback (exit code 2)."""
    raise dar.BadInput(message)


def check_modes(args):
    """The modes that go together, and the counts, checked before anything loads."""
    modes = [name for name in ("layout_from", "fid", "reconstruct")
             if getattr(args, name) is not None]
    if args.benchmark is not None and (modes or args.eval):
        fail("--benchmark times the sampler alone: leave out --eval, --fid, --reconstruct and "
             "--layout-from")
    random_pair = args.config is not None and ":" in args.config
    if random_pair and args.benchmark is None:
        fail("--config TOKENIZER:AR (random weights) is for --benchmark only")
    if random_pair and (args.tokenizer or args.ar):
        fail("--config TOKENIZER:AR replaces --tokenizer and --ar: give one or the other")
    if args.config is not None and not random_pair and args.config not in dar.AR_PRESETS:
        fail(f"--config {args.config}: expected an AR preset ({', '.join(dar.AR_PRESETS)}) or, "
             f"with --benchmark, TOKENIZER:AR")
    if len(modes) > 1:
        fail("choose one of --layout-from, --fid, --reconstruct (got "
             f"{', '.join('--' + m.replace('_', '-') for m in modes)})")
    if args.eval and (args.fid is not None or args.layout_from not in (None, "builtin")):
        fail("--eval measures samples, --reconstruct builtin or --layout-from builtin; not --fid "
             "or one image")
    if args.eval and args.reconstruct not in (None, "builtin"):
        fail("--eval measures the built-in shapes: use --reconstruct builtin")
    if args.preview_groups is not None and args.fid is None and not (args.eval and not modes):
        fail("--preview-groups applies to --fid and --eval of samples; the picture shows every "
             "preview")
    writes_files = args.fid is not None or (args.reconstruct is not None and not args.eval)
    if writes_files and args.out is None:
        fail("--fid and --reconstruct write a folder of PNGs: pass --out DIR")
    if "RANK" in os.environ and not writes_files:
        fail("only --fid and --reconstruct are shared out over processes; run the other modes "
             "without torchrun")
    check_every_flag_is_read(args)


def mode_of(args):
    """The mode the flags choose, as the command line names it."""
    for flag, chosen in (("--benchmark", args.benchmark is not None), ("--eval", args.eval),
                         ("--fid", args.fid is not None), ("--reconstruct", args.reconstruct),
                         ("--layout-from", args.layout_from)):
        if chosen:
            return flag
    return "picture"


def check_every_flag_is_read(args):
    """No flag is silently ignored: one that the chosen mode does not read ends the run."""
    mode, samples = mode_of(args), args.reconstruct is None
    reads = {
        "stream": mode == "picture", "gif": mode == "picture",
        "labels": mode in ("picture", "--layout-from") and not args.eval,
        "n": mode in ("picture", "--eval", "--reconstruct"),
        "out": mode not in ("--benchmark", "--eval"),
        "prefix_tokens": args.layout_from is not None, "evaluator": args.eval,
        "repeat": mode == "--benchmark", "preview_groups": args.fid is not None or args.eval,
        "batch_size": mode in ("--fid", "--reconstruct") or args.eval and not args.layout_from,
        **{flag: samples for flag in ("ar", "config", "precision", "guidance", "temperature",
                                      "top_k", "top_p")},
    }
    for dest, read in reads.items():
        if dest in args.given and not read:
            name = "--" + dest.replace("_", "-")
            fail(f"{name} is not read by {mode if mode != 'picture' else 'the picture'}"
                 f"{' --eval' if args.eval and mode != '--eval' else ''}: leave it out")
    if args.labels is not None and not args.labels.strip(","):
        fail("--labels: give at least one class")
    if args.benchmark is not None:
        batch_sizes(args.benchmark)


def yours_or_shipped(name, command):
    """out/tiny/<name> when your `command` has written it, else the shipped weights/tiny/<name>;
    -> path, words."""
    if (QUICKSTART / name).is_file():
        return str(QUICKSTART / name), f"yours, from `{command}`"
    shipped = os.path.relpath(dar.SHIPPED_TINY / name)
    return shipped, f"shipped; `{command}` trains yours into {QUICKSTART}"


def load_models(args, device, need_ar=True):
    """-> (tokenizer, ar or None) in eval mode, the AR model in bf16 on CUDA as released. A missing
    --ar: yours or the shipped one (`yours_or_shipped`); a missing --tokenizer: the one whose codes
    the AR model learned (its record), or without an AR model yours or the shipped one. One printed
    line says which."""
    def load(flag, path, command, loader, *options):
        if not Path(path).is_file():
            fail(f"no checkpoint at {path}; `{command}` creates it, or pass {flag} PATH")
        try:
            return loader(path, *options, device=device)
        # a wrong or damaged file
        except (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError) as error:
            fail(f"{flag} {path} cannot be loaded: {str(error).splitlines()[0]}")
    chosen, ar, ar_path, tokenizer_path = [], None, args.ar, args.tokenizer
    if need_ar:
        if ar_path is None:
            ar_path, why = yours_or_shipped("ar.pt", "python train_ar.py")
            chosen.append(f"AR model {ar_path} ({why})")
        ar = load("--ar", ar_path, "python train_ar.py", dar.load_ar, args.config)
    if tokenizer_path is None and ar is not None:
        if ar.codes_of is None:
            fail(f"--ar {ar_path} does not record which tokenizer's codes it learned: pass "
                 "--tokenizer")
        tokenizer_path = os.path.relpath(ar.codes_of["path"])
        chosen.append(f"tokenizer {tokenizer_path} (whose codes it learned)")
        if not Path(tokenizer_path).is_file():
            fail(f"--ar {ar_path} learned the codes of {tokenizer_path}, which is not there: pass "
                 "--tokenizer")
    elif tokenizer_path is None:
        tokenizer_path, why = yours_or_shipped("tokenizer.pt", "python train_tokenizer.py")
        chosen.append(f"tokenizer {tokenizer_path} ({why})")
    if chosen:
        print("pair: " + ", ".join(chosen) if ar is not None else chosen[0])
    tokenizer = load("--tokenizer", tokenizer_path, "python train_tokenizer.py", dar.load_tokenizer)
    if ar is not None:
        try:
            dar.check_pair(ar, tokenizer)
        except ValueError as error:
            fail(f"--ar {ar_path} and --tokenizer {tokenizer_path}: {error}")
        at_release_precision(ar, device, args.precision)
    return tokenizer, ar


def output_folder(ar):
    """Pictures go next to the AR checkpoint, except for the shipped pair: out/tiny, outside
    the repository's files."""
    folder = ar.file.parent
    return QUICKSTART if folder.resolve() == dar.SHIPPED_TINY.resolve() else folder


def at_release_precision(ar, device, precision):
    if device.type == "cuda" and precision == "bf16":
        ar.to(torch.bfloat16)  # release: GPT weights and KV cache in bf16, logits in float32


def is_builtin(ar):
    return ar is not None and ar.cfg.num_classes == len(dar.SHAPE_CLASSES)


def class_name(ar, label):
    return dar.SHAPE_CLASSES[label] if is_builtin(ar) else f"class {label}"


def parse_labels(text, ar):
    """'0,3,plus' -> [0, 3, 6]; each must be one of the AR model's classes."""
    labels = []
    for item in text.split(","):
        item = item.strip()
        if is_builtin(ar) and item in dar.SHAPE_CLASSES:
            labels.append(dar.SHAPE_CLASSES.index(item))
            continue
        try:
            label = int(item)
        except ValueError:
            names = f" or a shape name ({', '.join(dar.SHAPE_CLASSES)})" if is_builtin(ar) else ""
            fail(f"--labels: {item!r} is not a class id{names}")
        if not 0 <= label < ar.cfg.num_classes:
            fail(f"--labels: class {label} is outside the AR model's {ar.cfg.num_classes} classes "
                 f"(0-{ar.cfg.num_classes - 1})")
        labels.append(label)
    return labels


def sampling_options(args):
    """The keyword arguments of dar.sample that the flags set."""
    return dict(guidance=args.guidance, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, solver=args.solver, steps=args.denoising_steps,
                compile=args.compile)


def picture(args, tokenizer, ar, device):
    """The default mode: one row per sample, the previews after groups 1..K (the K-th
    is the image)."""
    default = list(DIT_CLASSES) if ar.cfg.num_classes == 1000 else \
        list(range(min(ar.cfg.num_classes, 10)))
    labels = parse_labels(args.labels, ar) if args.labels is not None else default
    rows = args.n or len(labels)
    labels = [labels[i % len(labels)] for i in range(rows)]
    K, G = tokenizer.cfg.num_groups, tokenizer.cfg.group_size
    generator = dar.generators(range(args.seed, args.seed + rows), device)
    sampled_groups = dar.sample(ar, tokenizer, labels, generator=generator,
                                **sampling_options(args))
    previews, start = [], time.perf_counter()
    for sampled in sampled_groups:
        previews.append(sampled.preview)
        if args.stream:
            milliseconds = 1000 * (synchronized_time(device) - start)
            print(f"group {sampled.group + 1}/{K}: {sampled.tokens.shape[1]:4d} tokens, t = "
                  f"{sampled.t:.3f}, preview ready at {milliseconds:7.1f} ms")
    path = Path(args.out or output_folder(ar) / "samples.png")
    names = [class_name(ar, label) for label in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    dar.labelled_grid(torch.stack(previews, 1), names, dar.preview_names(K, G)).save(path)
    if args.gif:
        dar.save_forming_gif(torch.stack(previews, 1), names, G, path.with_suffix(".gif"))
        print(path.with_suffix(".gif"))
    return path


def load_reference(text, image_size):
    """--layout-from: an image file, or 'builtin:I' (held-out built-in image I) -> (1, 3, H, W)."""
    if text.startswith("builtin:"):
        index = text.split(":", 1)[1]
        if not index.isdigit():
            fail(f"--layout-from: expected builtin:INDEX with INDEX an integer >= 0, got {text!r}")
        index = int(index)
        return dar.BuiltinShapes(index + 1, image_size,
                                 seed=dar.EVALUATOR_REFERENCE_SEED)[index][0][None]
    try:
        with Image.open(text) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as error:
        fail(f"--layout-from: cannot read {text} as an image ({error})")
    return dar.pil_to_tensor(dar.center_crop(image, image_size))[None]


def layout_prefix_counts(args, tokenizer, ar):
    """--prefix-tokens, checked: counts in [0, N], and an AR model that writes the coarse tokens
    first."""
    num_tokens = tokenizer.cfg.num_tokens
    if ar.cfg.reverse:
        fail(f"{ar.file} writes the fine tokens first (--reverse); layout control needs the coarse "
             "ones first")
    try:
        counts = [int(value) for value in args.prefix_tokens.split(",")]
    except ValueError:
        fail(f"--prefix-tokens: expected comma-separated counts, got {args.prefix_tokens!r}")
    if any(not 0 <= count <= num_tokens for count in counts):
        fail(f"--prefix-tokens {args.prefix_tokens}: each count must lie in [0, {num_tokens}] (the "
             f"tokenizer has N = {num_tokens})")
    return counts


def layout_control(args, tokenizer, ar, device):
    """Fig. 5: the reference's first n tokens, the rest sampled under each label; a row per n. Every
    cell uses the same seed, so within a row only the label changes."""
    prefix_counts = layout_prefix_counts(args, tokenizer, ar)
    reference = load_reference(args.layout_from, tokenizer.cfg.image_size).to(device)
    codes = tokenizer.encode(reference)
    labels = parse_labels(args.labels, ar) if args.labels is not None else \
        list(range(min(ar.cfg.num_classes, 5)))
    rows = []
    for count in prefix_counts:
        prefix = codes[:, :count].expand(len(labels), count)
        *_, last = dar.sample(ar, tokenizer, labels, prefix=prefix,
                              generator=dar.generators([args.seed] * len(labels), device),
                              **sampling_options(args))
        rows.append(torch.cat([reference, last.image]))
    path = Path(args.out or output_folder(ar) / "layout.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    dar.labelled_grid(torch.stack(rows), [f"{count} tokens kept" for count in prefix_counts],
                      ["reference"] + [class_name(ar, label) for label in labels]).save(path)
    return path


def sample_batch(args, tokenizer, ar):
    """--fid, --eval: make(indices) -> (images, asked-for labels), `dar.class_balanced_samples`."""
    if args.preview_groups is not None and not 1 <= args.preview_groups <= tokenizer.cfg.num_groups:
        fail(f"--preview-groups {args.preview_groups}: must lie in [1, {tokenizer.cfg.num_groups}]")
    return dar.class_balanced_samples(ar, tokenizer, args.seed, args.preview_groups,
                                      **sampling_options(args))


def reconstruction_batch(args, tokenizer):
    """--reconstruct: (make(indices) -> (reconstructions, labels), number of images, the
    dataset)."""
    size = tokenizer.cfg.image_size
    if args.reconstruct == "builtin":
        dataset = dar.BuiltinShapes(args.n or 1000, size, seed=dar.EVALUATOR_REFERENCE_SEED)
    else:
        try:
            dataset = dar.ImageFolder(args.reconstruct, size)
            dataset.read(0)
        except ValueError as error:
            fail(f"--reconstruct {args.reconstruct}: {error}")
    make = reconstructions(tokenizer, dataset, args.seed, solver=args.solver,
                               steps=args.denoising_steps, compile=args.compile)
    return make, min(len(dataset), args.n or len(dataset)), dataset


def load_evaluator(path, image_size):
    return dar.load_toy_evaluator(path, image_size, flag="--evaluator")


def spread_text(figure, form):
    """A dar.spread as 'mean [low, high]'."""
    return f"{figure['mean']:{form}} [{figure['low']:{form}}, {figure['high']:{form}}]"


def toy_eval(args, tokenizer, ar, device):
    """--eval: the toy metric of the samples, or of the reconstructions (--reconstruct builtin), or
    Fig. 5 measured (--layout-from builtin)."""
    if ar is not None and not is_builtin(ar):
        fail(f"--eval measures models of the built-in shapes ({len(dar.SHAPE_CLASSES)} classes); "
             f"{ar.file} has {ar.cfg.num_classes}. For ImageNet, use --fid and the ADM evaluator")
    evaluator = load_evaluator(args.evaluator, tokenizer.cfg.image_size).to(device)
    if args.layout_from:
        references = dar.builtin_images(args.n or 50, tokenizer.cfg.image_size,
                                        dar.EVALUATOR_REFERENCE_SEED)[0]
        results = []
        for kept in layout_prefix_counts(args, tokenizer, ar):
            row = dar.layout_metrics(ar, tokenizer, evaluator, references, kept, args.seed,
                                     **sampling_options(args))
            print(f"{kept:3d} tokens kept, {len(references) * ar.cfg.num_classes} samples: class "
                  f"as asked {spread_text(row['class_as_asked'], '.1%')}, shape centroid "
                  f"{row['centroid_px']:.1f} px from the reference's, both colours kept "
                  f"{row['colours_kept']:.1%}")
            results.append(row)
        return results
    layouts = []  # of reconstructions: does each keep its image's layout (dar.layout_agreement)?
    if args.reconstruct:
        reconstruct, total, dataset = reconstruction_batch(args, tokenizer)
        what = "reconstructions"

        def make(indices):
            images, labels = reconstruct(indices)
            layouts.append(dar.layout_agreement(torch.stack([dataset[i][0] for i in indices]),
                                                images))
            return images, labels
    else:
        make, total, what = sample_batch(args, tokenizer,
                                         ar), args.n or 1000, f"samples (guidance {args.guidance}"
        what += f", previews after {args.preview_groups} groups)" if args.preview_groups else ")"
    what += f", {args.denoising_steps} steps" if args.denoising_steps else ""
    scores = dar.toy_metrics(evaluator, make, total, args.batch_size, tokenizer.cfg.image_size)
    print(f"{total} {what}: accuracy {spread_text(scores['accuracy'], '.1%')}, toy FID "
          f"{spread_text(scores['toy_fid'], '.2f')} (real held-out images: accuracy "
          f"{spread_text(scores['real_accuracy'], '.1%')}, toy FID "
          f"{spread_text(scores['real_toy_fid'], '.2f')}; {len(evaluator.members)} evaluators: "
          "mean [lowest, highest])")
    if layouts:
        background, colours, offsets = (torch.cat(parts) for parts in zip(*layouts))
        scores.update(background_kept=background.float().mean().item(),
                      colours_kept=colours.float().mean().item(), centroid_px=offsets.mean().item())
        print(f"their layout: background colour kept {scores['background_kept']:.1%}, both colours "
              f"{scores['colours_kept']:.1%}, the shape's centroid off by "
              f"{scores['centroid_px']:.2f} px on average")
    return scores


def sample_files(args, tokenizer, ar, rank, world_size, device):
    """--fid / --reconstruct: the PNGs of this process's share, then (rank 0) the .npz files."""
    make, total, dataset = ((sample_batch(args, tokenizer, ar), args.fid, None)
                            if args.fid is not None
                            else reconstruction_batch(args, tokenizer))
    folder = Path(args.out)
    if rank == 0:
        check_files_folder(folder, tokenizer.cfg.image_size)
        settings = file_settings(args, tokenizer, ar, total, dataset)
        dar.check_record(folder / "settings.json", settings, f"--out {folder}")
    if world_size > 1:
        torch.distributed.barrier()
    made = write_pngs(make, total, folder, rank, world_size, args.batch_size)
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        print(f"{folder}: {total} PNGs ({made} made now by process 0) -> "
              f"{pack_npz(folder, total)}")
        if dataset is not None and getattr(dataset, "skipped", 0):
            print(f"{dataset.skipped} unreadable files were skipped (the next readable file stood "
                  "in)")
        if dataset is not None:
            print(f"the {total} centre crops it encoded -> "
                  f"{pack_reference(dataset, total, folder)} (rFID: evaluator.py "
                  f"{folder.name}-reference.npz {folder.name}.npz)")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return folder


def check_files_folder(folder, image_size):
    """A --fid / --reconstruct folder holds only what this command makes: PNGs there without its
    record (settings.json), or of another size, end the run before any sampling."""
    pngs = sorted(folder.glob("[0-9]" * 6 + ".png"))
    if pngs and not (folder / "settings.json").exists():
        fail(f"--out {folder} holds {len(pngs)} PNGs that no run of sample.py recorded "
             f"(settings.json); choose an empty folder")
    for png in pngs:
        try:
            with Image.open(png) as image:
                size = image.size
        except OSError:
            size = None  # a truncated file (a killed run): rewritten below
        if size is not None and size != (image_size, image_size):
            fail(f"--out {folder}: {png.name} is {size[0]}x{size[1]}, not the "
                 f"{image_size}x{image_size} images this run makes; choose another folder")


def file_settings(args, tokenizer, ar, total, dataset):
    """What determines the images of a --fid / --reconstruct folder, as absolute facts (file
    digests, the folder's content): a rerun with other settings is refused."""
    models = {"tokenizer": tokenizer.digest(), **({"ar": dar.cached_digest(ar.file)}
                                                  if args.fid is not None else {})}
    source = "fid" if args.fid is not None else "reconstruct builtin"
    if isinstance(dataset, dar.ImageFolder):
        source = {"reconstruct": str(dataset.root.resolve()), "content": dataset.fingerprint()}
    return {"images": total, "mode": source,
            **{f"{flag}_sha256": digest for flag, digest in models.items()},
            **{key: getattr(args, key) for key in ("guidance", "temperature", "top_k", "top_p",
                                                   "solver", "denoising_steps", "seed",
                                                   "preview_groups", "precision")}}


def preset_pair(text, device, precision):
    """--config TOKENIZER:AR -> (tokenizer, AR model) with random weights, in eval mode, as
    load_models places them."""
    names = text.split(":")
    if len(names) != 2 or names[0] not in dar.TOKENIZER_PRESETS or names[1] not in dar.AR_PRESETS:
        fail("--config: expected TOKENIZER:AR with TOKENIZER one of "
             f"{', '.join(dar.TOKENIZER_PRESETS)} and AR one of {', '.join(dar.AR_PRESETS)}, got "
             f"{text!r}")
    # sampling needs no REPA head
    tokenizer = dar.Tokenizer(dar.replace(dar.TOKENIZER_PRESETS[names[0]], repa_dim=0))
    ar = dar.LlamaAR(dar.AR_PRESETS[names[1]])
    try:
        dar.check_pair(ar, tokenizer)
    except ValueError as error:
        fail(f"--config {text}: {error}")
    ar = ar.to(device).eval()
    at_release_precision(ar, device, precision)
    return tokenizer.to(device).eval(), ar


def batch_sizes(text):
    """--benchmark's comma-separated positive batch sizes."""
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        fail(f"--benchmark: expected comma-separated positive batch sizes, got {text!r}")
    return sizes


def benchmark(args, tokenizer, ar, device, weights):
    """--benchmark: benchmark_sampler per batch size, printed as a table under the settings and
    the AR floor."""
    sizes = batch_sizes(args.benchmark)
    options = sampling_options(args)
    ar_dtype, tokenizer_dtype = (next(model.parameters()).dtype for model in (ar, tokenizer))
    S = args.denoising_steps or tokenizer.cfg.decode_steps
    print(f"sampler benchmark: {weights} | {device.type}, AR {str(ar_dtype)[6:]}, tokenizer "
          f"{str(tokenizer_dtype)[6:]}{' (TF32)' if device.type == 'cuda' and args.tf32 else ''}, "
          f"{'compiled' if args.compile else 'eager'}, guidance {args.guidance}, {args.solver}, "
          f"{S} steps, N = {tokenizer.cfg.num_tokens} tokens; median of {args.repeat} runs after a "
          "warm-up")
    ar_bytes = sum(p.numel() * p.element_size() for p in ar.parameters())
    bandwidth = memory_bandwidth(device)
    print(f"AR weights {ar_bytes / 1e6:.1f} MB, read once per token at {bandwidth:.1f} GB/s "
          "(measured: the best of 5 sums of a 1 GiB tensor): at least "
          f"{1000 * ar_bytes / bandwidth / 1e9:.2f} ms per token")
    print("batch  images/s  AR ms/token  D_FM ms/step  AR share  D_FM share  peak memory")
    rows = []
    for batch in sizes:
        row = benchmark_sampler(ar, tokenizer, batch, args.repeat, args.seed, **options)
        peak = row["peak_memory_gib"]
        peak = "n/a (CPU)" if peak is None else f"{peak:.2f} GiB"
        print(f"{batch:5d}  {row['images_per_s']:8.2f}  {row['ar_ms_per_token']:11.2f}  "
              f"{row['diffusion_ms_per_step']:12.2f}  {row['ar_share']:8.0%}  "
              f"{row['diffusion_share']:10.0%}  {peak}")
        rows.append(row)
    return rows


# ---- the files of --fid and --reconstruct, and the timing of --benchmark -------------------------

def reconstructions(tokenizer, dataset, seed=0, **options):
    """-> make(indices) = (the tokenizer's decodes of those dataset images, their labels); image i
    is decoded from noise of its own generator, seeded seed + i. options: `Tokenizer.decode`'s."""
    device = tokenizer.sampling_times.device

    def make(indices):
        images, labels = zip(*(dataset[index] for index in indices))
        codes = tokenizer.encode(torch.stack(images).to(device))
        generator = dar.generators([seed + i for i in indices], device)
        return tokenizer.decode(codes, generator=generator, **options), torch.tensor(labels)
    return make


def write_pngs(make, total, folder, rank=0, world_size=1, batch_size=64):
    """Images 0..total-1 as folder/NNNNNN.png, from make(indices) -> (images (B, 3, H, W) in [-1,
    1], labels). This process makes i = rank, rank + world_size, ...; images whose PNG exists are
    kept, so an interrupted run continues. Each PNG is written under a temporary name and renamed,
    so none is ever truncated. -> how many this process made."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(rank, total, world_size) if not (folder / f"{i:06d}.png").exists()]
    # the temporaries of an interrupted write
    for stale in (path for i in todo for path in folder.glob(f"{i:06d}.png.*tmp")):
        stale.unlink()
    for start in tqdm(range(0, len(todo), batch_size), desc=f"{folder}", disable=rank != 0,
                      dynamic_ncols=True):
        indices = todo[start:start + batch_size]
        images, _ = make(indices)
        pixels = dar.to_uint8(images.float().cpu()).permute(0, 2, 3, 1).numpy()    # (B, H, W, 3)
        for index, image in zip(indices, pixels):
            temporary = folder / f"{index:06d}.png.{os.getpid()}.tmp"
            Image.fromarray(image).save(temporary, format="PNG")
            os.replace(temporary, folder / f"{index:06d}.png")
    return len(todo)


def pack_npz(folder, total):
    """The ADM evaluator's input: <folder>.npz with arr_0 = uint8 (total, H, W, 3),
    in index order."""
    first = np.asarray(Image.open(folder / f"{0:06d}.png").convert("RGB"))
    images = np.empty((total, *first.shape), dtype=np.uint8)
    for index in range(total):
        images[index] = np.asarray(Image.open(folder / f"{index:06d}.png").convert("RGB"))
    path = folder.parent / f"{folder.name}.npz"
    np.savez(path, arr_0=images)
    return path


def pack_reference(dataset, total, folder):
    """rFID's real side: <folder>-reference.npz, arr_0 = uint8 (total, H, W, 3), the centre crops
    that were encoded, in the order of <folder>.npz (scored against the original files instead, the
    same reconstructions get a worse rFID than the paper's protocol)."""
    crops = np.empty((total, dataset.image_size, dataset.image_size, 3), dtype=np.uint8)
    for index in range(total):
        crops[index] = dar.to_uint8(dataset[index][0]).permute(1, 2, 0).numpy()
    path = folder.parent / f"{folder.name}-reference.npz"
    np.savez(path, arr_0=crops)
    return path


def synchronized_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def memory_bandwidth(device):
    """GB/s at which this device reads memory: the best of 5 sums of a 1 GiB float32 tensor. A
    one-token AR step reads every weight once, so weight bytes / this is its floor at batch 1."""
    x, best = torch.ones(2 ** 28, device=device), float("inf")
    for _ in range(5):
        start = synchronized_time(device)
        x.sum()
        best = min(best, synchronized_time(device) - start)
    return x.numel() * x.element_size() / best / 1e9


def median_time(run, repeat, device):
    """-> (the median seconds of `repeat` calls of run() after one warm-up call, the last call's
    output)."""
    run()  # the warm-up: it compiles, with compile=True
    times = []
    for _ in range(repeat):
        start = synchronized_time(device)
        output = run()
        times.append(synchronized_time(device) - start)
    return sorted(times)[len(times) // 2], output


@torch.no_grad()
def benchmark_sampler(ar, tokenizer, batch, repeat=3, seed=0, **options):
    """Time `sample` at one batch size: a warm-up run (compiling, with compile=True), then the
    median of `repeat` runs. D_FM's share is timed apart, as `tokenizer.decode` of the sampled
    tokens with the same steps; the AR model's is the rest (so it includes the sampler's own Python
    work). -> a dict of the figures."""
    device = tokenizer.sampling_times.device
    N, S = tokenizer.cfg.num_tokens, options.get("steps") or tokenizer.cfg.decode_steps
    labels = torch.arange(batch, device=device) % ar.cfg.num_classes
    sampling = lambda: list(dar.sample(ar, tokenizer, labels,
                                   generator=torch.Generator(device).manual_seed(seed), **options))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total, sampled_groups = median_time(sampling, repeat, device)
    decoding, _ = median_time(lambda: tokenizer.decode(sampled_groups[-1].tokens,
                                                       solver=options.get("solver", "adams2"),
                                                       steps=options.get("steps"),
                                                       compile=options.get("compile", False)),
                              repeat, device)
    return dict(batch=batch, images_per_s=batch / total,
                ar_ms_per_token=1000 * (total - decoding) / N,
                diffusion_ms_per_step=1000 * decoding / S, ar_share=(total - decoding) / total,
                diffusion_share=decoding / total,
                peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30
                if device.type == "cuda" else None)


def main(argv=None):
    args = parse_args(argv)
    check_modes(args)
    rank, world_size, device = dar.setup_distributed(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.config is not None and ":" in args.config:
        tokenizer, ar = preset_pair(args.config, device, args.precision)
        return benchmark(args, tokenizer, ar, device,
                         f"random weights of the presets {args.config} (not trained)")
    tokenizer, ar = load_models(args, device, need_ar=args.reconstruct is None)
    with torch.no_grad():
        if args.benchmark is not None:
            return benchmark(args, tokenizer, ar, device,
                             f"{os.path.relpath(tokenizer.file)} + {os.path.relpath(ar.file)}")
        if args.eval:
            return toy_eval(args, tokenizer, ar, device)
        if args.fid is not None or args.reconstruct is not None:
            return sample_files(args, tokenizer, ar, rank, world_size, device)
        draw = layout_control if args.layout_from else picture
        path = draw(args, tokenizer, ar, device)
        print(path)
        return path


if __name__ == "__main__":
    dar.command_line(main)
