"""Sample from a trained D-AR pair (§3.3): images forming group by group, layout control, the files the
paper's FIDs are computed from, and a toy metric for the built-in shapes.

    python sample.py                              # out/tiny: a row per class, the preview after each group
    python sample.py --stream --labels plus       # one line per group, as its tokens arrive
    python sample.py --layout-from builtin:4 --prefix-tokens 8,16,32 --labels 0,1,2,3   # Fig. 5
    python sample.py --eval                       # class accuracy and toy FID of the tiny pair
    python sample.py --eval --preview-steps 2     # ... of the jump estimates after 2 groups (Table 5)
    python sample.py --eval --layout-from builtin --prefix-tokens 0,8,16   # layout control, measured
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --ar D-AR-L-360K.pt --cfg 1.1,8.0 \\
        --fid 50000 --out samples/L               # 50,000 PNGs + samples/L.npz for the ADM evaluator
    torchrun --nproc_per_node 8 sample.py ...     # the same files, shared out over 8 GPUs
    python sample.py --benchmark --batch-sizes 1,4,16 --compile   # images/s, ms per token and per step
    python sample.py --benchmark --preset ablation:B --batch-sizes 1,64   # random weights, no download
    python sample.py --tokenizer D-AR-tokenizer_v1.pt --reconstruct /imagenet/val --out recon/v1   # rFID:
        # recon/v1.npz and recon/v1-reference.npz, the centre crops it encoded (rFID's real side)

Sample i of --fid and --eval asks for class i mod C and draws its noise and tokens from its own generator,
seeded with --seed + i, so the set is the same whatever the batch size or the number of processes.
"""
import argparse
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import dar

DIT_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample classes, shown for 1000-class models
QUICKSTART = Path("out/tiny")  # where `python train_tokenizer.py && python train_ar.py` write
REAL_FLOOR_SEED = 3  # a second held-out real set: its toy FID to the reference is what chance alone gives
GRID_HEADER, GRID_PAD = 24, 6                           # pixels above a picture's first row, around its names


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="ours or the release's (default: the tiny pair, see below)")
    parser.add_argument("--ar", help="ours or the release's (D-AR-L-360K.pt, ...); default: out/tiny/ar.pt when "
                        "the quickstart has written it, else the shipped weights/tiny/ar.pt")
    parser.add_argument("--ar-config", default=None, choices=list(dar.AR_PRESETS),
                        help="preset of a release AR file (default: inferred from its shapes)")
    parser.add_argument("--labels", help="comma-separated class ids (or shape names, for the built-in data)")
    parser.add_argument("--n", type=int, help="how many: rows of the picture (default: one per label), "
                        "--eval samples (default 1000), --reconstruct images (default: all)")
    parser.add_argument("--out", help="the PNG of a picture mode, or the folder of --fid / --reconstruct "
                        "(default: next to the AR checkpoint)")
    sampling = parser.add_argument_group("sampling (release defaults)")
    sampling.add_argument("--cfg", default="4.0", help="guidance scale, or 'start,end' for the linear schedule "
                          "(paper: 1.1,8.0 for D-AR-L, 1.1,10.0 for D-AR-XL)")
    sampling.add_argument("--temperature", type=float, default=1.0)
    sampling.add_argument("--top-k", type=int, default=0, help="0: off")
    sampling.add_argument("--top-p", type=float, default=1.0, help="1: off")
    sampling.add_argument("--solver", default="adams2", choices=dar.SOLVERS)
    sampling.add_argument("--steps", help="diffusion steps S of the decoder (default: the tokenizer's, K = 8 as "
                          "released); with S > K a token group drives several steps (Eq. 5)")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--compile", action="store_true", help="compile the one-token AR step and the "
                          "denoising step (torch.compile; CUDA graphs on a GPU); the same numbers as eager")
    modes = parser.add_argument_group("modes (default: a picture of previews)")
    modes.add_argument("--stream", action="store_true", help="print a line per group as it arrives")
    modes.add_argument("--gif", action="store_true", help="also write the picture as an animated GIF of the "
                       "samples forming, a frame per group (same name, .gif)")
    modes.add_argument("--layout-from", metavar="IMAGE", help="keep this image's first tokens (Fig. 5); "
                       "'builtin:I' is held-out built-in image I; with --eval, 'builtin' measures it on --n of them")
    modes.add_argument("--prefix-tokens", default="8,16,32", help="with --layout-from: tokens kept, one row each")
    modes.add_argument("--fid", type=int, metavar="N", help="write N class-balanced samples as PNGs and an .npz")
    modes.add_argument("--reconstruct", metavar="FOLDER", help="write tokenizer reconstructions of an image "
                       "folder ('builtin': held-out built-in images) as PNGs and an .npz (rFID)")
    modes.add_argument("--eval", action="store_true", help="built-in data: class accuracy and toy FID of the "
                       "samples (or, with --reconstruct builtin, of the reconstructions)")
    modes.add_argument("--preview-steps", type=int, metavar="K",
                       help="--fid / --eval: use the jump estimate after K groups instead of the image (Table 5)")
    modes.add_argument("--evaluator", default=str(dar.SHIPPED_TINY / "evaluator.pt"),
                       help="--eval's classifier (shipped; trained and written there if missing)")
    modes.add_argument("--benchmark", action="store_true", help="time the sampler per batch size: images/s, AR ms "
                       "per token, decoder ms per step, their shares, peak memory on CUDA")
    modes.add_argument("--batch-sizes", default="1,16,64", help="--benchmark: comma-separated batch sizes")
    modes.add_argument("--repeat", type=int, default=3, help="--benchmark: timed runs per batch size after a "
                       "warm-up (the median is reported)")
    modes.add_argument("--preset", metavar="TOKENIZER:AR", help="--benchmark on random weights of presets instead "
                       f"of files, e.g. ablation:B or v1:L (tokenizer: {', '.join(dar.TOKENIZER_PRESETS)}; "
                       f"AR: {', '.join(dar.AR_PRESETS)})")
    parser.add_argument("--batch-size", type=int, default=64, help="per process (release FID run: 64)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                        help="the AR model's weights on CUDA (release: bf16; the tokenizer runs in fp32/TF32)")
    return parser.parse_args(argv)


def fail(message):
    """Bad input ends the run with one line, no traceback."""
    raise SystemExit(f"sample.py: error: {message}")


def choose_tiny_pair(args):
    """A missing --tokenizer / --ar: the quickstart's pair in out/tiny when it has run, else the shipped one."""
    if args.tokenizer is not None and args.ar is not None:
        return
    own = all((QUICKSTART / name).is_file() for name in ("tokenizer.pt", "ar.pt"))
    folder = QUICKSTART if own else dar.SHIPPED_TINY
    args.tokenizer = args.tokenizer or str(folder / "tokenizer.pt")
    args.ar = args.ar or str(folder / "ar.pt")
    print(f"tiny pair: {os.path.relpath(folder)}/ (" + ("your quickstart run)" if own else "shipped; `python train_tokenizer.py && "
                                        "python train_ar.py` trains your own into out/tiny)"))


def output_folder(args):
    """Pictures go next to the AR checkpoint, except for the shipped pair: out/tiny, outside the repository's files."""
    folder = Path(args.ar).parent
    return QUICKSTART if folder.resolve() == dar.SHIPPED_TINY.resolve() else folder


def load_models(args, device, need_ar=True):
    """-> (tokenizer, ar or None) in eval mode, the AR model in bf16 on CUDA as released."""
    checks = [(args.tokenizer, "python train_tokenizer.py", "--tokenizer")]
    if need_ar:
        checks.append((args.ar, "python train_ar.py", "--ar"))
    for path, command, flag in checks:
        if not Path(path).is_file():
            fail(f"no checkpoint at {path}; `{command}` creates it, or pass {flag} PATH")
    def load(flag, loader, *options):
        try:
            return loader(*options, device=device)
        except (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError) as error:  # a wrong or damaged file
            fail(f"{flag} {options[0]} cannot be loaded: {str(error).splitlines()[0]}")
    tokenizer = load("--tokenizer", dar.load_tokenizer, args.tokenizer)
    ar = load("--ar", dar.load_ar, args.ar, args.ar_config) if need_ar else None
    if ar is not None:
        try:
            dar.check_pair(ar, tokenizer)
        except ValueError as error:
            fail(f"--ar {args.ar} and --tokenizer {args.tokenizer}: {error}")
    if ar is not None:
        at_release_precision(ar, device, args.precision)
    return tokenizer, ar


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


def parse_cfg(text):
    try:
        scales = [float(value) for value in text.split(",")]
    except ValueError:
        scales = []
    if len(scales) not in (1, 2):
        fail(f"--cfg: expected a scale or 'start,end', got {text!r}")
    return scales[0] if len(scales) == 1 else tuple(scales)


def generators(seeds, device):
    """One generator per sample, so a sample depends on its seed only, not on its batch."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def labelled_grid(cells, row_names, column_names):
    """cells (R, C, 3, H, W) in [-1, 1] -> a PIL image with a name left of each row and above each column.
    Small images are enlarged (nearest neighbour) to about 96 pixels so that they can be seen."""
    R, C, _, H, W = cells.shape
    scale = max(1, 96 // H)
    grid = dar.to_uint8(cells.float().cpu()).permute(0, 3, 1, 4, 2).reshape(R * H, C * W, 3).numpy()
    picture = Image.fromarray(grid).resize((C * W * scale, R * H * scale), Image.NEAREST)
    font, pad, top = ImageFont.load_default(), GRID_PAD, GRID_HEADER
    measure = ImageDraw.Draw(picture)
    left = int(max(measure.textlength(name, font=font) for name in row_names)) + 2 * pad
    canvas = Image.new("RGB", (left + picture.width, top + picture.height), "white")
    canvas.paste(picture, (left, top))
    draw, cell_w, cell_h = ImageDraw.Draw(canvas), W * scale, H * scale
    for r, name in enumerate(row_names):
        draw.text((pad, top + r * cell_h + cell_h // 2), name, fill="black", font=font, anchor="lm")
    for c, name in enumerate(column_names):
        draw.text((left + c * cell_w + cell_w // 2, top // 2), name, fill="black", font=font, anchor="mm")
    return canvas


def save_labelled_grid(cells, row_names, column_names, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(cells, row_names, column_names).save(path)


def save_forming_gif(previews, names, group_size, path):
    """previews (R, K, 3, H, W) -> an animated GIF: frame k shows every sample's preview after group k, the
    last frame (the images) held longest."""
    K = previews.shape[1]
    frames = [labelled_grid(previews[:, k][None], [f"{(k + 1) * group_size} tokens" if k < K - 1 else "image"],
                            names) for k in range(K)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=[400] * (K - 1) + [2000], loop=0)


def parse_steps(text):
    """--steps: None (the tokenizer's S) or a positive integer."""
    if text is None:
        return None
    try:
        return dar.check_steps(int(text))
    except ValueError:
        fail(f"--steps must be an integer >= 1, got {text!r}")


def sampling_options(args):
    return dict(cfg=parse_cfg(args.cfg), temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                solver=args.solver, steps=parse_steps(args.steps), compile=args.compile)


def picture(args, tokenizer, ar, device):
    """The default mode: one row per sample, the jump estimates after groups 1..K (the K-th is the image)."""
    labels = parse_labels(args.labels, ar) if args.labels else (
        list(DIT_CLASSES) if ar.cfg.num_classes == 1000 else list(range(min(ar.cfg.num_classes, 10))))
    rows = args.n or len(labels)
    labels = [labels[i % len(labels)] for i in range(rows)]
    K, G = tokenizer.cfg.num_groups, tokenizer.cfg.group_size
    steps = dar.sample(ar, tokenizer, labels, generator=generators(range(args.seed, args.seed + rows), device),
                       **sampling_options(args))
    previews, start = [], time.perf_counter()
    for step in steps:
        previews.append(step.preview)
        if args.stream:
            if device.type == "cuda":
                torch.cuda.synchronize()
            print(f"group {step.group}/{K}: {step.tokens.shape[1]:4d} tokens, t = {step.t:.3f}, preview ready "
                  f"at {1000 * (time.perf_counter() - start):7.1f} ms")
    path = Path(args.out or output_folder(args) / "samples.png")
    columns = [f"{k * G} tokens" for k in range(1, K)] + [f"image ({K * G})"]
    names = [class_name(ar, label) for label in labels]
    save_labelled_grid(torch.stack(previews, 1), names, columns, path)
    if args.gif:
        save_forming_gif(torch.stack(previews, 1), names, G, path.with_suffix(".gif"))
        print(path.with_suffix(".gif"))
    return path


def load_reference(text, image_size):
    """--layout-from: an image file, or 'builtin:I' (held-out built-in image I) -> (1, 3, S, S)."""
    if text.startswith("builtin:"):
        try:
            index = int(text.split(":", 1)[1])
        except ValueError:
            fail(f"--layout-from: expected builtin:INDEX, got {text!r}")
        return dar.BuiltinShapes(index + 1, image_size, seed=dar.EVALUATOR_REFERENCE_SEED)[index][0][None]
    try:
        with Image.open(text) as image:
            image = image.convert("RGB")
    except (OSError, ValueError) as error:
        fail(f"--layout-from: cannot read {text} as an image ({error})")
    return dar.pil_to_tensor(dar.center_crop(image, image_size))[None]


def layout_prefix_counts(args, tokenizer, ar):
    """--prefix-tokens, checked: counts in [0, N], and an AR model that writes the coarse tokens first."""
    num_tokens = tokenizer.cfg.num_tokens
    if ar.cfg.reverse:
        fail(f"{args.ar} writes the fine tokens first (--reverse); layout control needs the coarse ones first")
    try:
        counts = [int(value) for value in args.prefix_tokens.split(",")]
    except ValueError:
        fail(f"--prefix-tokens: expected comma-separated counts, got {args.prefix_tokens!r}")
    if any(not 0 <= count <= num_tokens for count in counts):
        fail(f"--prefix-tokens {args.prefix_tokens}: each count must lie in [0, {num_tokens}] (the tokenizer has "
             f"N = {num_tokens})")
    return counts


def layout_control(args, tokenizer, ar, device):
    """Fig. 5: the reference's first P tokens, the rest sampled under each label; a row per P. Every cell
    uses the same seed, so within a row only the label changes."""
    prefix_counts = layout_prefix_counts(args, tokenizer, ar)
    reference = load_reference(args.layout_from, tokenizer.cfg.image_size).to(device)
    codes = tokenizer.encode(reference)
    labels = parse_labels(args.labels, ar) if args.labels else list(range(min(ar.cfg.num_classes, 5)))
    rows = []
    for count in prefix_counts:
        *_, last = dar.sample(ar, tokenizer, labels, prefix=codes[:, :count].expand(len(labels), count),
                              generator=generators([args.seed] * len(labels), device), **sampling_options(args))
        rows.append(torch.cat([reference, last.image]))
    path = Path(args.out or output_folder(args) / "layout.png")
    save_labelled_grid(torch.stack(rows), [f"{count} tokens kept" for count in prefix_counts],
                       ["reference"] + [class_name(ar, label) for label in labels], path)
    return path


@torch.no_grad()
def layout_eval(args, tokenizer, ar, device):
    """--eval --layout-from builtin: Fig. 5 measured. For --n held-out references, keep the first P tokens
    and sample every class from one seed per reference; per P: how often the evaluator sees the asked-for
    class, how far the shape's centroid lies from the reference's (pixels), and how often the shape and
    background colours are the reference's (`dar.shape_layout`). P = 0 keeps nothing: the chance level."""
    C, size = ar.cfg.num_classes, tokenizer.cfg.image_size
    classifier = load_evaluator(args.evaluator, size).to(device)
    data = dar.BuiltinShapes(args.n or 50, size, seed=dar.EVALUATOR_REFERENCE_SEED)
    references = torch.stack([image for image, _ in data]).to(device)              # (R, 3, H, W)
    codes, labels = tokenizer.encode(references), torch.arange(C, device=device)
    where, background, colour = dar.shape_layout(references.cpu())
    results = []
    for count in layout_prefix_counts(args, tokenizer, ar):
        correct = distance = same_colours = 0
        for r in tqdm(range(len(data)), desc=f"{count} tokens kept", dynamic_ncols=True):
            *_, last = dar.sample(ar, tokenizer, labels, prefix=codes[r:r + 1, :count].expand(C, count),
                                  generator=generators([args.seed + r] * C, device), **sampling_options(args))
            images = last.image.float().clamp(-1, 1)
            correct += (classifier(images).argmax(-1) == labels).sum().item()
            sample_where, sample_background, sample_colour = dar.shape_layout(images.cpu())
            distance += (sample_where - where[r]).norm(dim=-1).nan_to_num(float(size)).sum().item()
            same_colours += ((sample_background == background[r]).all(-1) & (sample_colour == colour[r]).all(-1)).sum().item()
        total = len(data) * C
        results.append((count, correct / total, distance / total, same_colours / total))
        print(f"{count:3d} tokens kept, {total} samples: class as asked {correct / total:.1%}, "
              f"shape centroid {distance / total:.1f} px from the reference's, both colours kept {same_colours / total:.1%}")
    return results


def sample_batch(args, tokenizer, ar, device):
    """-> make(indices) = (images, requested labels): sample i asks for class i mod C, seed --seed + i."""
    options, K = sampling_options(args), tokenizer.cfg.num_groups
    groups = args.preview_steps or K
    if not 1 <= groups <= K:
        fail(f"--preview-steps {args.preview_steps}: must lie in [1, {K}]")

    def make(indices):
        labels = torch.tensor(indices, device=device) % ar.cfg.num_classes
        seeds = [args.seed + index for index in indices]
        for step in dar.sample(ar, tokenizer, labels, generator=generators(seeds, device), **options):
            if step.group == groups:  # the AR model stops here too: later tokens are never written
                return step.preview, labels
    return make


def reconstruction_batch(args, tokenizer, device):
    """-> (make(indices) = (reconstructions, labels), number of images, the dataset) for --reconstruct."""
    size, steps = tokenizer.cfg.image_size, parse_steps(args.steps)
    if args.reconstruct == "builtin":
        dataset = dar.BuiltinShapes(args.n or 1000, size, seed=dar.EVALUATOR_REFERENCE_SEED)
    else:
        try:
            dataset = dar.ImageFolder(args.reconstruct, size)
        except ValueError as error:
            fail(f"--reconstruct: {error}")

    def make(indices):
        images, labels = zip(*(dataset[index] for index in indices))
        codes = tokenizer.encode(torch.stack(images).to(device))
        seeds = [args.seed + index for index in indices]
        images = tokenizer.decode(codes, generator=generators(seeds, device), solver=args.solver, steps=steps,
                                  compile=args.compile)
        return images, torch.tensor(labels)
    return make, min(len(dataset), args.n or len(dataset)), dataset


def write_pngs(make, total, folder, rank, world_size, batch_size):
    """Images 0..total-1 as folder/NNNNNN.png. This process makes i = rank, rank + world_size, ...; images
    whose PNG exists are kept, so an interrupted run continues. Each PNG is written under a temporary
    name and renamed, so an interruption never leaves a truncated one."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(rank, total, world_size) if not (folder / f"{i:06d}.png").exists()]
    batches = range(0, len(todo), batch_size)
    for start in tqdm(batches, desc=f"{folder}", disable=rank != 0, dynamic_ncols=True):
        indices = todo[start:start + batch_size]
        images, _ = make(indices)
        for index, image in zip(indices, dar.to_uint8(images.float().cpu()).permute(0, 2, 3, 1).numpy()):
            temporary = folder / f"{index:06d}.png.tmp"
            Image.fromarray(image).save(temporary, format="PNG")
            os.replace(temporary, folder / f"{index:06d}.png")
    return len(todo)


def pack_reference(dataset, total, folder):
    """rFID's real side: <folder>-reference.npz, arr_0 = uint8 (total, H, W, 3), the centre crops that were
    encoded, in the order of <folder>.npz. Scored against the original files instead, the same
    reconstructions get a worse rFID (a user of the release measured 2.2 for the published 1.52)."""
    crops = np.empty((total, dataset.image_size, dataset.image_size, 3), dtype=np.uint8)
    for index in range(total):
        crops[index] = dar.to_uint8(dataset[index][0]).permute(1, 2, 0).numpy()
    path = folder.parent / f"{folder.name}-reference.npz"
    np.savez(path, arr_0=crops)
    return path


def pack_npz(folder, total):
    """The ADM evaluator's input: <folder>.npz with arr_0 = uint8 (total, H, W, 3), in index order."""
    first = np.asarray(Image.open(folder / f"{0:06d}.png").convert("RGB"))
    images = np.empty((total, *first.shape), dtype=np.uint8)
    for index in range(total):
        images[index] = np.asarray(Image.open(folder / f"{index:06d}.png").convert("RGB"))
    path = folder.parent / f"{folder.name}.npz"
    np.savez(path, arr_0=images)
    return path


def load_evaluator(path, image_size):
    try:
        return dar.load_toy_evaluator(path, image_size)
    except (ValueError, KeyError, RuntimeError, OSError, pickle.UnpicklingError) as error:
        fail(f"--evaluator {path}: {str(error).splitlines()[0]}; pass another --evaluator")


@torch.no_grad()
def toy_eval(make, total, args, image_size, device):
    """Accuracy of the evaluator on the images w.r.t. the class each was asked for, and the Frechet distance
    of its features to `total` held-out real images; then, as the floor, the accuracy on those real images
    and the distance of another `total` real images to them."""
    classifier = load_evaluator(args.evaluator, image_size).to(device)

    def judge(images, labels):  # -> pooled features (CPU), how many are classified as `labels`
        features = classifier.features(images.float().clamp(-1, 1).to(device))
        return features.cpu(), (classifier.head(features).argmax(-1).cpu() == labels.cpu()).sum().item()

    def real_set(seed):
        real = dar.BuiltinShapes(total, image_size, seed=seed)
        return torch.stack([real[i][0] for i in range(total)]), torch.arange(total) % real.num_classes

    features, correct = [], 0
    for start in tqdm(range(0, total, args.batch_size), desc="eval", dynamic_ncols=True):
        batch_features, batch_correct = judge(*make(list(range(start, min(start + args.batch_size, total)))))
        features.append(batch_features)
        correct += batch_correct
    real_features, real_correct = judge(*real_set(dar.EVALUATOR_REFERENCE_SEED))
    floor_features, _ = judge(*real_set(REAL_FLOOR_SEED))
    return (correct / total, dar.frechet_distance(torch.cat(features).numpy(), real_features.numpy()),
            real_correct / total, dar.frechet_distance(floor_features.numpy(), real_features.numpy()))


def preset_pair(text, device, precision):
    """--preset TOKENIZER:AR -> (tokenizer, AR model) with random weights, in eval mode, as load_models places them."""
    names = text.split(":")
    if len(names) != 2 or names[0] not in dar.TOKENIZER_PRESETS or names[1] not in dar.AR_PRESETS:
        fail(f"--preset: expected TOKENIZER:AR with TOKENIZER one of {', '.join(dar.TOKENIZER_PRESETS)} and AR one "
             f"of {', '.join(dar.AR_PRESETS)}, got {text!r}")
    tokenizer_cfg = dar.replace(dar.TOKENIZER_PRESETS[names[0]], repa_dim=0, code_head=False)  # sampling needs neither
    tokenizer, ar = dar.Tokenizer(tokenizer_cfg), dar.LlamaAR(dar.AR_PRESETS[names[1]])
    try:
        dar.check_pair(ar, tokenizer)
    except ValueError as error:
        fail(f"--preset {text}: {error}")
    ar = ar.to(device).eval()
    at_release_precision(ar, device, precision)
    return tokenizer.to(device).eval(), ar


def synchronized_time(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def memory_bandwidth(device):
    """GB/s at which this device reads memory: the best of 5 sums of a 1 GiB float32 tensor. A one-token
    AR step reads every weight once, so weight bytes / this is its floor at batch 1."""
    x, best = torch.ones(2 ** 28, device=device), float("inf")
    for _ in range(5):
        start = synchronized_time(device)
        x.sum()
        best = min(best, synchronized_time(device) - start)
    return x.numel() * x.element_size() / best / 1e9


def median_time(run, repeat, device):
    """-> (the median seconds of `repeat` calls of run() after one warm-up call, the last call's output)."""
    run()  # the warm-up: it compiles, with --compile
    times = []
    for _ in range(repeat):
        start = synchronized_time(device)
        output = run()
        times.append(synchronized_time(device) - start)
    return sorted(times)[len(times) // 2], output


@torch.no_grad()
def benchmark(args, tokenizer, ar, device, weights):
    """--benchmark: per batch size, a warm-up run of dar.sample (compiling, with --compile), then the median of
    --repeat timed runs. The decoder's share is timed apart, as tokenizer.decode of the sampled tokens with the
    same steps; the AR model's is the rest (so it includes the sampler's own Python work)."""
    try:
        batch_sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError:
        batch_sizes = []
    if not batch_sizes or min(batch_sizes) < 1:
        fail(f"--batch-sizes: expected comma-separated positive integers, got {args.batch_sizes!r}")
    if args.repeat < 1:
        fail(f"--repeat must be at least 1, got {args.repeat}")
    options = sampling_options(args)
    N = tokenizer.cfg.num_tokens
    S = options["steps"] or tokenizer.cfg.denoising_steps
    ar_dtype, tokenizer_dtype = (next(model.parameters()).dtype for model in (ar, tokenizer))
    print(f"sampler benchmark: {weights} | {device.type}, AR {str(ar_dtype)[6:]}, tokenizer {str(tokenizer_dtype)[6:]}"
          f"{' (TF32)' if device.type == 'cuda' else ''}, {'compiled' if args.compile else 'eager'}, cfg {args.cfg}, "
          f"{args.solver}, {S} steps, N = {N} tokens; median of {args.repeat} runs after a warm-up")
    ar_bytes = sum(p.numel() * p.element_size() for p in ar.parameters())
    bandwidth = memory_bandwidth(device)
    print(f"AR weights {ar_bytes / 1e6:.1f} MB, read once per token at {bandwidth:.1f} GB/s (measured: the best of "
          f"5 sums of a 1 GiB tensor): at least {1000 * ar_bytes / bandwidth / 1e9:.2f} ms per token")
    print("batch  images/s  AR ms/token  decoder ms/step  AR share  decoder share  peak memory")
    results = []
    for batch in batch_sizes:
        labels = torch.arange(batch, device=device) % ar.cfg.num_classes
        sampling = lambda: list(dar.sample(ar, tokenizer, labels, generator=torch.Generator(device).manual_seed(args.seed),
                                           **options))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        total, steps = median_time(sampling, args.repeat, device)
        decoding, _ = median_time(lambda: tokenizer.decode(steps[-1].tokens, solver=args.solver, steps=options["steps"],
                                                           compile=args.compile), args.repeat, device)
        peak = f"{torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB" if device.type == "cuda" else "n/a (CPU)"
        row = dict(batch=batch, images_per_s=batch / total, ar_ms_per_token=1000 * (total - decoding) / N,
                   decoder_ms_per_step=1000 * decoding / S, ar_share=(total - decoding) / total,
                   decoder_share=decoding / total, peak_memory=peak)
        print(f"{batch:5d}  {row['images_per_s']:8.2f}  {row['ar_ms_per_token']:11.2f}  {row['decoder_ms_per_step']:15.2f}  "
              f"{row['ar_share']:8.0%}  {row['decoder_share']:13.0%}  {peak}")
        results.append(row)
    return results


def main(argv=None):
    args = parse_args(argv)
    modes = [name for name in ("layout_from", "fid", "reconstruct") if getattr(args, name) is not None]
    if args.benchmark and (modes or args.eval):
        fail("--benchmark times the sampler alone: leave out --eval, --fid, --reconstruct and --layout-from")
    if args.preset and not args.benchmark:
        fail("--preset (random weights) is for --benchmark only")
    if args.preset and (args.tokenizer or args.ar):
        fail("--preset replaces --tokenizer and --ar: give one or the other")
    if len(modes) > 1:
        fail(f"choose one of --layout-from, --fid, --reconstruct (got {', '.join('--' + m.replace('_', '-') for m in modes)})")
    if args.eval and (args.fid is not None or args.layout_from not in (None, "builtin")):
        fail("--eval measures samples, --reconstruct builtin or --layout-from builtin; not --fid or one image")
    for flag in ("fid", "n", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    parse_steps(args.steps)
    writes_files = args.fid is not None or (args.reconstruct is not None and not args.eval)
    if writes_files and args.out is None:
        fail("--fid and --reconstruct write a folder of PNGs: pass --out DIR")
    if "RANK" in os.environ and not writes_files:
        fail("only --fid and --reconstruct are shared out over processes; run the other modes without torchrun")
    rank, world_size, device = dar.setup_distributed(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as released

    if args.preset:
        tokenizer, ar = preset_pair(args.preset, device, args.precision)
        return benchmark(args, tokenizer, ar, device, f"random weights of the presets {args.preset} (not trained)")
    choose_tiny_pair(args)
    tokenizer, ar = load_models(args, device, need_ar=args.reconstruct is None)
    if args.benchmark:
        return benchmark(args, tokenizer, ar, device, f"{os.path.relpath(args.tokenizer)} + {os.path.relpath(args.ar)}")
    with torch.no_grad():
        if args.eval:
            if args.reconstruct not in (None, "builtin"):
                fail("--eval measures the built-in shapes: use --reconstruct builtin")
            if ar is not None and not is_builtin(ar):
                fail(f"--eval measures models of the built-in shapes ({len(dar.SHAPE_CLASSES)} classes); "
                     f"{args.ar} has {ar.cfg.num_classes}. For ImageNet, use --fid and the ADM evaluator")
            if args.layout_from:
                return layout_eval(args, tokenizer, ar, device)
            if args.reconstruct:
                make, total, _ = reconstruction_batch(args, tokenizer, device)
                what = "reconstructions" + (f" ({args.steps} steps)" if args.steps else "")
            else:
                make, total = sample_batch(args, tokenizer, ar, device), args.n or 1000
                what = (f"samples (cfg {args.cfg}" + (f", {args.steps} steps" if args.steps else "")
                        + (f", previews after {args.preview_steps} groups)" if args.preview_steps else ")"))
            accuracy, toy_fid, real_accuracy, real_fid = toy_eval(make, total, args, tokenizer.cfg.image_size, device)
            print(f"{total} {what}: accuracy {accuracy:.1%}, toy FID {toy_fid:.2f} "
                  f"(real held-out images: accuracy {real_accuracy:.1%}, toy FID {real_fid:.2f})")
            return accuracy, toy_fid
        if args.fid is not None or args.reconstruct is not None:
            make, total, dataset = ((sample_batch(args, tokenizer, ar, device), args.fid, None) if args.fid is not None
                                    else reconstruction_batch(args, tokenizer, device))
            folder = Path(args.out)
            made = write_pngs(make, total, folder, rank, world_size, args.batch_size)
            if world_size > 1:
                torch.distributed.barrier()
            if rank == 0:
                print(f"{folder}: {total} PNGs ({made} made now by process 0) -> {pack_npz(folder, total)}")
                if dataset is not None:
                    print(f"the {total} centre crops it encoded -> {pack_reference(dataset, total, folder)} "
                          f"(rFID: evaluator.py {folder.name}-reference.npz {folder.name}.npz)")
            if world_size > 1:
                torch.distributed.destroy_process_group()
            return folder
        if args.preview_steps is not None:
            fail("--preview-steps applies to --fid and --eval; the picture shows every preview")
        path = layout_control(args, tokenizer, ar, device) if args.layout_from else picture(args, tokenizer, ar, device)
        print(path)
        return path


if __name__ == "__main__":
    main()
