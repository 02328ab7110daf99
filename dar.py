"""D-AR: Diffusion via Autoregressive Models (Gao & Shou, ICLR 2026), in one readable file.

Contents: the paper's equations and the names that implement them, in file order.

  §3.1  the sequential diffusion tokenizer
    Eq. (1)  z = QUANT(E(I, [q_1..q_N]))                     `VectorQuantizer`
    Eq. (2)  D_FM(x_t, t, c(t)), the velocity network        `PixelDiffusionTransformer`
    Eq. (5)  c(t) = g_ceil(t' K), t' the unshifted time     `unshift_time`, `condition_group`
    Eq. (3)  x_t = t x_1 + (1 - t) x_0, v_t = x_1 - x_0      `flow_interpolant`
    jump     x_hat_1 = x_t + (1 - t) v_t (the previews)      `jump_estimate`
    Eq. (8)  t_i = (i/K) / (i/K + beta (1 - i/K))            `sampling_times`
    Eq. (1)  the encoder with N queries, then QUANT          `Tokenizer.encode`
    Eq. (4)  x_0 ~ N(0, 1), x_1 = I                           `Tokenizer.initial_noise`
    decode   S steps of Eq. (8), step i reads c(t_i)         `Tokenizer.decode`
    Eq. (7)  l = l_fm (2) + l_VQ + l1 l_LPIPS + l2 l_repa    `Tokenizer.forward`
  §3.2  the Llama AR model
    Eq. (6)  p(z) = prod_i p(z_i | y, z_<i)                  `next_token_loss`, `LlamaAR.forward`
  §3.3  the D-AR sampler
    guidance the scale s of each token: fixed, or a schedule `guidance_scales`
    the draw temperature, top-k, top-p                       `sample_token`
    §3.3     each group of G tokens drives its steps         `sample`
    guidance l = l_u + s (l_c - l_u), in logit space         `guide`

Then, below the paper: data and training utilities (the checkpoint loaders `load_tokenizer` and
`load_ar`, pictures, the ADM sample files, datasets, command lines, training pieces, timing), and
last the CPU miniature (not part of the paper or the release: the tiny recipe's training aids and a
toy evaluator of the built-in data). Nothing in §3.1-§3.3 uses a name defined below them.

Where the released model (showlab/D-AR, `D-AR-tokenizer_v1.pt`) differs from the paper's text
we follow the release, so that its checkpoints load and give the same numbers; a comment
marks each place.

Shape legend, used by every shape comment: B batch, N tokens per image (queries), K condition
  groups, G = N/K tokens per group, L tokens of a 2D grid (patches), D width, nh heads, hd head
  width (64), C codebook vector width, V codebook size (= the AR vocabulary), P pixel patch size, T
  positions of an AR sequence, S diffusion steps of a decode (K unless set), H x W image height and
  width, n a prefix of tokens, B' the AR batch (2B with guidance).
"""
import argparse
import atexit
import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import shlex
import socket
import sys
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# ================================================================================================
#  §3.1  Sequential diffusion tokenizer
# ================================================================================================


@dataclass
class TokenizerConfig:
    image_size: int = 256        # H = W of the images
    patch_size: int = 16         # encoder patch size (L = (H / patch_size)^2 patch tokens)
    encoder_dim: int = 768       # width of the encoder E of Eq. (1)
    encoder_depth: int = 8
    num_tokens: int = 256        # N: learnable queries = discrete tokens per image
    num_groups: int = 8          # K: condition groups, one per step of a default decode (Eq. 5, 8)
    num_denoising_steps: int | None = None  # S: steps of a decode (None: K, as released)
    codebook_size: int = 16384   # V
    codebook_dim: int = 8        # C: width of a codebook vector
    query_rank: int = 8          # released queries are low rank: a (table_size, 8) table -> Linear
    table_size: int = 1024       # rows of the query / position tables (release: 1024; N are used)
    decoder_dim: int = 768       # width of the post-quantisation causal layers, i.e. of z'
    decoder_depth: int = 8
    diffusion_dim: int = 768     # pixel diffusion transformer D_FM
    diffusion_depth: int = 12
    pixel_patch_size: int = 8    # P: D_FM works on P x P pixel patches
    data_std: float = 0.6        # release: pixels scaled by 0.6 before diffusion (not in the paper)
    time_shift: float = 2.0      # beta of Eq. (5) and Eq. (8)
    repa_layer: int = 8          # REPA features are read before this diffusion block
    repa_dim: int = 768          # width of the REPA target features (DINOv2-B); 0 = no REPA head
    repa_hidden: int = 2048
    repa_grid: int = 16          # the target's patch grid (DINOv2-B/14 at 224 px: 16 x 16)
    head_dim: int = 64           # every attention of the tokenizer uses 64-wide heads
    rope_theta: float = 10000.0

    @property
    def uses_repa(self):  # the release builds the head but never reads it when repa_layer >= depth
        return self.repa_dim > 0 and self.repa_layer < self.diffusion_depth

    @property
    def group_size(self):  # G = N / K
        return self.num_tokens // self.num_groups

    @property
    def decode_steps(self):  # S: num_denoising_steps, or K when that is None
        return self.num_groups if self.num_denoising_steps is None else self.num_denoising_steps


TOKENIZER_PRESETS = {
    # the released D-AR-tokenizer_v1.pt: 307,444,672 parameters, D_FM the paper's "185M"
    "v1": TokenizerConfig(),
    # appendix A.4's lightweight ablation tokenizer: 113,433,536 parameters
    "ablation": TokenizerConfig(encoder_dim=512, decoder_dim=512, diffusion_dim=512,
                                diffusion_depth=8),
    # for CPUs and tests: 32 x 32 images, 64 tokens in K = 8 groups of 8: 2,677,360 parameters
    "tiny": TokenizerConfig(
        image_size=32, patch_size=4, encoder_dim=128, encoder_depth=2, num_tokens=64, num_groups=8,
        codebook_size=256, table_size=64, decoder_dim=128, decoder_depth=2, diffusion_dim=128,
        diffusion_depth=4, pixel_patch_size=4, repa_layer=2, repa_dim=64, repa_hidden=256,
        repa_grid=4),
}


def layer_norm(x):
    """The parameter-free LayerNorm N(.) the release puts around attention and on outputs."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def rope_2d(height, width, head_dim, theta):
    """2D RoPE angles of a height x width grid, row-major (appendix A.2).
    Of a head's hd/2 feature pairs the first half rotates by row * w_j, the second by column * w_j,
    w_j = theta^(-4j/hd). -> cos, sin: (L, hd/2) float32."""
    pairs_per_axis = head_dim // 4
    freqs = theta ** (-torch.arange(pairs_per_axis, dtype=torch.float64) / pairs_per_axis)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                                torch.arange(width, dtype=torch.float64), indexing="ij")
    angles = torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], 1)  # (L, hd/2)
    # release: angles in float64, tables in float32
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate each feature pair (a, b) of x (..., L, hd) by its angle: e^{i phi} (a + ib)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)             # (B, nh, L, hd/2) each
    rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)                            # (B, nh, L, hd)


class Attention(nn.Module):
    """Tokenizer attention, self- or cross- (to `context`), with QK-norm (appendix A.2).
    QK-norm: a LayerNorm over each 64-wide head of q and of k, shared by the heads, before RoPE."""

    def __init__(self, dim, head_dim=64):
        super().__init__()
        self.head_dim = head_dim
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None, rope_q=None, rope_k=None, mask=None, causal=False):
        context = x if context is None else context
        # (B, L, D) -> (B, nh, L, hd)
        heads = lambda y: y.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(context)), heads(self.v(context))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope_q is not None:
            q = apply_rope(q, *rope_q)
        if rope_k is not None:
            k = apply_rope(k, *rope_k)
        # (B, nh, L, hd)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class GatedBlock(nn.Module):
    """Pre-LN transformer block of the encoder E (Eq. 1) and of the post-quantisation causal layers.

    x <- x + gate1 * Attn(LN(x));  x <- x + gate2 * MLP(LN(x)). The release adds per-channel
    residual gates, initialised to 0 so each block starts as the identity.
    """

    def __init__(self, dim, head_dim=64):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attention = Attention(dim, head_dim)
        self.mlp = MLP(dim, 4 * dim)
        self.gate1, self.gate2 = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))

    def forward(self, x, rope=None, mask=None, causal=False):
        x = x + self.gate1 * self.attention(self.norm1(x), rope_q=rope, rope_k=rope, mask=mask,
                                            causal=causal)
        return x + self.gate2 * self.mlp(self.norm2(x))


def run_blocks(blocks, x, checkpointed, **kwargs):
    """Apply blocks in turn; with `checkpointed`, recompute activations in backward."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False, **kwargs) if checkpointed \
            else block(x, **kwargs)
    return x


def encoder_mask(num_patches, num_queries):
    """The encoder's attention mask (§4): query i sees all patches and queries <= i.
    Patches never see queries, so query i depends on the image and queries 1..i only: the causality
    that lets a prefix of tokens mean the same thing whatever follows. (L+N) x (L+N), True where
    attention is allowed.
    """
    mask = torch.zeros(num_patches + num_queries, num_patches + num_queries, dtype=torch.bool)
    mask[:, :num_patches] = True
    mask[num_patches:, num_patches:] = torch.ones(num_queries, num_queries, dtype=torch.bool).tril()
    return mask


class VectorQuantizer(nn.Module):
    """Eq. (1) QUANT(.): nearest l2-normalised codebook entry, with the l_VQ loss of appendix A.2.

    Encoder outputs f and codebook rows are l2-normalised; the token is argmin_k ||f - e_k||^2;
    the forward value f + sg[e - f] equals e while gradients pass straight through to f. Per
    token, l_VQ = ||sg[f] - e||^2 + beta ||f - sg[e]||^2 (means over the C channels), beta = 0.25,
    no entropy term.
    """

    beta = 0.25

    def __init__(self, codebook_size, dim):
        super().__init__()
        self.codebook = nn.Embedding(codebook_size, dim)

    def normalized_codebook(self):
        return F.normalize(self.codebook.weight, dim=-1)                        # (V, C)

    def forward(self, f):
        """f (B, N, C) -> straight-through z_q (B, N, C), codes (B, N), per-token l_VQ (B, N)."""
        f = F.normalize(f, dim=-1)
        e = self.normalized_codebook()
        # the release's literal form of the distance; argmin takes the first of equal minima
        distance = f.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * f @ e.t()  # (B, N, V)
        codes = distance.argmin(-1)                                                   # (B, N)
        e_codes = e[codes]                                                            # (B, N, C)
        codebook_term = (e_codes - f.detach()).pow(2).mean(-1)
        vq_loss = codebook_term + self.beta * (e_codes.detach() - f).pow(2).mean(-1)  # + commitment
        return f + (e_codes - f).detach(), codes, vq_loss


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the diffusion time t followed by an MLP (as in DiT).

    Release details: t is multiplied by 1000, the cos half comes first, the frequency table is as
    wide as the model.
    """

    def __init__(self, dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                                     # t (B,)
        half = self.mlp[0].in_features // 2
        positions = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000) * positions / half)
        angles = (1000 * t.float())[:, None] * freqs[None]                     # (B, D/2)
        embedding = torch.cat([angles.cos(), angles.sin()], dim=-1)            # (B, D)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))[:, None]     # (B, 1, D)


class DiffusionBlock(nn.Module):
    """One block of D_FM (§4), modulated per token by its cross-attention to c(t).
    s = CrossAttn(N(x), cond); (shift, scale, gate) x 2 = Linear(SiLU(tau(t) + s)); x <- x + gate_a
    * SelfAttn(N(x)(1 + scale_a) + shift_a); x <- x + gate_m * MLP(N(x)(1 + scale_m) + shift_m). The
    modulation differs per pixel token because the cross-attention output does; the block has its
    own time embedder tau.
    """

    def __init__(self, dim, head_dim=64):
        super().__init__()
        self.attention = Attention(dim, head_dim)
        self.cross_attn = Attention(dim, head_dim)
        self.mlp = MLP(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.time_embed = TimestepEmbedder(dim)
        self.cond_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, x, t, cond, rope):                     # x (B, L, D), t (B,), cond (B, G, D)
        cond, normed = layer_norm(self.cond_embed(cond)), layer_norm(x)
        # pixel queries rotated, condition keys not
        s = self.cross_attn(normed, cond, rope_q=rope)
        modulation = self.adaLN_modulation(self.time_embed(t) + s)              # (B, L, 6D)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=-1)
        h = normed * (1 + scale_a) + shift_a
        x = x + gate_a * self.attention(h, rope_q=rope, rope_k=rope)
        h = layer_norm(x) * (1 + scale_m) + shift_m
        return x + gate_m * self.mlp(h)


class PixelDiffusionTransformer(nn.Module):
    """Eq. (2): the velocity network D_FM(x_t, t, c(t)), a DiT on raw P x P pixel patches (no VAE).

    x_t (B, 3, H, W) in the scaled pixel space, t (B,) the diffusion time, cond (B, G, D) = c(t).
    Returns the velocity v (B, 3, H, W) and the REPA features read before block `repa_layer`
    (None unless `return_repa`).
    """

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        dim, P = cfg.diffusion_dim, cfg.pixel_patch_size
        self.patch_size, self.repa_layer = P, cfg.repa_layer
        self.cond_mlp = nn.Linear(cfg.decoder_dim, dim)
        self.pixel_in = nn.Linear(3 * P * P, dim)
        self.blocks = nn.ModuleList(DiffusionBlock(dim, cfg.head_dim)
                                    for _ in range(cfg.diffusion_depth))
        self.pixel_out = nn.Linear(dim, 3 * P * P)
        grid = cfg.image_size // P
        self.repa_pool = grid // cfg.repa_grid
        self.repa_out = nn.Sequential(
            nn.Linear(dim, cfg.repa_hidden), nn.SiLU(), nn.Linear(cfg.repa_hidden, cfg.repa_hidden),
            nn.SiLU(), nn.Linear(cfg.repa_hidden, cfg.repa_dim)) if cfg.repa_dim else None
        cos, sin = rope_2d(grid, grid, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def repa_features(self, x):  # x (B, L, D) -> (B, repa_grid^2, repa_dim)
        side = math.isqrt(x.shape[1])
        grid = x.transpose(1, 2).unflatten(2, (side, side))                  # (B, D, H/P, W/P)
        pooled = F.avg_pool2d(grid, self.repa_pool).flatten(2).transpose(1, 2)
        return self.repa_out(pooled)

    def forward(self, x_t, t, cond, return_repa=False, checkpointed=False):
        B, _, height, width = x_t.shape
        rope = (self.rope_cos, self.rope_sin)
        cond = layer_norm(self.cond_mlp(cond))                                 # (B, G, D)
        # pixel_unshuffle puts pixel (c, P*h + i, P*w + j) at channel c*P*P + i*P + j, as the
        # release does
        x = F.pixel_unshuffle(x_t, self.patch_size).flatten(2).transpose(1, 2)  # (B, L, 3P^2)
        x = self.pixel_in(x)                                                   # (B, L, D)
        repa = None
        for i, block in enumerate(self.blocks):
            if return_repa and i == self.repa_layer:
                repa = self.repa_features(x)
            x = run_blocks([block], x, checkpointed, t=t, cond=cond, rope=rope)
        x = self.pixel_out(layer_norm(x))                                      # (B, L, 3P^2)
        grid = x.transpose(1, 2).unflatten(2, (height // self.patch_size, width // self.patch_size))
        return F.pixel_shuffle(grid, self.patch_size), repa                   # (B, 3, H, W)


def shift_time(u, beta):
    """The time shift of Eq. (8): t = u / (u + beta (1 - u)). Its inverse is Eq. (5)'s t'."""
    return u / (u + beta * (1 - u))


def unshift_time(t, beta):
    """Eq. (5)'s shifted time t' = t / (t + (1/beta)(1 - t)), the inverse of `shift_time`."""
    return t / (t + (1 - t) / beta)


def condition_group(t, num_groups, beta, form="release"):
    """Eq. (5): the condition schedule c(t) = g_{ceil(t' K)}, as the 0-based group index of times t.
    form="paper": ceil(t' K) - 1, with t' = 0 in group 0. form="release": round(t' K), at most
    K - 1: the released model is trained and sampled so (grid point i/K mid-way in group i)."""
    u = unshift_time(t, beta)
    if form == "paper":
        return (torch.ceil(u * num_groups).long() - 1).clamp(0, num_groups - 1)
    if form == "release":
        return torch.floor(u * num_groups + 0.5).long().clamp(max=num_groups - 1)
    raise ValueError(f"unknown condition schedule form {form!r}; use 'release' or 'paper'")


def flow_interpolant(x0, x1, t):
    """Eq. (3) and (4): x_t = t x1 + (1 - t) x0 and v_t = dx_t/dt = x1 - x0.
    t is broadcast per sample."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return t * x1 + (1 - t) * x0, x1 - x0


def jump_estimate(x_t, t, v):
    """The jump estimate of §3.3: x_hat_1 = x_t + (1 - t) v.
    Where the flow lands if v stayed constant."""
    return x_t + (1 - t.view(-1, *([1] * (x_t.dim() - 1)))) * v


def sampling_times(num_steps, beta):
    """Eq. (8): the decode's times t_i = (i/S) / (i/S + beta (1 - i/S)), then t_S = 1.
    i = 0..S-1; float32, (S + 1,). The paper decodes with S = K steps; the release's
    `num_denoising_steps` may set another S."""
    return shift_time(torch.arange(num_steps + 1, dtype=torch.float32) / num_steps, beta)


def step_groups(num_steps, num_groups):
    """Eq. (5) on a decode of S steps: the group of conditions each step reads.
    Release form: step i (at u_i = i/S, before the time shift) reads group round(u_i K) (halves up),
    at most K - 1. S = K: step i reads group i; else a group drives several steps or none
    (S = 6, K = 4: 0, 1, 1, 2, 3, 3). -> (S,) int64, non-decreasing."""
    u = torch.arange(num_steps, dtype=torch.float64) / num_steps  # from u, as released
    return torch.floor(u * num_groups + 0.5).long().clamp(max=num_groups - 1)


SOLVERS = ("adams2", "euler")


def solver_step(x, v, v_prev, dt, solver):
    """One ODE step from t_i to t_i + dt: Euler, or two-step Adams-Bashforth ("adams2").
    The release uses the constant-step weights 1.5 / -0.5 although the steps of Eq. (8) are uneven;
    we keep them to reproduce its numbers. Step 0 has no previous velocity and is an Euler step.
    """
    if solver == "euler" or v_prev is None:
        return x + dt * v
    return x + dt * (1.5 * v - 0.5 * v_prev)


def compiled(step):
    """A sampler step as one compiled graph (CUDA graphs on a GPU), as released.
    `LlamaAR.one_token_logits` or `Tokenizer.denoise_step`, its no_grad wrapper unwrapped."""
    on_cuda = next(step.__self__.parameters()).is_cuda
    plain = inspect.unwrap(step.__func__).__get__(step.__self__)  # callers run under no_grad
    return torch.compile(plain, mode="reduce-overhead" if on_cuda else None, fullgraph=True)


def gather_group(cond, group, group_size):
    """Group `group[b]` of the conditions of each image: cond (B, N, D), group (B,) -> (B, G, D)."""
    token_ids = group[:, None] * group_size + torch.arange(group_size, device=cond.device)
    return cond.gather(1, token_ids[..., None].expand(-1, -1, cond.shape[-1]))


def describe(x):
    """A refused tensor input as its message names it: dtype, shape and range of values."""
    values = f" in [{x.min().item():.4g}, {x.max().item():.4g}]" if x.numel() and x.dim() else ""
    return f"{str(x.dtype).removeprefix('torch.')} {tuple(x.shape)}{values}"


class Tokenizer(nn.Module):
    """The sequential diffusion tokenizer (§3.1, Fig. 3).

    encode:     image -> Eq. (1) encoder with N causal queries -> VQ -> N discrete tokens
    conditions: tokens -> codebook vectors -> causal transformer layers -> z' (the conditions)
    decode:     K steps of the Eq. (8) schedule; step k runs D_FM on group k of z' (Eq. 5)
    forward:    the training loss of Eq. (7)

    `patchify` replaces the release's patch embedding (one strided convolution), any module mapping
    images (B, 3, H, W) to (B, D, H/patch_size, W/patch_size); `init_std` and `gate_init` the
    release's initialisation (0.02 and 0).
    """

    def __init__(self, cfg: TokenizerConfig, patchify=None, init_std=0.02, gate_init=0.0):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patchify = patchify or nn.Conv2d(3, cfg.encoder_dim, cfg.patch_size,
                                              stride=cfg.patch_size)
        self.query_embedding = nn.Embedding(cfg.table_size, cfg.query_rank)
        self.query_linear = nn.Linear(cfg.query_rank, cfg.encoder_dim)
        self.encoder_layers = nn.ModuleList(GatedBlock(cfg.encoder_dim, cfg.head_dim)
                                            for _ in range(cfg.encoder_depth))
        self.quant_in = nn.Linear(cfg.encoder_dim, cfg.codebook_dim, bias=False)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim)
        self.quant_out = nn.Linear(cfg.codebook_dim, cfg.decoder_dim, bias=False)
        self.decoder_embedding = nn.Embedding(cfg.table_size, cfg.decoder_dim)
        self.decoder_layers = nn.ModuleList(GatedBlock(cfg.decoder_dim, cfg.head_dim)
                                            for _ in range(cfg.decoder_depth))
        self.diffusion = PixelDiffusionTransformer(cfg)
        # patches are rotated by their 2D position; the 1D queries get the identity rotation (A.2)
        cos, sin = rope_2d(grid, grid, cfg.head_dim, cfg.rope_theta)
        identity = (torch.ones(cfg.num_tokens, cfg.head_dim // 2),
                    torch.zeros(cfg.num_tokens, cfg.head_dim // 2))
        self.register_buffer("encoder_rope_cos", torch.cat([cos, identity[0]]), persistent=False)
        self.register_buffer("encoder_rope_sin", torch.cat([sin, identity[1]]), persistent=False)
        self.register_buffer("encoder_mask", encoder_mask(grid * grid, cfg.num_tokens),
                             persistent=False)
        self.register_buffer("sampling_times", sampling_times(cfg.decode_steps, cfg.time_shift),
                             persistent=False)
        self.register_buffer("step_groups", step_groups(cfg.decode_steps, cfg.num_groups),
                             persistent=False)
        # a training option: recompute block activations in backward
        self.grad_checkpointing = False
        self.initialize_weights(init_std, gate_init)

    @torch.no_grad()
    def initialize_weights(self, init_std, gate_init):
        """The release's initialisation for training from scratch.
        Blocks' Linear weights ~ N(0, init_std) truncated, gates = gate_init; others: PyTorch's."""
        for layer in [*self.encoder_layers, *self.decoder_layers, *self.diffusion.blocks]:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.trunc_normal_(module.weight, std=init_std)
                    nn.init.zeros_(module.bias)
        for layer in [*self.encoder_layers, *self.decoder_layers]:
            nn.init.constant_(layer.gate1, gate_init)
            nn.init.constant_(layer.gate2, gate_init)
        # adaLN-Zero: every diffusion block starts as the identity
        for block in self.diffusion.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        nn.init.zeros_(self.diffusion.pixel_out.weight)
        nn.init.zeros_(self.diffusion.pixel_out.bias)
        nn.init.trunc_normal_(self.query_embedding.weight, std=1.0)
        nn.init.trunc_normal_(self.decoder_embedding.weight, std=0.02)
        codebook = self.quantizer.codebook.weight
        codebook.uniform_(-1 / self.cfg.codebook_size, 1 / self.cfg.codebook_size)
        codebook.copy_(F.normalize(codebook, dim=-1))

    # ---- Eq. (1): encoder and quantiser --------------------------------------------------------
    def encoder_features(self, images):
        """Eq. (1) before quantisation: E(I, [q_1..q_N]), projected to the codebook width.
        -> f (B, N, C)."""
        B, N = images.shape[0], self.cfg.num_tokens
        patches = layer_norm(self.patchify(images).flatten(2).transpose(1, 2))     # (B, L, D)
        queries = self.query_linear(self.query_embedding.weight[:N]).expand(B, -1, -1)  # (B, N, D)
        x = torch.cat([patches, queries], dim=1)                                     # (B, L+N, D)
        rope = (self.encoder_rope_cos, self.encoder_rope_sin)
        x = run_blocks(self.encoder_layers, x, self.grad_checkpointing and self.training,
                       rope=rope, mask=self.encoder_mask)
        return self.quant_in(layer_norm(x[:, -N:]))                                  # (B, N, C)

    @torch.no_grad()
    def encode(self, images, values=True):
        """Eq. (1): images (B, 3, H, W) in [-1, 1] -> codes (B, N) int64, coarse to fine.
        values=False: no value check (a host sync), for a loop that checked its data once."""
        images = torch.as_tensor(images, device=self.sampling_times.device)
        size = self.cfg.image_size
        if images.shape[1:] != (3, size, size) or not images.is_floating_point() or values and (
                not images.isfinite().all() or images.abs().max() > 1.1):
            raise ValueError(f"images must be {size}x{size} RGB finite floats in [-1, 1], (B, 3, "
                             f"{size}, {size}) (0-255 pixels map by x / 127.5 - 1), got "
                             f"{describe(images)}")
        return self.quantizer(self.encoder_features(images))[1]

    # ---- post-quantisation causal layers: z -> z' ----------------------------------------------
    def causal_decoder(self, z_q):
        """z_q (B, n, C) -> z' (B, n, D). Causal layers (§4): z'_i depends on z_1..z_i only."""
        x = self.quant_out(z_q) + self.decoder_embedding.weight[:z_q.shape[1]]      # (B, n, D)
        x = run_blocks(self.decoder_layers, x, self.grad_checkpointing and self.training,
                       causal=True)
        return layer_norm(x)

    @torch.no_grad()
    def conditions(self, codes):
        """The causal layers of §3.1: tokens (B, n) -> conditions z' (B, n, D).
        The layers are causal, so the first n tokens of a sequence (n <= N) give the same z'[:, :n]
        as the whole sequence."""
        codes, N, V = torch.as_tensor(codes), self.cfg.num_tokens, self.cfg.codebook_size
        if codes.dim() != 2 or codes.is_floating_point() or not 0 < codes.shape[1] <= N \
                or codes.numel() and (codes.min() < 0 or codes.max() >= V):
            raise ValueError(f"codes must be ids of the codebook [0, {V}), (B, n) with 1 <= n <= "
                             f"{N}, got {describe(codes)}")
        return self.causal_decoder(self.quantizer.normalized_codebook()[codes.long()])

    # ---- Eq. (2)-(4), (8): decoding with D_FM, the pixel diffusion transformer -------------------
    @torch.no_grad()
    def velocity(self, x_t, t, cond):
        """One call of D_FM, the velocity of Eq. (2): x_t, t and one group cond -> v.
        x_t (B, 3, H, W) in the scaled pixel space, t the diffusion time the network sees (after the
        time shift; a float or (B,)), cond (B, G, D) -> v (B, 3, H, W)."""
        size, G, D = self.cfg.image_size, self.cfg.group_size, self.cfg.decoder_dim
        if x_t.shape[1:] != (3, size, size) or cond.shape != (x_t.shape[0], G, D):
            raise ValueError(f"x_t (B, 3, {size}, {size}) and cond, one group of conditions (B, "
                             f"{G}, {D}), got {tuple(x_t.shape)} and {tuple(cond.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        return self.diffusion(x_t, t, cond)[0]

    def initial_noise(self, batch, noise=None, generator=None, device=None):
        """x_0 of the flow in Eq. (3): (B, 3, H, W) in the scaled pixel space.
        `noise`, or drawn with `generator` (one, or a list of one per sample)."""
        size = self.cfg.image_size
        if noise is None and isinstance(generator, (list, tuple)):
            noise = torch.cat([torch.randn(1, 3, size, size, generator=g, device=device)
                               for g in generator])
        elif noise is None:
            return torch.randn(batch, 3, size, size, generator=generator, device=device)
        if torch.as_tensor(noise).shape != (batch, 3, size, size):
            raise ValueError(f"x_0 must be ({batch}, 3, {size}, {size}): noise of that shape or "
                             f"one generator per sample, got {describe(torch.as_tensor(noise))}")
        return torch.as_tensor(noise).to(device)  # the release draws x_0 on the CPU

    def schedule(self, steps=None):
        """The S-step decode: the times of Eq. (8) and the group each step reads (Eq. 5).
        -> times t_0..t_S (S + 1,), groups (S,). steps=None: the config's S (K as released)."""
        if steps is None or steps == self.cfg.decode_steps:
            return self.sampling_times, self.step_groups
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        device = self.sampling_times.device
        return (sampling_times(steps, self.cfg.time_shift).to(device),
                step_groups(steps, self.cfg.num_groups).to(device))

    @torch.no_grad()
    def denoise_step(self, x, t, t_next, cond, v_prev, solver):
        """One step of a decode, from t to t_next, conditioned on the group c(t) of Eq. (5).
        cond (B, G, D). Returns x at t_next and the velocity v at t (the next step's v_prev)."""
        v, _ = self.diffusion(x, t.expand(x.shape[0]), cond)
        return solver_step(x, v, v_prev, t_next - t, solver), v

    @torch.no_grad()
    def decode(self, codes, noise=None, solver="adams2", generator=None, steps=None, compile=False):
        """Decode tokens (B, N) into images (B, 3, H, W) by S steps of Eq. (8).
        S = `steps`, default the config's (K as released); step i is conditioned on group
        `step_groups`[i] of z' (Eq. 5). `noise`: x_0 in the scaled pixel space, else drawn with
        `generator`; compile: `compiled`."""
        cond, N = self.conditions(codes), self.cfg.num_tokens                         # (B, N, D)
        if cond.shape[1] != N or solver not in SOLVERS:
            raise ValueError(f"decode takes all N = {N} tokens and a solver of {SOLVERS}, got "
                             f"{cond.shape[1]} tokens and {solver!r}")
        times, step_group = self.schedule(steps)
        groups = cond.unflatten(1, (self.cfg.num_groups, -1)).transpose(0, 1).contiguous()
        x, v = self.initial_noise(len(cond), noise, generator, cond.device).to(cond), None
        denoise_step = compiled(self.denoise_step) if compile else self.denoise_step
        for i, group in enumerate(step_group.tolist()):                # groups[group]: (B, G, D)
            x, v = denoise_step(x, times[i], times[i + 1], groups[group], v, solver)
        return x / self.cfg.data_std

    # ---- Eq. (7): the training loss -------------------------------------------------------------
    def training_conditions(self, quantized, u=None):
        """Eq. (5) for one training step: the time t, the group c(t) it reads, and l_VQ.
        quantized: the quantiser's tokens z_q (B, N, C), codes and per-token l_VQ (B, N) of Eq. (1);
        u: Eq. (5)'s t' per image (U[0, 1) when None) -> t = shift(u) (B,), its group (B,), c(t)
        (B, G, D), l_VQ over the tokens up to each image's group, the codebook fraction in use."""
        (z_q, codes, vq_per_token), cfg = quantized, self.cfg
        if u is None:
            u = torch.rand(z_q.shape[0], device=z_q.device)
        t = shift_time(u, cfg.time_shift)
        group = condition_group(t, cfg.num_groups, cfg.time_shift)                   # (B,)
        cond_t = gather_group(self.causal_decoder(z_q), group, cfg.group_size)   # c(t): (B, G, D)
        # l_VQ counts only the tokens up to the selected group: later ones got no D_FM signal this
        # step
        seen = (torch.arange(cfg.num_tokens,
                             device=z_q.device) < (group[:, None] + 1) * cfg.group_size).float()
        vq = (vq_per_token * seen).sum() / seen.sum()
        in_use = torch.zeros(cfg.codebook_size, device=codes.device)
        in_use = in_use.index_fill_(0, codes.flatten(), 1.0)
        return t, group, cond_t, vq, in_use.mean()

    def forward(self, images, perceptual=None, repa_target=None, lpips_weight=0.5, repa_weight=0.5,
                u=None, lpips_from_group=1):
        """Eq. (7): l = l_fm + l_VQ + lambda_1 l_LPIPS + lambda_2 l_repa (paper: both lambdas 0.5).
        perceptual(images, fakes) -> per-image distances (lpips.LPIPS(net="vgg")), read on the jump
        estimate x_hat_1 as released; repa_target(images) -> (B, repa_grid^2, repa_dim) features
        (DINOv2-B patch tokens) for 1 - cosine similarity; each term only when given. u: Eq. (5)'s
        t' per image (U[0, 1) when None). -> {"loss"; detached "fm", "vq", "lpips", "repa", and
        "usage", the fraction of the codebook this batch uses}."""
        cfg = self.cfg
        if repa_target is not None and not cfg.uses_repa:
            raise ValueError("this tokenizer computes no REPA features (repa_dim = 0 or repa_layer "
                             ">= diffusion_depth); pass repa_target=None")
        quantized = self.quantizer(self.encoder_features(images))                       # Eq. (1)
        t, group, cond_t, vq, usage = self.training_conditions(quantized, u)
        # release: data scaled by 0.6 (not in the paper); l_fm divides it back out
        x1 = cfg.data_std * images
        x_t, v_target = flow_interpolant(torch.randn_like(x1), x1, t)                 # Eq. (3), (4)
        v, repa = self.diffusion(x_t, t, cond_t, return_repa=repa_target is not None,
                                 checkpointed=self.grad_checkpointing and self.training)
        fm = F.mse_loss(v, v_target) / cfg.data_std ** 2  # Eq. (2), in image units

        loss, terms = fm + vq, {"fm": fm, "vq": vq}
        if perceptual is not None:
            fakes = jump_estimate(x_t, t, v) / cfg.data_std
            distance = perceptual(images, fakes)                                    # (B,)
            # tiny: groups k..K's steps only, so the first groups ask no detail (release: k = 1)
            terms["lpips"] = (distance * (group >= lpips_from_group - 1)).mean()
            loss = loss + lpips_weight * terms["lpips"]
        if repa_target is not None:
            with torch.no_grad():
                target = repa_target(images)
            terms["repa"] = (1 - F.cosine_similarity(repa, target, dim=-1)).mean()
            loss = loss + repa_weight * terms["repa"]
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()},
                "usage": usage}


# ================================================================================================
#  §3.2  Autoregressive modelling: a vanilla Llama over the tokens, Eq. (6)
# ================================================================================================


@dataclass
class ARConfig:
    dim: int = 1024              # D
    depth: int = 24              # transformer blocks
    num_heads: int = 16          # H (64-wide heads in every released model)
    vocab_size: int = 16384      # = the tokenizer's codebook size V
    num_tokens: int = 256        # N: tokens per image (the class token is one more position)
    num_classes: int = 1000      # the class embedding has one more row: the null class for CFG
    rope_theta: float = 10000.0
    token_dropout: float = 0.1     # release: dropout on the input sequence,
    residual_dropout: float = 0.1  # after each attention,
    ffn_dropout: float = 0.1       # after each feed-forward,
    label_dropout: float = 0.1     # and of the class label (which trains the null class of CFG)
    reverse: bool = False  # trained on the reversed, fine-to-coarse order (Table 7's ablation)

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    @property
    def ffn_hidden(self):  # the released SwiGLU width: 2/3 of 4D, rounded up to a multiple of 256
        return -(-(8 * self.dim // 3) // 256) * 256


AR_PRESETS = {  # the paper's D-AR-B/L/XL/XXL (LlamaGen's GPT-B/L/XL/XXL sizes)
    "B": ARConfig(dim=768, depth=12, num_heads=12),     # 110,888,448 params
    "L": ARConfig(dim=1024, depth=24, num_heads=16),    # 342,910,976 params
    "XL": ARConfig(dim=1280, depth=36, num_heads=20),   # 774,699,520 params
    "XXL": ARConfig(dim=1536, depth=48, num_heads=24),  # 1,410,972,672 params
    # for CPUs and tests, matched to the `tiny` tokenizer (V = 256, N = 64) and the built-in data
    "tiny": ARConfig(dim=128, depth=4, num_heads=2, vocab_size=256, num_tokens=64, num_classes=10),
}


def rope_1d(length, head_dim, theta):
    """1D RoPE angles for positions 0..length-1: pair k of a head rotates by pos * theta^(-2k/hd).

    Returns cos, sin: (length, hd/2). Release: computed in float32 (the tokenizer's 2D
    tables use float64).
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), freqs)   # (length, hd/2)
    return angles.cos(), angles.sin()


class RMSNorm(nn.Module):
    """Llama's RMSNorm: x / rms(x) in float32, cast back, times a learned weight (eps 1e-5)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), x.shape[-1:], eps=1e-5).type_as(x) * self.weight


class KVCache:
    """A static key/value cache for one attention layer, as in gpt-fast.
    Allocated once per generation, (B, nh, N + 1, hd): a slot per position (the class token and N
    tokens), written at explicit positions; keys are stored after RoPE."""

    def __init__(self, batch, heads, length, head_dim, dtype, device):
        self.k = torch.zeros(batch, heads, length, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, positions, k, v):           # k, v (B, nh, n, hd) at positions (n,)
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v  # (B, nh, N + 1, hd); slots after the position are masked


class LlamaAttention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection and 1D RoPE, no biases."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        # rows: [q | k | v], heads of hd inside each
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.residual_dropout)

    def forward(self, x, rope, cache=None, positions=None, mask=None):
        cos, sin = (angles[:, None] for angles in rope)                       # (T, 1, hd/2)
        q, k, v = self.wqkv(x).unflatten(-1, (3, -1, self.head_dim)).unbind(2)  # (B, T, nh, hd)
        # RoPE before the head transpose, and v copied out of the fused projection: backward
        # keeps (B, T, D) for each of q, k, v instead of the whole (B, T, 3D) output
        q, k, v = (y.transpose(1, 2) for y in (apply_rope(q, cos, sin), apply_rope(k, cos, sin),
                                               v.contiguous()))
        if cache is None:  # the whole sequence: plain causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # new positions attend to every cached slot <= them
            k, v = cache.update(positions, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dropout(self.wo(out.transpose(1, 2).flatten(2)))          # (B, T, D)


class SwiGLU(nn.Module):
    """Llama's feed-forward: w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.dropout = nn.Dropout(cfg.ffn_dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.attention_norm, self.attention = RMSNorm(cfg.dim), LlamaAttention(cfg)
        self.ffn_norm, self.feed_forward = RMSNorm(cfg.dim), SwiGLU(cfg)

    def forward(self, x, rope, cache=None, positions=None, mask=None):
        x = x + self.attention(self.attention_norm(x), rope, cache, positions, mask)
        return x + self.feed_forward(self.ffn_norm(x))


def next_token_loss(logits, tokens):
    """Eq. (6): the mean next-token cross-entropy -log p(z_i | y, z_<i).
    Over the batch and the positions; logits (B, T, V) from `LlamaAR`, tokens (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1), tokens.flatten())


class LlamaAR(nn.Module):
    """Eq. (6): p(z_1..z_N | y) = prod_i p(z_i | y, z_<i), a vanilla Llama over the tokens.
    The sequence [y; z_1 .. z_{N-1}] puts the class y at position 0, so logits[:, i] predicts
    tokens[:, i]. The class table's row `num_classes` is the null class, for guidance (CFG)."""

    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # position 0 = the class token
        cos, sin = rope_1d(cfg.num_tokens + 1, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.register_buffer("positions", torch.arange(cfg.num_tokens + 1), persistent=False)
        slots = cfg.num_tokens + 1
        self.register_buffer("cache_mask", torch.ones(slots, slots, dtype=torch.bool).tril(),
                             persistent=False)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The release's initialisation of the Llama.
        Every Linear and Embedding ~ N(0, 0.02); the output head zero."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    def embed(self, labels, tokens):
        """[class token; token embeddings]: labels (B,), tokens (B, T) -> (B, 1 + T, D)."""
        return torch.cat([self.class_embedding(labels)[:, None], self.tok_embeddings(tokens)],
                         dim=1)

    def transformer(self, h, positions, caches=None):
        """The Llama's blocks and head: h (B, T, D) at `positions` (T,) -> logits (B, T, V).
        Logits in float32. Without caches the positions are 0..T-1 and attention is causal; with
        caches, keys and values are written to them and reused."""
        rope = (self.rope_cos[positions], self.rope_sin[positions])              # (T, hd/2) each
        mask = None if caches is None else self.cache_mask[positions]            # (T, N + 1)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, None if caches is None else caches[i], positions, mask)
        return self.output(self.norm(h)).float()

    def forward(self, tokens, labels):
        """Eq. (6)'s teacher forcing: tokens (B, T), labels (B,) -> logits (B, T, V).
        logits[:, i] predicts tokens[:, i]."""
        V, N, C = self.cfg.vocab_size, self.cfg.num_tokens, self.cfg.num_classes
        if tokens.dim() != 2 or tokens.is_floating_point() or not 0 < tokens.shape[1] <= N \
                or labels.shape != tokens.shape[:1] or labels.is_floating_point():
            raise ValueError(f"tokens must be ids (B, T) with 1 <= T <= {N} and labels class ids "
                             f"(B,), got {describe(tokens)} and {describe(labels)}")
        # the value ranges (a host sync) outside training: the scripts check their data once
        if not self.training and (tokens.min() < 0 or tokens.max() >= V or labels.min() < 0
                                  or labels.max() > C):
            raise ValueError(f"tokens must lie in [0, {V}) and labels in [0, {C}] ({C} = the null "
                             f"class), got {describe(tokens)} and {describe(labels)}")
        if self.training and self.cfg.label_dropout > 0:  # trains the null class used by CFG
            dropped = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = labels.masked_fill(dropped, self.cfg.num_classes)
        h = self.token_dropout(self.embed(labels, tokens[:, :-1]))                # (B, T, D)
        return self.transformer(h, self.positions[:tokens.shape[1]])

    # ---- generation with a static KV cache -------------------------------------------------------
    def new_cache(self, batch):
        """One KVCache per layer for `batch` sequences, in the model's dtype and device."""
        weight = self.tok_embeddings.weight
        return [KVCache(batch, self.cfg.num_heads, self.cfg.num_tokens + 1, self.cfg.head_dim,
                        weight.dtype, weight.device) for _ in self.layers]

    @torch.no_grad()
    def next_logits(self, h, positions, caches):
        """The logits of the next token (B, V) after embeddings h (B, T, D) at `positions`.
        A cached forward (T,); the sampler prefills the class token (and a prefix) with it."""
        return self.transformer(h, positions, caches)[:, -1]

    @torch.no_grad()
    def one_token_logits(self, token, position, caches):
        """The sampler's hot step: the last token (B, 1) at `position` -> the next logits.
        (B, V). One forward of one position; static shapes (the position is a tensor), so a compiled
        step (`compiled`) runs every position without recompiling."""
        return self.next_logits(self.tok_embeddings(token), position, caches)


# ================================================================================================
#  §3.3  The D-AR sampler: every group of generated tokens drives one diffusion step
# ================================================================================================


def guidance_scales(guidance, num_tokens):
    """The classifier-free guidance scale of each token (§3.3).
    A number, or the release's linear schedule (start, end) from token 0 to token N-1 (paper:
    (1.1, 8.0) for D-AR-L, (1.1, 10.0) for D-AR-XL)."""
    start, end = map(float, guidance if isinstance(guidance, (tuple, list)) else (guidance,) * 2)
    # release: a schedule starting at exactly 1.0 is nudged to 1.001 to turn guidance on; not here
    return torch.linspace(start, end, num_tokens).tolist()


def sample_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None, uniform=None):
    """Draw one token per row of logits (B, V), as released.
    Temperature, then top-k, then nucleus (top-p) filtering, then one draw from what is left
    (top_k = 1: greedy). The draw inverts the cumulative distribution at one uniform number per row:
    `uniform` (B,) when given (`sample` draws them per sample, so that a sample does not depend on
    its batch), else from `generator`."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    # drop the tail whose cumulative mass exceeds top_p; the most likely token always stays
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        beyond = sorted_logits.softmax(-1).cumsum(-1) > top_p
        # keep the boundary token
        beyond = torch.cat([torch.zeros_like(beyond[:, :1]), beyond[:, :-1]], dim=-1)
        logits = logits.masked_fill(beyond.scatter(-1, order, beyond), -math.inf)
    if uniform is None:
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
    cdf = logits.float().softmax(-1).cumsum(-1)                                         # (B, V)
    # side="right": the first token whose cumulative mass exceeds u, so a token of zero mass is
    # never drawn
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(1), side="right")[:, 0]
    return drawn.clamp(max=logits.shape[-1] - 1)                                        # (B,)


@dataclass
class SampledGroup:
    """What `sample` yields once group `group` is written and has driven its diffusion steps."""
    group: int              # its index, 0..K-1 (Eq. 5's g_{group + 1})
    tokens: torch.Tensor    # (B, (group + 1) G) the tokens so far, in coarse-to-fine order
    t: float                # the diffusion time reached (1 after the last group)
    preview: torch.Tensor   # (B, 3, H, W) the solver's last step extended to t = 1
    image: torch.Tensor = None  # (B, 3, H, W) the final image, after the last group only


@torch.no_grad()
def sample(ar, tokenizer, labels, *, guidance=1.0, temperature=1.0, top_k=0, top_p=1.0, prefix=None,
           solver="adams2", noise=None, generator=None, steps=None, compile=False):
    """§3.3: D-AR sampling, a generator of one `SampledGroup` per group (the last has `.image`).
    The AR model writes the tokens one by one (Eq. 6); once group k is complete, D_FM takes the
    steps it drives (Eq. 5, 8) and yields a preview, the solver's last step extended to t = 1
    (Euler: the jump estimate; AB2: the release's, Table 5). The image is `tokenizer.decode`'s.

    labels (B,): class ids. guidance: a scale, or a (start, end) schedule over the tokens
        (`guidance_scales`). temperature, top_k, top_p: as `sample_token`. prefix (B, n): tokens
        kept fixed (layout control, Fig. 5), whose steps run first; not for a reversed-order model.
    noise: x_0 (B, 3, H, W), scaled by data_std. generator (on the models' device): one, or a list
        of B (each sample then independent of its batch). steps: S diffusion steps (default K).
    compile: the one-token AR step and the denoising step compiled (`compiled`), same numbers."""
    N, K, G = tokenizer.cfg.num_tokens, tokenizer.cfg.num_groups, tokenizer.cfg.group_size
    device = tokenizer.sampling_times.device
    labels, prefix, scales, temperature, top_k, top_p = sampler_inputs(
        ar, tokenizer, labels, prefix, guidance, temperature, top_k, top_p, solver)
    B, n, guided = len(labels), prefix.shape[1], any(scale != 1.0 for scale in scales)
    x = tokenizer.initial_noise(B, noise, generator, device)  # x_0: one generator per sample?

    # the AR side: prefill the class token and the prefix; guidance doubles the batch (y ; null)
    double = (lambda y: torch.cat([y, y])) if guided else (lambda y: y)
    batch_labels = torch.cat([labels, torch.full_like(labels, ar.cfg.num_classes)]) if guided \
        else labels
    caches = ar.new_cache(batch_labels.shape[0])
    h = ar.embed(batch_labels, double(prefix))                                 # (B', 1 + n, D)
    logits = ar.next_logits(h, ar.positions[:1 + n], caches)                   # (B', V)
    eager = (ar.one_token_logits, tokenizer.denoise_step)
    ar_step, denoise_step = (compiled(f) for f in eager) if compile else eager
    tokens = torch.cat([prefix, prefix.new_empty(B, N - n)], 1)                 # in the AR's order

    # the diffusion side: x_0, and the S steps of Eq. (8) with the group each reads (Eq. 5)
    times, step_group = tokenizer.schedule(steps)
    step_group = step_group.tolist()                         # step 0 always reads group 0 (u_0 = 0)
    v, step, written = None, 0, n
    uniforms = token_uniforms(B, N, generator, device)      # (B, N), every token draw's, up front
    for k in range(K):
        needed = N if ar.cfg.reverse else (k + 1) * G
        for i in range(written, needed):                     # (a) the AR tokens group k waits for
            if i > n:
                logits = ar_step(double(tokens[:, i - 1:i]), ar.positions[i:i + 1], caches)
            logits_i = guide(logits, scales[i]) if guided else logits
            tokens[:, i] = sample_token(logits_i, temperature, top_k, top_p, uniform=uniforms[:, i])
        written = max(written, needed)
        coarse_to_fine = (tokens.flip(1) if ar.cfg.reverse else tokens)[:, :(k + 1) * G]
        # (b) z' of group k, contiguous: the same strides in every group, one compiled graph
        cond = tokenizer.conditions(coarse_to_fine)[:, k * G:].contiguous()
        while step < len(step_group) and step_group[step] == k:  # (c) the steps it drives
            x_prev, v_prev = x.to(cond), v
            x, v = denoise_step(x_prev, times[step], times[step + 1], cond, v_prev, solver)
            dt = times[-1] - times[step]                # the preview: this update taken to t = 1
            preview = solver_step(x_prev, v, v_prev, dt, solver) / tokenizer.cfg.data_std
            step += 1
        image = x / tokenizer.cfg.data_std if k == K - 1 else None
        yield SampledGroup(k, coarse_to_fine.clone(), times[step].item(), preview, image)  # (d)


def sampler_inputs(ar, tokenizer, labels, prefix, guidance, temperature, top_k, top_p, solver):
    """`sample`'s inputs as tensors and numbers, each checked before any work.
    A bad one: a ValueError naming it. -> labels (B,), prefix (B, n) int64 on the models' device,
    the guidance scale per token, temperature, top_k, top_p."""
    N, V, C = tokenizer.cfg.num_tokens, tokenizer.cfg.codebook_size, ar.cfg.num_classes
    device = tokenizer.sampling_times.device
    labels = torch.as_tensor(labels, device=device)                            # (B,)
    prefix = torch.as_tensor([[]] * len(labels) if prefix is None else prefix, device=device)
    B, n = len(labels), prefix.shape[-1]
    prefix = prefix.long() if n == 0 else prefix  # an empty list is float32
    try:  # numbers given as text are read as numbers
        scales, temperature, top_k, top_p = guidance_scales(guidance, N), *map(float, (
            temperature, top_k, top_p))
    except (TypeError, ValueError):
        raise ValueError(f"guidance, temperature, top_k and top_p must be numbers, got "
                         f"{guidance!r}, {temperature!r}, {top_k!r}, {top_p!r}") from None
    for bad, message in (
            ((ar.cfg.vocab_size, ar.cfg.num_tokens) != (V, N), f"the AR model "
             f"({ar.cfg.vocab_size} ids, {ar.cfg.num_tokens} tokens) does not match the tokenizer "
             f"({V} ids, {N} tokens)"),
            (ar.training, "the AR model is in training mode (dropout on): call ar.eval() first"),
            (solver not in SOLVERS, f"unknown solver {solver!r}; choose one of {SOLVERS}"),
            (not all(0 <= s < math.inf for s in scales), f"guidance must be finite numbers >= 0 "
             f"(a scale or a (start, end) schedule), got {guidance!r}"),
            (not 0 <= temperature < math.inf, f"temperature must be a finite number >= 0, got "
             f"{temperature!r}"),
            (not (0 <= top_k < math.inf and float(top_k).is_integer()), f"top_k must be an "
             f"integer >= 0, got {top_k!r}"),
            (not 0 < top_p <= 1, f"top_p must be a finite number > 0 and <= 1, got {top_p!r}"),
            (labels.dim() != 1 or labels.is_floating_point() or bool(labels.numel()) and (
                labels.min() < 0 or labels.max() >= C), f"labels must be class ids in [0, {C}), "
             f"got {describe(labels)}"),
            (prefix.dim() != 2 or len(prefix) != B or n > N or prefix.is_floating_point() or bool(
                prefix.numel()) and (prefix.min() < 0 or prefix.max() >= V), f"prefix must be "
             f"({B}, n) token ids in [0, {V}) with n <= {N}, got {describe(prefix)}"),
            (n > 0 and ar.cfg.reverse, "a prefix fixes the coarse tokens, which a reversed-order "
             "AR model writes last")):
        if bad:
            raise ValueError(message)
    return labels, prefix.long(), scales, temperature, int(top_k), top_p


def guide(logits, scale):
    """Classifier-free guidance in logit space, as released: l = l_u + s (l_c - l_u).
    logits (2B, V): of the labels, then of the null class -> (B, V)."""
    conditional, unconditional = logits.chunk(2)
    return unconditional + scale * (conditional - unconditional)


def token_uniforms(batch, num_tokens, generator, device):
    """The uniform numbers of every token draw (`sample_token`), drawn up front.
    (B, N): row b from sample b's generator when given a list of them, else all from one."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.rand(num_tokens, generator=g, device=device) for g in generator])
    return torch.rand(batch, num_tokens, generator=generator, device=device)


# ================================================================================================
#  Data and training utilities (used by the scripts and the notebooks)
# ================================================================================================

# ---- pictures ------------------------------------------------------------------------------------

def pil_to_tensor(image):
    """A PIL RGB image -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(images):
    """Images in [-1, 1] -> uint8 as the release converts them: clamp(127.5 x + 128,
    0, 255), truncated."""
    return (127.5 * images + 128).clamp(0, 255).to(torch.uint8)


def image_grid(cells):
    """Images (rows, columns, 3, H, W) in [-1, 1] -> one uint8 array (rows H, columns W, 3)."""
    rows, columns, _, H, W = cells.shape
    pixels = to_uint8(cells.detach().float().cpu())                  # (rows, columns, H, W, 3)
    return pixels.permute(0, 3, 1, 4, 2).reshape(rows * H, columns * W, 3).numpy()


def labelled_grid(cells, row_names, column_names, header=24, pad=6):
    """Images (rows, columns, 3, H, W) in [-1, 1] -> a PIL image with a name left of each row and
    above each column. Small images are enlarged (nearest neighbour) to about 96 pixels so that they
    can be seen."""
    rows, columns, _, H, W = cells.shape
    scale = max(1, 96 // H)
    size = (columns * W * scale, rows * H * scale)
    picture = Image.fromarray(image_grid(cells)).resize(size, Image.NEAREST)
    font = ImageFont.load_default()
    left = int(max(ImageDraw.Draw(picture).textlength(name, font=font)
                   for name in row_names)) + 2 * pad
    canvas = Image.new("RGB", (left + picture.width, header + picture.height), "white")
    canvas.paste(picture, (left, header))
    draw, cell_w, cell_h = ImageDraw.Draw(canvas), W * scale, H * scale
    for r, name in enumerate(row_names):
        draw.text((pad, header + r * cell_h + cell_h // 2), name, fill="black", font=font,
                  anchor="lm")
    for c, name in enumerate(column_names):
        draw.text((left + c * cell_w + cell_w // 2, header // 2), name, fill="black", font=font,
                  anchor="mm")
    return canvas


def preview_names(num_groups, group_size):
    """What the preview after each group shows: "8 tokens", "16 tokens", ..., "image (64)"."""
    partial = [f"{k * group_size} tokens" for k in range(1, num_groups)]
    return partial + [f"image ({num_groups * group_size})"]


def save_forming_gif(previews, names, group_size, path):
    """previews (B, K, 3, H, W) -> an animated GIF: frame k shows every sample's preview after k + 1
    groups, the last frame (the images) held longest."""
    K = previews.shape[1]
    frames = [labelled_grid(previews[:, k][None], [step], names) for k,
              step in enumerate(preview_names(K, group_size))]
    save_picture(frames[0], path, save_all=True, append_images=frames[1:],
                 duration=[400] * (K - 1) + [2000], loop=0)


# ---- class-balanced samples (the FID files' and the toy metric's) --------------------------------

def generators(seeds, device):
    """One generator per sample, so that a sample depends on its seed only, not on its batch."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def class_balanced_samples(ar, tokenizer, seed=0, preview_groups=None, **options):
    """-> make(indices) = (images, asked-for labels), as the FID files are drawn: sample i asks for
    class i mod C and draws from its own generator seeded seed + i, so the set does not depend on
    batches or processes.
    preview_groups = k: the previews after k groups instead (Table 5); the AR model stops there.
    options: `sample`'s."""
    device, K = tokenizer.sampling_times.device, tokenizer.cfg.num_groups
    stop = preview_groups or K
    if not 1 <= stop <= K:
        raise ValueError(f"preview_groups must lie in [1, {K}], got {preview_groups}")

    def make(indices):
        labels = torch.tensor(indices, device=device) % ar.cfg.num_classes
        generator = generators([seed + i for i in indices], device)
        for sampled in sample(ar, tokenizer, labels, generator=generator, **options):
            if sampled.group + 1 == stop:  # later tokens are never written
                return sampled.preview, labels
    return make


# ---- data ----------------------------------------------------------------------------------------


# the palette of the built-in textures: the eight corners of the RGB cube
PALETTE = torch.tensor([[r, g, b] for r in (-1.0, 1.0) for g in (-1.0, 1.0) for b in (-1.0, 1.0)])


# the built-in textures' classes: 4 x 4 tiles of a pattern, each covering exactly half the tile (8
# of 16 pixels), so that every class has the same mean colour and a blur of a few pixels makes them
# one
TEXTURE_CLASSES = ("rows", "columns", "diagonals", "antidiagonals", "checks", "fine checks", "dots",
                   "fine rows", "waves", "ripples")


def texture_tiles():
    """-> (10, 4, 4) bool, one tile per `TEXTURE_CLASSES` entry; True where the pattern darkens."""
    y, x = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    dots = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    zigzag = torch.tensor([0, 1, 2, 1])
    tiles = [y < 2, x < 2, (x + y) % 4 < 2, (x - y) % 4 < 2, (x // 2 + y // 2) % 2 == 0,
             (x + y) % 2 == 0, dots, y % 2 == 0, (y - zigzag[x]) % 4 < 2, (x - zigzag[y]) % 4 < 2]
    return torch.stack(tiles)


class BuiltinTextures(torch.utils.data.Dataset):
    """A procedural dataset whose class lives in the fine detail, as fur does in
    Fig. 5 (no download).

    The layout is coarse and independent of the class: an ellipse of random radii and position, and
    two different colours of `PALETTE` for the background and the object. The class
    (`TEXTURE_CLASSES`, label = index mod 10) is a pattern of a 2-4 pixel period inside the object,
    fixed to the pixel grid (one whole tile per 4 x 4 patch: the object is a window onto it), that
    darkens the object's colour to 30% on half of its pixels and fades out towards the edge: no
    channel changes sign, so the layout reads by the nearest palette colour (`object_layout`), and a
    blur of 3 pixels removes the class.
    Image i is a pure function of (seed, i); a different seed gives a held-out set.
    """

    num_classes, class_names = len(TEXTURE_CLASSES), TEXTURE_CLASSES
    views = 1  # no augmentation: each image has one view (see `ImageFolder.views`)
    tiles = texture_tiles()

    def __init__(self, num_images=10000, image_size=32, seed=0):
        self.num_images, self.image_size, self.seed = num_images, image_size, seed

    def __len__(self):
        return self.num_images

    def layout(self, index):
        """The class-independent part of image `index`: coverage (H, W) of the ellipse, the
        pattern's contrast (H, W) (1 inside, fading to 0 over the outer `fade` pixels), and the
        background and object colours (3,) each."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        size, fade = self.image_size, 2.5
        radii = (0.24 + 0.2 * torch.rand(2, generator=gen)) * size
        centre = radii + (size - 2 * radii) * torch.rand(2, generator=gen)
        coords = (torch.arange(4 * size) + 0.5) / 4  # 4x supersampled, averaged: smooth edges
        dy, dx = torch.meshgrid((coords - centre[0]) / radii[0], (coords - centre[1]) / radii[1],
                                indexing="ij")
        radius = (dy ** 2 + dx ** 2).sqrt()
        average = lambda x: x.view(size, 4, size, 4).mean((1, 3))
        cover = average((radius <= 1).float())
        contrast = average(((1 - radius) * radii.min() / fade).clamp(0, 1))
        background, colour = PALETTE[torch.randperm(len(PALETTE), generator=gen)[:2]]
        return cover, contrast, background, colour

    def draw(self, layout, label):
        """The image (3, H, W) of a layout (`layout`) drawn in class `label`."""
        cover, contrast, background, colour = layout
        # the tile repeated over the whole image, in the grid of D_FM's 4 x 4 pixel patches
        size = self.image_size
        pattern = self.tiles[label].float().repeat(-(-size // 4), -(-size // 4))[:size, :size]
        # the fade keeps the mean: no class at the object's edge
        darkened = 0.5 + (pattern - 0.5) * contrast
        inside = colour[:, None, None] * (1 - 0.7 * darkened)
        return background[:, None, None] * (1 - cover) + inside * cover

    def __getitem__(self, key):
        """key: an index, or (index, augmentation seed) as `TrainingStream` yields
        (no augmentation here)."""
        index = key[0] if isinstance(key, tuple) else key
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} of {self.num_images}")
        label = index % self.num_classes
        return self.draw(self.layout(index), label), label


# the built-in datasets by --data name
BUILTIN_DATA = {"textures": BuiltinTextures}


def open_rgb(path):
    """An image file as 8-bit RGB: 16- and 32-bit greyscale keep their contrast
    (scaled, not clipped), float images are read as [0, 1], transparency is composited
    on white, CMYK and palettes are converted, an animation gives its first frame."""
    with Image.open(path) as image:
        image.seek(0)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            values = np.asarray(image, dtype=np.float64)
            top = 1.0 if image.mode == "F" and values.max() <= 1 else 255.0 if values.max() <= 255 \
                else 65535.0
            scaled = (values.clip(0, top) / top * 255).round().astype(np.uint8)
            return Image.fromarray(scaled).convert("RGB")
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P"
                                                  and "transparency" in image.info):
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
        return image.convert("RGB")


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def resize_short_side(image, size):
    """ADM's resize: halve with a box filter while the image is at least twice too
    large, then bicubic."""
    while min(image.size) >= 2 * size:
        image = image.reduce(2)
    scale = size / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


def center_crop(image, size):
    image = resize_short_side(image, size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_resized_crop(image, size, rng):
    """The tokenizer's augmentation (release): short side uniform in [size, 1.25 size], a random
    crop, a horizontal flip with probability 1/2."""
    image = resize_short_side(image, rng.randint(size, round(1.25 * size)))
    left, top = rng.randint(0, image.width - size), rng.randint(0, image.height - size)
    image = image.crop((left, top, left + size, top + size))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def ten_crop(image, size, view):
    """The AR's augmentation (release): centre crop to 1.1x, then view 0-9 of the ten
    crops (four corners and the centre, of the image and of its mirror image, in
    torchvision's TenCrop order)."""
    image = center_crop(image, int(size * 1.1))
    if view >= 5:
        image, view = image.transpose(Image.FLIP_LEFT_RIGHT), view - 5
    far, mid = image.width - size, round((image.width - size) / 2)
    left, top = [(0, 0), (far, 0), (0, far), (far, far), (mid, mid)][view]
    return image.crop((left, top, left + size, top + size))


def image_files(root):
    """The one image-folder walker (root/<class>/<image>): -> sorted class names, the files as
    (path, label, size, mtime), and how many entries it passed over. Hidden entries (".name") are
    ignored; a link that leads nowhere or in a loop, a name that is not UTF-8 or an entry it may
    not read is passed over (counted); a folder or a class without images is a ValueError."""
    root, passed_over, classes, files = Path(root), 0, [], []
    if not root.is_dir():
        raise ValueError(f"image folder {root} does not exist")

    def entries(folder):
        nonlocal passed_over
        try:
            found = sorted((entry for entry in os.scandir(folder)
                            if not entry.name.startswith(".")), key=lambda entry: entry.name)
        except OSError:
            passed_over += 1
            return []
        named = [entry for entry in found if entry.name.encode("utf-8", "surrogateescape")
                 .decode("utf-8", "replace") == entry.name]
        passed_over += len(found) - len(named)
        return named
    for folder in entries(root):
        try:
            is_class = folder.is_dir()  # follows a link; a broken link or a loop is no folder
        except OSError:
            is_class = False
        if not is_class:
            continue
        images = []
        for entry in entries(folder.path):
            try:
                stat = entry.stat()  # follows a link: a broken one or a loop raises
            except OSError:
                passed_over += 1
                continue
            if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and entry.is_file():
                images.append((Path(entry.path), len(classes), stat.st_size, stat.st_mtime_ns))
        if not images:
            raise ValueError(f"class folder {folder.path} holds no readable images")
        classes.append(folder.name)
        files += images
    if not files:
        raise ValueError(f"{root} holds no images in class sub-folders (expected "
                         f"{root}/<class>/<image>.jpg)")
    return classes, files, passed_over


class ImageFolder(torch.utils.data.Dataset):
    """An ImageNet-style folder (root/<class>/<image>): sorted class names -> labels
    0..C-1, PIL only.

    augment: "tokenizer" (random resized crop + flip), "ar" (one of ten crops at random), or None
    (centre crop). An unreadable or truncated file is skipped -- the next file stands in -- with a
    warning and a count in `skipped` (per process).
    """

    def __init__(self, root, image_size, augment=None):
        if augment not in (None, "tokenizer", "ar"):
            raise ValueError(f"unknown augmentation {augment!r}; use 'tokenizer', 'ar' or None")
        self.root, self.image_size, self.augment = Path(root), image_size, augment
        self.classes, self.files, self.passed_over = image_files(self.root)
        self.num_classes, self.unreadable = len(self.classes), set()
        self.class_names = self.classes

    @property
    def skipped(self):  # how many files were found unreadable (per process), each counted once
        return len(self.unreadable)

    def fingerprint(self):
        """The folder's content as a rerun must find it: the SHA-256 of every image file's path
        (relative to the root: its class), size and modification time."""
        lines = (f"{path.relative_to(self.root)}\t{size}\t{mtime}\n"
                 for path, _, size, mtime in self.files)
        return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()

    @property
    def views(self):  # distinct augmented versions of one image that a codes cache must hold
        return 10 if self.augment == "ar" else 1

    def __len__(self):
        return len(self.files)

    def read(self, index):
        for attempt in range(len(self.files)):
            path, label, *_ = self.files[(index + attempt) % len(self.files)]
            try:
                return open_rgb(path), label
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                if path not in self.unreadable:
                    self.unreadable.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({self.skipped} skipped so "
                                  f"far): {error}")
        raise ValueError(f"no readable image in {len(self.files)} files")

    def __getitem__(self, key):
        """key: an index, or (index, augmentation seed) as `TrainingStream` yields;
        (index, seed, view) picks an AR view explicitly (for a codes cache)."""
        index, seed, *view = key if isinstance(key, tuple) else (key, 0)
        image, label = self.read(index)
        rng = random.Random(seed)
        if self.augment == "tokenizer":
            image = random_resized_crop(image, self.image_size, rng)
        elif self.augment == "ar":
            image = ten_crop(image, self.image_size, view[0] if view else rng.randrange(10))
        else:
            image = center_crop(image, self.image_size)
        return pil_to_tensor(image), label


def stream_seed(seed, position, purpose):
    """A seed for one position of the training stream and one purpose (0 augmentation,
    1 model noise)."""
    return (seed * 1_000_003 + position) * 2 + purpose


class TrainingStream(torch.utils.data.Sampler):
    """Which samples every process sees at every step: a pure function of (seed, step).

    Step s consumes global positions [s GB, (s + 1) GB) of an endless stream (GB = batch x
    grad_accum x world size); position p is sample perm_e[p mod n] of epoch e = p // n, with a
    fresh permutation per epoch. Micro-batch m of rank r takes the slice starting at
    `first_position(s, m)`, so the same samples meet the same augmentation and noise seeds whatever
    the number of processes, and a resumed run continues exactly.
    """

    def __init__(self, num_samples, batch_size, grad_accum, world_size, rank, seed, start_step,
                 num_steps):
        self.n, self.batch_size, self.grad_accum, self.world_size, self.rank = (
            num_samples, batch_size, grad_accum, world_size, rank)
        self.seed, self.start_step, self.num_steps = seed, start_step, num_steps
        self.epoch, self.permutation = None, None

    def first_position(self, step, micro):
        global_batch = self.batch_size * self.grad_accum * self.world_size
        return step * global_batch + (micro * self.world_size + self.rank) * self.batch_size

    def sample_index(self, position):
        epoch, offset = divmod(position, self.n)
        if epoch != self.epoch:
            self.epoch = epoch
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self.permutation = torch.randperm(self.n, generator=generator).tolist()
        return self.permutation[offset]

    def __len__(self):
        return (self.num_steps - self.start_step) * self.grad_accum

    def batches(self, dataset, workers, pin_memory):
        """An iterator over this process's micro-batches of `dataset`, in stream order."""
        return iter(torch.utils.data.DataLoader(dataset, batch_sampler=self, num_workers=workers,
                                                pin_memory=pin_memory))

    def __iter__(self):
        for step in range(self.start_step, self.num_steps):
            for micro in range(self.grad_accum):
                first = self.first_position(step, micro)
                yield [(self.sample_index(p), stream_seed(self.seed, p, 0))
                       for p in range(first, first + self.batch_size)]


def training_batches(args, dataset, world_size, rank, start_step, num_steps):
    """A run's `TrainingStream` (--batch-size x --grad-accum samples a step and process, --seed)
    from `start_step`, and the iterator over its micro-batches of `dataset` (--workers loaders,
    pinned memory where CUDA is used)."""
    stream = TrainingStream(len(dataset), args.batch_size, args.grad_accum, world_size, rank,
                            args.seed, start_step, num_steps)
    pin_memory = args.device != "cpu" and torch.cuda.is_available()
    return stream, stream.batches(dataset, args.workers, pin_memory)


# ---- command lines -------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse, with every error as one line `script: error: --flag ...` (exit code 2),
    before any work."""

    def __init__(self, description):
        super().__init__(description=description, allow_abbrev=False,
                         formatter_class=argparse.RawDescriptionHelpFormatter)

    def parse_args(self, argv=None):
        """-> the arguments, with `given`: the dests of the flags the command line names."""
        argv = sys.argv[1:] if argv is None else list(argv)
        args = super().parse_args(argv)
        actions = self._option_string_actions
        args.given = {actions[word.split("=")[0]].dest for word in argv
                      if word.startswith("-") and word.split("=")[0] in actions}
        return args

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message.removeprefix('argument ')}\n")


class BadInput(SystemExit):
    """A bad input found after parsing: the scripts print its one line and exit with code 2,
    as argparse does."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def command_line(run):
    """Run a script's work; a BadInput ends it with its one line on stderr and exit code 2."""
    try:
        return run()
    except BadInput as error:
        sys.exit(print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr) or 2)


def write_atomically(path, content):
    """Every file the project writes goes through here: a temporary file in the same folder, then
    a rename, so that a kill never leaves it half written and a symlink at `path` is replaced, not
    its target. content: a text, or write(file) that writes the bytes to an open binary file."""
    path = Path(path)
    if not path.name:
        raise ValueError("an empty path names no file")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w" if isinstance(content, str) else "wb") as file:
            file.write(content) if isinstance(content, str) else content(file)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_picture(image, path, **options):
    """A PIL image to `path` (its format from the suffix: PNG, GIF, ...), atomically, and marked
    as the project's: PNG text "Software" or a GIF comment reads `PICTURE_MARK` (`is_ours`)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    png_mark = PngImagePlugin.PngInfo()
    png_mark.add_text("Software", PICTURE_MARK)
    mark = {"PNG": {"pnginfo": png_mark}, "GIF": {"comment": PICTURE_MARK.encode()}}.get(fmt, {})
    write_atomically(path, lambda file: image.save(file, format=fmt, **mark, **options))


PICTURE_MARK = "D-AR reference (dar.save_picture)"


def is_ours(path):
    """Whether the file at `path` is a picture that `save_picture` wrote: the pictures of
    sample.py replace only those."""
    try:
        with Image.open(path) as image:
            marks = image.info.get("Software"), image.info.get("comment", b"").decode("latin-1")
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return PICTURE_MARK in marks


def check_record(path, settings, what):
    """A resumable output's record: `settings` (plain values) written to `path` on first use; a
    later run with other settings, or a damaged record, is refused with one line."""
    path, settings = Path(path), json.loads(json.dumps(settings))  # as the file holds them
    if not path.exists():
        return write_atomically(path, json.dumps(settings, indent=1, sort_keys=True))
    try:
        recorded = json.loads(path.read_text())
        changed = [key for key in sorted({*recorded, *settings})
                   if recorded.get(key) != settings.get(key)]
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError):
        raise BadInput(f"{what}: its record {path} is empty or damaged; delete it (and what it "
                       "describes) to start afresh") from None
    if changed:
        raise BadInput(f"{what} was made with {changed[0]} = {recorded.get(changed[0])!r}, this "
                       f"run has {settings.get(changed[0])!r}; keep the settings, or choose "
                       "another folder")


def claim_run_folder(out, checkpoint, resume, overwrite):
    """A training run owns its --out (`lock_folder`); a checkpoint there is continued (--resume) or
    replaced (--overwrite), never silently."""
    if resume and not checkpoint.is_file():
        raise BadInput(f"--resume: no checkpoint at {checkpoint}")
    if checkpoint.exists() and not (resume or overwrite):
        raise BadInput(f"--out {out} already holds {checkpoint}: pass --resume to continue it or "
                       "--overwrite to start afresh")
    lock_folder(out, "--out")
    for old in [out / "learning_curve.tsv", *out.glob("reconstructions_*.png"),
                *out.glob("samples_*.png")] if overwrite else []:
        old.unlink(missing_ok=True)  # afresh: the old run's records and pictures go with it


def lock_folder(folder, flag):
    """Make `folder` this run's: its .lock names the host, process and start time of the run that
    holds it. A live run on this host refuses a second (naming it), a lock of another host names the
    file to delete, and a lock of an ended run is taken over. -> release(), also called at exit."""
    folder, lock = Path(folder), Path(folder) / ".lock"
    me = [socket.gethostname(), str(os.getpid()), process_started(os.getpid())]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        try:  # created only if absent: of two runs starting together, one wins
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            holder = lock.read_text().split()
            if len(holder) == 3 and holder[0] != me[0]:
                raise BadInput(f"{flag} {folder} is locked by process {holder[1]} on {holder[0]}; "
                               f"if that run has ended, delete {lock}") from None
            if len(holder) == 3 and holder != me and process_started(int(holder[1])) == holder[2]:
                raise BadInput(f"{flag} {folder} is in use by process {holder[1]} (lock {lock}); "
                               f"wait for it or choose another {flag}") from None
        write_atomically(lock, " ".join(me) + "\n")
    except OSError as error:
        raise BadInput(f"{flag} {folder} is not writable ({error.strerror})") from None

    def release():
        if lock.exists() and lock.read_text().split() == me:
            lock.unlink()
    atexit.register(release)
    return release


def process_started(pid):
    """When process `pid` started (clock ticks after boot, from /proc; a PID that a new process
    reuses gets another start time), "" if it is not running. Without /proc: "alive" or ""."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        if Path("/proc/self/stat").exists():
            return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass  # alive, another user's
    return "alive" if pid > 0 else ""


def flag_type(low=None, high=None, low_open=False, high_open=False, integer=False):
    """An argparse type: a finite number (an integer with `integer`) in [low, high], an end open
    where said; else one line that names the range: "must be a finite number >= 0, got 'x'"."""
    bounds = [f"{'>' if low_open else '>='} {low}"] * (low is not None) + \
        [f"{'<' if high_open else '<='} {high}"] * (high is not None)
    range_text = " ".join(["an integer" if integer else "a finite number", " and ".join(bounds)])

    def parse(text):
        try:
            number = int(text) if integer else float(text)
        except ValueError:
            number = math.nan
        finite = isinstance(number, int) or math.isfinite(number)  # a huge int: no float
        below = low is not None and (number < low or low_open and number == low)
        above = high is not None and (number > high or high_open and number == high)
        if not finite or below or above:
            raise argparse.ArgumentTypeError(f"must be {range_text.strip()}, got {text!r}")
        return number
    parse.__name__ = "integer" if integer else "number"
    return parse


COUNT, SIZE = flag_type(0, integer=True), flag_type(1, integer=True)  # counts from 0, sizes from 1
SEED = flag_type(0, 2 ** 32 - 1, integer=True)  # the seeds derived from it stay below 2^63
RATE, WEIGHT = flag_type(0, low_open=True), flag_type(0)                # > 0, >= 0
SCALE = flag_type(0, 100)  # a guidance scale or a temperature: beyond 100 the logits overflow
FRACTION = flag_type(0, 1, high_open=True)                              # [0, 1)


# ---- checkpoints and pairs -----------------------------------------------------------------------

class _ForeignObject:
    """Stand-in for classes that official files pickle but we do not have (config_util.Config): it
    only receives the pickled attributes; no code of the file runs."""


def load_checkpoint_file(path, mmap=True):
    """torch.load with weights_only=True, allowing only plain data plus the two foreign
    objects the official files contain: an argparse.Namespace and a config_util.Config
    (read as plain attributes)."""
    allowed = [argparse.Namespace, (_ForeignObject, "config_util.Config")]
    legacy = not zipfile.is_zipfile(path)  # torch's legacy (non-zip) format: no memory map
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and not legacy)
    except OSError:
        raise
    except Exception as error:  # on arbitrary bytes torch's unpickler raises anything
        # a real checkpoint that pickles an object we do not allow
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            raise ValueError(f"{path} holds {found[1]}, an object other than tensors and plain "
                             "values; refused") from None
        raise ValueError(f"{path} is not a PyTorch checkpoint (truncated, or another kind of "
                         f"file)") from None


def load_state_strict(model, state, what):
    """load_state_dict that names the first missing key, unexpected key, shape mismatch or tensor
    that is not finite (a damaged or diverged file)."""
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            raise ValueError(f"{what}: missing key {key!r}")
    for key, tensor in state.items():
        if key not in expected:
            raise ValueError(f"{what}: unexpected key {key!r}")
        if tensor.shape != expected[key].shape:
            raise ValueError(f"{what}: key {key!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
        if tensor.is_floating_point() and not tensor.isfinite().all():
            raise ValueError(f"{what}: {key!r} holds values that are not finite (NaN or inf)")
    model.load_state_dict(state)


# ---- the release's files and configurations (read by the loaders) -------------------------------

def check_config(cfg):
    """A TokenizerConfig or ARConfig read from a file must build a working model: a ValueError
    names the first field that cannot."""
    if isinstance(cfg, ARConfig):
        problems = [(cfg.dim % cfg.num_heads or cfg.dim // cfg.num_heads % 2,
                     f"dim {cfg.dim} must split into num_heads {cfg.num_heads} of even width")]
    else:
        grid, steps = cfg.image_size // cfg.pixel_patch_size, cfg.num_denoising_steps
        problems = [(cfg.num_tokens % cfg.num_groups,
                     "num_tokens must be a multiple of num_groups"),
                    (steps is not None and (not isinstance(steps, int) or steps < 1),
                     "num_denoising_steps must be an integer >= 1"),
                    (cfg.image_size % cfg.patch_size or cfg.image_size % cfg.pixel_patch_size,
                     "image_size must be a multiple of patch_size and of pixel_patch_size"),
                    (any(width % cfg.head_dim for width in (cfg.encoder_dim, cfg.decoder_dim,
                                                            cfg.diffusion_dim)) or cfg.head_dim % 4,
                     "the widths must be multiples of head_dim, itself a multiple of 4 (2D RoPE)"),
                    (cfg.num_tokens > cfg.table_size, "num_tokens must not exceed table_size"),
                    (cfg.uses_repa and grid % cfg.repa_grid,
                     "the pixel token grid must be a multiple of repa_grid")]
    for bad, message in problems:
        if bad:
            raise ValueError(f"{message}; got {cfg}")


def official_tokenizer_config(model):
    """The `model:` section of an official tokenizer config (plain dict) -> TokenizerConfig."""
    diff, steps = model["diff_decoder"], model.get("num_denoising_steps",
                                                   model["num_query_groups"])
    unsupported = {
        "vq_enable": (model.get("vq_enable", True), True),
        "query_low_rank": (model.get("query_low_rank", True), True),
        "diff_decoder.mlp_head": (diff.get("mlp_head", False), False),
        "diff_decoder.share_time_encoding": (diff.get("share_time_encoding", False), False),
        "queries_per_step": (model["queries_per_step"],
                             model["num_all_queries"] // model["num_query_groups"]),
        "diff_decoder.cond_dim": (diff["cond_dim"], model["decoder_dim"]),
    }
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise ValueError(f"official tokenizer config {key}={value!r} is not supported "
                             f"(expected {supported!r})")
    return TokenizerConfig(
        image_size=model.get("sampling_resolution", 256),
        patch_size=model["encoder_patch_size"],
        encoder_dim=model["encoder_dim"], encoder_depth=model["num_encoder_layers"],
        num_tokens=model["num_all_queries"], num_groups=model["num_query_groups"],
        num_denoising_steps=None if steps == model["num_query_groups"] else steps,
        codebook_size=model["vq_codebook_size"], codebook_dim=model["vq_dim"],
        decoder_dim=model["decoder_dim"], decoder_depth=model["num_decoder_layers"],
        diffusion_dim=diff["dim"], diffusion_depth=diff["depth"],
        pixel_patch_size=diff["patch_size"],
        data_std=diff["data_std"], time_shift=diff["time_shift"],
        repa_layer=diff.get("repa_layer", 8), rope_theta=model.get("rope_base_len", 10000.0),
    )


# official tokenizer key prefix -> ours (the release's 1x1 convolutions are per-token linear maps
# here)
OFFICIAL_TOKENIZER_KEYS = {
    "diff_decoder.net.conv_in.": "diffusion.pixel_in.",
    "diff_decoder.net.conv_out.": "diffusion.pixel_out.", "diff_decoder.net.": "diffusion.",
    "quant_in_conv.": "quant_in.", "quant_out_conv.": "quant_out.",
    "quantize.embedding.": "quantizer.codebook.",
}
# training statistics of the release (a FIFO of recently used codes); no effect on any output
OFFICIAL_TOKENIZER_IGNORED = {"quantize.codebook_used"}


def convert_official_tokenizer_state(state):
    """Rename official tokenizer keys to ours; 1x1 conv weights (out, in, 1, 1) become
    Linear (out, in)."""
    converted = {}
    for key, tensor in state.items():
        key = key.removeprefix("_orig_mod.").removeprefix("module.")
        if key in OFFICIAL_TOKENIZER_IGNORED:
            continue
        for official, ours in OFFICIAL_TOKENIZER_KEYS.items():
            if key.startswith(official):
                key = ours + key[len(official):]
                break
        one_by_one = tensor.dim() == 4 and tensor.shape[2:] == (1, 1)
        converted[key] = tensor.flatten(1) if one_by_one else tensor
    return converted


# official GPT key prefix -> ours (LlamaGen's names are kept everywhere else)
OFFICIAL_AR_KEYS = {"cls_embedding.embedding_table.": "class_embedding."}


def official_ar_state(ckpt):
    """The state dict inside an official AR file, read as the official sampler does
    (`model`, then `module`, then `state_dict`, then the file itself), with compile/DDP
    prefixes stripped and keys renamed."""
    state = next((ckpt[key] for key in ("model", "module", "state_dict")
                  if isinstance(ckpt.get(key), dict)), ckpt)
    converted = {}
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"not an AR state dict: entry {key!r} is a {type(tensor).__name__}, "
                             "not a tensor")
        key = key.removeprefix("_orig_mod.").removeprefix("module.")
        for official, ours in OFFICIAL_AR_KEYS.items():
            if key.startswith(official):
                key = ours + key[len(official):]
        converted[key] = tensor
    return converted


def infer_ar_config(state, head_dim=64, num_tokens=256):
    """An ARConfig from the weight shapes, assuming `head_dim`-wide heads and N = `num_tokens`
    (neither is stored in the weights; both hold for every released model)."""
    if "tok_embeddings.weight" not in state or "class_embedding.weight" not in state:
        raise ValueError("not an AR state dict: no token or class embedding")
    vocab_size, dim = state["tok_embeddings.weight"].shape
    depth = len({key.split(".")[1] for key in state if key.startswith("layers.")})
    return ARConfig(dim=dim, depth=depth, num_heads=dim // head_dim, vocab_size=vocab_size,
                    num_tokens=num_tokens, num_classes=state["class_embedding.weight"].shape[0] - 1)


# How a checkpoint of ours that names a "builder" makes its untrained model: builder(cfg, recipe) ->
# Tokenizer. The release's architecture needs none; the CPU miniature at the end of this file
# registers its own.
TOKENIZER_BUILDERS = {}


def load_tokenizer(path, device="cpu"):
    """Load a tokenizer checkpoint -- ours or an official release file (detected) -- in eval mode.

    Ours: {"kind": "tokenizer", "config": dict, "model": state, optional "ema": state,
    optional "builder" (a name in TOKENIZER_BUILDERS) and "recipe" (a plain dict it reads)}.
    Official (`D-AR-tokenizer_v1.pt`): {"model", "ema", "config": config_util.Config, "args",
    ...}; the configuration is read from the file. Both use the EMA weights when present, as
    the official sampler does.
    """
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a tokenizer checkpoint (no 'model' and 'config' entries)")
    weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    if isinstance(ckpt["config"], _ForeignObject):                     # an official release file
        model_config = getattr(ckpt["config"], "_data", {}).get("model")
        if not isinstance(model_config, dict) or "diff_decoder" not in model_config:
            raise ValueError(f"{path}: its config has no tokenizer 'model' section; not a "
                             "tokenizer checkpoint")
        cfg = official_tokenizer_config(model_config)
        weights = convert_official_tokenizer_state(weights)
    elif ckpt.get("kind") == "tokenizer" and isinstance(ckpt["config"], dict):
        unknown = set(ckpt["config"]) - {f.name for f in fields(TokenizerConfig)}
        if unknown:
            raise ValueError(f"{path}: unknown tokenizer config keys {sorted(unknown)}")
        cfg = TokenizerConfig(**ckpt["config"])
    else:
        raise ValueError(f"{path} is not a tokenizer checkpoint (kind={ckpt.get('kind')!r})")
    if not any(key.startswith("diffusion.repa_out.") for key in weights):
        cfg = replace(cfg, repa_dim=0)  # the REPA head is a training aid; files may omit it
    check_config(cfg)
    builder = ckpt.get("builder")
    if builder is not None and builder not in TOKENIZER_BUILDERS:
        raise ValueError(f"{path}: unknown tokenizer builder {builder!r}; known: "
                         f"{sorted(TOKENIZER_BUILDERS)}")
    tokenizer = TOKENIZER_BUILDERS[builder](cfg, ckpt.get("recipe", {})) if builder \
        else Tokenizer(cfg)
    load_state_strict(tokenizer, weights, f"tokenizer checkpoint {path}")
    # what `check_pair` compares with an AR model's record: the file's SHA-256, computed on first
    # use, once per version of the file
    tokenizer.file, tokenizer.digest = Path(path), functools.partial(cached_digest, path)
    return tokenizer.to(device).eval()


def load_ar(path, config=None, device="cpu"):
    """Load an AR checkpoint -- ours or an official release file (detected) -- in eval mode.

    Ours: {"kind": "ar", "config": dict, "model": state, optional "ema": state}; uses "ema"
    when present. Official (`D-AR-L-360K.pt`, ...): the configuration is not stored; `config`
    (an ARConfig or a preset name) gives it, else it is inferred from the shapes with 64-wide
    heads and N = 256.
    """
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not an AR checkpoint (a {type(ckpt).__name__}, not a dict)")
    if ckpt.get("kind") == "ar":
        if config is not None:
            raise ValueError(f"{path} stores its own configuration; do not pass `config`")
        unknown = set(ckpt["config"]) - {f.name for f in fields(ARConfig)}
        if unknown:
            raise ValueError(f"{path}: unknown AR config keys {sorted(unknown)}")
        cfg = ARConfig(**ckpt["config"])
        weights = ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]
    elif "kind" in ckpt or isinstance(ckpt.get("config"), _ForeignObject):
        raise ValueError(f"{path} is not an AR checkpoint (it is a {ckpt.get('kind', 'tokenizer')} "
                         "checkpoint)")
    else:
        weights = official_ar_state(ckpt)
        if isinstance(config, str):
            if config not in AR_PRESETS:
                raise ValueError(f"unknown AR preset {config!r}; choose one of "
                                 f"{sorted(AR_PRESETS)}")
            config = AR_PRESETS[config]
        cfg = config or infer_ar_config(weights)
    check_config(cfg)
    model = LlamaAR(cfg)
    load_state_strict(model, weights, f"AR checkpoint {path}")
    # ours: the tokenizer it learned; release: None
    model.codes_of = read_tokenizer_record(ckpt.get("tokenizer"), path)
    model.file, model.class_names = Path(path), ckpt.get("classes")  # ours: the data's class names
    return model.to(device).eval()


def check_pair(ar, tokenizer):
    """An AR model writes a tokenizer's codes only if its vocabulary and length are the tokenizer's
    V and N, and (where both were loaded from our files) only the codes of the tokenizer file it
    learned: the loaders give the AR model `codes_of` (its record of that file) and the tokenizer
    `digest()` (its file's SHA-256)."""
    if (ar.cfg.vocab_size, ar.cfg.num_tokens) != (tokenizer.cfg.codebook_size,
                                                  tokenizer.cfg.num_tokens):
        raise ValueError(f"the AR model ({ar.cfg.vocab_size} ids, {ar.cfg.num_tokens} tokens) does "
                         f"not match the tokenizer ({tokenizer.cfg.codebook_size} ids, "
                         f"{tokenizer.cfg.num_tokens} tokens)")
    learned, digest = getattr(ar, "codes_of", None), getattr(tokenizer, "digest", None)
    if learned and digest and digest() != learned["sha256"]:
        raise ValueError(f"the AR model learned the codes of {learned['path']} (sha256 "
                         f"{learned['sha256'][:12]}), not of {tokenizer.file} ({digest()[:12]}): "
                         "pass the tokenizer it learned")


def file_digest(path):
    """The SHA-256 of a file's bytes: what identifies a checkpoint in the records
    of resumable outputs."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_record(tokenizer_path, holder_path):
    """What an AR checkpoint at `holder_path` records of the tokenizer whose codes it learns: the
    file's SHA-256 and its path relative to the checkpoint's folder (so the pair stays a pair when
    both move together)."""
    return {"path": os.path.relpath(Path(tokenizer_path).resolve(),
                                    Path(holder_path).resolve().parent),
            "sha256": cached_digest(tokenizer_path)}


def read_tokenizer_record(record, holder_path):
    """A `tokenizer_record` read from the checkpoint at `holder_path` -> {"path": where it points,
    "sha256"}, or None."""
    if record is None:
        return None
    return {"path": Path(os.path.normpath(Path(holder_path).parent / record["path"])),
            "sha256": record["sha256"]}


_DIGESTS = {}


def cached_digest(path):
    """`file_digest`, computed once per version of the file (its path, inode, size
    and change times)."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


# ---- training ------------------------------------------------------------------------------------

def add_training_flags(parser, recipes):
    """The flags both training scripts share; -> the recipe group, to which a script adds its
    own. The recipe flags' defaults are RECIPES[--config]'s, set by `finish_training_flags`
    (--help shows them)."""
    parser.add_argument("--config", default="tiny", choices=list(recipes))
    parser.add_argument("--data", default="textures",
                        help="'textures' (the built-in data) or an ImageNet-style folder")
    parser.add_argument("--builtin-size", type=SIZE, default=10000,
                        help="images in the built-in dataset")
    parser.add_argument("--out", default=None, help="output folder (default out/<config>)")
    recipe = parser.add_argument_group("recipe (default: RECIPES[--config])")
    recipe.add_argument("--batch-size", type=SIZE, help="per process")
    recipe.add_argument("--grad-accum", type=SIZE)
    recipe.add_argument("--lr", type=RATE)
    recipe.add_argument("--ema", type=FRACTION, help="EMA decay in [0, 1) (0: no EMA)")
    recipe.add_argument("--weight-decay", type=WEIGHT, help="AdamW weight decay")
    run = parser.add_argument_group("the run")
    run.add_argument("--betas", type=FRACTION, nargs=2, default=(0.9, 0.95),
                     help="AdamW betas (release)")
    run.add_argument("--grad-clip", type=RATE, default=1.0,
                     help="global grad-norm clip (release: 1.0)")
    run.add_argument("--seed", type=SEED, default=0)
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                     help="TF32 matmuls on CUDA")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--workers", type=COUNT, default=0,
                     help="data-loading processes per training process")
    run.add_argument("--log-every", type=SIZE, default=100)
    run.add_argument("--sample-every", type=SIZE, default=250,
                     help="write a picture every N steps and at the end")
    run.add_argument("--save-every", type=SIZE, default=500)
    run.add_argument("--resume", action="store_true", help="continue the checkpoint in --out, with "
                     "the same settings; only these may change: --steps or --epochs (to extend), "
                     "--workers, --device, --compile, --tf32, --grad-checkpointing, --export and "
                     "the flags of logging, pictures and evaluation")
    run.add_argument("--overwrite", action="store_true",
                     help="start afresh over the checkpoint in --out")
    run.add_argument("--export", metavar="PATH",
                     help="at the end, also write the EMA weights alone in half "
                     "precision to PATH, a small file to share (with --resume at the last step: "
                     "export only)")
    return recipe


def finish_training_flags(parser, argv, recipes, script, checkpoint_name):
    """Parse, with the recipe flags defaulting to RECIPES[--config] (`--config v1 --help` shows
    them); record the command and the resolved --data folder; refuse what is in the way."""
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default="tiny")  # an unknown one: the parser below says so
    recipe = recipes.get(config.parse_known_args(argv)[0].config, {})
    parser.set_defaults(**recipe)
    for action in parser._actions:
        if action.dest in recipe:
            action.help = f"{action.help or ''} (default: %(default)s)".lstrip()
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])
    args.out, folder = Path(args.out or f"out/{args.config}"), args.data not in BUILTIN_DATA
    export, checkpoint = Path(args.export or "."), args.out / checkpoint_name
    for bad, message in (
            (folder and not Path(args.data).is_dir(), f"--data: no folder {args.data} (an "
             "ImageNet-style folder, or 'textures')"),
            (folder and "builtin_size" in args.given, "--builtin-size sizes the built-in data; "
             "--data names a folder"),
            (args.out.exists() and not args.out.is_dir(), f"--out {args.out} is a file, not a "
             "folder"),
            (args.resume and args.overwrite, "--resume continues the checkpoint, --overwrite "
             "replaces it: give one"),
            (args.export and (export.is_dir() or export.suffix != ".pt"), f"--export "
             f"{args.export}: expected a file name ending in .pt"),
            (args.export and export.resolve() == checkpoint.resolve(), f"--export {export} is the "
             "run's training checkpoint; name another file"),
            (args.export and export.exists() and exported_from(export) != checkpoint.resolve(),
             f"--export {export} exists and is not an export of {checkpoint}; name another file, "
             "or move it away")):
        if bad:
            parser.error(message)
    args.data = str(Path(args.data).resolve()) if folder else args.data  # a resume from elsewhere
    return args


def exported_from(path):
    """The training checkpoint an export of ours was made from (its record, relative to the
    export's folder), as an absolute path; else None."""
    try:
        recorded = load_checkpoint_file(path).get("exported_from")
    except (ValueError, OSError, AttributeError):
        return None
    return (Path(path).resolve().parent / recorded).resolve() if recorded else None


def training_setup(args, checkpoint_path):
    """Processes, device and precision of a training run: -> rank, world size, device, the autocast
    context (bf16 on CUDA, none on the CPU, where fp32 keeps runs exact), a rank-0 log function.
    Rank 0 claims --out (`claim_run_folder`); the initial weights are seeded."""
    rank, world_size, device = setup_distributed(args.device)
    if rank == 0:
        claim_run_folder(args.out, checkpoint_path, args.resume, args.overwrite)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" \
        else contextlib.nullcontext()
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)
    args.world_size = world_size  # recorded: the stream of samples depends on it
    torch.manual_seed(args.seed)  # the initial weights; the training stream seeds itself per step
    return rank, world_size, device, autocast, log


def training_images(args, image_size, augment):
    """--data: the built-in textures (--builtin-size of seed --seed) or an image folder with the
    `augment` of `ImageFolder`; a folder without readable images ends the run with one line."""
    if args.data in BUILTIN_DATA:
        return BUILTIN_DATA[args.data](args.builtin_size, image_size, seed=args.seed)
    try:
        dataset = ImageFolder(args.data, image_size, augment=augment)
        dataset.read(0)
    except ValueError as error:
        raise BadInput(f"--data {args.data}: {error}") from None
    return dataset


def finish_training(args, checkpoint_path, rank, world_size, log):
    """The end of a training run: --export's small file, and the process group
    closed under torchrun."""
    log(f"saved {checkpoint_path}")
    if args.export and rank == 0:
        export_weights(checkpoint_path, args.export, args.command)
        log(f"exported the weights to {args.export}")
    if world_size > 1:
        torch.distributed.destroy_process_group()


class StepLog:
    """The training log and its progress bar: every `every` steps (and at step `total`) a line of
    the step's losses, the learning rate and the images per second since the last line. Reading the
    losses is the step's one host sync; a loss that is no longer finite stops the run there."""

    def __init__(self, log, every, start, total, disable):
        self.log, self.every, self.total = log, every, total
        self.progress = tqdm(initial=start, total=total, disable=disable, dynamic_ncols=True)
        self.start, self.images = time.time(), 0

    def __call__(self, done, images, losses, lr):
        self.images += images
        self.progress.update()
        if done % self.every and done != self.total:
            return
        terms = {name: float(value.detach()) for name, value in losses.items()}
        if not all(math.isfinite(value) for value in terms.values()):
            raise BadInput(f"step {done}: a loss is no longer finite ({terms}); stopping before "
                           "the next save (try a lower --lr)")
        rate = self.images / (time.time() - self.start)
        self.progress.set_postfix({name: f"{value:.3f}" for name, value in terms.items()})
        self.log(f"step {done}: " + " ".join(f"{name} {value:.4f}" for name, value in terms.items())
                 + f" lr {lr:.2e} {rate:.1f} img/s")
        self.start, self.images = time.time(), 0

    def close(self):
        self.progress.close()


def save_checkpoint(checkpoint, path):
    """torch.save through `write_atomically`: a crash never leaves a broken checkpoint."""
    write_atomically(path, lambda file: torch.save(checkpoint, file))


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, over parameters (as released; no
    buffer is persistent)."""
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param.detach(), 1 - decay)


def setup_distributed(device="auto"):
    """-> (rank, world_size, device). Launched by torchrun (RANK set): DDP, NCCL on CUDA and gloo on
    CPU. Otherwise one plain process and no torch.distributed call at all."""
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: this machine has no CUDA device that torch can use "
                       f"(torch {torch.__version__}); use --device cpu")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not use_cuda:
        return rank, world_size, torch.device("cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    return rank, world_size, torch.device("cuda", local_rank)


def gradient_sync(trained, sync):
    """The context of one micro-step's forward and backward: under DDP, `no_sync()` unless `sync`
    (gradients are all-reduced in the last micro-step of a step only); a plain model: nothing."""
    ddp = isinstance(trained, torch.nn.parallel.DistributedDataParallel)
    return trained.no_sync() if ddp and not sync else contextlib.nullcontext()


def wrap_for_training(model, compile_model, world_size, device, find_unused_parameters=False):
    """The module the training step calls: optionally compiled, DDP-wrapped under torchrun.
    Checkpoints are taken from `model` itself, so they never carry `_orig_mod.` or `module.`
    prefixes. find_unused_parameters: some parameters get no gradient in some steps."""
    trained = torch.compile(model) if compile_model else model
    if world_size > 1:
        trained = torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters)
    return trained


def save_training_checkpoint(path, kind, cfg, model, ema, optimizer, step, args, **entries):
    """What the training scripts save (`save_checkpoint`): tensors and plain values only
    (the seed replaces RNG states, since every random draw of training is seeded by the
    position of its samples in the stream); `entries` adds a script's own. Weights that are
    no longer finite are never saved: the run stops with one line naming the last finite
    checkpoint, kept on disk."""
    weights = [model.state_dict(), ema.state_dict() if ema is not None else {}]
    if not all_finite(weights):  # one host read per save
        last = f"{path} (step {load_checkpoint_file(path)['step']})" if Path(path).exists() \
            else "none was saved"
        raise BadInput(f"step {step}: the weights are no longer finite (the run diverged; try a "
                       f"lower --lr); nothing saved, the last finite checkpoint is {last}")
    save_checkpoint({"kind": kind, "config": asdict(cfg), "model": weights[0],
                     **({"ema": weights[1]} if ema is not None else {}),
                     "optimizer": optimizer.state_dict(), "step": step, "seed": args.seed,
                     "args": {key: setting_text(value) for key, value in vars(args).items()},
                     **entries}, path)


def all_finite(states):
    """Whether every floating-point tensor of these state dicts is finite (one host read)."""
    tensors = [t for state in states for t in state.values() if t.is_floating_point()]
    return not tensors or bool(torch.stack([t.isfinite().all() for t in tensors]).all())


# what a shared file keeps of a training checkpoint, besides the weights
EXPORTED_ENTRIES = ("kind", "config", "step", "builder", "recipe", "tokenizer", "classes")


def export_weights(checkpoint_path, path, command):
    """Write a training checkpoint as a small file to share: the EMA weights
    alone (the model's where the run kept no EMA), floats in half precision
    (the loaders cast them back to float32), the entries that say how to build
    the model, the arguments of the training run and `command`, the invocation
    that exported it. No optimizer state, and nothing that only training uses."""
    checkpoint = load_checkpoint_file(checkpoint_path)
    weights = checkpoint.get("ema") or checkpoint["model"]
    # an AR model's tokenizer, its path now relative to the exported file
    if "tokenizer" in checkpoint:
        learned = read_tokenizer_record(checkpoint["tokenizer"], checkpoint_path)
        checkpoint["tokenizer"] = {**checkpoint["tokenizer"], "path": os.path.relpath(
            learned["path"].resolve(), Path(path).resolve().parent)}
    save_checkpoint({**{key: checkpoint[key] for key in EXPORTED_ENTRIES if key in checkpoint},
                     "model": {key: value.half() if value.is_floating_point() else value for key,
                               value in weights.items()},
                     "training_args": checkpoint["args"], "command": command,
                     "exported_from": os.path.relpath(Path(checkpoint_path).resolve(),
                                                      Path(path).resolve().parent)}, path)


def training_checkpoint(path, kind, args):
    """The checkpoint that --resume continues: one of `kind` written by `save_training_checkpoint`,
    trained with this run's settings (`check_same_run`); else a ValueError naming what it is."""
    try:
        checkpoint = load_checkpoint_file(path, mmap=False)  # the optimizer state changes in place
    except ValueError as error:
        raise ValueError(f"--resume: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != kind \
            or "optimizer" not in checkpoint:
        found = checkpoint.get("kind", "no kind") if isinstance(checkpoint, dict) \
            else type(checkpoint).__name__
        no_optimizer = isinstance(checkpoint, dict) and "optimizer" not in checkpoint
        raise ValueError(f"--resume: {path} is not a {kind} training checkpoint (it is {found!r}"
                         f"{', without optimizer state' if no_optimizer else ''})")
    check_same_run(checkpoint.get("args", {}), args, path)
    return checkpoint


def resume_training(checkpoint, path, model, ema, optimizer):
    """Load a `training_checkpoint` read from `path` into model, ema (or None) and optimizer; a
    wrong file: ValueError naming its first bad key."""
    load_state_strict(model, checkpoint["model"], f"--resume {path}")
    if ema is not None:
        load_state_strict(ema, checkpoint["ema"], f"--resume {path} (EMA)")
    optimizer.load_state_dict(checkpoint["optimizer"])


# what a resumed run may change: how long it runs (--steps, --epochs), what it logs, draws and
# measures, how it loads data and runs (--workers, --device, --compile), and the files it names
RESUMABLE = ("steps", "epochs", "log_every", "sample_every", "save_every", "eval_every",
             "eval_images", "probe_images", "evaluator", "eval_samples", "sample_guidance",
             "workers", "device", "compile", "tf32", "grad_checkpointing", "export", "resume",
             "overwrite", "out", "tokenizer", "tokenizer_choice", "cache_codes", "command", "given")


def setting_text(value):
    """A setting as a checkpoint records it (a tuple and a list alike)."""
    return str(list(value)) if isinstance(value, (tuple, list)) else str(value)


def check_same_run(recorded, args, path):
    """--resume continues the same run: every setting outside `RESUMABLE` must be the one the
    checkpoint recorded, else one line names the flag and both values."""
    for key, value in sorted(vars(args).items()):
        was = recorded.get(key, setting_text(value)).replace("(", "[").replace(")", "]")
        if key not in RESUMABLE and was != setting_text(value):
            flag = "--" + key.replace("_", "-")
            raise BadInput(f"--resume: {path} was trained with {flag} {recorded[key]}, this run "
                           f"has {flag} {setting_text(value)}; resume with the same settings, or "
                           "start afresh with --overwrite")


def ar_optimizer(model, lr, betas, weight_decay):
    """AdamW as the paper trains the AR model: weight decay on matrices and embeddings, none
    on norm weights."""
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    not_decayed = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                              {"params": not_decayed, "weight_decay": 0.0}], lr=lr,
                              betas=tuple(betas))


# ================================================================================================
#  The CPU miniature: not part of the paper or the release
#  What the `tiny` recipe adds so that a tokenizer learns 32 x 32 textures on 2 CPU cores (a conv
# stem, its initialisation, codebook restarts, LPIPS's form on a toy teacher from group k on),
# and a toy evaluator of the built-in textures (a classifier, the layout reader, a Frechet distance)
# Nothing above  this banner uses anything below it; the paper's configs never need it.
# ================================================================================================

# the committed tiny pair and toy evaluator (made by the scripts; weights/tiny/README.md: how)
SHIPPED_TINY = Path(__file__).resolve().parent / "weights" / "tiny"

# data seeds: the evaluator learns from its own images, the real side of a toy FID is a third set,
# the teacher learns from a fourth; none is the seed-0 set that the tokenizer and the AR model learn
# from
EVALUATOR_TRAIN_SEED, EVALUATOR_REFERENCE_SEED, TEACHER_TRAIN_SEED = 1, 2, 7


@dataclass
class MiniatureRecipe:
    """The tiny tokenizer's departures from the release; each is a training aid of
    the CPU miniature."""
    conv_stem: bool = True  # patches embedded by a small CNN (release: one strided convolution)
    # the blocks' Linear init (release: 0.02, which at width 128 leaves the codes image-independent)
    init_std: float = 0.1
    # residual gates open at init (release: 0, every block starts as the identity)
    gate_init: float = 1.0
    # every N steps, re-seed the codebook rows no token chose (release: never)
    codebook_restart: int = 100


def conv_stem(patch_size, dim, width=32):
    """A patch embedding for tiny images: a 3x3 convolution, then log2(patch_size) stride-2 3x3
    convolutions to `dim` channels, the same grid as the release's single patch_size x patch_size
    convolution ("Early convolutions help transformers see better", Xiao et al. 2021)."""
    if patch_size & (patch_size - 1):
        raise ValueError(f"a conv stem needs a power-of-two patch_size, got {patch_size}")
    layers, channels = [nn.Conv2d(3, width, 3, padding=1), nn.GELU()], width
    for i in range(patch_size.bit_length() - 1):
        out_channels = dim if 2 ** (i + 2) > patch_size else 2 * channels
        layers += [nn.Conv2d(channels, out_channels, 3, stride=2, padding=1), nn.GELU()]
        channels = out_channels
    # no activation after the last convolution, as after the release's
    return nn.Sequential(*layers[:-1])


def miniature_tokenizer(cfg, recipe=None):
    """A `Tokenizer` of config cfg built by the recipe (a MiniatureRecipe, a dict of its
    fields, or None for the defaults): its patch embedding and initialisation. Registered as
    the builder "miniature"."""
    recipe = recipe if isinstance(recipe, MiniatureRecipe) else MiniatureRecipe(**(recipe or {}))
    patchify = conv_stem(cfg.patch_size, cfg.encoder_dim) if recipe.conv_stem else None
    return Tokenizer(cfg, patchify=patchify, init_std=recipe.init_std, gate_init=recipe.gate_init)


TOKENIZER_BUILDERS["miniature"] = miniature_tokenizer


class CodebookRestarts:
    """Codebook restarts (a standard VQ-VAE remedy against collapse): a forward hook on the
    quantiser counts, in training, how often each row is chosen and keeps the last batch's
    l2-normalised encoder outputs f; `restart()` (after an optimizer step, every
    `recipe.codebook_restart` steps) replaces each row that no token chose since the last call by a
    random one of those outputs. `use` is saved for an exact resume."""

    def __init__(self, quantizer):
        self.quantizer = quantizer
        self.use = torch.zeros(quantizer.codebook.num_embeddings,
                               device=quantizer.codebook.weight.device)
        self.latest_outputs = None                                      # (B N, C)
        quantizer.register_forward_hook(self.observe)

    def observe(self, quantizer, inputs, outputs):
        if not quantizer.training:
            return
        codes = outputs[1].flatten()
        ones = torch.ones_like(codes, dtype=self.use.dtype)
        use = torch.zeros_like(self.use).index_add_(0, codes, ones)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(use)  # every process counts the whole global batch
        self.use += use
        self.latest_outputs = F.normalize(inputs[0].detach(), dim=-1).flatten(0, 1)

    @torch.no_grad()
    def restart(self):
        """Re-seed the rows unused since the last call (none while the codebook is frozen);
        -> how many."""
        if not self.quantizer.codebook.weight.requires_grad:
            self.use.zero_()
            return 0
        dead = (self.use == 0).nonzero().flatten()
        outputs = self.latest_outputs
        replacement = outputs[torch.randint(0, outputs.shape[0], (dead.numel(),),
                                            device=outputs.device)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # the last process holds the last samples of the step, as one process accumulating would
            torch.distributed.broadcast(replacement, torch.distributed.get_world_size() - 1)
        self.quantizer.codebook.weight[dead] = replacement
        self.use.zero_()
        return dead.numel()


def gaussian_blur(images, sigma):
    """images (B, 3, H, W), each blurred by a Gaussian of its own sigma (B,)
    pixels (reflected borders)."""
    out = images.clone()
    for value in sigma.unique().tolist():  # a few distinct times per batch: one separable blur each
        chosen, radius = sigma == value, min(math.ceil(3 * value), images.shape[-1] - 1)
        if radius == 0:
            continue
        offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
        kernel = torch.exp(-offsets ** 2 / (2 * value ** 2))
        kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)                           # (3, 1, 1, k)
        x = F.conv2d(F.pad(images[chosen], (radius, radius, 0, 0), mode="reflect"), kernel,
                     groups=3)
        x = F.pad(x, (0, 0, radius, radius), mode="reflect")
        out[chosen] = F.conv2d(x, kernel.transpose(2, 3), groups=3)
    return out


class ToyClassifier(nn.Module):
    """A small CNN that tells the built-in textures apart; its pooled features stand in for
    Inception's in a Frechet distance. It sees the pattern, not the object's position or colours
    (global average pool)."""

    widths = (16, 32, 64, 128)

    def __init__(self, num_classes=len(TEXTURE_CLASSES), widths=widths):
        super().__init__()
        layers, channels = [], 3
        for out_channels in widths:  # 32 -> 16 -> 8 -> 4 pixels, then a global average
            pool = nn.MaxPool2d(2) if out_channels != widths[-1] else nn.Identity()
            layers += [nn.Conv2d(channels, out_channels, 3, padding=1),
                       nn.GroupNorm(8, out_channels), nn.GELU(), pool]
            channels = out_channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def features(self, images):
        """(B, 3, H, W) in [-1, 1] -> (B, widths[-1]) pooled features."""
        return self.body(images).mean((2, 3))

    def forward(self, images):
        return self.head(self.features(images))


def soften(images, generator=None):
    """The toy evaluator's augmentation: half the images blurred (sigma uniform in [0, 1.25] px, in
    steps of 0.25) and, independently, half given Gaussian noise (std uniform in [0, 0.15]), so that
    a slightly soft but recognisable pattern is judged by its pattern."""
    B = images.shape[0]
    blurred = torch.rand(B, generator=generator) < 0.5
    sigma = (torch.randint(1, 6, (B,), generator=generator) * 0.25) * blurred
    noisy = (torch.rand(B, generator=generator) < 0.5).float() * 0.15
    noisy = noisy * torch.rand(B, generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    return gaussian_blur(images, sigma) + noisy.view(-1, 1, 1, 1) * noise


@torch.enable_grad()  # also when called under no_grad (the toy evaluator trains on first use)
def train_toy_classifier(image_size=32, num_images=5000, steps=1000, batch_size=64, lr=2e-3,
                         seed=0, data_seed=EVALUATOR_TRAIN_SEED, augment=False, data="textures"):
    """Train a `ToyClassifier` on `num_images` built-in images (`BUILTIN_DATA[data]`, set
    `data_seed`); -> the model in eval mode. AdamW with a cosine decay; the images are drawn once
    and cycled; augment: `soften` each batch."""
    data = BUILTIN_DATA[data](num_images, image_size, seed=data_seed)
    images = torch.stack([data[i][0] for i in range(num_images)])
    labels = torch.arange(num_images) % data.num_classes
    torch.manual_seed(seed)
    model = ToyClassifier(data.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    order = torch.cat([torch.randperm(num_images)
                       for _ in range(steps * batch_size // num_images + 1)])
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = order[step * batch_size:(step + 1) * batch_size]
        inputs = soften(images[batch], generator) if augment else images[batch]
        F.cross_entropy(model(inputs), labels[batch]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
    return model.eval()


# the toy evaluator's members: (initial-weight seed, data seed); no other part of the repository
# uses these images
EVALUATOR_MEMBERS = ((0, 11), (1, 12), (2, 13), (3, 14), (4, 15))


class ToyEvaluator(nn.Module):
    """The toy evaluator: an ensemble of `ToyClassifier`s of different seeds, each trained
    (with `soften`) on images of its own. Every figure it gives is reported as the members'
    mean and range, so that a result does not hinge on one classifier. forward / features:
    (M, B, classes) logits / (M, B, 128) pooled features."""

    def __init__(self, num_members=len(EVALUATOR_MEMBERS)):
        super().__init__()
        self.members = nn.ModuleList(ToyClassifier() for _ in range(num_members))

    def features(self, images):
        return torch.stack([member.features(images) for member in self.members])

    def forward(self, images):
        return torch.stack([member(images) for member in self.members])


def train_toy_evaluator(image_size=32, members=EVALUATOR_MEMBERS, data="textures"):
    """-> a `ToyEvaluator` whose member i is `train_toy_classifier` with augment=True and the
    seed and data seed of members[i]."""
    evaluator = ToyEvaluator(len(members))
    for member, (seed, data_seed) in zip(evaluator.members, members):
        member.load_state_dict(train_toy_classifier(image_size, seed=seed, data_seed=data_seed,
                                                    augment=True, data=data).state_dict())
    return evaluator.eval()


def save_toy_evaluator(path, image_size=32, data="textures"):
    """Train the toy evaluator and write it to `path`: its members in half precision, their
    seeds, the command."""
    evaluator = train_toy_evaluator(image_size, data=data)
    save_checkpoint({"kind": "evaluator", "image_size": image_size, "members": EVALUATOR_MEMBERS,
                     "data": data,
                     "command": f"python -c \"import dar; dar.save_toy_evaluator('{path}', "
                                f"{image_size}, '{data}')\"",
                     "model": {key: value.half() for key, value in evaluator.state_dict().items()}},
                     path)


def load_toy_evaluator(path, image_size, data="textures", flag=None):
    """The toy evaluator of the built-in data, trained once (about 2 minutes on 2 CPU
    cores) and cached at `path`. A file that is no such evaluator: ValueError, or with
    `flag` (the command line's) a one-line BadInput naming it."""
    path = Path(path)
    if not path.is_file():
        tqdm.write(f"training the toy evaluator once -> {path}")
        save_toy_evaluator(path, image_size, data)
    try:
        checkpoint = load_checkpoint_file(path)
        found = checkpoint if isinstance(checkpoint, dict) else {"kind": type(checkpoint).__name__}
        if found.get("kind") != "evaluator" or found.get("image_size") != image_size \
                or "members" not in found or found.get("data") != data:
            raise ValueError(f"{path} is not a toy evaluator of {image_size}-pixel --data {data} "
                             f"images (kind {found.get('kind')!r}, image_size "
                             f"{found.get('image_size')}, data {found.get('data')!r})")
        evaluator = ToyEvaluator(len(checkpoint["members"]))
        weights = {key: value.float() for key, value in checkpoint["model"].items()}
        load_state_strict(evaluator, weights, str(path))
    except (ValueError, OSError, KeyError, RuntimeError) as error:
        if flag is None:
            raise
        raise BadInput(f"{flag} {path}: {str(error).splitlines()[0]}") from None
    return evaluator.eval()


@torch.no_grad()
def toy_judgement(evaluator, images, labels):
    """The evaluator on images (B, 3, H, W) (clamped to [-1, 1]) and their asked-for labels (B,): ->
    each member's pooled features (M, B, 128) on the CPU and how many images each classifies as
    their label (M,)."""
    device = next(evaluator.parameters()).device
    features = evaluator.features(images.float().clamp(-1, 1).to(device))  # (M, B, 128)
    logits = torch.stack([member.head(f) for member, f in zip(evaluator.members, features)])
    return features.cpu(), (logits.argmax(-1).cpu() == torch.as_tensor(labels).cpu()).sum(-1)


def spread(values):
    """Per-member figures (M,) -> {"mean", "low", "high"}."""
    values = torch.as_tensor(values, dtype=torch.float64)
    return {"mean": values.mean().item(), "low": values.min().item(), "high": values.max().item()}


def builtin_images(num_images, image_size, seed, data="textures"):
    """Built-in images 0..num_images-1 of set `seed` and their labels: (num_images, 3,
    H, W), (num_images,)."""
    data = BUILTIN_DATA[data](num_images, image_size, seed=seed)
    return torch.stack([data[i][0]
                        for i in range(num_images)]), torch.arange(num_images) % data.num_classes


# a second held-out real set: its toy FID to the reference set is what chance alone gives
REAL_FLOOR_SEED = 3


def toy_metrics(evaluator, make, total, batch_size, image_size, data="textures"):
    """The toy metric of make(indices) -> (images, asked-for labels) for indices 0..total-1: the
    accuracy w.r.t. the labels and the Frechet distance of the features to `total` held-out real
    images of `data` ("toy FID"); then, as the floor, the accuracy on those real images and the
    distance of another real set to them. Each a `spread` over the evaluator's members."""
    features, correct = [], 0
    for start in tqdm(range(0, total, batch_size), desc="eval", dynamic_ncols=True):
        batch = make(list(range(start, min(start + batch_size, total))))
        batch_features, batch_correct = toy_judgement(evaluator, *batch)
        features.append(batch_features)
        correct = correct + batch_correct
    features = torch.cat(features, 1)
    real = builtin_images(total, image_size, EVALUATOR_REFERENCE_SEED, data)
    real_features, real_correct = toy_judgement(evaluator, *real)
    floor = builtin_images(total, image_size, REAL_FLOOR_SEED, data)
    floor_features, _ = toy_judgement(evaluator, *floor)
    distance = lambda a, b: spread([frechet_distance(x.numpy(), y.numpy()) for x, y in zip(a, b)])
    return dict(accuracy=spread(correct / total), toy_fid=distance(features, real_features),
                real_accuracy=spread(real_correct / total),
                real_toy_fid=distance(floor_features, real_features))


def object_layout(images):
    """Where the object of a built-in image is and which colours it has, read from the pixels
    alone: the background is the median colour of the border, the object the pixels that differ
    from it by more than 0.5 (mean over channels). images (B, 3, H, W) -> centroid (B, 2) in
    pixels (row, column), background and object colours (B, 3) snapped to the nearest of
    `PALETTE` (centroid NaN if no object)."""
    B, _, H, W = images.shape
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0],
                        images[..., 1:-1, -1]], -1)
    background = border.median(-1).values                                       # (B, 3)
    inside = (images - background[..., None, None]).abs().mean(1) > 0.5         # (B, H, W)
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32),
                                torch.arange(W, dtype=torch.float32), indexing="ij")
    count = inside.sum((1, 2)).float()
    centroid = torch.stack([(inside * rows).sum((1, 2)), (inside * cols).sum((1, 2))],
                           -1) / count[:, None]
    object_colour = (images * inside[:, None]).sum((2, 3)) / count[:, None].clamp(min=1)
    snap = lambda colours: PALETTE[torch.cdist(colours, PALETTE).argmin(-1)]
    return centroid, snap(background), snap(object_colour)


def layout_agreement(references, images):
    """Does each image (B, 3, H, W) have its reference's layout (`object_layout`)? -> whether
    its background colour is the reference's (B,), whether both colours are (B,), and how far
    its object's centroid lies from the reference's (B,) in pixels (the image size where either
    has no object)."""
    where, background, colour = object_layout(references.float().cpu())
    image_where, image_background, image_colour = object_layout(images.float().clamp(-1, 1).cpu())
    same_background = (image_background == background).all(-1)
    colours = same_background & (image_colour == colour).all(-1)
    offset = (image_where - where).norm(dim=-1).nan_to_num(float(images.shape[-1]))
    return same_background, colours, offset


@torch.no_grad()
def layout_metrics(ar, tokenizer, evaluator, references, kept, seed=0, **options):
    """Fig. 5 measured: for each reference (R, 3, H, W), keep its first `kept` tokens and sample
    every class from one seed per reference (seed + r). -> how often the evaluator sees the
    asked-for class (a `spread`), how far the object's centroid lies from the reference's
    (pixels; the image size where no object is found), and how often the object and background
    colours are the reference's (`object_layout`). kept = 0: the chance level."""
    C = ar.cfg.num_classes
    device = tokenizer.sampling_times.device
    codes, labels = tokenizer.encode(references.to(device)), torch.arange(C, device=device)
    correct, distance, same_colours = torch.zeros(len(evaluator.members)), 0, 0
    for r in tqdm(range(len(references)), desc=f"{kept} tokens kept", dynamic_ncols=True):
        *_, last = sample(ar, tokenizer, labels, prefix=codes[r:r + 1, :kept].expand(C, kept),
                          generator=generators([seed + r] * C, device), **options)
        images = last.image.float().clamp(-1, 1)
        correct += toy_judgement(evaluator, images, labels)[1]
        _, colours, off = layout_agreement(references[r:r + 1].expand(C, -1, -1, -1), images)
        same_colours, distance = same_colours + colours.sum().item(), distance + off.sum().item()
    total = len(references) * C
    return dict(kept=kept, class_as_asked=spread(correct / total), centroid_px=distance / total,
                colours_kept=same_colours / total)


def frechet_distance(features_a, features_b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (n, d), in float64
    NumPy. Its trace term is the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2)."""
    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues, eigenvectors = np.linalg.eigh(cov_a)
    root_a = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(cross).sum())
