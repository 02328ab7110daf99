"""Tests for dar.py, named after the paper's claims and the release's behaviour.

Fixture tests compare with files that the official code wrote from random weights
(testdata/official_tiny/).
"""
import ast
import dataclasses
import inspect
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dar

FIXTURES = Path(__file__).parent / "testdata" / "official_tiny"
OFFICIAL_TOKENIZER = FIXTURES / "official_tokenizer.pt"


@pytest.fixture(scope="module")
def expected():
    return torch.load(FIXTURES / "expected.pt", weights_only=True)


@pytest.fixture(scope="module")
def official():
    return dar.load_tokenizer(OFFICIAL_TOKENIZER)


def group_of(cond, group, group_size):
    """cond (B, N, D), group (B,) -> the group's conditions per sample (B, G, D)."""
    return torch.stack(
        [c[g * group_size : (g + 1) * group_size] for c, g in zip(cond, group.tolist())]
    )


def shapes(n, size=32, seed=0):
    """n images of one coloured disc or square on a coloured background, in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for i in range(n):
        background, foreground = torch.rand(2, 3, 1, 1, generator=gen) * 2 - 1
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=gen)
        r = torch.randint(size // 6, size // 3, (1,), generator=gen)
        inside = (
            ((ys - cy) ** 2 + (xs - cx) ** 2 < r**2)
            if i % 2
            else ((ys - cy).abs() < r) & ((xs - cx).abs() < r)
        )
        images.append(torch.where(inside, foreground, background))
    return torch.stack(images)


# ---- presets ------------------------------------------------------------------------------------

def count_parameters(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in dar.Tokenizer(cfg).parameters())


def test_preset_parameter_counts_match_the_release():
    v1 = dar.TOKENIZER_PRESETS["v1"]
    assert count_parameters(v1) == 307_444_672
    assert count_parameters(replace(v1, repa_dim=0)) == 300_099_776
    with torch.device("meta"):
        diffusion = dar.Tokenizer(replace(v1, repa_dim=0)).diffusion
    # the paper's "185M" decoder
    assert sum(p.numel() for p in diffusion.parameters()) == 185_129_664
    # appendix A.4's "113M"
    assert count_parameters(dar.TOKENIZER_PRESETS["ablation"]) == 113_433_536
    assert count_parameters(dar.TOKENIZER_PRESETS["tiny"]) == 2_677_360


# ---- official equivalence ------------------------------------------------------------------------

def test_official_codes_identical(official, expected):
    assert torch.equal(official.encode(expected["images"]), expected["codes"])


def test_official_conditions(official, expected):
    torch.testing.assert_close(
        official.conditions(expected["codes"]), expected["cond"], atol=1e-5, rtol=0
    )


def test_official_velocity(official, expected):
    cond = group_of(expected["cond"], expected["velocity_group"], official.cfg.group_size)
    v = official.velocity(expected["velocity_x_t"], expected["velocity_t"], cond)
    torch.testing.assert_close(v, expected["velocity"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        dar.shift_time(expected["velocity_t_unshifted"], 2.0), expected["velocity_t"]
    )


@pytest.mark.parametrize("solver", ["euler", "adams2"])
def test_official_decode(official, expected, solver):
    images = official.decode(expected["codes"], noise=expected["noise"], solver=solver)
    torch.testing.assert_close(images, expected[f"decode_{solver}"], atol=1e-5, rtol=0)


def test_official_default_decode_is_adams2(official, expected):
    torch.testing.assert_close(official.decode(expected["codes"], noise=expected["noise"]),
                               expected["decode_code"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def expected_steps():
    return torch.load(FIXTURES / "expected_steps.pt", weights_only=True)


@pytest.mark.parametrize("solver", ["euler", "adams2"])
@pytest.mark.parametrize("steps", [6, 8])
def test_official_decode_with_s_steps_other_than_k(official, expected_steps, solver, steps):
    assert steps in expected_steps["steps"].tolist() and official.cfg.num_groups == 4
    images = official.decode(expected_steps["codes"], expected_steps["noise"], solver, steps=steps)
    torch.testing.assert_close(
        images, expected_steps[f"decode_{solver}_{steps}"], atol=1e-5, rtol=0
    )
    with_k_steps = official.decode(
        expected_steps["codes"], expected_steps["noise"], solver, steps=4
    )
    # S changes the image: not a no-op
    assert (with_k_steps - images).abs().max() > 1e-3


def test_official_file_with_s_steps_decodes_with_s_by_default(
    monkeypatch, expected, expected_steps
):
    raw = dar.load_checkpoint_file(OFFICIAL_TOKENIZER)
    raw["config"]._data["model"]["num_denoising_steps"] = 6        # as a release config may set it
    monkeypatch.setattr(dar, "load_checkpoint_file", lambda path: raw)
    tok = dar.load_tokenizer("a release file with num_denoising_steps 6")
    assert (tok.cfg.num_groups, tok.cfg.decode_steps, len(tok.sampling_times)) == (4, 6, 7)
    torch.testing.assert_close(tok.decode(expected_steps["codes"], expected_steps["noise"]),
                               expected_steps["decode_adams2_6"], atol=1e-5, rtol=0)
    # an explicit S wins
    torch.testing.assert_close(tok.decode(expected["codes"], expected["noise"], steps=4),
                               expected["decode_adams2"], atol=1e-5, rtol=0)


def test_official_file_loads_safely_without_official_code(monkeypatch):
    # the file pickles foreign objects: plain weights_only loading refuses it
    with pytest.raises(Exception):
        torch.load(OFFICIAL_TOKENIZER, weights_only=True)
    seen = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **kw: seen.append(kw.get("weights_only")) or real_load(*a, **kw)
    )
    dar.load_tokenizer(OFFICIAL_TOKENIZER)
    assert seen == [True]
    assert "config_util" not in sys.modules


def test_official_loader_reads_config_and_ema_weights():
    tok = dar.load_tokenizer(OFFICIAL_TOKENIZER)
    raw = dar.load_checkpoint_file(OFFICIAL_TOKENIZER)
    assert not tok.training
    assert (tok.cfg.image_size, tok.cfg.num_tokens, tok.cfg.num_groups, tok.cfg.codebook_size) == (
        32,
        32,
        4,
        64,
    )
    codebook = tok.quantizer.codebook.weight
    assert torch.equal(codebook, raw["ema"]["quantize.embedding.weight"])
    assert not torch.equal(codebook, raw["model"]["quantize.embedding.weight"])
    # the fixture omits the REPA head; nothing random stands in for it
    assert tok.diffusion.repa_out is None


def own_checkpoint(tmp_path, tok, **changes):
    state = tok.state_dict()
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    path = tmp_path / "tok.pt"
    torch.save({"kind": "tokenizer", "config": asdict(tok.cfg), "model": state}, path)
    return path


def test_own_checkpoint_round_trip(tmp_path, official, expected):
    tok = dar.load_tokenizer(own_checkpoint(tmp_path, official))
    assert torch.equal(tok.encode(expected["images"]), expected["codes"])


def test_loader_names_missing_unexpected_and_misshaped_keys(tmp_path, official):
    with pytest.raises(ValueError, match="missing key 'patchify.bias'"):
        dar.load_tokenizer(own_checkpoint(tmp_path, official, **{"patchify.bias": None}))
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        dar.load_tokenizer(own_checkpoint(tmp_path, official, **{"extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match="'query_linear.bias' has shape"):
        dar.load_tokenizer(
            own_checkpoint(tmp_path, official, **{"query_linear.bias": torch.zeros(3)})
        )
    official_state = dar.load_checkpoint_file(OFFICIAL_TOKENIZER)["ema"]
    converted = dar.convert_official_tokenizer_state(official_state)
    del converted["diffusion.blocks.1.cross_attn.k.bias"]
    with pytest.raises(ValueError, match="missing key 'diffusion.blocks.1.cross_attn.k.bias'"):
        dar.load_state_strict(dar.Tokenizer(official.cfg), converted, "test")


def test_loader_rejects_files_that_are_not_tokenizers(tmp_path):
    with pytest.raises(ValueError, match="not a tokenizer"):
        dar.load_tokenizer(FIXTURES / "official_ar.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a tokenizer"):
        dar.load_tokenizer(tmp_path / "other.pt")


# ---- one test per equation -----------------------------------------------------------------------

def test_eq5_condition_group_release_rounds_paper_ceils():
    # t -> t' = t / (t + (1 - t) / 2): 0.02 -> 0.0392, 1/9 -> 0.2, 0.2 -> 1/3, 0.3 -> 0.4615,
    # 0.5 -> 2/3, 0.9 -> 0.947
    t = torch.tensor([0.02, 1 / 9, 0.2, 0.3, 0.5, 0.9])
    # K t' = 0.31, 1.6, 2.67, 3.69, 5.33, 7.58
    assert dar.condition_group(t, 8, 2.0, form="release").tolist() == [0, 2, 3, 4, 5, 7]
    assert dar.condition_group(t, 8, 2.0, form="paper").tolist() == [0, 1, 2, 3, 5, 7]
    # at the sampling grid of Eq. (8) the release uses group i for step i
    grid = dar.sampling_times(8, 2.0)[:8]
    assert dar.condition_group(grid, 8, 2.0, form="release").tolist() == list(range(8))
    with pytest.raises(ValueError, match="unknown condition schedule form"):
        dar.condition_group(t, 8, 2.0, form="floor")


def test_eq5_on_s_steps_a_group_drives_several_steps_or_none():
    # S = K: step i reads group i
    assert dar.step_groups(8, 8).tolist() == list(range(8))
    # the fixture README's example
    assert dar.step_groups(6, 4).tolist() == [0, 1, 1, 2, 3, 3]
    # u_i K = i/2: halves round up
    assert dar.step_groups(8, 4).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    # S < K: groups 1 and 3 drive none
    assert dar.step_groups(2, 4).tolist() == [0, 2]
    assert dar.sampling_times(6, 2.0)[-1] == 1 and len(dar.sampling_times(6, 2.0)) == 7


def test_eq5_shifted_time_inverts_the_eq8_time_shift():
    u = torch.rand(100, dtype=torch.float64)
    torch.testing.assert_close(dar.unshift_time(dar.shift_time(u, 2.0), 2.0), u)
    torch.testing.assert_close(dar.shift_time(u, 1.0), u)  # beta = 1: evenly split


def test_eq8_sampling_schedule_values():
    # t_i = (i/8) / (i/8 + 2 (1 - i/8)) = i / (16 - i), then t_8 = 1
    expected = torch.tensor([0, 1 / 15, 1 / 7, 3 / 13, 1 / 3, 5 / 11, 0.6, 7 / 9, 1.0])
    torch.testing.assert_close(dar.sampling_times(8, 2.0), expected, atol=1e-7, rtol=0)
    assert torch.all(dar.sampling_times(8, 2.0).diff() > 0)


def test_eq3_interpolant_and_velocity_target():
    x0, x1 = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    x_t, v = dar.flow_interpolant(x0, x1, t)
    torch.testing.assert_close(
        dar.flow_interpolant(x0, x1, torch.zeros(4, dtype=torch.float64))[0], x0
    )
    torch.testing.assert_close(
        dar.flow_interpolant(x0, x1, torch.ones(4, dtype=torch.float64))[0], x1
    )
    h = 1e-6
    finite_difference = (dar.flow_interpolant(x0, x1, t + h)[0] - x_t) / h  # v_t = dx_t / dt
    torch.testing.assert_close(finite_difference, v, atol=1e-6, rtol=0)


def test_jump_estimate_of_the_true_velocity_is_the_data():
    x0, x1 = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    t = torch.rand(4, dtype=torch.float64)
    x_t, v = dar.flow_interpolant(x0, x1, t)
    torch.testing.assert_close(dar.jump_estimate(x_t, t, v), x1)


def test_vq_straight_through_gradient_and_loss():
    torch.manual_seed(0)
    quantizer = dar.VectorQuantizer(32, 8)
    f = torch.randn(2, 5, 8, requires_grad=True)
    z_q, codes, vq_loss = quantizer(f)
    e = quantizer.normalized_codebook()
    torch.testing.assert_close(z_q, e[codes])  # forward value: the chosen codebook entry
    distances = torch.cdist(F.normalize(f, dim=-1), e)
    assert torch.equal(codes, distances.argmin(-1))
    # backward: identity through the quantiser (straight-through), i.e. the gradient of normalize(f)
    w = torch.randn_like(z_q)
    (grad_f,) = torch.autograd.grad((z_q * w).sum(), f, retain_graph=True)
    f_copy = f.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad((F.normalize(f_copy, dim=-1) * w).sum(), f_copy)
    torch.testing.assert_close(grad_f, expected)
    # l_VQ = ||sg[f] - e||^2 + 0.25 ||f - sg[e]||^2: the encoder gets only the commitment part
    grad_f, grad_codebook = torch.autograd.grad(vq_loss.sum(), [f, quantizer.codebook.weight])
    (commit,) = torch.autograd.grad(
        0.25 * (e[codes].detach() - F.normalize(f_copy, dim=-1)).pow(2).mean(-1).sum(), f_copy
    )
    torch.testing.assert_close(grad_f, commit)
    assert grad_codebook[codes.unique()].abs().sum() > 0
    unused = torch.ones(32, dtype=torch.bool)
    unused[codes.unique()] = False
    assert grad_codebook[unused].abs().sum() == 0


# ---- causality: the property the method rests on -------------------------------------------------

def test_conditions_are_causal_in_the_tokens(official, expected):
    codes = expected["codes"]
    cond = official.conditions(codes)
    for j in [0, 5, 17, 31]:
        changed = codes.clone()
        changed[:, j] = (changed[:, j] + 1) % official.cfg.codebook_size
        new = official.conditions(changed)
        assert torch.equal(new[:, :j], cond[:, :j])
        assert (new[:, j:] - cond[:, j:]).abs().amax(dim=(0, 2)).min() > 0
    torch.testing.assert_close(official.conditions(codes[:, :12]), cond[:, :12], atol=1e-6, rtol=0)


def test_encoder_query_i_ignores_later_queries(official, expected):
    with torch.no_grad():
        features = official.encoder_features(expected["images"])
        table = official.query_embedding.weight
        original = table.clone()
        try:
            j = 13
            table[j] += 1.0
            changed = official.encoder_features(expected["images"])
        finally:
            table.copy_(original)
    assert torch.equal(changed[:, :j], features[:, :j])
    assert (changed[:, j] - features[:, j]).abs().max() > 1e-3


# ---- decoding ------------------------------------------------------------------------------------

def test_decode_is_deterministic_given_noise_and_solvers_differ(official, expected):
    codes = expected["codes"]
    a = official.decode(codes, generator=torch.Generator().manual_seed(3))
    b = official.decode(codes, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    noise = torch.randn(2, 3, 32, 32)
    euler, adams = official.decode(codes, noise, "euler"), official.decode(codes, noise, "adams2")
    assert torch.equal(official.decode(codes, noise, "euler"), euler)
    assert (euler - adams).abs().max() > 1e-3


# ---- Eq. (7): the training loss ------------------------------------------------------------------

def test_eq7_loss_terms_lpips_on_jump_estimate_and_repa():
    torch.manual_seed(0)
    tok = dar.Tokenizer(dar.TOKENIZER_PRESETS["tiny"])
    with torch.no_grad():  # leave the zero initialisation so that every path carries signal
        for p in tok.parameters():
            p.add_(0.02 * torch.randn_like(p))
    images = shapes(3)
    seen = {}

    def perceptual(real, fake):  # a cheap stand-in for lpips.LPIPS
        seen["real"], seen["fake"] = real, fake
        return (real - fake).abs().mean(dim=(1, 2, 3))

    projection = torch.randn(3 * 8 * 8, 64)

    def repa_target(real):  # a stand-in for DINOv2 patch tokens: (B, 4 x 4, 64)
        return F.pixel_unshuffle(real, 8).flatten(2).transpose(1, 2) @ projection

    u = torch.tensor([0.1, 0.5, 0.9])
    torch.manual_seed(7)
    out = tok(images, perceptual=perceptual, repa_target=repa_target, u=u)
    assert set(out) == {"loss", "fm", "vq", "lpips", "repa", "usage"}
    torch.testing.assert_close(
        out["loss"].detach(), out["fm"] + out["vq"] + 0.5 * out["lpips"] + 0.5 * out["repa"]
    )
    assert 0 < out["usage"] <= 1

    # recompute l_fm and the jump estimate x_hat_1 = x_t + (1 - t) v from the public pieces
    torch.manual_seed(7)
    x0 = torch.randn_like(images)
    t = dar.shift_time(u, 2.0)
    x_t, v_target = dar.flow_interpolant(x0, 0.6 * images, t)
    groups = dar.condition_group(t, 8, 2.0)
    cond = group_of(tok.conditions(tok.encode(images)), groups, tok.cfg.group_size)
    v = tok.velocity(x_t, t, cond)
    torch.testing.assert_close(out["fm"], F.mse_loss(v, v_target) / 0.36, atol=1e-5, rtol=1e-5)
    assert seen["real"] is images
    torch.testing.assert_close(seen["fake"], dar.jump_estimate(x_t, t, v) / 0.6, atol=1e-5, rtol=0)

    out["loss"].backward()
    assert tok.diffusion.repa_out[0].weight.grad.abs().sum() > 0
    plain = tok(images, u=u)
    assert set(plain) == {"loss", "fm", "vq", "usage"}


def test_vq_loss_counts_tokens_up_to_the_selected_group(official, expected):
    images, G = expected["images"], official.cfg.group_size
    captured = {}
    hook = official.quant_in.register_forward_hook(
        lambda m, i, out: captured.update(f=out) or out.retain_grad()
    )
    try:
        for u, last_group in [(0.02, 0), (0.4, 2)]:  # release rounding: 4 * 0.4 + 0.5 -> group 2
            official.zero_grad()
            official(images, u=torch.full((2,), u))["loss"].backward()
            grad = captured["f"].grad.abs().sum(dim=(0, 2))                  # per token
            assert torch.all(grad[:(last_group + 1) * G] > 0)
            assert torch.all(grad[(last_group + 1) * G:] == 0)
    finally:
        hook.remove()
        official.zero_grad(set_to_none=True)


def test_gradient_checkpointing_changes_memory_not_numbers(official, expected):
    def loss_and_gradient():
        official.zero_grad()
        torch.manual_seed(0)
        loss = official(expected["images"], u=torch.tensor([0.3, 0.8]))["loss"]
        loss.backward()
        return loss.detach(), official.patchify.weight.grad.clone()

    official.train()
    try:
        plain = loss_and_gradient()
        official.grad_checkpointing = True
        checkpointed = loss_and_gradient()
    finally:
        official.grad_checkpointing = False
        official.eval()
        official.zero_grad(set_to_none=True)
    torch.testing.assert_close(checkpointed, plain)
    assert plain[1].abs().sum() > 0


# ---- learning ------------------------------------------------------------------------------------

def test_tiny_tokenizer_overfits_eight_images():
    torch.manual_seed(0)
    # the release's init learns too slowly here
    tok = dar.miniature_tokenizer(dar.TOKENIZER_PRESETS["tiny"])
    images = shapes(8)
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    u = torch.linspace(0.03, 0.97, 8)

    def measure():
        tok.eval()
        torch.manual_seed(5)
        with torch.no_grad():
            loss = tok(images, u=u)["fm"].item()
        reconstruction = tok.decode(tok.encode(images), noise=noise)
        tok.train()
        return loss, (reconstruction - images).pow(2).mean().item()

    loss_before, error_before = measure()
    # A high rate overfits fastest. It does not yet make the tokens informative (decoding
    # another image's codes gives the same error): at lr 3e-4 that happens after ~750 steps,
    # too slow for this suite.
    optimizer = torch.optim.AdamW(tok.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0)
    start = time.time()
    for _ in range(300):
        loss = tok(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        optimizer.step()
    loss_after, error_after = measure()
    print(
        f"fm loss {loss_before:.3f} -> {loss_after:.3f}, reconstruction MSE {error_before:.3f} -> "
        f"{error_after:.3f} in {time.time() - start:.0f} s"
    )
    assert loss_after < 0.3 * loss_before
    assert error_after < 0.3 * error_before


# ---- bad inputs ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_value_errors(official, expected):
    images, codes = expected["images"], expected["codes"]
    with pytest.raises(ValueError, match="32x32"):
        official.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="RGB"):
        official.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        official.encode((images + 1) * 127.5)
    with pytest.raises(ValueError, match="floats"):
        official.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="codebook"):
        official.decode(codes + official.cfg.codebook_size)
    with pytest.raises(ValueError, match="codebook"):
        official.conditions(-codes - 1)
    with pytest.raises(ValueError, match="all N = 32 tokens"):
        official.decode(codes[:, :10])
    with pytest.raises(ValueError, match="1 <= n <= 32"):
        official.conditions(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="ids of the codebook"):
        official.decode(codes.float())
    with pytest.raises(ValueError, match="'heun'"):
        official.decode(codes, solver="heun")
    for steps in (0, -2, 2.5, True, "8"):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            official.decode(codes, steps=steps)
    with pytest.raises(ValueError, match="num_denoising_steps must be an integer >= 1"):
        dar.check_config(replace(official.cfg, num_denoising_steps=0))
    with pytest.raises(ValueError, match="x_0 must be"):
        official.decode(codes, generator=[torch.Generator()])  # one generator for two images
    with pytest.raises(ValueError, match="finite"):
        official.encode(images.index_put((torch.tensor([0]),) * 4, torch.tensor(float("nan"))))
    with pytest.raises(ValueError, match="one group"):
        official.velocity(expected["velocity_x_t"], 0.5, expected["cond"])
    with pytest.raises(ValueError, match="no REPA"):
        official(images, repa_target=lambda x: x)


# ==== §3.2 the AR model and §3.3 the D-AR sampler ===============================================

OFFICIAL_AR = FIXTURES / "official_ar.pt"


def fixture_ar_config(expected):
    c = expected["ar_model"]
    return dar.ARConfig(dim=c["dim"], depth=c["n_layer"], num_heads=c["n_head"],
                        vocab_size=c["vocab_size"], num_tokens=c["block_size"],
                        num_classes=c["num_classes"])


@pytest.fixture(scope="module")
def official_ar(expected):
    return dar.load_ar(OFFICIAL_AR, fixture_ar_config(expected))


def test_ar_preset_parameter_counts_match_the_release():
    counts = {"B": 110_888_448, "L": 342_910_976, "XL": 774_699_520, "XXL": 1_410_972_672}
    for name, count in counts.items():
        with torch.device("meta"):
            assert (
                sum(p.numel() for p in dar.LlamaAR(dar.AR_PRESETS[name]).parameters()) == count
            ), name
    assert [dar.AR_PRESETS[name].ffn_hidden for name in counts] == [2048, 2816, 3584, 4096]
    tiny_tok, tiny_ar = dar.TOKENIZER_PRESETS["tiny"], dar.AR_PRESETS["tiny"]
    assert (tiny_ar.vocab_size, tiny_ar.num_tokens) == (tiny_tok.codebook_size, tiny_tok.num_tokens)


def test_official_ar_teacher_forced_logits(official_ar, expected):
    logits = official_ar(expected["tokens"], expected["labels"])
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("guided", [True, False])
def test_official_greedy_tokens_through_the_sampler(official_ar, official, expected, guided):
    cfg = (expected["cfg_start"], expected["cfg_end"]) if guided else 1.0
    steps = list(dar.sample(official_ar, official, expected["labels"], guidance=cfg, top_k=1))
    want = expected["greedy_tokens_cfg" if guided else "greedy_tokens_nocfg"]
    assert torch.equal(steps[-1].tokens, want)


def test_official_ar_file_loads_safely_in_every_layout(
    tmp_path, official_ar, expected, monkeypatch
):
    # the file pickles an argparse.Namespace: plain weights_only loading refuses it
    with pytest.raises(Exception):
        torch.load(OFFICIAL_AR, weights_only=True)
    state = dar.load_checkpoint_file(OFFICIAL_AR)["model"]
    layouts = {
        "module": {"module": state},
        "state_dict": {"state_dict": state},
        "bare": dict(state),
        "compiled": {"model": {"_orig_mod." + k: v for k, v in state.items()}},
    }
    seen = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **kw: seen.append(kw.get("weights_only")) or real_load(*a, **kw)
    )
    for name, ckpt in layouts.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        ar = dar.load_ar(tmp_path / f"{name}.pt", fixture_ar_config(expected))
        assert not ar.training
        torch.testing.assert_close(
            ar(expected["tokens"], expected["labels"]), expected["logits"], atol=1e-5, rtol=0
        )
    assert seen == [True] * len(layouts)


def test_load_ar_infers_the_config_from_shapes_with_64_wide_heads(expected):
    # the fixture's heads are 32 wide, so only an explicit config reproduces it
    ar = dar.load_ar(OFFICIAL_AR)
    c = ar.cfg
    assert (c.dim, c.depth, c.num_heads, c.vocab_size, c.num_classes, c.num_tokens) == (64, 2, 1,
                                                                                        64, 10, 256)
    with pytest.raises(ValueError, match="missing key 'layers.2."):
        dar.load_ar(OFFICIAL_AR, "B")
    with pytest.raises(ValueError, match="unknown AR preset 'GPT-L'"):
        dar.load_ar(OFFICIAL_AR, "GPT-L")


def test_own_ar_checkpoint_round_trip_uses_ema(tmp_path, official_ar, expected):
    ema = {k: v + 0.01 for k, v in official_ar.state_dict().items()}
    torch.save(
        {"kind": "ar", "config": asdict(official_ar.cfg), "model": official_ar.state_dict(),
         "ema": ema},
        tmp_path / "ar.pt",
    )
    ar = dar.load_ar(tmp_path / "ar.pt")
    assert ar.cfg == official_ar.cfg
    assert torch.equal(ar.output.weight, ema["output.weight"])
    del ema["norm.weight"]
    torch.save(
        {"kind": "ar", "config": asdict(official_ar.cfg), "model": ema}, tmp_path / "broken.pt"
    )
    with pytest.raises(ValueError, match="missing key 'norm.weight'"):
        dar.load_ar(tmp_path / "broken.pt")


def test_load_ar_rejects_tokenizer_files(tmp_path, official):
    with pytest.raises(ValueError, match="not an AR checkpoint"):
        dar.load_ar(OFFICIAL_TOKENIZER)
    with pytest.raises(ValueError, match="not an AR checkpoint"):
        dar.load_ar(own_checkpoint(tmp_path, official))


def test_eq6_logits_are_causal_and_the_loss_is_next_token_cross_entropy(official_ar, expected):
    tokens, labels = expected["tokens"], expected["labels"]
    changed = tokens.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % official_ar.cfg.vocab_size
    logits, logits_changed = official_ar(tokens, labels), official_ar(changed, labels)
    # position i sees tokens < i only
    torch.testing.assert_close(logits[:, :11], logits_changed[:, :11])
    assert not torch.allclose(logits[:, 11:], logits_changed[:, 11:])
    by_hand = -logits.log_softmax(-1).gather(-1, tokens[..., None]).mean()
    torch.testing.assert_close(dar.next_token_loss(logits, tokens), by_hand)


def test_label_dropout_trains_the_null_class(expected):
    cfg = replace(fixture_ar_config(expected), token_dropout=0.0, residual_dropout=0.0,
                  ffn_dropout=0.0, label_dropout=1.0)
    ar = dar.LlamaAR(cfg)
    nn_init = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # the head starts at zero; make the logits informative
        ar.output.weight.normal_(generator=nn_init)
    tokens, labels = expected["tokens"], expected["labels"]
    null = torch.full_like(labels, cfg.num_classes)
    dropped = ar.train()(tokens, labels)
    ar.eval()
    torch.testing.assert_close(dropped, ar(tokens, null))
    assert not torch.allclose(dropped, ar(tokens, labels))


def test_release_initialisation_zeroes_the_output_head():
    ar = dar.LlamaAR(dar.AR_PRESETS["tiny"])
    assert torch.all(ar.output.weight == 0)
    assert abs(ar.tok_embeddings.weight.std().item() - 0.02) < 0.002
    assert torch.all(ar.norm.weight == 1)


def guided_greedy_by_full_forward(ar, labels, scales):
    """The slow reference: greedy decoding that runs the whole sequence again for each token."""
    null = torch.full_like(labels, ar.cfg.num_classes)
    tokens = torch.zeros(len(labels), 0, dtype=torch.long)
    for i, scale in enumerate(scales):
        # the last input is never read
        padded = torch.cat([tokens, torch.zeros_like(labels)[:, None]], dim=1)
        conditional, unconditional = ar(padded, labels)[:, i], ar(padded, null)[:, i]
        tokens = torch.cat(
            [
                tokens,
                (unconditional + scale * (conditional - unconditional)).argmax(-1, keepdim=True),
            ],
            1,
        )
    return tokens


@pytest.mark.parametrize("cfg", [1.0, (1.5, 6.0)])
def test_kv_cached_greedy_generation_equals_full_forward_argmax(official_ar, official, cfg):
    labels = torch.arange(4)
    steps = list(dar.sample(official_ar, official, labels, guidance=cfg, top_k=1))
    scales = dar.guidance_scales(cfg, official_ar.cfg.num_tokens)
    assert torch.equal(steps[-1].tokens, guided_greedy_by_full_forward(official_ar, labels, scales))


def test_guidance_schedule_is_linear_over_the_tokens():
    scales = dar.guidance_scales((1.1, 8.0), 256)
    assert scales[0] == pytest.approx(1.1) and scales[-1] == pytest.approx(8.0)
    assert scales[1] == pytest.approx(1.1 + 6.9 / 255)
    assert dar.guidance_scales(4.0, 3) == [4.0, 4.0, 4.0]


def test_top_k_and_top_p_keep_the_release_support():
    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(500, -1)
    support = lambda **kw: set(dar.sample_token(logits, generator=gen, **kw).tolist())
    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_k=1) == {0}
    assert support(top_p=0.7) == {0, 1}    # cumulative 0.5, 0.8: the token that crosses 0.7 stays
    assert support(top_p=0.4) == {0}       # the most likely token always stays
    assert support(temperature=0) == {0}


def test_sampler_runs_the_decoder_k_times_and_the_ar_once_per_position(official_ar, official):
    decoder_calls, ar_positions = [], []
    hooks = [
        official.diffusion.register_forward_hook(
            lambda m, args, out: decoder_calls.append(args[0].shape[0])
        ),
        official_ar.layers[0].register_forward_hook(
            lambda m, args, out: ar_positions.append(args[0].shape[1])
        ),
    ]
    try:
        list(dar.sample(official_ar, official, torch.arange(3), guidance=2.0))
    finally:
        for hook in hooks:
            hook.remove()
    # K network calls per image
    assert len(decoder_calls) == official.cfg.num_groups
    # prefill (class) + N - 1 single tokens
    assert sum(ar_positions) == official.cfg.num_tokens
    assert max(ar_positions) == 1


@pytest.mark.parametrize("steps", [2, 6, 8])
def test_streaming_with_s_steps_equals_offline_decode_and_runs_the_decoder_s_times(
    official_ar, official, steps
):
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    decoder_calls, tokens_when_called = [], []
    hook = official.diffusion.register_forward_hook(lambda m, args, out: decoder_calls.append(1))
    try:
        sampled = []
        for step in dar.sample(official_ar, official, torch.arange(3), guidance=2.0, noise=noise,
                               steps=steps, generator=torch.Generator().manual_seed(6)):
            sampled.append(step)
            tokens_when_called.append((step.tokens.shape[1], len(decoder_calls)))
    finally:
        hook.remove()
    K, G = official.cfg.num_groups, official.cfg.group_size
    assert len(decoder_calls) == steps and [s.group for s in sampled] == list(range(K))
    # after group k the decoder has run every step that reads groups 1..k, and none that reads
    # a later one
    groups = dar.step_groups(steps, K).tolist()
    assert tokens_when_called == [(k * G, sum(g < k for g in groups)) for k in range(1, K + 1)]
    assert sampled[-1].t == 1.0
    torch.testing.assert_close(sampled[-1].image,
                               official.decode(sampled[-1].tokens, noise, steps=steps), atol=1e-5,
                               rtol=0)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        next(dar.sample(official_ar, official, torch.arange(3), steps=0))


@pytest.mark.parametrize("solver", dar.SOLVERS)
def test_streaming_equals_offline_decode(official_ar, official, solver):
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps = list(
        dar.sample(official_ar, official, torch.arange(4), guidance=(1.1, 4.0), noise=noise,
                   solver=solver, generator=torch.Generator().manual_seed(2))
    )
    assert [s.group for s in steps] == list(range(official.cfg.num_groups))
    assert [s.tokens.shape[1] for s in steps] == [official.cfg.group_size * k for k in range(1, 5)]
    assert all(s.image is None for s in steps[:-1])
    torch.testing.assert_close(
        steps[-1].image, official.decode(steps[-1].tokens, noise, solver), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(torch.tensor([s.t for s in steps]), official.sampling_times[1:])


@pytest.mark.parametrize("solver", dar.SOLVERS)
def test_previews_jump_estimates_converge_to_the_image(official_ar, official, solver):
    noise = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    steps = list(dar.sample(official_ar, official, torch.arange(8), noise=noise, solver=solver,
                           generator=torch.Generator().manual_seed(4)))
    assert torch.equal(steps[-1].preview, steps[-1].image)
    group0 = official.conditions(steps[-1].tokens)[:, :official.cfg.group_size]
    v0 = official.velocity(noise, 0.0, group0)
    # x_hat_1 = x_0 + v_0 at t = 0
    torch.testing.assert_close(steps[0].preview, (noise + v0) / official.cfg.data_std)
    distances = [(s.preview - steps[-1].image).pow(2).mean().item() for s in steps]
    assert all(a > b for a, b in zip(distances, distances[1:])), distances


def test_layout_control_prefix_is_kept_and_fixes_the_first_steps(official_ar, official, expected):
    G = official.cfg.group_size
    # the first two groups of a real image
    prefix = expected["codes"][:1, :2 * G].expand(3, -1)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)).expand(
        3, -1, -1, -1
    )
    steps = list(
        dar.sample(official_ar, official, torch.tensor([0, 4, 9]), prefix=prefix, noise=noise,
                   generator=torch.Generator().manual_seed(6))
    )
    assert torch.equal(steps[-1].tokens[:, :2 * G], prefix)
    for step in steps[:2]:  # groups inside the prefix: identical whatever the label
        assert torch.equal(step.preview[0], step.preview[1]) and torch.equal(
            step.preview[0], step.preview[2]
        )
    assert not torch.equal(steps[-1].tokens[0], steps[-1].tokens[1])  # the labels decide the rest


def test_compiled_sampling_gives_the_eager_tokens_and_images_without_recompiling_per_token(
    official_ar, official, expected
):
    import torch._dynamo
    labels, noise, G = expected["labels"], expected["noise"], official.cfg.group_size
    cases = [
        dict(
            guidance=(expected["cfg_start"], expected["cfg_end"]), prefix=expected["codes"][:, :G]
        ),  # guided + prefix
        # no guidance
        dict(guidance=1.0),
    ]
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for case in cases:
        eager, fast = (
            list(
                dar.sample(
                    official_ar, official, labels, top_k=1, noise=noise, compile=compile, **case
                )
            )
            for compile in (False, True)
        )
        assert torch.equal(fast[-1].tokens, eager[-1].tokens)
        for a, b in zip(eager, fast):
            torch.testing.assert_close(b.preview, a.preview, atol=1e-5, rtol=0)
        torch.testing.assert_close(fast[-1].image, eager[-1].image, atol=1e-5, rtol=0)
    assert torch.equal(fast[-1].tokens, expected["greedy_tokens_nocfg"])
    torch.testing.assert_close(official.decode(expected["codes"], noise, compile=True),
                               expected["decode_adams2"], atol=1e-5, rtol=0)
    # one AR graph per batch shape (2 and 4), the decoder's first step and the others: not one
    # per token
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before <= 4


def test_generator_makes_sampling_reproducible(official_ar, official):
    def draw(seed):
        steps = list(dar.sample(official_ar, official, torch.arange(4), guidance=3.0, top_p=0.9,
                               generator=torch.Generator().manual_seed(seed)))
        return steps[-1].tokens, steps[-1].image
    (tokens_a, image_a), (tokens_b, image_b), (tokens_c, _) = draw(7), draw(7), draw(8)
    assert torch.equal(tokens_a, tokens_b) and torch.equal(image_a, image_b)
    assert not torch.equal(tokens_a, tokens_c)


def test_sampler_bad_inputs_raise_clear_value_errors(official_ar, official, expected):
    first = lambda **kw: next(
        dar.sample(official_ar, official, **{"labels": torch.arange(2), **kw})
    )
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 10\)"):
        first(labels=torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="n <= 32"):
        first(prefix=torch.zeros(2, 33, dtype=torch.long))
    for prefix in (torch.full((2, 4), 64), [[1.5, 2.5], [1.0, 2.0]]):  # out of range, fractional
        with pytest.raises(ValueError, match=r"prefix must be \(2, n\) token ids in \[0, 64\)"):
            first(prefix=prefix)
    with pytest.raises(ValueError, match=">= 0"):
        first(guidance=(-1.0, 4.0))
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be a finite number > 0 and <= 1"):
            first(top_p=top_p)
    with pytest.raises(ValueError, match="unknown solver"):
        first(solver="heun")
    for change in ({"vocab_size": 128}, {"num_tokens": 64}):
        with pytest.raises(ValueError, match="does not match the tokenizer"):
            next(
                dar.sample(
                    dar.LlamaAR(replace(official_ar.cfg, **change)).eval(),
                    official,
                    torch.arange(2),
                )
            )
    with pytest.raises(ValueError, match="training mode"):
        next(dar.sample(dar.LlamaAR(official_ar.cfg), official, torch.arange(2)))
    with pytest.raises(ValueError, match=r"labels in \[0, 10\]"):
        official_ar(expected["tokens"], expected["labels"] + 20)


def test_reversed_order_model_samples_back_in_coarse_to_fine_order(official_ar, official):
    reversed_ar = dar.LlamaAR(replace(official_ar.cfg, reverse=True))
    reversed_ar.load_state_dict(official_ar.state_dict())
    reversed_ar.eval()
    labels = torch.arange(3)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    steps = list(dar.sample(reversed_ar, official, labels, top_k=1, noise=noise))
    written = guided_greedy_by_full_forward(reversed_ar, labels, [1.0] * official_ar.cfg.num_tokens)
    assert torch.equal(steps[-1].tokens, written.flip(1))   # the AR wrote fine-to-coarse
    torch.testing.assert_close(
        steps[-1].image, official.decode(written.flip(1), noise), atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="reversed-order"):
        next(dar.sample(reversed_ar, official, labels, prefix=written[:, :4]))


# ==== data and the training scripts ===============================================================

import train_ar  # noqa: E402
import train_tokenizer  # noqa: E402


@pytest.mark.parametrize("name", list(dar.BUILTIN_DATA))
def test_builtin_data_are_deterministic_balanced_and_varied(name):
    data = dar.BUILTIN_DATA[name](40, 32, seed=0)
    image, label = data[13]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1 and label == 3
    assert torch.equal(image, dar.BUILTIN_DATA[name](40, 32, seed=0)[13][0])
    assert not torch.equal(image, dar.BUILTIN_DATA[name](40, 32, seed=1)[13][0])
    assert [data[i][1] for i in range(20)] == list(range(10)) * 2
    same_class = torch.stack([data[i][0] for i in range(3, 40, 10)])
    # layout and colours vary within a class
    assert (same_class[1:] - same_class[:1]).abs().mean() > 0.2


def test_builtin_textures_put_the_class_in_the_fine_detail_and_the_layout_apart():
    data = dar.BuiltinTextures(40, 32, seed=0)
    # every pattern covers half
    assert dar.texture_tiles().float().mean((1, 2)).eq(0.5).all()
    for index in range(40):
        layout = data.layout(index)
        classes = torch.stack([data.draw(layout, c) for c in range(10)])
        # the classes differ sharply
        assert (classes - classes[:1]).abs().amax((1, 2, 3))[1:].min() > 0.5
        blurred = dar.gaussian_blur(classes, torch.full((10,), 3.0))
        # and not at all under a blur
        assert (blurred - blurred[:1]).abs().max() <= 0.07
        # no channel changes sign: the layout reads by the nearest palette colour,
        # whatever the class
        _, background, colour = dar.object_layout(classes)
        assert (background == layout[2]).all() and (colour == layout[3]).all()


def write_folder(root, corrupt=False):
    gen = torch.Generator().manual_seed(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=gen).numpy()
            dar.Image.fromarray(pixels).save(root / name / f"{i}.png")
    if corrupt:
        data = (root / "dogs" / "0.png").read_bytes()
        (root / "dogs" / "1.png").write_bytes(data[:len(data) // 3])   # truncated


def test_image_folder_labels_augmentations_and_corrupt_files(tmp_path):
    write_folder(tmp_path / "ok")
    for augment in (None, "tokenizer", "ar"):
        data = dar.ImageFolder(tmp_path / "ok", 32, augment=augment)
        image, label = data[(3, 7)]
        assert data.classes == ["cats", "dogs"] and label == 1 and image.shape == (3, 32, 32)
        # the augmentation follows the seed
        assert torch.equal(image, data[(3, 7)][0])
    views = {
        dar.ImageFolder(tmp_path / "ok", 32, augment="ar")[(0, 0, v)][0].numpy().tobytes()
        for v in range(10)
    }
    assert len(views) == 10 and dar.ImageFolder(tmp_path / "ok", 32, "ar").views == 10

    write_folder(tmp_path / "bad", corrupt=True)
    data = dar.ImageFolder(tmp_path / "bad", 32)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        images = [data[i] for i in range(4)]
    assert data.skipped == 1 and len(images) == 4
    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no (readable )?images"):
        dar.ImageFolder(tmp_path / "empty", 32)
    with pytest.raises(ValueError, match="does not exist"):
        dar.ImageFolder(tmp_path / "missing", 32)


def test_training_stream_is_the_same_samples_whatever_the_process_layout():
    def keys(world_size, grad_accum, rank):
        stream = dar.TrainingStream(
            10, 2, grad_accum, world_size, rank, seed=3, start_step=0, num_steps=4
        )
        return [key for batch in stream for key in batch]
    single = keys(1, 4, 0)
    split = [keys(2, 2, rank) for rank in range(2)]
    assert sorted(single) == sorted(split[0] + split[1])
    resumed = dar.TrainingStream(10, 2, 4, 1, 0, seed=3, start_step=2, num_steps=4)
    assert [key for batch in resumed for key in batch] == single[16:]
    epoch_one = [index for index, _ in single[:10]]
    assert sorted(epoch_one) == list(range(10))                        # each epoch is a permutation


# Eq. (7) from step 0


def tokenizer_args(out, *extra):
    return train_tokenizer.parse_args(
        ["--out", str(out), "--builtin-size", "64", "--batch-size", "2", "--log-every", "1",
         "--sample-every", "2", "--save-every", "2", "--eval-every", "0", *extra]
    )


def ar_args(out, tokenizer, *extra):
    return train_ar.parse_args(
        ["--out", str(out), "--tokenizer", str(tokenizer), "--builtin-size", "32", "--batch-size",
         "4", "--log-every", "1", "--sample-every", "4", "--save-every", "2", "--eval-samples", "0",
         *extra]
    )


def host_syncs_per_run(monkeypatch, run):
    """How often our code reads a tensor's value back to Python (item, float, int, bool, tolist)
    during run()."""
    ours = {str(Path(module.__file__).resolve()) for module in (dar, train_tokenizer, train_ar)}
    count = [0]
    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, real=real):
            count[0] += sys._getframe(1).f_code.co_filename in ours
            return real(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    run()
    monkeypatch.undo()
    return count[0]


@pytest.mark.parametrize("script", ["tokenizer", "ar"])
def test_a_training_step_reads_nothing_back_but_the_logged_loss(
    tmp_path, monkeypatch, script, request
):
    """Steps between the log lines add no host sync: a run of 8 steps reads back as often as one of
    4 (one log line, one save at the end of each; the input checks run once per run)."""
    if script == "tokenizer":
        run = lambda steps: train_tokenizer.main(
            tokenizer_args(
                tmp_path / str(steps),
                "--steps",
                str(steps),
                "--log-every",
                "100",
                "--sample-every",
                "100",
                "--save-every",
                "100",
                "--codebook-restart",
                "0",
            )
        )
    else:
        tokenizer = request.getfixturevalue("trained_tokenizer")
        run = lambda steps: train_ar.main(
            ar_args(tmp_path / str(steps), tokenizer, "--epochs", str(steps / 8), "--log-every",
                    "100", "--sample-every", "100", "--save-every", "100")
        )
    syncs = [host_syncs_per_run(monkeypatch, lambda: run(steps)) for steps in (4, 8)]
    assert syncs[0] == syncs[1], syncs


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer.main(tokenizer_args(out, "--steps", "2"))
    return out / "tokenizer.pt"


def test_train_tokenizer_writes_a_loadable_checkpoint_and_pictures(trained_tokenizer):
    tok = dar.load_tokenizer(trained_tokenizer)
    # trained without REPA: no head saved
    assert tok.cfg.image_size == 32 and tok.diffusion.repa_out is None
    raw = torch.load(trained_tokenizer, weights_only=True)
    assert raw["step"] == 2 and set(raw) >= {"model", "ema", "optimizer", "config", "seed"}
    assert (trained_tokenizer.parent / "reconstructions_0000002.png").exists()


def test_train_ar_writes_a_loadable_checkpoint_and_samples(tmp_path, trained_tokenizer, capsys):
    train_ar.main(ar_args(tmp_path, trained_tokenizer, "--epochs", "0.5", "--eval-samples", "10"))
    ar = dar.load_ar(tmp_path / "ar.pt")
    assert (ar.cfg.num_classes, ar.cfg.vocab_size, ar.cfg.num_tokens, ar.cfg.reverse) == (10, 256,
                                                                                          64, False)
    # the tiny recipe
    assert ar.cfg.token_dropout == ar.cfg.residual_dropout == ar.cfg.ffn_dropout == 0.0
    # guidance needs it
    assert ar.cfg.label_dropout == 0.1
    # a labelled row per class, a column per group
    with Image.open(tmp_path / "samples_0000004.png") as picture:
        assert picture.width > 8 * 96 and picture.height > 10 * 96
    out = capsys.readouterr().out
    assert out.startswith(f"the tokens of {trained_tokenizer}\n")
    assert (
        len(
            [
                line
                for line in out.splitlines()
                if line.startswith("step 4 (16 images): toy accuracy of 10 samples")
            ]
        )
        == 1
    )
    assert torch.load(tmp_path / "ar.pt", weights_only=True)["step"] == 4


def test_train_ar_reverse_is_recorded_and_cached_codes_round_trip(tmp_path, trained_tokenizer):
    train_ar.main(ar_args(tmp_path / "rev", trained_tokenizer, "--epochs", "0.25", "--reverse",
                          "--cache-codes", str(tmp_path / "codes")))
    assert dar.load_ar(tmp_path / "rev" / "ar.pt").cfg.reverse
    codes = np.load(tmp_path / "codes" / "codes.npy")
    tok, data = dar.load_tokenizer(trained_tokenizer), dar.BuiltinTextures(32, 32, seed=0)
    images = torch.stack([data[i][0] for i in range(32)])
    assert codes.shape == (1, 32, 64) and torch.equal(
        torch.from_numpy(codes[0]).long(), tok.encode(images)
    )


def test_code_cache_is_reused_and_refused_for_another_tokenizer_file(tmp_path, trained_tokenizer):
    data, path = dar.BuiltinTextures(8, 32, seed=0), tmp_path / "tokenizer.pt"
    path.write_bytes(trained_tokenizer.read_bytes())
    identity = {"source": "textures", "size": 8, "seed": 0}
    cache = lambda tok: train_ar.cache_codes(
        tok, path, data, tmp_path / "codes", 0, 1, torch.device("cpu"), 4, identity
    )
    images = torch.stack([data[i][0] for i in range(8)])
    tok = dar.load_tokenizer(path)
    first = cache(tok).codes[0].copy()
    assert np.array_equal(first, tok.encode(images).numpy())
    stamp = (tmp_path / "codes" / "codes.npy").stat().st_mtime_ns
    cache(tok)
    # unchanged file: reused
    assert (tmp_path / "codes" / "codes.npy").stat().st_mtime_ns == stamp
    # another tokenizer, saved over it
    other = dar.Tokenizer(tok.cfg)
    torch.save({"kind": "tokenizer", "config": asdict(tok.cfg), "model": other.state_dict()}, path)
    with pytest.raises(dar.BadInput, match="made with tokenizer_sha256 = "):
        cache(dar.load_tokenizer(path))
    # and left as it was
    assert (tmp_path / "codes" / "codes.npy").stat().st_mtime_ns == stamp
    # an interrupted cache is rebuilt
    (tmp_path / "codes" / "codes.npy").unlink()
    path.write_bytes(trained_tokenizer.read_bytes())
    assert np.array_equal(cache(tok).codes[0], first)


def final_state(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["model"], ckpt["ema"]


def killed_in_step_three(monkeypatch, run):
    """run() killed by a KeyboardInterrupt in its third EMA update, after the step-2 checkpoint
    (--save-every 2)."""
    real_update_ema, calls = dar.update_ema, []

    def killed(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        real_update_ema(*args)
    monkeypatch.setattr(dar, "update_ema", killed)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(dar, "update_ema", real_update_ema)


@pytest.mark.parametrize("script", ["tokenizer", "ar"])
def test_resume_is_exact(tmp_path, trained_tokenizer, monkeypatch, script):
    """n steps in one go == a run killed after step k (its checkpoint) + --resume, bit for
    bit (CPU, fp32)."""
    if script == "tokenizer":
        run, name = (
            lambda out, *extra: train_tokenizer.main(tokenizer_args(out, "--steps", "4", *extra)),
            "tokenizer.pt",
        )
    else:
        run, name = lambda out, *extra: train_ar.main(
            # 4 steps
            ar_args(out, trained_tokenizer, "--epochs", "0.5", "--ema", "0.9", *extra)), "ar.pt"
    straight = run(tmp_path / "straight")
    killed_in_step_three(monkeypatch, lambda: run(tmp_path / "split"))
    assert torch.load(tmp_path / "split" / name, weights_only=True)["step"] == 2
    resumed = run(tmp_path / "split", "--resume")
    assert resumed[1] == straight[1]   # the last step's losses
    for a, b in zip(
        final_state(tmp_path / "straight" / name), final_state(tmp_path / "split" / name)
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.pt"
    dar.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkp")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        dar.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    train_tokenizer.main(tokenizer_args(tmp_path, "--steps", "2"))
    real_forward = dar.Tokenizer.forward

    def poisoned(self, *args, **kwargs):
        losses = real_forward(self, *args, **kwargs)
        return {**losses, "loss": losses["loss"] * float("nan")}
    monkeypatch.setattr(dar.Tokenizer, "forward", poisoned)
    with pytest.raises(SystemExit, match="a loss is no longer finite"):
        train_tokenizer.main(tokenizer_args(tmp_path, "--steps", "4", "--resume"))
    assert torch.load(tmp_path / "tokenizer.pt", weights_only=True)["step"] == 2


def test_no_non_finite_state_is_saved_or_loaded_and_a_missing_device_is_named(tmp_path, capsys,
                                                                              monkeypatch):
    """Nothing non-finite: a diverging run saves no NaN weights and names the last finite
    checkpoint; loaders refuse NaN weights and unknown config keys; --device cuda without CUDA is
    one line."""
    argv = ["--steps", "8", "--lr", "1e30", "--save-every", "2", "--log-every", "8"]
    line = one_line_refusal(lambda: train_tokenizer.main(tokenizer_args(tmp_path / "run", *argv)),
                            capsys)
    # step 2 is still finite and saved; by step 4 the weights are NaN, and nothing is saved
    assert "step 4: the weights are no longer finite" in line
    assert f"the last finite checkpoint is {tmp_path / 'run' / 'tokenizer.pt'} (step 2)" in line
    saved = torch.load(tmp_path / "run" / "tokenizer.pt", weights_only=True)
    assert saved["step"] == 2 and dar.all_finite([saved["model"], saved["ema"]])
    damaged = torch.load(SHIPPED["tokenizer"], weights_only=True)
    damaged["model"]["quant_in.weight"][0, 0] = float("nan")
    torch.save(damaged, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match="'quant_in.weight' holds values that are not finite"):
        dar.load_tokenizer(tmp_path / "nan.pt")
    unknown = torch.load(SHIPPED["ar"], weights_only=True)
    unknown["config"]["colour"] = "red"
    torch.save(unknown, tmp_path / "ar.pt")
    with pytest.raises(ValueError, match=r"unknown AR config keys \['colour'\]"):
        dar.load_ar(tmp_path / "ar.pt")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a CUDA machine
    line = one_line_refusal(lambda: train_tokenizer.main(
        tokenizer_args(tmp_path / "gpu", "--device", "cuda", "--steps", "1")), capsys)
    assert "--device cuda: this machine has no CUDA device" in line
    assert not (tmp_path / "gpu").exists()  # refused before the run folder is claimed


def ddp_worker(rank, world_size, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, _ = train_tokenizer.main(train_tokenizer.parse_args(argv))
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / f"rank{rank}.pt")


def test_ddp_on_cpu_stays_in_sync_and_equals_gradient_accumulation(tmp_path):
    common = [
        "--builtin-size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "3",
        "--warmup",
        "0",
        "--save-every",
        "3",
        # a restart at step 2, with the usage of both ranks
        "--sample-every",
        "100",
        "--codebook-restart",
        "2",
    ]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(
        ddp_worker, args=(2, port, ["--out", str(tmp_path / "ddp"), *common]), nprocs=2
    )
    model, _ = train_tokenizer.main(
        train_tokenizer.parse_args(["--out", str(tmp_path / "one"), "--grad-accum", "2", *common])
    )
    ranks = [
        torch.load(tmp_path / "ddp" / f"rank{rank}.pt", weights_only=True) for rank in range(2)
    ]
    single = model.state_dict()
    for key in single:
        # the ranks stay in sync
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        # == accumulation, up to float reduction order: Adam divides by sqrt(v), so an
        # element whose gradient is near zero can move by ~1e-5; all but 0.1% of the
        # elements agree to 1e-5 + 1e-4 |x|, and all to 1e-4
        close = torch.isclose(ranks[0][key], single[key], atol=1e-5, rtol=1e-4)
        assert (
            close.float().mean() >= 0.999 and (ranks[0][key] - single[key]).abs().max() <= 1e-4
        ), key
    torch.manual_seed(0)  # the scripts' initial weights (--seed 0): the runs moved away from them
    initial = dar.miniature_tokenizer(model.cfg).state_dict()
    assert not torch.equal(single["quant_in.weight"], initial["quant_in.weight"])
    assert not torch.equal(
        ranks[0]["encoder_layers.0.attention.q.weight"],
        initial["encoder_layers.0.attention.q.weight"],
    )


# ---- sample.py ----------------------------------------------------------------------------------
from PIL import Image  # noqa: E402

import sample  # noqa: E402


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, trained_tokenizer):
    out = tmp_path_factory.mktemp("pair")
    train_ar.main(ar_args(out, trained_tokenizer, "--epochs", "0.25", "--sample-every", "100"))
    return ["--tokenizer", str(trained_tokenizer), "--ar", str(out / "ar.pt")]


def copy_pair(pair, folder):
    """The pair's files as folder/tokenizer.pt and folder/ar.pt, the AR file's record pointing at
    the copy."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, ar = (Path(pair[pair.index(flag) + 1]) for flag in ("--tokenizer", "--ar"))
    (folder / "tokenizer.pt").write_bytes(tokenizer.read_bytes())
    checkpoint = torch.load(ar, weights_only=True)
    checkpoint["tokenizer"] = dar.tokenizer_record(folder / "tokenizer.pt", folder / "ar.pt")
    torch.save(checkpoint, folder / "ar.pt")


@pytest.fixture
def sampler_calls(monkeypatch):
    """Records the labels and prefix of every dar.sample call that sample.py makes."""
    calls, real_sample = [], dar.sample

    def recording_sample(ar, tokenizer, labels, **options):
        calls.append({"labels": torch.as_tensor(labels).tolist(), "prefix": options.get("prefix")})
        yield from real_sample(ar, tokenizer, labels, **options)
    monkeypatch.setattr(dar, "sample", recording_sample)
    return calls


# pixels above the first row
GRID_HEADER = inspect.signature(dar.labelled_grid).parameters["header"].default


def test_sample_default_picture_has_a_row_per_class_and_a_column_per_group(tmp_path, trained_pair):
    path = sample.main([*trained_pair, "--out", str(tmp_path / "pic.png")])
    width, height = Image.open(path).size
    rows, columns, cell = 10, 8, 96                  # 32-pixel images enlarged 3x; K = 8 previews
    assert height == GRID_HEADER + rows * cell
    assert 0 < width - columns * cell < 200          # the class names on the left


def test_fid_mode_is_balanced_named_by_index_and_packed_for_the_adm_evaluator(
    tmp_path, trained_pair, sampler_calls
):
    folder = sample.main(
        [*trained_pair, "--fid", "12", "--batch-size", "5", "--out", str(tmp_path / "fid")]
    )
    assert sorted(label for call in sampler_calls for label in call["labels"]) == sorted(
        i % 10 for i in range(12)
    )
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(12)] + [
        "settings.json"
    ]
    packed = np.load(tmp_path / "fid.npz")
    assert (
        list(packed) == ["arr_0"]
        and packed["arr_0"].dtype == np.uint8
        and packed["arr_0"].shape == (12, 32, 32, 3)
    )
    assert np.array_equal(packed["arr_0"][7], np.asarray(Image.open(folder / "000007.png")))


def test_reconstruct_writes_the_centre_crops_it_encoded_as_the_rfid_reference(tmp_path, official):
    folder, rng = tmp_path / "val", np.random.default_rng(0)
    # other sizes and aspect ratios
    for name, (width, height) in zip("abc", [(40, 32), (32, 57), (90, 64)]):
        (folder / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
            folder / name / "0.png"
        )
    sample.main(
        ["--tokenizer", str(OFFICIAL_TOKENIZER), "--reconstruct", str(folder), "--out",
         str(tmp_path / "recon"), "--denoising-steps", "6"]
    )
    crops = np.stack([np.asarray(dar.center_crop(Image.open(path).convert("RGB"), 32))
                      for path in sorted(folder.glob("*/*.png"))])
    reference = np.load(tmp_path / "recon-reference.npz")["arr_0"]
    assert reference.dtype == np.uint8 and np.array_equal(reference, crops)
    # the reconstructions, in the same order, are the 6-step decodes of exactly those crops
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1
    decoded = official.decode(official.encode(images), steps=6,
                              generator=[torch.Generator().manual_seed(i) for i in range(3)])
    expected_uint8 = dar.to_uint8(decoded).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.load(tmp_path / "recon.npz")["arr_0"], expected_uint8)


def test_fid_mode_resumes_without_redoing_finished_images(tmp_path, trained_pair, sampler_calls):
    argv = [*trained_pair, "--fid", "6", "--batch-size", "4", "--out", str(tmp_path / "fid")]
    folder = sample.main(argv)
    first = {p.name: np.asarray(Image.open(p)) for p in folder.glob("*.png")}
    for index in (2, 4, 5):
        (folder / f"{index:06d}.png").unlink()
    # a write that was interrupted
    (folder / "000004.png.tmp").write_bytes(b"half a PNG")
    sampler_calls.clear()
    sample.main(argv)
    assert [call["labels"] for call in sampler_calls] == [[2, 4, 5]]   # only the missing ones
    for name, image in first.items():                                   # and they come out the same
        assert np.array_equal(np.asarray(Image.open(folder / name)), image), name
    assert not list(folder.glob("*.tmp"))


def fid_shard_worker(rank, world_size, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sample.main(argv)


def test_fid_mode_gives_the_same_images_in_one_or_two_processes(tmp_path, trained_pair):
    common = [*trained_pair, "--fid", "6", "--guidance", "2.0"]
    sample.main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(
        fid_shard_worker,
        args=(2, port, [*common, "--batch-size", "2", "--out", str(tmp_path / "two")]),
        nprocs=2,
    )
    one, two = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert one.shape == two.shape == (6, 32, 32, 3)
    assert np.array_equal(one, two)
    # per-sample seeds: different images
    assert not np.array_equal(one[0], one[1])


def test_preview_groups_stop_the_ar_model_early(tmp_path, trained_pair, monkeypatch):
    positions = []
    real_next_logits = dar.LlamaAR.next_logits
    monkeypatch.setattr(
        dar.LlamaAR,
        "next_logits",
        lambda self, h, at, caches: positions.append(h.shape[1])
        or real_next_logits(self, h, at, caches),
    )
    sample.main(
        [*trained_pair, "--fid", "2", "--preview-groups", "2", "--out", str(tmp_path / "partial")]
    )
    # class token + 15 tokens: the 16 tokens of groups 1-2, no more
    assert sum(positions) == 2 * 8
    assert np.load(tmp_path / "partial.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_eval_of_previews_measures_them_against_their_final_samples(trained_pair, evaluator,
                                                                    monkeypatch, capsys):
    """--eval --preview-groups k (Table 5): the previews are those of --fid --preview-groups k (the
    same seeds and labels), and each is compared with the final sample it becomes."""
    made, real_metrics = [], dar.toy_metrics
    monkeypatch.setattr(dar, "toy_metrics", lambda evaluator, make, *args: made.append(make)
                        or real_metrics(evaluator, make, *args))
    scores = sample.main([*trained_pair, "--eval", "--n", "4", "--preview-groups", "2",
                          "--evaluator", str(evaluator[1])])
    assert "their layout against the final samples" in capsys.readouterr().out
    assert 0 <= scores["colours_kept"] <= 1 and scores["centroid_px"] >= 0
    tokenizer, ar = dar.load_tokenizer(trained_pair[1]), dar.load_ar(trained_pair[3])
    previews, labels = dar.class_balanced_samples(ar, tokenizer, 0, 2, guidance=4.0)([0, 1, 2])
    again, again_labels = made[0]([0, 1, 2])
    assert torch.equal(previews, again) and torch.equal(labels, again_labels)


def test_layout_control_keeps_the_reference_prefix(tmp_path, trained_pair, sampler_calls):
    path = sample.main(
        [*trained_pair, "--layout-from", "textures:3", "--prefix-tokens", "0,8,24", "--labels",
         "rows,dots,7", "--out", str(tmp_path / "layout.png")]
    )
    tokenizer = dar.load_tokenizer(trained_pair[1])
    codes = tokenizer.encode(
        dar.BuiltinTextures(4, 32, seed=dar.EVALUATOR_REFERENCE_SEED)[3][0][None]
    )
    assert [call["labels"] for call in sampler_calls] == [[0, 6, 7]] * 3
    for call, count in zip(sampler_calls, (0, 8, 24)):
        assert torch.equal(call["prefix"], codes[:, :count].expand(3, count))
    width, height = Image.open(path).size
    # rows: P; columns: reference + labels
    assert height == GRID_HEADER + 3 * 96 and width > 4 * 96


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    """A small two-member toy evaluator (short training) and its file, in the shipped format."""
    path = tmp_path_factory.mktemp("eval") / "evaluator.pt"
    members = ((0, 1), (1, 11))
    ensemble = dar.ToyEvaluator(len(members))
    for member, (seed, data_seed) in zip(ensemble.members, members):
        member.load_state_dict(dar.train_toy_classifier(32, num_images=2000, steps=300, seed=seed,
                                                        data_seed=data_seed).state_dict())
    dar.save_checkpoint({"kind": "evaluator", "image_size": 32, "members": members,
                         "data": "textures", "model": ensemble.state_dict()}, path)
    return ensemble.eval(), path


def test_benchmark_measures_speed_and_shares_for_a_pair_and_for_random_preset_weights(
    trained_pair, capsys
):
    rows = sample.main([*trained_pair, "--benchmark", "1,3", "--repeat", "1"])
    assert [row["batch"] for row in rows] == [1, 3] and all(
        row["peak_memory_gib"] is None for row in rows
    )  # CPU
    for row in rows:
        assert (
            row["images_per_s"] > 0
            and row["ar_ms_per_token"] > 0
            and row["diffusion_ms_per_step"] > 0
        )
        assert 0 < row["diffusion_share"] < 1 and row["ar_share"] + row[
            "diffusion_share"
        ] == pytest.approx(1)
        # the shares are the measured times': AR ms/token x N + D_FM ms/step x S is the
        # time of one batch
        total_ms = 1000 * row["batch"] / row["images_per_s"]
        assert row["ar_ms_per_token"] * 64 + row["diffusion_ms_per_step"] * 8 == pytest.approx(
            total_ms, rel=1e-6
        )
    rows = sample.main(
        ["--benchmark", "2", "--config", "tiny:tiny", "--repeat", "1", "--guidance", "1.0"]
    )
    assert [row["batch"] for row in rows] == [2]
    for argv, message in [
        (["--benchmark", "1", "--config", "tiny:B"], r"does not match the tokenizer"),
        (["--benchmark", "1", "--config", "huge:B"], r"--config: expected TOKENIZER:AR"),
        (
            ["--config", "tiny:tiny"],
            r"--config TOKENIZER:AR \(random weights\) is for --benchmark only",
        ),
        (["--benchmark", "0", *trained_pair],
         r"--benchmark: each batch size must be an integer >= 1"),
    ]:
        assert re.search(message, one_line_refusal(lambda: sample.main(argv), capsys))


def test_evaluator_classifies_held_out_real_textures(evaluator):
    ensemble, _ = evaluator
    images, labels = dar.builtin_images(500, 32, dar.EVALUATOR_REFERENCE_SEED)
    with torch.no_grad():
        # (M,): each member
        accuracy = (ensemble(images).argmax(-1) == labels).float().mean(-1)
    assert accuracy.shape == (2,) and (accuracy > 0.95).all()
    features, correct = dar.toy_judgement(ensemble, images, labels)
    assert features.shape == (2, 500, 128) and torch.equal(correct, (accuracy * 500).round().long())


def test_shipped_evaluator_members_agree_and_judge_soft_textures_by_their_pattern():
    """Five classifiers of their own seeds and images; trained with `soften`, so mild blur or noise
    is no coin flip (a blur of 3 px removes the class by design, `BuiltinTextures`)."""
    ensemble = dar.load_toy_evaluator(SHIPPED["evaluator"], 32)
    images, labels = dar.builtin_images(500, 32, dar.EVALUATOR_REFERENCE_SEED)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for softened in (
            images,
            dar.gaussian_blur(images, torch.full((500,), 0.75)),
            images + 0.2 * noise,
        ):
            accuracy = (ensemble(softened).argmax(-1) == labels).float().mean(-1)
            assert len(accuracy) == 5 and accuracy.min() >= 0.95, accuracy


def test_frechet_distance_closed_form_and_real_versus_noise(evaluator):
    x = np.random.default_rng(0).normal(size=(400, 5)) @ np.random.default_rng(1).normal(
        size=(5, 5)
    )
    # b = 2a + 1 shares a's covariance shape: FD = |mu_a - mu_b|^2 + tr(S + 4S - 2 * 2S) =
    # |mu_a + 1|^2 + tr(S)
    expected = ((x.mean(0) + 1) ** 2).sum() + np.trace(np.cov(x, rowvar=False))
    assert dar.frechet_distance(x, 2 * x + 1) == pytest.approx(expected, rel=1e-9)
    assert dar.frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    classifier = evaluator[0].members[0]
    features = lambda images: classifier.features(images).detach().numpy()
    real = lambda seed: dar.builtin_images(500, 32, seed)[0]
    real_a, real_b = features(real(dar.EVALUATOR_REFERENCE_SEED)), features(real(7))
    noise = features(torch.rand(500, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert dar.frechet_distance(real_a, real_b) < 0.02 * dar.frechet_distance(real_a, noise)


def test_eval_mode_reports_accuracy_and_toy_fid(trained_pair, evaluator):
    # the same numbers by hand: item i uses class i mod 10 and a generator seeded i (--seed
    # 0); the real side is the first 20 images of the reference set
    tokenizer, members = (
        dar.load_tokenizer(trained_pair[1]),
        dar.load_toy_evaluator(evaluator[1], 32).members,
    )
    ar, classes = dar.load_ar(trained_pair[3]), torch.arange(20) % 10
    seeded = lambda: [torch.Generator().manual_seed(i) for i in range(20)]
    real = torch.stack(
        [image for image, _ in dar.BuiltinTextures(20, 32, seed=dar.EVALUATOR_REFERENCE_SEED)]
    )

    def by_hand(images):  # -> each member's accuracy and toy FID
        with torch.no_grad():
            accuracy = [
                (member(images.clamp(-1, 1)).argmax(-1) == classes).float().mean().item()
                for member in members
            ]
            fid = [
                dar.frechet_distance(
                    member.features(images.clamp(-1, 1)).numpy(), member.features(real).numpy()
                )
                for member in members
            ]
        return accuracy, fid

    def check(scores, accuracy, fid):  # the mean and the range over the members
        assert (
            scores["accuracy"]["mean"],
            scores["accuracy"]["low"],
            scores["accuracy"]["high"],
        ) == pytest.approx((np.mean(accuracy), min(accuracy), max(accuracy)))
        assert (
            scores["toy_fid"]["mean"],
            scores["toy_fid"]["low"],
            scores["toy_fid"]["high"],
        ) == pytest.approx((np.mean(fid), min(fid), max(fid)), rel=1e-4)

    scores = sample.main([*trained_pair, "--eval", "--n", "20", "--evaluator", str(evaluator[1])])
    *_, last = dar.sample(ar, tokenizer, classes, guidance=4.0, generator=seeded())
    check(scores, *by_hand(last.image))
    scores = sample.main([*trained_pair[:2], "--eval", "--reconstruct", "textures", "--n", "20",
                          "--evaluator", str(evaluator[1])])
    check(scores, *by_hand(tokenizer.decode(tokenizer.encode(real), generator=seeded())))
    assert scores["real_accuracy"]["mean"] == pytest.approx(np.mean(by_hand(real)[0]))


def test_eval_measures_the_built_in_data_the_ar_model_learned(tmp_path, trained_pair, evaluator,
                                                              monkeypatch, capsys):
    """--eval reads the data from the AR model's class names and draws its real images from that
    data; --reconstruct and --layout-from name it; an evaluator of other data, or an AR model of a
    folder's classes, is refused with one line."""
    copy_pair(trained_pair, tmp_path)
    drawn, real_images = [], dar.builtin_images
    monkeypatch.setattr(dar, "builtin_images", lambda *args: drawn.append(args[3:]) or
                        real_images(*args))
    pair = ["--ar", str(tmp_path / "ar.pt"), "--evaluator", str(evaluator[1])]
    for argv in (["--eval", "--n", "4"], ["--eval", "--layout-from", "textures", "--n", "1",
                                         "--prefix-tokens", "8"]):
        sample.main([*pair, *argv])
    assert drawn and all(data == ("textures",) for data in drawn)
    sample.main(["--tokenizer", str(tmp_path / "tokenizer.pt"), "--eval", "--reconstruct",
                 "textures", "--n", "4", "--evaluator", str(evaluator[1])])
    assert "their layout" in capsys.readouterr().out
    other = torch.load(evaluator[1], weights_only=True)
    torch.save({**other, "data": "a folder"}, tmp_path / "other-evaluator.pt")
    line = one_line_refusal(lambda: sample.main(
        ["--ar", str(tmp_path / "ar.pt"), "--eval", "--n", "4", "--evaluator",
         str(tmp_path / "other-evaluator.pt")]), capsys)
    assert "is not a toy evaluator of 32-pixel --data textures" in line
    checkpoint = torch.load(tmp_path / "ar.pt", weights_only=True)
    torch.save({**checkpoint, "classes": [f"folder {i}" for i in range(10)]}, tmp_path / "ar.pt")
    line = one_line_refusal(lambda: sample.main([*pair, "--eval", "--n", "4"]), capsys)
    assert "--eval measures models of the built-in data" in line and "folder 0" in line


def test_sample_bad_inputs_end_with_one_clear_line(tmp_path, trained_pair):
    run = subprocess.run([sys.executable, "sample.py", "--tokenizer", str(tmp_path / "missing.pt")],
                         capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "python train_tokenizer.py" in run.stderr
    unreadable = tmp_path / "broken.png"
    unreadable.write_bytes(b"not a png")
    for extra, message in [
        (["--labels", "3,10"], r"class 10 is outside the AR model's 10 classes"),
        (["--layout-from", "textures:0", "--prefix-tokens", "65"], r"must lie in \[0, 64\]"),
        (["--layout-from", str(unreadable)], r"cannot read .*broken.png as an image"),
        (["--ar", str(tmp_path / "none.pt")],
         rf"`python train_ar.py --export {re.escape(str(tmp_path / 'none.pt'))}` writes it"),
        (["--ar", str(tmp_path / "run" / "ar.pt")],
         rf"`python train_ar.py --out {re.escape(str(tmp_path / 'run'))}` writes it"),
    ]:
        with pytest.raises(SystemExit, match=message) as raised:
            sample.main([*trained_pair, *extra])
        assert "\n" not in str(raised.value)


# ---- a new user's commands -----------------------------------------------------------------------


def test_eval_on_a_first_run_trains_the_evaluator_without_a_traceback(
    tmp_path, trained_tokenizer, monkeypatch
):
    # a new user's first `--eval` with no evaluator file: it is trained inside sample.py's
    # no_grad block
    real_training = dar.train_toy_classifier
    monkeypatch.setattr(dar, "train_toy_classifier",
                        lambda size, **kw: real_training(size, num_images=200, steps=20, **kw))
    monkeypatch.chdir(tmp_path)
    scores = sample.main(
        ["--tokenizer", str(trained_tokenizer), "--eval", "--reconstruct", "textures", "--n", "10",
         "--evaluator", "out/evaluator.pt"]
    )
    assert (tmp_path / "out" / "evaluator.pt").is_file() and 0 <= scores["accuracy"]["mean"] <= 1
    assert np.isfinite(scores["toy_fid"]["mean"])


def test_sample_uses_your_ar_model_when_it_exists_and_the_tokenizer_it_learned(
    tmp_path, trained_pair, monkeypatch, capsys
):
    shipped = tmp_path / "shipped"
    copy_pair(trained_pair, shipped)
    monkeypatch.setattr(dar, "SHIPPED_TINY", shipped)
    monkeypatch.chdir(tmp_path)
    path = sample.main(["--n", "1"])
    assert (
        "pair: AR model shipped/ar.pt (shipped; `python train_ar.py` trains yours into "
        "out/tiny), tokenizer "
        "shipped/tokenizer.pt (whose codes it learned)" in capsys.readouterr().out
    )
    assert (
        path == Path("out/tiny/samples.png")
        and path.is_file()
        and not (shipped / "samples.png").exists()
    )
    (tmp_path / "out" / "tiny" / "tokenizer.pt").write_bytes(
        b"your tokenizer, not what the AR model learned"
    )
    # your tokenizer alone: still the shipped pair
    sample.main(["--n", "1"])
    assert "tokenizer shipped/tokenizer.pt (whose codes it learned)" in capsys.readouterr().out
    copy_pair(trained_pair, tmp_path / "out" / "tiny")
    # your AR model, with the tokenizer it learned
    sample.main(["--n", "1"])
    assert (
        "pair: AR model out/tiny/ar.pt (yours, from `python train_ar.py`), tokenizer "
        "out/tiny/tokenizer.pt "
        "(whose codes it learned)" in capsys.readouterr().out
    )


def test_an_ar_model_records_the_tokenizer_it_learned_and_a_mismatched_pair_is_refused(
    tmp_path, trained_pair, capsys
):
    tokenizer, ar_path = (
        Path(trained_pair[trained_pair.index(flag) + 1]) for flag in ("--tokenizer", "--ar")
    )
    ar = dar.load_ar(ar_path)
    assert ar.codes_of == {"path": tokenizer.resolve(), "sha256": dar.file_digest(tokenizer)}
    # the same V and N: only the record tells them apart
    other = dar.load_tokenizer(dar.SHIPPED_TINY / "tokenizer.pt")
    with pytest.raises(ValueError, match=f"learned the codes of {tokenizer.resolve()}"):
        dar.check_pair(ar, other)  # what the scripts check when they load a pair
    line = one_line_refusal(
        lambda: sample.main(
            [
                "--ar",
                str(ar_path),
                "--tokenizer",
                str(dar.SHIPPED_TINY / "tokenizer.pt"),
                "--n",
                "1",
            ]
        ),
        capsys,
    )
    assert "learned the codes of" in line and "pass the tokenizer it learned" in line
    moved = tmp_path / "moved"
    moved.mkdir()
    # rebased: it still names the tokenizer it learned
    dar.export_weights(ar_path, moved / "exported.pt", "test")
    assert dar.load_ar(moved / "exported.pt").codes_of["path"] == tokenizer.resolve()
    copy_pair(trained_pair, moved)
    # replaced by another
    (moved / "tokenizer.pt").write_bytes((dar.SHIPPED_TINY / "tokenizer.pt").read_bytes())
    line = one_line_refusal(lambda: sample.main(["--ar", str(moved / "ar.pt"), "--n", "1"]), capsys)
    assert f"learned the codes of {(moved / 'tokenizer.pt').resolve()}" in line
    assert not list(moved.glob("*.png"))
    # the shipped pair records its tokenizer
    shipped = dar.load_ar(dar.SHIPPED_TINY / "ar.pt")
    assert shipped.codes_of["path"] == (dar.SHIPPED_TINY / "tokenizer.pt").resolve()
    dar.check_pair(shipped, dar.load_tokenizer(dar.SHIPPED_TINY / "tokenizer.pt"))


def test_train_ar_without_a_tokenizer_uses_yours_or_the_shipped_one_and_says_which(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = train_ar.parse_args([])
    assert Path(args.tokenizer).resolve() == (dar.SHIPPED_TINY / "tokenizer.pt").resolve()
    assert (
        args.tokenizer_choice.startswith("the tokens of the shipped tokenizer")
        and "you have none in out/tiny" in args.tokenizer_choice
    )
    assert (
        Path(args.cache_codes) == Path("out/tiny") / f"codes-{dar.file_digest(args.tokenizer)[:12]}"
    )
    (tmp_path / "out" / "tiny").mkdir(parents=True)
    (tmp_path / "out" / "tiny" / "tokenizer.pt").write_bytes(
        (dar.SHIPPED_TINY / "tokenizer.pt").read_bytes()
    )
    args = train_ar.parse_args([])
    assert args.tokenizer == "out/tiny/tokenizer.pt" and args.tokenizer_choice.startswith(
        "the tokens of your tokenizer"
    )


def test_train_ar_refuses_to_resume_on_another_tokenizer_and_to_share_a_cache_being_built(
    tmp_path, trained_tokenizer, capsys
):
    train_ar.main(ar_args(tmp_path / "run", trained_tokenizer, "--epochs", "0.25"))
    before = (tmp_path / "run" / "ar.pt").read_bytes()
    shipped = str(dar.SHIPPED_TINY / "tokenizer.pt")
    line = one_line_refusal(
        lambda: train_ar.main(ar_args(tmp_path / "run", shipped, "--epochs", "0.5", "--resume")),
        capsys,
    )
    assert (
        f"learned the codes of "
        f"{os.path.relpath(trained_tokenizer.resolve(), (tmp_path / 'run').resolve())}"
        in line
    )
    assert (tmp_path / "run" / "ar.pt").read_bytes() == before
    cache = tmp_path / "cache"
    cache.mkdir()
    parent = f"{socket.gethostname()} {os.getppid()} {dar.process_started(os.getppid())}"
    (cache / ".lock").write_text(parent + "\n")                  # a live process is building it
    argv = ar_args(tmp_path / "other", trained_tokenizer, "--epochs", "0.25", "--cache-codes",
                   str(cache))
    line = one_line_refusal(lambda: train_ar.main(argv), capsys)
    assert f"--cache-codes {cache} is in use by process {os.getppid()}" in line
    assert sorted(path.name for path in cache.iterdir()) == [".lock"]


# ---- the shipped tiny pair (weights/tiny): real numbers on held-out data, in seconds -------------

SHIPPED = {
    name: dar.SHIPPED_TINY / f"{name}.pt" for name in ("tokenizer", "ar", "ar-reverse", "evaluator")
}
# regression guards, below what the shipped files measure on these images (weights/tiny/README.md)
SHIPPED_RECONSTRUCTION_ACCURACY, SHIPPED_SAMPLE_ACCURACY = 0.95, 0.85


def test_shipped_weights_are_small_half_precision_and_record_how_they_were_made():
    assert sum(path.stat().st_size for path in SHIPPED.values()) <= 12 * 2 ** 20
    for name in ("tokenizer", "ar", "ar-reverse"):
        checkpoint = torch.load(SHIPPED[name], weights_only=True)
        assert "optimizer" not in checkpoint and checkpoint["step"] > 0, name
        assert checkpoint["command"].startswith("python train_"), name
        assert all(
            value.dtype == torch.float16
            for value in checkpoint["model"].values()
            if value.is_floating_point()
        )
    tokenizer_file = torch.load(SHIPPED["tokenizer"], weights_only=True)
    # training-only: not shipped
    assert not any(key.startswith("code_head.") for key in tokenizer_file["model"])
    assert (
        dar.load_ar(SHIPPED["ar-reverse"]).cfg.reverse
        and not dar.load_ar(SHIPPED["ar"]).cfg.reverse
    )


def test_the_model_card_repeats_each_shipped_files_command_and_no_file_names_a_machine_path():
    card = (dar.SHIPPED_TINY / "README.md").read_text()
    one_line = " ".join(card.replace("\\\n", " ").split())  # continuation lines joined
    for name, path in SHIPPED.items():
        checkpoint = torch.load(path, weights_only=True)
        assert " ".join(checkpoint["command"].split()) in one_line, name
        assert not any(str(value).startswith("/") for value in checkpoint.values()
                       if isinstance(value, str)), name


@pytest.fixture(scope="module")
def shipped():
    return (dar.load_tokenizer(SHIPPED["tokenizer"]), dar.load_ar(SHIPPED["ar"]),
            dar.load_toy_evaluator(SHIPPED["evaluator"], 32))


def shipped_accuracy(images, labels, ensemble):
    """The toy evaluator's accuracy, its members' mean."""
    with torch.no_grad():
        return (ensemble(images.clamp(-1, 1)).argmax(-1) == labels).float().mean().item()


def test_shipped_tokenizer_reconstructs_held_out_textures(shipped):
    tokenizer, _, classifier = shipped
    real = dar.BuiltinTextures(100, 32, seed=dar.EVALUATOR_REFERENCE_SEED)
    images, labels = torch.stack([image for image, _ in real]), torch.arange(100) % 10
    reconstructions = tokenizer.decode(
        tokenizer.encode(images), generator=torch.Generator().manual_seed(0)
    )
    assert shipped_accuracy(reconstructions, labels, classifier) >= SHIPPED_RECONSTRUCTION_ACCURACY


def test_shipped_pair_samples_the_class_asked_for(shipped):
    # with and without guidance (on this pair guidance does not raise the accuracy: its model card)
    tokenizer, ar, classifier = shipped
    labels = torch.arange(50) % 10
    for cfg in (1.0, 4.0):
        generators = [torch.Generator().manual_seed(i) for i in range(50)]
        *_, last = dar.sample(ar, tokenizer, labels, guidance=cfg, generator=generators)
        assert shipped_accuracy(last.image, labels, classifier) >= SHIPPED_SAMPLE_ACCURACY, cfg


def readme_sample_commands():
    """Every `python sample.py ...` of the README that runs on the tiny pair (not on the release's
    files, nor on the random weights of a paper-size preset, nor compiled: compiling takes about a
    minute, and the compiled sampler has its own test)."""
    text = (Path(__file__).parent / "README.md").read_text()
    found = re.findall(r"^python sample\.py[^#\n]*", text, flags=re.M) + re.findall(
        r"`(python sample\.py[^`]*)`", text
    )
    return sorted(
        {
            command.strip()
            for command in found
            if not any(
                marker in command
                for marker in ("D-AR-", "imagenet", "...", "--config ablation", "--config v1",
                               "--compile")
            )
        }
    )


@pytest.mark.parametrize("command", readme_sample_commands())
def test_every_readme_sample_command_runs_and_gives_what_it_says(
    command, tmp_path, trained_pair, evaluator, monkeypatch, capsys
):
    # the README's commands as they stand, in a folder laid out as after the quickstart
    # (out/tiny, out/evaluator.pt)
    copy_pair(trained_pair, tmp_path / "out" / "tiny")
    (tmp_path / "out" / "evaluator.pt").write_bytes(evaluator[1].read_bytes())
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[2:]
    if "--reverse" in command or "tiny-reverse" in command:
        (tmp_path / "out" / "tiny-reverse").mkdir()
        train_ar.main(
            ar_args(tmp_path / "out" / "tiny-reverse", tmp_path / "out" / "tiny" / "tokenizer.pt",
                    "--epochs", "0.25", "--reverse", "--sample-every", "100")
        )
    # a longer run's files: the pair stands in
    for flag, name in (("--tokenizer", "tokenizer.pt"), ("--ar", "ar.pt")):
        named = tmp_path / argv[argv.index(flag) + 1] if flag in argv else None
        if named is not None and not named.exists():
            named.parent.mkdir(parents=True, exist_ok=True)
            named.write_bytes((tmp_path / "out" / "tiny" / name).read_bytes())
            if flag == "--ar":  # it learned the pair's tokenizer
                checkpoint = torch.load(named, weights_only=True)
                checkpoint["tokenizer"] = dar.tokenizer_record(
                    tmp_path / "out" / "tiny" / "tokenizer.pt", named
                )
                torch.save(checkpoint, named)
    small = ["--n", "3"] if "--layout-from" not in argv or "--eval" in argv else []
    if "--benchmark" in argv:  # at batch 2, timed once
        at = argv.index("--benchmark") + 1
        argv = argv[:at] + ["2"] + argv[at + (at < len(argv) and not argv[at].startswith("--")):]
        small = ["--repeat", "1"]
    result = sample.main(argv + small)
    printed = capsys.readouterr().out
    if "--benchmark" in argv:
        assert [row["batch"] for row in result] == [2]
    elif "--eval" in argv and "--layout-from" in argv:
        assert [row["kept"] for row in result] == [
            int(n) for n in argv[argv.index("--prefix-tokens") + 1].split(",")
        ]
    elif "--eval" in argv:
        assert 0 <= result["accuracy"]["mean"] <= 1 and np.isfinite(result["toy_fid"]["mean"])
    else:
        assert Path(result).is_file() and str(result) in printed
    if "--gif" in argv:
        with Image.open(Path(result).with_suffix(".gif")) as gif:
            assert gif.n_frames == 8


def test_export_writes_half_precision_ema_weights_that_load(tmp_path, trained_tokenizer):
    exported = tmp_path / "small.pt"
    train_tokenizer.main(
        tokenizer_args(tmp_path / "run", "--steps", "2", "--export", str(exported))
    )
    checkpoint = torch.load(exported, weights_only=True)
    assert "optimizer" not in checkpoint and "ema" not in checkpoint and checkpoint["step"] == 2
    assert "--export" in checkpoint["command"] and checkpoint["training_args"]["steps"] == "2"
    full = torch.load(tmp_path / "run" / "tokenizer.pt", weights_only=True)
    for key, value in checkpoint["model"].items():
        reference = full["ema"][key]
        assert value.dtype == (torch.float16 if reference.is_floating_point() else reference.dtype)
        torch.testing.assert_close(value.to(reference.dtype), reference, atol=1e-2, rtol=1e-3)
    assert dar.load_tokenizer(exported).quantizer.codebook.weight.dtype == torch.float32
    # model, EMA and two Adam moments in float32 -> the EMA alone in float16: about an eighth
    assert exported.stat().st_size < 0.2 * (tmp_path / "run" / "tokenizer.pt").stat().st_size


# ---- the CPU miniature: the tiny recipe's training aids, apart from the paper's code -------------

def test_the_contents_name_every_equation_and_only_what_exists_in_file_order():
    contents = dar.__doc__.split("Contents:")[1].split("Then, below the paper")[0]
    for equation in [f"Eq. ({n})" for n in range(1, 9)] + ["jump", "guidance", "§3.3"]:
        assert equation in contents
    lines = []
    for name in re.findall(r"`([\w.]+)`", contents):
        owner, _, member = name.rpartition(".")
        # AttributeError: no such name
        obj = getattr(getattr(dar, owner) if owner else dar, member)
        lines.append(inspect.getsourcelines(obj)[1])
    assert len(lines) >= 16 and lines == sorted(lines)


def test_the_papers_sections_use_nothing_defined_below_them():
    source = Path(dar.__file__).read_text()
    tree = ast.parse(source)
    end = source[:source.index("#  Data and training utilities")].count("\n")
    defined_below = {target.id for node in tree.body if node.lineno > end
                     for target in ([node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                                    getattr(node, "targets", [])) if hasattr(target, "id")}
    defined_below |= {
        node.name for node in tree.body if node.lineno > end and hasattr(node, "name")
    }
    assert {"load_tokenizer", "cached_digest", "check_record", "BuiltinTextures"} <= defined_below
    for node in tree.body:
        if node.lineno < end:
            used = {name.id for name in ast.walk(node) if isinstance(name, ast.Name)}
            assert not used & defined_below, (
                getattr(node, "name", node.lineno),
                used & defined_below,
            )


def test_the_training_loop_is_on_the_page_and_every_function_fits_a_screen():
    """Each training script's main shows forward, backward and the optimizer's step, defines no
    function inside its loop; no function of the module or the scripts is longer than 60 lines, no
    line longer than 100 characters."""
    root = Path(__file__).parent
    for script in ("train_tokenizer.py", "train_ar.py"):
        tree = ast.parse((root / script).read_text())
        main = next(
            node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"
        )
        calls = {ast.unparse(node.func) for node in ast.walk(main) if isinstance(node, ast.Call)}
        assert {
            "optimizer.step",
            "optimizer.zero_grad",
            "torch.nn.utils.clip_grad_norm_",
        } <= calls, script
        assert any(name.endswith(".backward") for name in calls), script
        loops = [node for node in ast.walk(main) if isinstance(node, ast.For)]
        assert loops and not any(isinstance(inner, (ast.FunctionDef, ast.Lambda))
                                 for loop in loops for inner in ast.walk(loop)), script
    for name in ("dar.py", "train_tokenizer.py", "train_ar.py", "sample.py"):
        source = (root / name).read_text()
        long_functions = [
            (node.name, node.end_lineno - node.lineno + 1)
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > 60
        ]
        assert not long_functions, (name, long_functions)
        assert not [
            number for number, line in enumerate(source.splitlines(), 1) if len(line) > 100
        ], name


def test_nothing_of_the_paper_names_the_cpu_miniature():
    """dar.py's §3.1-§3.3 and utilities never use a name defined in its final
    section (the miniature)."""
    source = (Path(__file__).parent / "dar.py").read_text()
    banner = next(i for i, line in enumerate(source.splitlines(), 1)
                  if line.startswith("#  The CPU miniature"))
    tree = ast.parse(source)
    below = {
        node.name
        for node in tree.body
        if node.lineno > banner and isinstance(node, (ast.FunctionDef, ast.ClassDef))
    }
    below |= {
        target.id
        for node in tree.body
        if node.lineno > banner and isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert {"MiniatureRecipe", "CodebookRestarts", "conv_stem", "ToyClassifier",
            "object_layout"} <= below
    used = {(node.id if isinstance(node, ast.Name) else node.attr, node.lineno)
            for top in tree.body if top.lineno < banner for node in ast.walk(top)
            if isinstance(node, (ast.Name, ast.Attribute))}
    assert not [(name, line) for name, line in used if name in below]
    assert {f.name for f in dataclasses.fields(dar.TokenizerConfig)} >= {"codebook_size",
                                                                          "num_groups"}
    assert not {f.name for f in dataclasses.fields(dar.TokenizerConfig)} & {
        f.name for f in dataclasses.fields(dar.MiniatureRecipe)
    }


def test_miniature_tokenizer_has_the_conv_stem_and_its_files_load_as_such(tmp_path):
    cfg = dar.TOKENIZER_PRESETS["tiny"]
    with torch.device("meta"):
        assert sum(p.numel() for p in dar.miniature_tokenizer(cfg).parameters()) == 2_764_336
    tokenizer = dar.miniature_tokenizer(cfg, {"conv_stem": True, "init_std": 0.1})
    assert isinstance(tokenizer.patchify, torch.nn.Sequential) and torch.equal(
        # open gates: the recipe's init
        tokenizer.encoder_layers[0].gate1, torch.ones(128))
    path = tmp_path / "tokenizer.pt"
    torch.save(
        {"kind": "tokenizer", "config": asdict(cfg), "builder": "miniature",
         "recipe": {"conv_stem": True}, "model": tokenizer.state_dict()},
        path,
    )
    loaded = dar.load_tokenizer(path)
    assert isinstance(loaded.patchify, torch.nn.Sequential)
    images = shapes(2)
    assert torch.equal(loaded.encode(images), tokenizer.eval().encode(images))
    torch.save({"kind": "tokenizer", "config": asdict(cfg), "builder": "other", "model": {}}, path)
    with pytest.raises(ValueError, match="unknown tokenizer builder 'other'"):
        dar.load_tokenizer(path)


def test_codebook_restart_reseeds_only_unused_rows_from_encoder_outputs():
    torch.manual_seed(0)
    quantizer = dar.VectorQuantizer(16, 4).train()
    restarts = dar.CodebookRestarts(quantizer)
    f, g = torch.randn(1, 32, 4), torch.randn(1, 32, 4)
    _, codes_f, _ = quantizer(f)
    # the rows used by either batch count as used
    _, codes_g, _ = quantizer(g)
    quantizer.eval()(torch.randn(1, 32, 4))                    # not counted: not training
    used = torch.cat([codes_f, codes_g]).unique()
    assert restarts.use.sum() == 64 and (restarts.use > 0).sum() == used.numel()
    before = quantizer.codebook.weight.clone()
    dead = torch.tensor([row not in used for row in range(16)])
    assert restarts.restart() == dead.sum() > 0
    after = quantizer.codebook.weight
    assert torch.equal(after[~dead], before[~dead])
    # the restarted rows come from the last batch
    latest = F.normalize(g[0], dim=-1)
    assert all((latest - row).abs().amax(-1).min() < 1e-6 for row in after[dead])
    # the release's keys
    assert restarts.use.sum() == 0 and list(quantizer.state_dict()) == ["codebook.weight"]


def test_a_tiny_run_writes_its_learning_curve_pictures_and_a_small_export(tmp_path, capsys):
    """The shipped recipe's flags: the learning curve at every --eval-every (fractions in [0, 1],
    the centroid in pixels) with a printed line each, the labelled held-out pictures, and an export
    that holds the EMA weights alone and says how to build the model."""
    argv = ["--steps", "4", "--lpips-weight", "0.5", "--lpips-from-group", "4", "--eval-every",
            "2", "--eval-images", "10", "--probe-images", "40", "--evaluator",
            str(tmp_path / "ev.pt"), "--warmup", "0", "--export", str(tmp_path / "small.pt")]
    monkey = pytest.MonkeyPatch()
    monkey.setattr(dar, "train_toy_classifier", lambda size, **kw: dar.ToyClassifier().eval())
    try:
        model, terms = train_tokenizer.main(tokenizer_args(tmp_path / "run", *argv))
    finally:
        monkey.undo()
    assert isinstance(model.patchify, torch.nn.Sequential) and "fm" in terms
    # the perceptual term is read (on the teacher the run trained and cached) and not 0
    assert terms["lpips"] > 0 and (tmp_path / "run" / "teacher.pt").is_file()
    rows = (tmp_path / "run" / "learning_curve.tsv").read_text().splitlines()
    assert rows[0].split("\t") == [*train_tokenizer.CURVE_COLUMNS, *train_tokenizer.PROBE_COLUMNS]
    # background and colours kept, accuracy, codebook use, probes
    fractions = [value for row in rows[1:] for i, value in enumerate(row.split("\t"))
                 if i in (2, 3, 5, 7) or i >= 8]
    assert all(0 <= float(value) <= 1 for value in fractions)
    # the centroid's offset in pixels
    assert all(0 <= float(row.split("\t")[4]) <= 32 for row in rows[1:])
    assert [row.split("\t")[:2] for row in rows[1:]] == [["2", "4"], ["4", "8"]]
    printed = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("eval step")
    ]
    assert [line.split(":")[0] for line in printed] == ["eval step 2 (4 images)",
                                                        "eval step 4 (8 images)"]
    assert all("background kept" in line and "both colours" in line and "centroid off by" in line
               and "toy accuracy" in line for line in printed)
    for step in (2, 4):  # the labelled held-out pictures
        with Image.open(tmp_path / "run" / f"reconstructions_{step:07d}.png") as picture:
            assert picture.size[1] > 2 * 96
    exported = torch.load(tmp_path / "small.pt", weights_only=True)
    assert not {"codebook_use", "optimizer"} & set(exported)
    assert exported["builder"] == "miniature" and exported["recipe"]["conv_stem"]
    assert isinstance(dar.load_tokenizer(tmp_path / "small.pt").patchify, torch.nn.Sequential)


def test_two_runs_of_one_seed_give_identical_weights(tmp_path, monkeypatch):
    """The shipped tokenizer's recipe on the textures (the toy perceptual term from group 4,
    codebook restarts), run twice with one seed into two folders: the same weights, bit for bit,
    and a record without this machine's absolute paths."""
    monkeypatch.setattr(dar, "train_toy_classifier",
                        lambda size, seed=0, **kw: torch.manual_seed(seed) and
                        dar.ToyClassifier().eval())
    argv = ["--data", "textures", "--steps", "4", "--lpips-weight", "0.5", "--lpips-from-group",
            "4", "--codebook-restart", "1", "--warmup", "0"]
    for run in ("first", "second"):
        train_tokenizer.main(tokenizer_args(tmp_path / run, *argv))
    first, second = (torch.load(tmp_path / run / "tokenizer.pt", weights_only=True)
                     for run in ("first", "second"))
    for key in ("model", "ema"):
        assert first[key].keys() == second[key].keys()
        assert all(torch.equal(first[key][name], second[key][name]) for name in first[key])
    assert torch.equal(first["codebook_use"], second["codebook_use"])
    # no absolute path but the run's own --out (here in a temporary folder)
    assert not [value for key, value in first["args"].items()
                if key not in ("out", "command") and str(tmp_path) in value or value[:1] == "/"
                and not value.startswith(str(tmp_path))]


def test_a_killed_tiny_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    """The miniature's own state (the codebook use of its restarts) resumes exactly too."""
    argv = ["--steps", "4", "--codebook-restart", "1", "--warmup", "0"]
    straight = train_tokenizer.main(tokenizer_args(tmp_path / "straight", *argv))
    killed_in_step_three(
        monkeypatch, lambda: train_tokenizer.main(tokenizer_args(tmp_path / "split", *argv))
    )
    resumed = train_tokenizer.main(tokenizer_args(tmp_path / "split", *argv, "--resume"))
    assert resumed[1] == straight[1]
    a, b = (
        torch.load(tmp_path / run / "tokenizer.pt", weights_only=True)
        for run in ("straight", "split")
    )
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key]), key
    assert torch.equal(a["codebook_use"], b["codebook_use"])


def test_the_miniatures_perceptual_term_is_lpips_form_on_the_toy_teacher():
    """--lpips-weight on the tiny config needs no download: LPIPS's form on the toy teacher. It is
    0 for the image itself, grows with another class of the same layout far more than with slight
    noise, and sends a gradient to the fakes."""
    torch.manual_seed(0)
    perceptual = train_tokenizer.toy_perceptual(dar.ToyClassifier().eval().requires_grad_(False))
    data = dar.BuiltinTextures(4)
    layouts = [data.layout(i) for i in range(4)]
    real = torch.stack([data.draw(layout, 0) for layout in layouts])
    other = torch.stack([data.draw(layout, 5) for layout in layouts]).requires_grad_()
    noisy = real + 0.02 * torch.randn_like(real)
    assert perceptual(real, real).abs().max() < 1e-6
    assert (perceptual(real, other) > 3 * perceptual(real, noisy)).all()
    perceptual(real, other).sum().backward()
    assert other.grad.abs().sum() > 0


def test_group_probes_read_the_shipped_tokenizers_first_group():
    tokenizer = dar.load_tokenizer(dar.SHIPPED_TINY / "tokenizer.pt")
    images, labels = dar.builtin_images(700, 32, train_tokenizer.PROBE_SEED)
    probes = train_tokenizer.group_probes(tokenizer, images, labels, train=500)
    assert set(probes) == {0, 1, 3, 7} and set(probes[0]) == {"class", "background",
                                                              "object colour", "position"}
    # the shipped codes hold the layout in group 1 and the class in the last group; group 1 holds
    # part of the class too (a limit its model card names)
    assert min(probes[0][name] for name in ("background", "object colour", "position")) > 0.9
    assert probes[7]["class"] > 0.9 and probes[0]["class"] < 0.7
    shuffled = train_tokenizer.group_probes(
        tokenizer,
        images,
        labels[torch.randperm(700, generator=torch.Generator().manual_seed(0))],
        train=500,
        groups=[0],
    )
    # chance, for labels it cannot read
    assert set(shuffled) == {0} and shuffled[0]["class"] < 0.3


def test_the_perceptual_terms_option_is_refused_where_it_cannot_act(tmp_path, capsys):
    for flags, named in ((["--lpips-from-group", "4"], "acts only with --lpips-weight > 0"),
                         (["--lpips-weight", "1", "--lpips-from-group", "9"], "<= 8, got '9'"),
                         (["--config", "ablation", "--lpips-from-group", "4"], "(--config tiny)")):
        with pytest.raises(SystemExit):
            train_tokenizer.parse_args(["--out", str(tmp_path), *flags])
        assert named in capsys.readouterr().err


def test_the_perceptual_term_from_group_k_reads_only_those_groups_steps():
    """lpips_from_group=4: an image whose step reads group 1 adds nothing to the term, one of the
    last group's step adds its distance; lpips_from_group=1 (as released) reads both."""
    torch.manual_seed(0)
    tokenizer = dar.miniature_tokenizer(dar.TOKENIZER_PRESETS["tiny"])
    images = dar.builtin_images(2, 32, 0, "textures")[0]
    distances = []

    def perceptual(real, fakes):
        distances.append((real - fakes).square().mean((1, 2, 3)))
        return distances[-1]
    u = torch.tensor([0.05, 0.95])  # Eq. (5): the steps of group 1 and of group K
    later = tokenizer(images, perceptual, lpips_weight=1.0, u=u, lpips_from_group=4)
    assert torch.allclose(later["lpips"], distances[-1][1].detach() / 2)
    every = tokenizer(images, perceptual, lpips_weight=1.0, u=u)
    assert torch.allclose(every["lpips"], distances[-1].detach().mean())
    assert (distances[-1] > 0).all()


def test_layout_eval_measures_class_position_and_colours(trained_pair, evaluator):
    # with all N tokens kept nothing is sampled: every label gives the reference's own
    # reconstruction
    results = sample.main(
        [*trained_pair, "--eval", "--layout-from", "textures", "--prefix-tokens", "0,64",
         "--n", "3", "--evaluator", str(evaluator[1])]
    )
    assert [row["kept"] for row in results] == [0, 64]
    tokenizer, ensemble = dar.load_tokenizer(trained_pair[1]), evaluator[0]
    references = torch.stack(
        [image for image, _ in dar.BuiltinTextures(3, 32, seed=dar.EVALUATOR_REFERENCE_SEED)]
    )
    codes = tokenizer.encode(references)
    where, background, colour = dar.object_layout(references)
    correct, distance, kept = torch.zeros(2), 0, 0
    for r in range(3):
        image = tokenizer.decode(
            codes[r : r + 1], generator=torch.Generator().manual_seed(r)
        ).clamp(-1, 1)
        # per member
        correct += (ensemble(image)[:, 0].argmax(-1)[:, None] == torch.arange(10)).sum(-1)
        image_where, image_background, image_colour = dar.object_layout(image)
        distance += 10 * (image_where[0] - where[r]).norm().nan_to_num(32.0).item()
        kept += (
            10
            * (
                (image_background[0] == background[r]).all() & (image_colour[0] == colour[r]).all()
            ).item()
        )
    measured = results[1]
    assert measured["class_as_asked"]["mean"] == pytest.approx(
        (correct / 30).mean().item(), abs=1e-4
    )
    assert (measured["centroid_px"], measured["colours_kept"]) == pytest.approx(
        (distance / 30, kept / 30), abs=1e-4
    )


def test_object_layout_reads_position_and_colours():
    background, colour = dar.PALETTE[1], dar.PALETTE[6]
    images = background.view(1, 3, 1, 1).repeat(2, 1, 32, 32)
    # a 6 x 4 block: centroid (6.5, 21.5)
    images[0, :, 4:10, 20:24] = colour.view(3, 1, 1)
    # moved by (3, -2), slightly off colour
    images[1, :, 7:13, 18:22] = colour.view(3, 1, 1) * 0.9
    where, found_background, found_colour = dar.object_layout(images)
    torch.testing.assert_close(where, torch.tensor([[6.5, 21.5], [9.5, 19.5]]))
    assert (found_background == background).all() and (found_colour == colour).all()
    data = dar.BuiltinTextures(20, 32, seed=5)
    _, data_background, data_colour = dar.object_layout(torch.stack([image for image, _ in data]))
    # two different colours each
    assert not (data_background == data_colour).all(-1).any()


# ---- notebooks -----------------------------------------------------------------------------------

NOTEBOOKS = sorted((Path(__file__).parent / "notebooks").glob("*.ipynb"))


def code_cells(notebook):
    return [
        cell for cell in json.loads(notebook.read_text())["cells"] if cell["cell_type"] == "code"
    ]


def test_notebooks_are_committed_with_the_outputs_of_one_top_to_bottom_run():
    assert NOTEBOOKS, "no notebooks in notebooks/"
    for notebook in NOTEBOOKS:
        cells = code_cells(notebook)
        assert [cell["execution_count"] for cell in cells] == list(
            range(1, len(cells) + 1)
        ), notebook.name
        for number, cell in enumerate(cells, 1):
            assert cell["outputs"], f"{notebook.name}: code cell {number} has no output"
            assert all(output["output_type"] != "error" for output in cell["outputs"]), (
                notebook.name,
                number,
            )
        pictures = [
            output
            for cell in cells
            for output in cell["outputs"]
            if "image/png" in output.get("data", {})
        ]
        assert pictures, f"{notebook.name} shows no picture"
        assert not any(
            "image/jpeg" in output.get("data", {}) for cell in cells for output in cell["outputs"]
        ), f"{notebook.name} stores a picture twice (PNG and JPEG)"
        assert (
            notebook.stat().st_size <= 600_000
        ), f"{notebook.name}: {notebook.stat().st_size:,} bytes"





@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[notebook.stem for notebook in NOTEBOOKS])
def test_notebook_runs_top_to_bottom_without_jupyter(notebook, monkeypatch):
    """Each code cell in order in one fresh namespace, as Jupyter would (cwd = notebooks/), at the
    small size; a cell's last expression is evaluated and, if it is a picture, rendered to PNG."""
    monkeypatch.setenv("DAR_NOTEBOOK_QUICK", "1")
    monkeypatch.chdir(notebook.parent)
    # as Jupyter's kernel: its folder
    monkeypatch.setattr(sys, "path", [str(notebook.parent), *sys.path])

    def display(value):
        if hasattr(value, "_repr_png_"):
            assert value._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"

    namespace = {"__name__": "__main__", "display": display}
    for number, cell in enumerate(code_cells(notebook), 1):
        tree = ast.parse("".join(cell["source"]))
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        name = f"{notebook.name}, cell {number}"
        exec(compile(tree, name, "exec"), namespace)
        if last is not None:
            display(eval(compile(ast.Expression(last.value), name, "eval"), namespace))


# ---- bad input never corrupts or lies ------------------------------------------------------------

def one_line_refusal(run, capsys):
    """run() must end with exit code 2 and one line `script: error: ...` (argparse's or a
    BadInput's); -> the line."""
    with pytest.raises(SystemExit) as raised:
        run()
    assert raised.value.code == 2
    line = (
        str(raised.value)
        if isinstance(raised.value, dar.BadInput)
        else capsys.readouterr().err.strip()
    )
    assert line and "\n" not in line and "Traceback" not in line
    return line


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("tokenizer", ["--steps", "0"], "--steps: must be an integer >= 1, got '0'"),
        ("tokenizer", ["--warmup", "-1"], "--warmup: must be an integer >= 0"),
        ("tokenizer", ["--ema", "1.5"], "--ema: must be a finite number >= 0 and < 1"),
        ("tokenizer", ["--lr", "nan"], "--lr: must be a finite number > 0"),
        ("tokenizer", ["--lr", "-1"], "--lr: must be a finite number > 0"),
        ("tokenizer", ["--batch-size", "0"], "--batch-size: must be an integer >= 1"),
        ("tokenizer", ["--grad-accum", "0"], "--grad-accum: must be an integer >= 1"),
        ("tokenizer", ["--save-every", "0"], "--save-every: must be an integer >= 1"),
        ("tokenizer", ["--data", "/no/such/folder"], "--data: no folder /no/such/folder"),
        ("tokenizer", ["--export", "small"], "--export small: expected a file name ending in .pt"),
        ("tokenizer", ["--resume", "--overwrite"], "give one"),
        ("ar", ["--epochs", "0"], "--epochs: must be a finite number > 0"),
        ("ar", ["--epochs", "-1"], "--epochs: must be a finite number > 0"),
        ("ar", ["--decay-fraction", "2"],
         "--decay-fraction: must be a finite number >= 0 and <= 1"),
        ("ar", ["--tokenizer", "/no/such.pt"], "--tokenizer: no checkpoint at /no/such.pt"),
        ("sample", ["--guidance", "nan"], "--guidance: each scale must be a finite number >= 0"),
        ("sample", ["--guidance", "inf"], "--guidance: each scale must be a finite number >= 0"),
        ("sample", ["--guidance", "-1"], "--guidance: each scale must be a finite number >= 0"),
        # numbers ranged where they are parsed: nothing overflows later
        ("sample", ["--guidance", "3e38"], "--guidance: each scale must be a finite number >= 0 "
         "and <= 100"),
        ("ar", ["--sample-guidance", "1e39"], "--sample-guidance: must be a finite number >= 0 and "
         "<= 100"),
        ("ar", ["--epochs", "1e308"], "--epochs: must be a finite number > 0 and <= 1000000"),
        ("sample", ["--eval", "--n", "1"], "--eval --n: at least 2 images"),
        ("sample", ["--out", ""], "--out: an empty path"),
        ("sample", ["--temperature", "nan"], "--temperature: must be a finite number >= 0"),
        ("sample", ["--top-p", "0"], "--top-p: must be a finite number > 0 and <= 1"),
        ("sample", ["--top-p", "1.5"], "--top-p: must be a finite number > 0 and <= 1"),
        ("sample", ["--top-k", "-5"], "--top-k: must be an integer >= 0"),
        ("sample", ["--denoising-steps", "1.5"],
         "--denoising-steps: must be an integer >= 1, got '1.5'"),
        ("sample", ["--fid", "3", "--labels", "3", "--out", "x"], "--labels is not read by --fid"),
        ("sample", ["--out", "picture"], "a picture is written to a file name ending in .png"),
        # flags that the chosen mode would ignore, empty lists, counts that disagree, seeds out
        # of range
        ("sample", ["--labels", ""], "--labels: give at least one class"),
        ("sample", ["--benchmark", ""], "--benchmark: give at least one batch size"),
        ("sample", ["--fid", "4", "--n", "100", "--out", "x"], "--n is not read by --fid"),
        ("sample", ["--stream", "--eval"], "--stream is not read by --eval"),
        ("sample", ["--gif", "--fid", "4", "--out", "x"], "--gif is not read by --fid"),
        ("sample", ["--prefix-tokens", "8"], "--prefix-tokens is not read by the picture"),
        ("sample", ["--eval", "--out", "x"], "--out is not read by --eval"),
        ("sample", ["--repeat", "2"], "--repeat is not read by the picture"),
        (
            "sample",
            ["--reconstruct", "textures", "--out", "x", "--guidance", "2"],
            "--guidance is not read",
        ),
        ("sample", ["--seed", str(2**64)], "--seed: must be an integer >= 0 and <= 4294967295"),
        (
            "sample",
            ["--out", "/proc/x/x.png"],
            "--out /proc/x/x.png: its folder cannot be created or written",
        ),
        ("sample", ["--evall"], "unrecognized arguments: --evall"),
        (
            "tokenizer",
            ["--seed", str(time.time_ns() * 10**6)],
            "--seed: must be an integer >= 0 and <=",
        ),
        (
            "tokenizer",
            ["--eval-every", "0", "--eval-images", "5"],
            "--eval-images acts only with --eval-every N",
        ),
        (
            "ar",
            ["--eval-samples", "0", "--evaluator", "x.pt"],
            "--evaluator acts only with --eval-samples N",
        ),
    ],
)
def test_every_bad_flag_value_ends_with_one_line_before_any_work(
    script, argv, message, tmp_path, capsys
):
    out = tmp_path / "run"
    if script == "sample":
        run = lambda: sample.main(argv)
    else:
        module = train_tokenizer if script == "tokenizer" else train_ar
        extra = (
            []
            if script == "tokenizer" or "--tokenizer" in argv
            else ["--tokenizer", str(OFFICIAL_TOKENIZER)]
        )
        run = lambda: module.main(module.parse_args(["--out", str(out), *extra, *argv]))
    assert message in one_line_refusal(run, capsys)
    assert not out.exists()                                          # nothing was written


def test_export_never_replaces_what_the_run_did_not_make(tmp_path, capsys):
    out, foreign = tmp_path / "run", tmp_path / "foreign.pt"
    foreign.write_bytes(SHIPPED["tokenizer"].read_bytes())          # e.g. the shipped tokenizer
    for target, message in ((foreign, "exists and is not an export of"),
                            (out / "tokenizer.pt", "is the run's training checkpoint")):
        line = one_line_refusal(
            lambda: tokenizer_args(out, "--steps", "2", "--export", str(target)), capsys
        )
        assert message in line
    assert foreign.read_bytes() == SHIPPED["tokenizer"].read_bytes() and not out.exists()
    small = tmp_path / "small.pt"
    train_tokenizer.main(tokenizer_args(out, "--steps", "2", "--export", str(small)))
    first = torch.load(small, weights_only=True)
    # the run's own earlier export may be written again (here: --resume at the last step
    # exports only)
    train_tokenizer.main(tokenizer_args(out, "--steps", "2", "--resume", "--export", str(small)))
    again = torch.load(small, weights_only=True)
    # the record is relative to the export's folder: no absolute path of this machine ships
    assert again["exported_from"] == os.path.relpath(out / "tokenizer.pt", tmp_path)
    assert dar.exported_from(small) == (out / "tokenizer.pt").resolve()
    assert "--resume" in again["command"]
    assert all(torch.equal(again["model"][key], value) for key, value in first["model"].items())


def test_resume_continues_the_same_run_or_names_the_setting_that_changed(tmp_path, capsys):
    out = tmp_path / "run"
    train_tokenizer.main(tokenizer_args(out, "--steps", "2", "--sample-every", "1"))
    before = (out / "tokenizer.pt").read_bytes()
    for flags, named in (
        (["--lr", "0.001"], "--lr 0.0003, this run has --lr 0.001"),
        (["--seed", "1"], "--seed 0, this run has --seed 1"),
        (["--builtin-size", "32"], "--builtin-size 64, this run has --builtin-size 32"),
        (
            ["--lpips-weight", "0.5"],
            "--lpips-weight 0.0, this run has --lpips-weight 0.5",
        ),
    ):
        line = one_line_refusal(
            lambda: train_tokenizer.main(tokenizer_args(out, "--steps", "4", "--resume", *flags)),
            capsys,
        )
        assert named in line and "--overwrite" in line
        assert (out / "tokenizer.pt").read_bytes() == before         # nothing changed
    # what may change: its length, logging and pictures
    train_tokenizer.main(tokenizer_args(out, "--steps", "3", "--resume", "--log-every", "5"))
    assert torch.load(out / "tokenizer.pt", weights_only=True)["step"] == 3
    assert (out / "reconstructions_0000001.png").exists()
    # afresh: the old pictures go
    train_tokenizer.main(tokenizer_args(out, "--steps", "1", "--overwrite"))
    assert sorted(path.name for path in out.glob("*.png")) == ["reconstructions_0000001.png"]


def test_a_legacy_format_checkpoint_loads_and_a_tensor_is_no_evaluator(tmp_path, capsys):
    legacy = tmp_path / "legacy.pt"
    torch.save(
        torch.load(SHIPPED["tokenizer"], weights_only=True),
        legacy,
        _use_new_zipfile_serialization=False,
    )
    assert dar.load_tokenizer(legacy).cfg == dar.load_tokenizer(SHIPPED["tokenizer"]).cfg
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    line = one_line_refusal(
        lambda: sample.main(["--eval", "--n", "2", "--evaluator", str(tmp_path / "tensor.pt")]),
        capsys,
    )
    assert "--evaluator" in line and "is not a toy evaluator" in line and "'Tensor'" in line


def test_files_folders_hold_only_what_the_command_records(tmp_path, trained_pair, capsys):
    folder = tmp_path / "fid"
    folder.mkdir()
    # PNGs of another origin, no record
    Image.new("RGB", (32, 32)).save(folder / "000000.png")
    line = one_line_refusal(
        lambda: sample.main([*trained_pair, "--fid", "2", "--out", str(folder)]), capsys
    )
    assert "no run of sample.py recorded" in line and sorted(p.name for p in folder.iterdir()) == [
        "000000.png"
    ]
    (folder / "000000.png").unlink()
    sample.main([*trained_pair, "--fid", "2", "--out", str(folder)])
    Image.new("RGB", (64, 64)).save(folder / "000001.png")          # one of another size
    line = one_line_refusal(
        lambda: sample.main([*trained_pair, "--fid", "2", "--out", str(folder)]), capsys
    )
    assert "000001.png is 64x64, not the 32x32" in line
    (folder / "000001.png").unlink()
    (folder / "settings.json").write_text("")                        # a record a kill emptied
    line = one_line_refusal(
        lambda: sample.main([*trained_pair, "--fid", "2", "--out", str(folder)]), capsys
    )
    assert "settings.json is empty or damaged" in line
    record = json.loads(json.dumps({"a": 1}))
    dar.check_record(tmp_path / "record.json", record, "x")
    assert not list(tmp_path.glob("record.json.*.tmp"))              # written through a rename


def test_an_image_folder_is_known_by_its_content_and_counts_a_bad_file_once(tmp_path):
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "cats" / "broken.png").write_bytes(b"not a png")
    data = dar.ImageFolder(tmp_path / "data", 32)
    broken = [i for i, (path, *_) in enumerate(data.files) if path.name == "broken.png"][0]
    with pytest.warns(UserWarning):
        data.read(broken)
    data.read(broken)
    assert data.skipped == 1                                         # read twice, counted once
    before = data.fingerprint()
    moved = next((tmp_path / "data" / "cats").glob("*.png"))
    # an image moves to another class
    moved.rename(tmp_path / "data" / "dogs" / moved.name)
    assert dar.ImageFolder(tmp_path / "data", 32).fingerprint() != before


def test_a_run_owns_its_out_folder(tmp_path, capsys):
    out, argv = tmp_path / "run", ["--steps", "2"]
    train = lambda *extra: train_tokenizer.main(tokenizer_args(out, *argv, *extra))
    train()
    first = (out / "tokenizer.pt").read_bytes()
    # a finished checkpoint is not replaced
    line = one_line_refusal(train, capsys)
    assert "already holds" in line and "--resume" in line and "--overwrite" in line
    assert (out / "tokenizer.pt").read_bytes() == first
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # a second live run holds the folder: its lock names this host, its process, its start
        host, started = socket.gethostname(), dar.process_started(sleeper.pid)
        (out / ".lock").write_text(f"{host} {sleeper.pid} {started}\n")
        line = one_line_refusal(lambda: train("--overwrite"), capsys)
        assert f"in use by process {sleeper.pid}" in line
        assert (out / "tokenizer.pt").read_bytes() == first
        (out / ".lock").write_text(f"elsewhere {sleeper.pid} {started}\n")  # another host's run
        line = one_line_refusal(lambda: train("--overwrite"), capsys)
        assert f"if that run has ended, delete {out / '.lock'}" in line
        # the PID now belongs to another process (another start time): the lock is stale
        (out / ".lock").write_text(f"{host} {sleeper.pid} 1\n")
        train("--overwrite")
    finally:
        sleeper.kill()
        sleeper.wait()
    # its process ended: a stale lock is taken over
    train("--overwrite")
    assert (out / ".lock").read_text().split()[1] == str(os.getpid())
    # temporaries are per process and renamed
    assert not list(out.glob("*.tmp"))


def test_resumable_outputs_refuse_a_rerun_with_other_settings(
    tmp_path, trained_pair, trained_tokenizer
):
    folder = tmp_path / "fid"
    sample.main([*trained_pair, "--fid", "3", "--guidance", "4.0", "--out", str(folder)])
    (folder / "000001.png").unlink()                                 # an interrupted run
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    with pytest.raises(dar.BadInput, match=r"made with guidance = 4.0, this run has 1.0"):
        sample.main([*trained_pair, "--fid", "3", "--guidance", "1.0", "--out", str(folder)])
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before
    data, cache = dar.BuiltinTextures(8, 32, seed=0), tmp_path / "codes"
    tokenizer = dar.load_tokenizer(trained_tokenizer)
    build = lambda seed: train_ar.cache_codes(tokenizer, trained_tokenizer, data, cache, 0, 1,
                                              torch.device("cpu"), 4,
                                              {"source": "textures", "size": 8, "seed": seed})
    build(0)
    with pytest.raises(
        dar.BadInput, match=r"made with data = .*'seed': 0.*this run has .*'seed': 1"
    ):
        # another dataset: not the seed-0 codes
        build(1)


def test_one_image_folder_walker_passes_over_what_it_cannot_read(tmp_path, trained_pair):
    """Image folders: hidden folders are no class, a dangling link, a link loop and a name that
    is not UTF-8 are passed over and counted, an empty class is refused; the AR checkpoint records
    its data's class names."""
    root = tmp_path / "images"
    for name in ("cat", "dog", ".ipynb_checkpoints"):
        (root / name).mkdir(parents=True)
    for i, name in enumerate(("cat", "dog")):
        Image.fromarray(np.full((8, 8, 3), 60 * i, dtype=np.uint8)).save(root / name / "a.png")
    (root / "cat" / "gone.png").symlink_to(root / "nowhere.png")      # a dangling link
    (root / "dog" / "loop.png").symlink_to(root / "dog" / "loop.png")  # a link to itself
    os.close(os.open(os.fsencode(root / "cat") + b"/\xff.png", os.O_CREAT | os.O_WRONLY))
    data = dar.ImageFolder(root, 8)
    assert data.classes == ["cat", "dog"] and len(data) == 2 and data.passed_over == 3
    assert len(data.fingerprint()) == 64 and data[1][1] == 1
    (root / "bird").mkdir()
    with pytest.raises(ValueError, match="class folder .*bird holds no readable images"):
        dar.ImageFolder(root, 8)
    assert dar.load_ar(trained_pair[3]).class_names == list(dar.TEXTURE_CLASSES)


def test_fid_resume_lists_its_folder_once_and_remakes_a_damaged_png(tmp_path, monkeypatch):
    """The resume scan is linear: one listing of the folder and one header read per PNG, whatever
    is left to do (it was a glob per missing image); a truncated PNG is made again at packing."""
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    calls = {"listings": 0, "opens": 0}
    real_iterdir, real_open = Path.iterdir, sample.Image.open
    monkeypatch.setattr(Path, "iterdir", lambda self: calls.update(
        listings=calls["listings"] + 1) or real_iterdir(self))
    monkeypatch.setattr(sample.Image, "open", lambda *a, **k: calls.update(
        opens=calls["opens"] + 1) or real_open(*a, **k))
    for total in (40, 160):
        folder = tmp_path / str(total)
        folder.mkdir()
        for i in range(0, total, 2):  # half made
            Image.fromarray(pixels).save(folder / f"{i:06d}.png")
        (folder / "settings.json").write_text("{}")
        calls.update(listings=0, opens=0)
        sample.check_files_folder(folder, 32)
        made = sample.write_pngs(lambda indices: (torch.zeros(len(indices), 3, 32, 32), None),
                                 total, folder, batch_size=1000)
        assert made == total // 2 and calls == {"listings": 1, "opens": total // 2}
    (tmp_path / "gone.npz").write_bytes(b"an earlier run's file")  # its folder deleted since
    with pytest.raises(dar.BadInput, match="gone.npz exists, but no record of the run"):
        sample.check_files_folder(tmp_path / "gone", 32)
    (folder / "000003.png").write_bytes((folder / "000003.png").read_bytes()[:40])  # truncated
    path = sample.pack(folder, 160, lambda indices: (torch.ones(len(indices), 3, 32, 32), None))
    packed = np.load(path)["arr_0"]
    assert packed.shape == (160, 32, 32, 3) and (packed[3] == 255).all()  # made again
    assert (packed[1] == 128).all() and (packed[2] == 0).all()  # as written: made, and found


def test_a_picture_folder_that_cannot_be_written_is_refused_before_sampling(
        trained_pair, sampler_calls, monkeypatch, capsys):
    # root ignores permission bits here, so the folder's answer is stood in for
    monkeypatch.setattr(sample, "writable", lambda folder: False)
    line = one_line_refusal(lambda: sample.main(trained_pair), capsys)
    assert "cannot be created or written: pass --out FILE.png" in line and not sampler_calls


def test_every_file_is_written_through_a_temporary_and_a_rename(tmp_path, trained_pair, capsys):
    """A picture --out replaces only a picture of sample.py: a file of other origin (a checkpoint
    behind a symlink, a photo) is refused, nothing changed; a symlink to one of its pictures is
    replaced, never its target; no temporary is left behind."""
    checkpoint, photo = tmp_path / "precious.pt", tmp_path / "photo.png"
    ours = tmp_path / "ours.png"
    checkpoint.write_bytes(b"weights")
    Image.new("RGB", (8, 8)).save(photo)
    (tmp_path / "link.png").symlink_to(checkpoint)
    for out in (tmp_path / "link.png", photo):
        line = one_line_refusal(lambda: sample.main([*trained_pair, "--n", "1", "--out", str(out)]),
                                capsys)
        assert "is not a picture of sample.py" in line
    assert checkpoint.read_bytes() == b"weights" and Image.open(photo).size == (8, 8)
    sample.main([*trained_pair, "--n", "1", "--out", str(ours)])
    before = ours.read_bytes()
    (tmp_path / "link.png").unlink()
    (tmp_path / "link.png").symlink_to(ours)
    sample.main([*trained_pair, "--n", "1", "--labels", "3", "--out", str(tmp_path / "link.png")])
    assert ours.read_bytes() == before and not (tmp_path / "link.png").is_symlink()
    assert dar.is_ours(tmp_path / "link.png") and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="empty path"):
        dar.write_atomically(Path(""), "text")


def test_the_api_converts_or_names_its_inputs(official, official_ar, expected):
    """encode, decode and sample take numpy arrays, lists, integer dtypes and numbers as text; what
    they cannot take (NaN pixels, fractional ids, one generator for several images) is named."""
    images, codes = expected["images"], expected["codes"]
    assert torch.equal(official.encode(images.numpy()), codes)
    assert torch.equal(official.conditions(codes.tolist()), official.conditions(codes))
    assert torch.equal(official.conditions(codes.to(torch.uint8)), official.conditions(codes))
    as_text = dict(guidance="2", temperature="1", top_k="0", top_p="1")
    a, b = (list(dar.sample(official_ar, official, [0, 1], generator=dar.generators([0, 1], "cpu"),
                            **options))[-1].image for options in (as_text, dict(guidance=2.0)))
    assert torch.equal(a, b)
    for bad, message in ((dict(guidance="x"), "must be numbers"),
                         (dict(prefix=[[1.5], [2.5]]), "token ids"),
                         (dict(generator=[torch.Generator()]), "one generator per sample")):
        with pytest.raises(ValueError, match=message):
            next(dar.sample(official_ar, official, [0, 1], **bad))


def test_images_of_every_mode_are_read_as_8_bit_rgb(tmp_path):
    # 0 .. 65472, a 16-bit greyscale ramp
    ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    rgb = np.asarray(dar.open_rgb(tmp_path / "grey16.png"))
    # contrast kept, not clipped
    assert rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() >= 250
    assert rgb[..., 0].ravel().tolist() == sorted(rgb[..., 0].ravel().tolist())
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    transparent.save(tmp_path / "alpha.png")
    # on white
    assert np.asarray(dar.open_rgb(tmp_path / "alpha.png"))[0, 0].tolist() == [255, 255, 255]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert dar.open_rgb(tmp_path / "cmyk.jpg").mode == "RGB"
    frames = [Image.new("P", (8, 8), i) for i in (3, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert dar.open_rgb(tmp_path / "anim.gif").size == (8, 8)


def test_checkpoint_errors_name_the_real_cause(tmp_path, trained_tokenizer, capsys):
    noise = tmp_path / "noise.pt"
    # on arbitrary bytes torch's unpickler raises many kinds of error; each is the same
    # refusal
    for seed in range(64):
        noise.write_bytes(np.random.default_rng(seed).bytes(4096))
        for load in (dar.load_tokenizer, dar.load_checkpoint_file):
            with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
                load(noise)
    # a real checkpoint that pickles a class
    torch.save({"config": dar.TokenizerConfig()}, tmp_path / "class.pt")
    with pytest.raises(ValueError, match="holds dar.TokenizerConfig, an object other than tensors"):
        dar.load_checkpoint_file(tmp_path / "class.pt")
    out = tmp_path / "run"
    out.mkdir()
    (out / "tokenizer.pt").write_bytes(noise.read_bytes())
    line = one_line_refusal(
        lambda: train_tokenizer.main(tokenizer_args(out, "--steps", "2", "--resume")), capsys
    )
    assert "not a PyTorch checkpoint" in line
    # a wrong-kind checkpoint
    torch.save({"kind": "ar", "model": {}, "optimizer": {}}, out / "tokenizer.pt")
    line = one_line_refusal(
        lambda: train_tokenizer.main(tokenizer_args(out, "--steps", "2", "--resume")), capsys
    )
    assert "is not a tokenizer training checkpoint (it is 'ar')" in line and len(line) < 300


def test_sampler_refuses_non_finite_settings(official_ar, official):
    for options in (
        dict(guidance=float("nan")),
        dict(guidance=(1.0, float("inf"))),
        dict(temperature=float("nan")),
    ):
        with pytest.raises(ValueError, match="finite number"):
            next(dar.sample(official_ar, official, torch.arange(2), **options))
