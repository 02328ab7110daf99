"""Sample from a trained D-AR pair (§3.3): images forming group by group, layout control, the files
the paper's FIDs are computed from, the toy metric of the built-in data and the sampler's speed.

    python sample.py                              # a row per class, the preview after each group
    python sample.py --stream --labels dots       # one line per group, as its tokens arrive
    python sample.py --layout-from textures:4 --prefix-tokens 8,16,32 --labels 0,1,2,3  # Fig. 5
    python sample.py --eval                       # toy accuracy and toy FID of the pair's samples
    python sample.py --eval --preview-groups 2    # ... of the previews after 2 groups (Table 5)
    python sample.py --eval --layout-from textures --prefix-tokens 0,8,16  # layout control measured
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --ar D-AR-L-360K.pt --guidance 1.1,8.0 \\
        --fid 50000 --out samples/L               # 50,000 PNGs + samples/L.npz for ADM's evaluator
    torchrun --nproc_per_node 8 sample.py ...     # the same files, shared out over 8 GPUs
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --reconstruct /imagenet/val --out recon/v1
        # rFID: recon/v1.npz and recon/v1-reference.npz, the centre crops it encoded (the real side)
    python sample.py --benchmark 1,4,16 --compile # images/s, ms per token and per step
    python sample.py --benchmark 1,64 --config ablation:B         # random weights, no download

Without --ar: yours in out/tiny (from `python train_ar.py`), else the shipped one; without
--tokenizer: the one whose codes that AR model learned (its checkpoint records the file's SHA-256).
Sample i of --fid and --eval asks for class i mod C, its noise and tokens drawn with the seed
--seed + i: its tokens do not depend on the batch size or the number of processes (its pixels may
differ by a rounding step: batched kernels sum in other orders).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import dar

DIT_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample classes, for 1000 classes
QUICKSTART = Path("out/tiny")  # where `python train_tokenizer.py && python train_ar.py` write


def parse_args(argv=None):
    parser = dar.Parser(__doc__)
    pair = parser.add_argument_group("the pair")
    pair.add_argument("--tokenizer", help="ours or the release's (default: as above)")
    pair.add_argument("--ar", help="ours or the release's, e.g. D-AR-L-360K.pt (default: as above)")
    pair.add_argument("--config", metavar="PRESET", help=f"a release AR file's preset (default: "
                      f"inferred; {', '.join(dar.AR_PRESETS)}); with --benchmark, TOKENIZER:AR: "
                      f"random weights of two presets (tokenizer: "
                      f"{', '.join(dar.TOKENIZER_PRESETS)}), e.g. v1:L")
    pair.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pair.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                      help="the AR model's weights on CUDA (release: bf16; the tokenizer: fp32)")
    pair.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                      help="TF32 matmuls on CUDA (release: on)")
    sampling = parser.add_argument_group("sampling, every mode (release defaults)")
    sampling.add_argument("--labels", type=listed("class"), help="class ids or names, e.g. 0,dots")
    sampling.add_argument("--guidance", type=listed("scale", dar.SCALE), default="4.0",
                          help="classifier-free guidance, or 'start,end' for the linear schedule "
                          "(paper: 1.1,8.0 for D-AR-L, 1.1,10.0 for D-AR-XL)")
    sampling.add_argument("--temperature", type=dar.SCALE, default=1.0)
    sampling.add_argument("--top-k", type=dar.COUNT, default=0, help="0: off")
    sampling.add_argument("--top-p", type=dar.flag_type(0, 1, low_open=True), default=1.0,
                          help="in (0, 1]; 1: off")
    sampling.add_argument("--solver", default="adams2", choices=dar.SOLVERS)
    sampling.add_argument("--denoising-steps", type=dar.SIZE, metavar="S", help="steps of a "
                          "decode (default: K as released); S > K: a group drives several (Eq. 5)")
    sampling.add_argument("--seed", type=dar.SEED, default=0)
    sampling.add_argument("--compile", action="store_true", help="torch.compile the one-token AR "
                          "step and the denoising step (CUDA graphs on a GPU); the same numbers")
    sampling.add_argument("--batch-size", type=dar.SIZE, default=64, help="--fid, --reconstruct, "
                          "--eval: images per batch and process (release: 64)")
    sampling.add_argument("--n", type=dar.SIZE, help="images: the picture's rows (default: one per "
                          "label), --eval's (1000; references: 50), --reconstruct's (all)")
    sampling.add_argument("--out", help="a picture's PNG (default: out/tiny, or beside the AR "
                          "checkpoint), or the folder of --fid and --reconstruct")
    add_mode_flags(parser)
    args = parser.parse_args(argv)
    check_flags(args)
    return args


def add_mode_flags(parser):
    """The modes (one at most; default: a picture of previews) and their own flags."""
    modes = parser.add_argument_group("modes (default: a picture of previews)")
    chosen = modes.add_mutually_exclusive_group()
    modes.add_argument("--stream", action="store_true", help="picture: a line per group")
    modes.add_argument("--gif", action="store_true", help="picture: also an animated GIF of the "
                       "samples forming, a frame per group (same name, .gif)")
    chosen.add_argument("--layout-from", metavar="IMAGE", help="keep this image's first tokens "
                        "(Fig. 5): a file or 'textures:I' (held-out image I of the built-in "
                        "data); --eval: 'textures'")
    modes.add_argument("--prefix-tokens", type=listed("count", dar.COUNT), default="8,16,32",
                       help="--layout-from: counts of kept tokens, a row each")
    chosen.add_argument("--fid", type=dar.SIZE, metavar="N",
                        help="write N class-balanced samples as PNGs and an .npz")
    chosen.add_argument("--reconstruct", metavar="FOLDER", help="write reconstructions of an image "
                        "folder (or held-out images of the built-in data: 'textures') as "
                        "PNGs and an .npz (rFID)")
    modes.add_argument("--eval", action="store_true", help="built-in data: toy accuracy and toy "
                       "FID of the samples (of --reconstruct textures; Fig. 5 of --layout-from "
                       "textures)")
    modes.add_argument("--preview-groups", type=dar.SIZE, metavar="k", help="--fid, --eval: the "
                       "preview after k groups instead of the image (Table 5)")
    modes.add_argument("--evaluator", default=os.path.relpath(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval's toy evaluator (trained and written there if missing)")
    chosen.add_argument("--benchmark", metavar="BATCHES", nargs="?", const=[1, 16, 64],
                        type=listed("batch size", dar.SIZE), help="time the sampler at these batch "
                        "sizes (default 1,16,64): images/s, ms per token and step, peak memory")
    modes.add_argument("--repeat", type=dar.SIZE, default=3,
                       help="--benchmark: timed runs per batch size after a warm-up")


def listed(what, item=str):
    """An argparse type: a comma-separated list of at least one `item` (a type such as dar.SIZE)."""
    def parse(text):
        items = [part.strip() for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"give at least one {what}, comma-separated")
        try:
            return [item(part) for part in items]
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"each {what} {error}") from None
    parse.__name__ = what
    return parse


def check_flags(args):
    """The modes that go together, the flags each reads, and the paths, checked before anything
    loads: a flag the mode would ignore ends the run, as does an output in the way."""
    mode = next((f"--{flag.replace('_', '-')}" for flag in ("benchmark", "eval", "fid",
                 "reconstruct", "layout_from") if getattr(args, flag) not in (None, False)),
                "the picture")
    samples, picture = args.reconstruct is None, mode in ("the picture", "--layout-from")
    writes_files = not args.eval and (args.fid is not None or args.reconstruct is not None)
    random_pair = ":" in (args.config or "")
    reads = {"stream": mode == "the picture", "gif": mode == "the picture", "labels": picture,
             "n": mode in ("the picture", "--eval", "--reconstruct"), "evaluator": args.eval,
             "out": picture or writes_files, "prefix_tokens": args.layout_from is not None,
             "repeat": mode == "--benchmark", "preview_groups": args.fid is not None or (
                 args.eval and samples and not args.layout_from),
             "batch_size": mode in ("--fid", "--reconstruct") or args.eval and not args.layout_from,
             **dict.fromkeys(("ar", "config", "precision", "guidance", "temperature", "top_k",
                              "top_p"), samples)}
    problems = [f"--{dest.replace('_', '-')} is not read by {mode}: leave it out"
                for dest, read in reads.items() if dest in args.given and not read]
    problems += [message for bad, message in (
        (len(args.guidance) > 2, "--guidance: one scale, or 'start,end' for the schedule"),
        (args.eval and args.benchmark is not None, "--benchmark times the sampler alone: leave out "
         "--eval"),
        (args.out == "", "--out: an empty path; name a file or a folder"),
        (args.eval and args.n == 1 and not args.layout_from, "--eval --n: at least 2 images, the "
         "fewest a toy FID can compare"),
        (args.eval and args.fid is not None, "--eval measures samples, --reconstruct textures or "
         "--layout-from textures; not --fid"),
        (args.eval and args.layout_from not in (None, *dar.BUILTIN_DATA), "--eval --layout-from "
         "measures held-out built-in images: use --layout-from textures"),
        (args.eval and args.reconstruct not in (None, *dar.BUILTIN_DATA), "--eval measures the "
         "built-in data: use --reconstruct textures"),
        (random_pair and mode != "--benchmark", "--config TOKENIZER:AR (random weights) is for "
         "--benchmark only"),
        (random_pair and (args.tokenizer or args.ar), "--config TOKENIZER:AR replaces --tokenizer "
         "and --ar: give one or the other"),
        (args.config and not random_pair and args.config not in dar.AR_PRESETS, f"--config "
         f"{args.config}: expected an AR preset ({', '.join(dar.AR_PRESETS)}) or, with "
         "--benchmark, TOKENIZER:AR"),
        (writes_files and args.out is None, f"{mode} writes a folder of PNGs: pass --out DIR"),
        ("RANK" in os.environ and not writes_files, "only --fid and --reconstruct are shared out "
         "over processes; run the other modes without torchrun"),
        (args.out and picture and (args.out[-4:].lower() != ".png" or Path(args.out).is_dir()),
         f"--out {args.out}: a picture is written to a file name ending in .png"),
        (args.out and writes_files and Path(args.out).is_file(), f"--out {args.out} is a file: "
         "--fid and --reconstruct write a folder"),
        (args.reconstruct not in (None, *dar.BUILTIN_DATA) and not Path(args.reconstruct).is_dir(),
         f"--reconstruct: no folder {args.reconstruct}"),
        *((path and Path(path).is_dir(), f"--{flag} {path} is a folder, not a checkpoint")
          for flag, path in (("tokenizer", args.tokenizer), ("ar", args.ar),
                             ("evaluator", args.evaluator)))) if bad]
    if not problems and args.out and not writable(Path(args.out).parent if picture
                                                  else Path(args.out)):
        problems.append(f"--out {args.out}: its folder cannot be created or written")
    if problems:
        fail(problems[0])
    args.guidance = args.guidance[0] if len(args.guidance) == 1 else tuple(args.guidance)


def writable(folder):
    """Can this run create `folder` (if need be) and write a file in it? Tried, not guessed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def fail(message):
    """Bad input found after parsing ends the run with one line, no traceback (exit code 2)."""
    raise dar.BadInput(message)


def default_file(name, command, chosen, what):
    """out/tiny/<name> when your `command` has written it, else the shipped weights/tiny/<name>;
    the choice is appended to `chosen` for the printed line."""
    if (QUICKSTART / name).is_file():
        path, why = str(QUICKSTART / name), f"yours, from `{command}`"
    else:
        path = os.path.relpath(dar.SHIPPED_TINY / name)
        why = f"shipped; `{command}` trains yours into {QUICKSTART}"
    chosen.append(f"{what} {path} ({why})")
    return path


def load(flag, path, loader, device, *options):
    """A checkpoint through `loader`; a missing or damaged file ends the run with one line."""
    if not Path(path).is_file():
        script, where = f"python train_{flag[2:]}.py", Path(path)
        writes = f"--out {where.parent}" if where.name == f"{flag[2:]}.pt" else f"--export {path}"
        fail(f"no checkpoint at {path}; `{script} {writes}` writes it, or pass {flag} PATH")
    try:
        return loader(path, *options, device=device)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        fail(f"{flag} {path} cannot be loaded: {str(error).splitlines()[0]}")


def load_pair(args, device, need_ar=True):
    """-> (tokenizer, AR model or None) in eval mode (`ready`). Without --ar: yours or the shipped
    one; without --tokenizer: the one whose codes the AR model learned (its record), or without an
    AR model yours or the shipped one. One printed line says which."""
    ar, chosen, tokenizer_path = None, [], args.tokenizer
    if need_ar:
        ar_path = args.ar or default_file("ar.pt", "python train_ar.py", chosen, "AR model")
        ar = load("--ar", ar_path, dar.load_ar, device, args.config)
    if tokenizer_path is None and ar is not None:
        if ar.codes_of is None:
            fail(f"--ar {ar.file} does not record which tokenizer's codes it learned: pass "
                 "--tokenizer")
        tokenizer_path = os.path.relpath(ar.codes_of["path"])
        chosen.append(f"tokenizer {tokenizer_path} (whose codes it learned)")
    tokenizer_path = tokenizer_path or default_file("tokenizer.pt", "python train_tokenizer.py",
                                                    chosen, "tokenizer")
    if chosen:
        print(("pair: " if ar is not None else "") + ", ".join(chosen))
    tokenizer = load("--tokenizer", tokenizer_path, dar.load_tokenizer, device)
    return ready(tokenizer, ar, f"--ar {ar.file} and --tokenizer {tokenizer_path}" if ar else "",
                 device, args.precision)


def preset_pair(text, device, precision):
    """--config TOKENIZER:AR -> (tokenizer, AR model) of random weights, as `load_pair` gives."""
    names = text.split(":")
    if len(names) != 2 or names[0] not in dar.TOKENIZER_PRESETS or names[1] not in dar.AR_PRESETS:
        fail(f"--config: expected TOKENIZER:AR with TOKENIZER one of "
             f"{', '.join(dar.TOKENIZER_PRESETS)} and AR one of {', '.join(dar.AR_PRESETS)}, got "
             f"{text!r}")
    # sampling needs no REPA head
    tokenizer = dar.Tokenizer(dar.replace(dar.TOKENIZER_PRESETS[names[0]], repa_dim=0))
    return ready(tokenizer.to(device), dar.LlamaAR(dar.AR_PRESETS[names[1]]).to(device),
                 f"--config {text}", device, precision)


def ready(tokenizer, ar, pair, device, precision):
    """The pair in eval mode, checked (`dar.check_pair`), the AR model in bf16 on CUDA."""
    if ar is not None:
        try:
            dar.check_pair(ar, tokenizer)
        except ValueError as error:
            fail(f"{pair}: {error}")
        if device.type == "cuda" and precision == "bf16":
            ar.to(torch.bfloat16)  # release: GPT weights and KV cache in bf16, logits in float32
        ar.eval()
    return tokenizer.eval(), ar


def class_names(ar):
    """The AR model's class names as its checkpoint records them, else "class I"."""
    names = getattr(ar, "class_names", None)
    return names or [f"class {i}" for i in range(ar.cfg.num_classes)]


def parse_labels(items, ar, default):
    """--labels ['0', '3', 'dots'] -> [0, 3, 6]: ids or names of the AR model's classes; without
    --labels, the mode's `default`."""
    names, C = class_names(ar), ar.cfg.num_classes
    if not items:
        return list(default)
    labels = [names.index(item) if item in names else int(item) if item.isdigit() else C
              for item in items]
    for item, label in zip(items, labels):
        if label >= C:
            named = f", or {', '.join(names)}" if names[0] != "class 0" else ""
            fail(f"--labels: class {item} is outside the AR model's {C} classes (ids 0-{C - 1}"
                 f"{named})")
    return labels


def sampling_options(args):
    """The keyword arguments of dar.sample that the flags set."""
    return dict(guidance=args.guidance, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, solver=args.solver, steps=args.denoising_steps,
                compile=args.compile)


def picture_path(args, ar, name):
    """--out, else out/tiny/<name> for the shipped pair or <the AR checkpoint's folder>/<name>;
    a folder that cannot be written, or a file there that sample.py did not write (`dar.is_ours`),
    ends the run before any sampling."""
    folder = ar.file.parent
    folder = QUICKSTART if folder.resolve() == dar.SHIPPED_TINY.resolve() else folder
    path = Path(args.out or folder / name)
    if not writable(path.parent):
        fail(f"{path.parent} cannot be created or written: pass --out FILE.png")
    for made in [path] + [path.with_suffix(".gif")] * args.gif:
        if made.exists() and not dar.is_ours(made):
            fail(f"{made} exists and is not a picture of sample.py; move it away or choose "
                 "another --out")
    return path


def picture(args, tokenizer, ar, device):
    """The default mode: a row per sample, its previews after groups 1..K (the K-th: the image)."""
    C, K, G = ar.cfg.num_classes, tokenizer.cfg.num_groups, tokenizer.cfg.group_size
    labels = parse_labels(args.labels, ar, DIT_CLASSES if C == 1000 else range(min(C, 10)))
    labels = [labels[i % len(labels)] for i in range(args.n or len(labels))]
    generator = dar.generators(range(args.seed, args.seed + len(labels)), device)
    path, names = picture_path(args, ar, "samples.png"), [class_names(ar)[i] for i in labels]
    previews, start = [], time.perf_counter()
    for sampled in dar.sample(ar, tokenizer, labels, generator=generator,
                              **sampling_options(args)):
        previews.append(sampled.preview)
        if args.stream:
            milliseconds = 1000 * (synchronized_time(device) - start)
            print(f"group {sampled.group + 1}/{K}: {sampled.tokens.shape[1]:4d} tokens, t = "
                  f"{sampled.t:.3f}, preview ready at {milliseconds:7.1f} ms")
    previews = torch.stack(previews, 1)
    dar.save_picture(dar.labelled_grid(previews, names, dar.preview_names(K, G)), path)
    if args.gif:
        dar.save_forming_gif(previews, names, G, path.with_suffix(".gif"))
        print(path.with_suffix(".gif"))
    return path


def load_reference(text, image_size):
    """--layout-from: an image file, or 'textures:I' (held-out image I of the built-in data)
    -> (1, 3, H, W)."""
    data, _, index = text.partition(":")
    if data in dar.BUILTIN_DATA:
        if not index.isdigit() or int(index) > 10 ** 9:
            fail(f"--layout-from: expected {data}:INDEX with INDEX an integer in [0, 10^9], got "
                 f"{text!r}")
        return dar.builtin_images(int(index) + 1, image_size, dar.EVALUATOR_REFERENCE_SEED,
                                  data)[0][-1:]
    try:
        with Image.open(text) as image:
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        fail(f"--layout-from: cannot read {text} as an image ({error})")
    return dar.pil_to_tensor(dar.center_crop(image, image_size))[None]


def prefix_counts(args, tokenizer, ar):
    """--prefix-tokens, each in [0, N], for an AR model that writes the coarse tokens first."""
    N = tokenizer.cfg.num_tokens
    if ar.cfg.reverse:
        fail(f"{ar.file} writes the fine tokens first (--reverse); layout control needs the coarse "
             "ones first")
    if max(args.prefix_tokens) > N:
        fail(f"--prefix-tokens {','.join(map(str, args.prefix_tokens))}: each count must lie in "
             f"[0, {N}] (the tokenizer has N = {N})")
    return args.prefix_tokens


def layout_control(args, tokenizer, ar, device):
    """Fig. 5: the reference's first n tokens, the rest sampled under each label; a row per n. Every
    cell uses the same seed, so within a row only the label changes."""
    counts, path = prefix_counts(args, tokenizer, ar), picture_path(args, ar, "layout.png")
    reference = load_reference(args.layout_from, tokenizer.cfg.image_size).to(device)
    codes = tokenizer.encode(reference)
    labels = parse_labels(args.labels, ar, range(min(ar.cfg.num_classes, 5)))
    rows = []
    for count in counts:
        prefix = codes[:, :count].expand(len(labels), -1)
        *_, last = dar.sample(ar, tokenizer, labels, prefix=prefix, **sampling_options(args),
                              generator=dar.generators([args.seed] * len(labels), device))
        rows.append(torch.cat([reference, last.image]))
    dar.save_picture(dar.labelled_grid(torch.stack(rows), [f"{n} tokens kept" for n in counts],
                                       ["reference"] + [class_names(ar)[i] for i in labels]), path)
    return path


def spread_text(figure, form):
    """A dar.spread as 'mean [low, high]'."""
    return f"{figure['mean']:{form}} [{figure['low']:{form}}, {figure['high']:{form}}]"


def toy_eval(args, tokenizer, ar, device):
    """--eval: the toy metric of the samples, or of the reconstructions (--reconstruct textures),
    or Fig. 5 measured (--layout-from textures); of the built-in data these flags or the AR model
    name (by its class names)."""
    learned = next((name for name, data in dar.BUILTIN_DATA.items()
                    if ar is not None and class_names(ar) == list(data.class_names)), None)
    data = args.reconstruct or args.layout_from or learned
    if data is None or ar is not None and learned != data:
        fail(f"--eval measures models of the built-in {data or 'data'}; {ar.file} learned other "
             f"classes ({', '.join(class_names(ar)[:3])}, ...): use --fid and an evaluator of its "
             "data")
    size = tokenizer.cfg.image_size
    evaluator = dar.load_toy_evaluator(args.evaluator, size, data, flag="--evaluator").to(device)
    if args.layout_from:
        references = dar.builtin_images(args.n or 50, size, dar.EVALUATOR_REFERENCE_SEED, data)[0]
        return [layout_eval(args, tokenizer, ar, evaluator, kept, references)
                for kept in prefix_counts(args, tokenizer, ar)]
    layouts = []  # does each image keep a layout (dar.layout_agreement)? (`measured_batches`)
    make, total, what = measured_batches(args, tokenizer, ar, layouts)
    what += f", {args.denoising_steps} steps" if args.denoising_steps else ""
    scores = dar.toy_metrics(evaluator, make, total, args.batch_size, size, data)
    print(f"{total} {what}: accuracy {spread_text(scores['accuracy'], '.1%')}, toy FID "
          f"{spread_text(scores['toy_fid'], '.2f')} (real held-out images: accuracy "
          f"{spread_text(scores['real_accuracy'], '.1%')}, toy FID "
          f"{spread_text(scores['real_toy_fid'], '.2f')}; {len(evaluator.members)} evaluators: "
          "mean [lowest, highest])")
    if layouts:
        background, colours, offsets = (torch.cat(parts) for parts in zip(*layouts))
        scores.update(background_kept=background.float().mean().item(),
                      colours_kept=colours.float().mean().item(), centroid_px=offsets.mean().item())
        print(f"their layout against {'the images' if args.reconstruct else 'the final samples'}"
              f": background colour kept {scores['background_kept']:.1%}, both colours "
              f"{scores['colours_kept']:.1%}, the object's centroid off by "
              f"{scores['centroid_px']:.2f} px on average")
    return scores


def measured_batches(args, tokenizer, ar, layouts):
    """--eval's make(indices) -> (images, asked-for labels), how many, and what they are. A batch
    of reconstructions appends to `layouts` whether each keeps its image's layout; a batch of
    previews (--preview-groups k, Table 5) whether each keeps the layout of its final sample."""
    if args.reconstruct:
        reconstruct, total, dataset = reconstruction_batch(args, tokenizer)

        def make(indices):
            images, labels = reconstruct(indices)
            layouts.append(dar.layout_agreement(torch.stack([dataset[i][0] for i in indices]),
                                                images))
            return images, labels
        return make, total, "reconstructions"
    what = f"samples (guidance {args.guidance}" + (
        f", previews after {args.preview_groups} groups)" if args.preview_groups else ")")
    if not args.preview_groups:
        return sample_batch(args, tokenizer, ar), args.n or 1000, what
    k = preview_groups(args, tokenizer)  # sampled with the seeds and labels of sample_batch

    def make(indices):
        labels = torch.tensor(indices, device=tokenizer.sampling_times.device) % ar.cfg.num_classes
        groups = list(dar.sample(ar, tokenizer, labels, **sampling_options(args),
                                 generator=dar.generators([args.seed + i for i in indices],
                                                          labels.device)))
        layouts.append(dar.layout_agreement(groups[-1].image, groups[k - 1].preview))
        return groups[k - 1].preview, labels
    return make, args.n or 1000, what


def layout_eval(args, tokenizer, ar, evaluator, kept, references):
    """--eval --layout-from textures: Fig. 5 measured (`dar.layout_metrics`) with `kept` tokens of
    each reference."""
    row = dar.layout_metrics(ar, tokenizer, evaluator, references, kept, args.seed,
                             **sampling_options(args))
    print(f"{kept:3d} tokens kept, {len(references) * ar.cfg.num_classes} samples: class as asked "
          f"{spread_text(row['class_as_asked'], '.1%')}, object centroid {row['centroid_px']:.1f} "
          f"px from the reference's, both colours kept {row['colours_kept']:.1%}")
    return row


def sample_batch(args, tokenizer, ar):
    """--fid, --eval: make(indices) -> (images, asked-for labels), `dar.class_balanced_samples`."""
    return dar.class_balanced_samples(ar, tokenizer, args.seed, preview_groups(args, tokenizer),
                                      **sampling_options(args))


def preview_groups(args, tokenizer):
    """--preview-groups k, at most the tokenizer's K (None: the images)."""
    if args.preview_groups is not None and args.preview_groups > tokenizer.cfg.num_groups:
        fail(f"--preview-groups {args.preview_groups}: must lie in [1, {tokenizer.cfg.num_groups}]")
    return args.preview_groups


def reconstruction_batch(args, tokenizer):
    """--reconstruct: make(indices) -> (decodes of those images, labels), how many, the dataset.
    Image i is decoded from noise of its own generator, seeded --seed + i."""
    size, device = tokenizer.cfg.image_size, tokenizer.sampling_times.device
    if args.reconstruct in dar.BUILTIN_DATA:
        dataset = dar.BUILTIN_DATA[args.reconstruct](args.n or 1000, size,
                                                     seed=dar.EVALUATOR_REFERENCE_SEED)
    else:
        try:
            dataset = dar.ImageFolder(args.reconstruct, size)
            dataset.read(0)
        except ValueError as error:
            fail(f"--reconstruct {args.reconstruct}: {error}")

    def make(indices):
        images, labels = zip(*(dataset[index] for index in indices))
        codes = tokenizer.encode(torch.stack(images).to(device))
        generator = dar.generators([args.seed + i for i in indices], device)
        return tokenizer.decode(codes, generator=generator, solver=args.solver,
                                steps=args.denoising_steps, compile=args.compile), \
            torch.tensor(labels)
    return make, min(len(dataset), args.n or len(dataset)), dataset


def sample_files(args, tokenizer, ar, rank, world_size):
    """--fid / --reconstruct: the PNGs of this process's share, then (rank 0) the .npz files."""
    make, total, dataset = ((sample_batch(args, tokenizer, ar), args.fid, None)
                            if args.fid is not None else reconstruction_batch(args, tokenizer))
    folder = Path(args.out)
    if rank == 0:
        check_files_folder(folder, tokenizer.cfg.image_size)
        dar.check_record(folder / "settings.json", file_settings(args, tokenizer, ar, total,
                                                                 dataset), f"--out {folder}")
    if world_size > 1:
        torch.distributed.barrier()
    made = write_pngs(make, total, folder, rank, world_size, args.batch_size)
    if world_size > 1:
        torch.distributed.barrier()
    if rank == 0:
        print(f"{folder}: {total} PNGs ({made} made now by process 0) -> "
              f"{pack(folder, total, make)}")
        if dataset is not None and getattr(dataset, "skipped", 0):
            print(f"{dataset.skipped} unreadable files were skipped (the next readable file stood "
                  "in)")
        if dataset is not None:
            crops = (pixels(dataset[i][0]) for i in range(total))
            path = save_npz(crops, total, folder.parent / f"{folder.name}-reference.npz")
            print(f"the {total} centre crops it encoded -> {path} (rFID: evaluator.py "
                  f"{folder.name}-reference.npz {folder.name}.npz)")
    if world_size > 1:
        torch.distributed.destroy_process_group()
    return folder


def check_files_folder(folder, image_size):
    """A --fid / --reconstruct folder holds only what this command makes: PNGs there without its
    record (settings.json), or of another size, end the run before any sampling."""
    pngs, packed = sorted(folder.glob("[0-9]" * 6 + ".png")), folder.parent / f"{folder.name}.npz"
    if packed.exists() and not (folder / "settings.json").exists():
        fail(f"--out {folder}: {packed} exists, but no record of the run that made it; move it "
             "away or choose another --out")
    if pngs and not (folder / "settings.json").exists():
        fail(f"--out {folder} holds {len(pngs)} PNGs that no run of sample.py recorded "
             f"(settings.json); choose an empty folder")
    for png in pngs:
        try:
            with Image.open(png) as image:
                size = image.size
        except OSError:
            size = None  # a damaged file: made again
        if size is not None and size != (image_size, image_size):
            fail(f"--out {folder}: {png.name} is {size[0]}x{size[1]}, not the "
                 f"{image_size}x{image_size} images this run makes; choose another folder")


def file_settings(args, tokenizer, ar, total, dataset):
    """What determines the images of a --fid / --reconstruct folder, as absolute facts
    (file digests, the folder's content): a rerun with other settings is refused."""
    models = {"tokenizer": tokenizer.digest(), **({"ar": dar.cached_digest(ar.file)}
                                                  if args.fid is not None else {})}
    source = "fid" if args.fid is not None else f"reconstruct {args.reconstruct}"
    if isinstance(dataset, dar.ImageFolder):
        source = {"reconstruct": str(dataset.root.resolve()), "content": dataset.fingerprint()}
    return {"images": total, "mode": source,
            **{f"{flag}_sha256": digest for flag, digest in models.items()},
            **{key: getattr(args, key) for key in ("guidance", "temperature", "top_k", "top_p",
                                                   "solver", "denoising_steps", "seed",
                                                   "preview_groups", "precision")}}


def write_pngs(make, total, folder, rank=0, world_size=1, batch_size=64):
    """Images 0..total-1 as folder/NNNNNN.png, from make(indices) -> (images in [-1, 1], labels).
    This process makes i = rank, rank + world_size, ...; a PNG that exists is kept, so an
    interrupted run continues after one listing of the folder. -> how many this process made."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {path.name for path in folder.iterdir()}
    todo = [i for i in range(rank, total, world_size) if f"{i:06d}.png" not in names]
    for name in names:  # this process's temporaries of an interrupted write
        if name.endswith(".tmp") and name[:6].isdigit() and int(name[:6]) % world_size == rank:
            (folder / name).unlink()
    for start in tqdm(range(0, len(todo), batch_size), desc=f"{folder}", disable=rank != 0,
                      dynamic_ncols=True):
        indices = todo[start:start + batch_size]
        for index, image in zip(indices, make(indices)[0]):
            dar.save_picture(Image.fromarray(pixels(image)), folder / f"{index:06d}.png")
    return len(todo)


def pixels(image):
    """An image (3, H, W) in [-1, 1] -> uint8 (H, W, 3), as the release converts it."""
    return dar.to_uint8(image.float().cpu()).permute(1, 2, 0).numpy()


def pack(folder, total, make):
    """The ADM evaluator's input: <folder>.npz with arr_0 = uint8 (total, H, W, 3), in index order;
    a damaged PNG is made again first."""
    def image(index):
        path = folder / f"{index:06d}.png"
        try:
            with Image.open(path) as png:
                return np.asarray(png.convert("RGB"))
        except OSError:
            dar.save_picture(Image.fromarray(pixels(make([index])[0][0])), path)
            return image(index)
    return save_npz((image(index) for index in range(total)), total,
                    folder.parent / f"{folder.name}.npz")


def save_npz(images, total, path):
    """uint8 images (H, W, 3) -> path, arr_0 = (total, H, W, 3), written through a temporary."""
    first = next(images)
    array = np.empty((total, *first.shape), dtype=np.uint8)
    array[0] = first
    for index, image in enumerate(images, 1):
        array[index] = image
    dar.write_atomically(path, lambda file: np.savez(file, arr_0=array))
    return path


# ---- --benchmark ---------------------------------------------------------------------------------

def synchronized_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def median_time(run, repeat, device):
    """-> (the median seconds of `repeat` calls of run() after one warm-up call, which compiles
    with --compile; the last call's output)."""
    run()
    times = []
    for _ in range(repeat):
        start = synchronized_time(device)
        output = run()
        times.append(synchronized_time(device) - start)
    return sorted(times)[len(times) // 2], output


def memory_bandwidth(device):
    """GB/s at which this device reads memory: the best of 5 sums of a 1 GiB float32 tensor. A
    one-token AR step reads every weight once, so weight bytes / this is its floor at batch 1."""
    x = torch.ones(2 ** 28, device=device)
    return x.numel() * x.element_size() / min(median_time(x.sum, 1, device)[0]
                                              for _ in range(5)) / 1e9


@torch.no_grad()
def benchmark_sampler(ar, tokenizer, batch, repeat=3, seed=0, **options):
    """Time `dar.sample` at one batch size: the median of `repeat` runs after a warm-up. D_FM's
    share is timed apart, as `tokenizer.decode` of the sampled tokens with the same steps; the AR
    model's is the rest (with the sampler's own Python work). -> a dict of the figures."""
    device = tokenizer.sampling_times.device
    N, S = tokenizer.cfg.num_tokens, options.get("steps") or tokenizer.cfg.decode_steps
    labels = torch.arange(batch, device=device) % ar.cfg.num_classes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total, sampled_groups = median_time(lambda: list(dar.sample(
        ar, tokenizer, labels, generator=torch.Generator(device).manual_seed(seed), **options)),
        repeat, device)
    decode = {key: options[key] for key in ("solver", "steps", "compile") if key in options}
    decoding, _ = median_time(lambda: tokenizer.decode(sampled_groups[-1].tokens, **decode),
                              repeat, device)
    return dict(batch=batch, images_per_s=batch / total, ar_ms_per_token=1000 * (total - decoding)
                / N, diffusion_ms_per_step=1000 * decoding / S, ar_share=(total - decoding) / total,
                diffusion_share=decoding / total, peak_memory_gib=torch.cuda.max_memory_allocated(
                    device) / 2 ** 30 if device.type == "cuda" else None)


def benchmark(args, tokenizer, ar, device, weights):
    """--benchmark: `benchmark_sampler` per batch size, printed as a table under the settings and
    the AR floor."""
    ar_dtype, tokenizer_dtype = (next(model.parameters()).dtype for model in (ar, tokenizer))
    print(f"sampler benchmark: {weights} | {device.type}, AR {str(ar_dtype)[6:]}, tokenizer "
          f"{str(tokenizer_dtype)[6:]}{' (TF32)' if device.type == 'cuda' and args.tf32 else ''}, "
          f"{'compiled' if args.compile else 'eager'}, guidance {args.guidance}, {args.solver}, "
          f"{args.denoising_steps or tokenizer.cfg.decode_steps} steps, N = "
          f"{tokenizer.cfg.num_tokens} tokens; median of {args.repeat} runs after a warm-up")
    ar_bytes = sum(p.numel() * p.element_size() for p in ar.parameters())
    bandwidth = memory_bandwidth(device)
    print(f"AR weights {ar_bytes / 1e6:.1f} MB, read once per token at {bandwidth:.1f} GB/s "
          "(measured: the best of 5 sums of a 1 GiB tensor): at least "
          f"{1000 * ar_bytes / bandwidth / 1e9:.2f} ms per token")
    print("batch  images/s  AR ms/token  D_FM ms/step  AR share  D_FM share  peak memory")
    rows = []
    for batch in args.benchmark:
        rows.append(benchmark_sampler(ar, tokenizer, batch, args.repeat, args.seed,
                                      **sampling_options(args)))
        peak = rows[-1]["peak_memory_gib"]
        print(f"{batch:5d}  {rows[-1]['images_per_s']:8.2f}  {rows[-1]['ar_ms_per_token']:11.2f}  "
              f"{rows[-1]['diffusion_ms_per_step']:12.2f}  {rows[-1]['ar_share']:8.0%}  "
              f"{rows[-1]['diffusion_share']:10.0%}  "
              f"{'n/a (CPU)' if peak is None else f'{peak:.2f} GiB'}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    rank, world_size, device = dar.setup_distributed(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.config is not None and ":" in args.config:
        tokenizer, ar = preset_pair(args.config, device, args.precision)
        return benchmark(args, tokenizer, ar, device,
                         f"random weights of the presets {args.config} (not trained)")
    tokenizer, ar = load_pair(args, device, need_ar=args.reconstruct is None)
    with torch.no_grad():
        if args.benchmark is not None:
            return benchmark(args, tokenizer, ar, device,
                             f"{os.path.relpath(tokenizer.file)} + {os.path.relpath(ar.file)}")
        if args.eval:
            return toy_eval(args, tokenizer, ar, device)
        if args.fid is not None or args.reconstruct is not None:
            return sample_files(args, tokenizer, ar, rank, world_size)
        path = (layout_control if args.layout_from else picture)(args, tokenizer, ar, device)
        print(path)
        return path


if __name__ == "__main__":
    dar.command_line(main)
