#!/usr/bin/env python3
"""The PyTorch side of `kd-engine bench-step`: the anchor DFT training step (SPEC §5, last row).

What one step computes (plain PyTorch + transformers, eager, bf16, random weights made on the device
from configs: no files, no downloads):

  1. vision: a SiglipVisionModel of SigLIP-so400m-patch14-384's shape (frozen, no_grad) on a batch
     of 4 random images, features = hidden_states[-2] (the output of the penultimate encoder layer,
     no post-layernorm), the first token dropped ("patch" select) -> 728 visual tokens per image.
     By default only the encoder layers up to that one run (as bench-step runs them, and as LLaVA
     code that trims the tower does); `--vision full` runs the whole tower with
     output_hidden_states=True and picks [-2] (what a plain upstream tower call costs). The tower is
     run ONCE and its features shared by student and teacher, as bench-step does (both use the same
     frozen tower; upstream runs each model's own copy).
  2. teacher forward (no_grad): its own mlp2x_gelu projector (Linear -> GELU(erf) -> Linear, with
     biases), visual tokens spliced into the token embeddings, a Qwen2ForCausalLM of Qwen1.5-4B's
     shape (untied, rope θ 5e6) to its full [B, T, V] bf16 logits.
  3. student forward: the same for a Qwen1.5-0.5B-shape Qwen2ForCausalLM (tied embeddings, rope θ
     1e6) with its own projector, to its final hidden states.
  4. loss: the student's LM head (full [B, T, V] logits, as upstream computes them) and the
     LLaVA-KD DFT objective, total = L_ce + 1·L_res + 1·L_vis + 0.5·L_rel (SPEC §1; τ = 1):
       - L_ce: cross-entropy (fp32) over the rows that predict a response token;
       - L_res: KL(p_t‖p_s) on the same rows, nn.KLDivLoss(reduction="batchmean") on
         log_softmax(student) and softmax(teacher), fp32;
       - L_vis: the same on the rows AT the visual positions (not shifted);
       - L_rel: per image, Z = the fp32 logits at its 728 visual positions, R = Z·Zᵀ (728×728),
         1 − cos(vec R_s, vec R_t), mean over the images. Two forms (`--gram`): "fp32" = the
         upstream form (fp32 Gram with TF32 off); "tf32" = the strongest eager form of the SPEC
         anchor (the same fp32 Gram with TF32 matmuls allowed). TF32 only changes that Gram: every
         other matmul of the step is bf16.
     KL and relation use the first min(V_s, V_t) columns (all of them here: both vocabularies are
     151936, or the same V/scale).
  5. backward: loss.backward() through the student LM head, LLM and projector (vision tower,
     teacher frozen). `--gradient-checkpointing` recomputes each student block in the backward
     (transformers' non-reentrant checkpointing), the PyTorch counterpart of bench-step's flag of
     that name where the binary has it.
  6. optimizer: global-norm gradient clipping at 1.0 (clip_grad_norm_, foreach), then AdamW (fused
     where available, else foreach; lr 2e-5, β 0.9/0.999, ε 1e-8, weight decay 0 as SFT/DFT use)
     over the student LLM + projector, bf16 parameters and therefore bf16 moments (PyTorch keeps
     the moments in the parameters' dtype; kd-engine keeps f32 moments), then zero_grad(None).

Where it matches `kd-engine bench-step` (src/cli/bench_step.rs; compare with `--head direct`,
which also materialises full logits, and with the default fused head, which does not):
  - shapes: the same presets and the same `--scale S` rule (presets.rs scale_llm / scale_vision:
    heads, kv heads, intermediate, layers, vocabulary ÷ S, head dim kept; tower layers ÷ S (≥ 2),
    patch grid ÷ √S rounded (≥ 2)); batch 4 × 1024 tokens ÷ S (at least the layout + 2);
  - token layout of every sequence: [32 prompt][728 visual][32 prompt][232 response] (÷ S, ≥ 1
    each), response at the end; the 4 sequences are equal-length, so a [4, T] batch with causal
    attention is the same work as bench-step's 4 packed sequences; position ids 0..T−1 each;
  - rows: L_ce / L_res on rows j with token j+1 a response token (232 per sequence at scale 1),
    L_vis on the 728 visual rows, L_rel on each image's 728 visual rows (SPEC §1, loss/select.rs);
  - token ids uniform in [0, min(V_s, V_t)), pixels uniform in [−1, 1); every weight drawn by
    kd-engine's rule (normal(0, 0.02), biases 0, norm weights 1; presets::init_kind), tower
    included, so the loss values land where bench-step's do (not bit-equal: another RNG);
  - parameters: the same count (tied student head counted once; the tower without its pooling
    head but with its post-layernorm, which neither side runs);
  - memory counted the SPEC §5 way: allocator high-water mark over the timed steps
    (torch.cuda.max_memory_allocated), transient = peak − (weights + gradients + optimizer state);
    weights = every parameter of tower, both projectors and both LLMs, as bench-step counts them;
  - phases named as bench-step's. Differences that remain: bench-step's "loss" phase includes the
    student LM head's backward, here that sits in "backward" (one autograd call); PyTorch's moments
    are bf16 (kd-engine's f32); the teacher here computes full logits (bench-step's fused head only
    the rows a loss uses).

Timing: wall clock per step with a device synchronisation at the end of each step (bench-step
syncs each phase), CUDA events per phase; `--warmup` untimed steps, then the median of `--steps`
timed ones. tok/s = B·T / median step. On the CPU, memory figures are null and the numbers are a
smoke test only, NOT the GPU anchor.

Prints one JSON object (also written with --json FILE); each case (--gram form) is guarded: a
failure is recorded as {"error": ...} and the other cases still run.
"""
import argparse
import gc
import json
import math
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

PHASES = ["vision", "teacher_forward", "student_forward", "loss", "backward", "optimizer"]

# SPEC §2 presets (src/model/presets.rs), unscaled.
STUDENT = dict(name="qwen1.5-0.5b", hidden=1024, intermediate=2816, layers=24, heads=16, kv_heads=16, tied=True, theta=1e6, vocab=151936)
TEACHER = dict(name="qwen1.5-4b", hidden=2560, intermediate=6912, layers=40, heads=20, kv_heads=20, tied=False, theta=5e6, vocab=151936)
VISION = dict(name="siglip-so400m-patch14-384", hidden=1152, intermediate=4304, layers=27, heads=16, image_size=384, patch_size=14)
PROMPT_BEFORE, PROMPT_AFTER = 32, 32
ALPHA, BETA, GAMMA = 1.0, 1.0, 0.5
LR = 2e-5


# ---------------------------------------------------------------- shapes (mirrors bench_step.rs)

def scale_llm(c, s):
    """presets::scale_llm: heads, kv heads, intermediate, layers, vocabulary ÷ s; head dim kept."""
    if s <= 1:
        return dict(c, head_dim=c["hidden"] // c["heads"])
    head_dim = c["hidden"] // c["heads"]
    heads = max(c["heads"] // s, 1)
    kv = min(max(c["kv_heads"] // s, 1), heads)
    while heads % kv:
        kv -= 1
    return dict(c, hidden=heads * head_dim, head_dim=head_dim, intermediate=max(c["intermediate"] // s, 1),
                layers=max(c["layers"] // s, 1), heads=heads, kv_heads=kv, vocab=max(c["vocab"] // s, 2))


def scale_vision(c, s):
    """presets::scale_vision: heads ÷ s (head dim kept), intermediate ÷ s, layers ÷ s (≥ 2), grid ÷ √s."""
    if s <= 1:
        return dict(c)
    head_dim = c["hidden"] // c["heads"]
    heads = max(c["heads"] // s, 1)
    # Rust's f64::round rounds halves away from zero; floor(x + 0.5) does the same for x > 0.
    grid = max(math.floor(c["image_size"] / c["patch_size"] / math.sqrt(s) + 0.5), 2)
    return dict(c, hidden=heads * head_dim, intermediate=max(c["intermediate"] // s, 1),
                layers=max(c["layers"] // s, 2), heads=heads, image_size=grid * c["patch_size"])


def shapes(a):
    s = a.scale
    if s < 1 or a.batch < 1:
        raise SystemExit("--scale and --batch must be at least 1")
    st, te, vi = scale_llm(STUDENT, s), scale_llm(TEACHER, s), scale_vision(VISION, s)
    visual = (vi["image_size"] // vi["patch_size"]) ** 2 - 1  # "patch" select drops the first token
    before, after = max(PROMPT_BEFORE // s, 1), max(PROMPT_AFTER // s, 1)
    seq_len = max(a.seq_len // s, before + visual + after + 2)
    return dict(student=st, teacher=te, vision=vi, batch=a.batch, seq_len=seq_len,
                layout=[before, visual, after, seq_len - before - visual - after])


def describe_llm(c):
    return (f"hidden {c['hidden']}, intermediate {c['intermediate']}, {c['layers']} layers, "
            f"{c['heads']}/{c['kv_heads']} heads, vocab {c['vocab']}")


def step_flops(sh, vision_layers):
    """bench_step.rs phase_flops for --head direct (full logits), in FLOPs, by phase."""
    b, t_len = sh["batch"], sh["seq_len"]
    t = b * t_len
    _, n_vis, _, _ = sh["layout"]

    def linear_params(c):
        h, qd, kvd = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
        return c["layers"] * (h * qd * 2 + h * kvd * 2 + 3 * h * c["intermediate"])

    def causal_attn(c):
        return c["layers"] * b * 2.0 * t_len * t_len * c["heads"] * c["head_dim"]

    v = sh["vision"]
    n = (v["image_size"] // v["patch_size"]) ** 2
    d = v["hidden"]
    vision = vision_layers * b * (2.0 * n * (4.0 * d * d + 2.0 * d * v["intermediate"]) + 4.0 * n * n * d) \
        + 2.0 * b * n * d * (3 * v["patch_size"] ** 2)

    def projector(h):
        return 2.0 * b * n_vis * (d * h + h * h)

    s, te = sh["student"], sh["teacher"]
    kept = min(s["vocab"], te["vocab"])
    teacher_head = 2.0 * t * te["vocab"] * te["hidden"]
    student_head = 2.0 * t * s["vocab"] * s["hidden"]
    relation = b * 3.0 * 2.0 * n_vis * n_vis * kept  # R_s, R_t, dZ_s per image
    teacher_fwd = 2.0 * t * linear_params(te) + causal_attn(te) + projector(te["hidden"]) + teacher_head
    student_fwd = 2.0 * t * linear_params(s) + causal_attn(s) + projector(s["hidden"])
    return dict(vision=vision, teacher_forward=teacher_fwd, student_forward=student_fwd,
                loss=3.0 * student_head + relation, backward=2.0 * student_fwd, optimizer=0.0)


# ---------------------------------------------------------------- models

def qwen2(c, dev):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        hidden_act="silu", max_position_embeddings=32768, initializer_range=0.02, rms_norm_eps=1e-6,
        use_cache=False, tie_word_embeddings=c["tied"], use_sliding_window=False, attention_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": c["theta"]},
    )
    with torch.device(dev):
        m = Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    if c["tied"] and m.lm_head.weight is not m.model.embed_tokens.weight:
        raise RuntimeError("tie_word_embeddings did not tie the student's LM head to its embeddings")
    return m


def siglip(c, dev):
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(
        hidden_size=c["hidden"], intermediate_size=c["intermediate"], num_hidden_layers=c["layers"],
        num_attention_heads=c["heads"], num_channels=3, image_size=c["image_size"], patch_size=c["patch_size"],
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0,
    )
    cfg.vision_use_head = False  # LLaVA never runs the pooling head (kd-engine does not hold it)
    with torch.device(dev):
        return SiglipVisionModel._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")


def projector(d_in, h, dev):
    """mlp2x_gelu: Linear(D_v→H) → GELU (erf) → Linear(H→H), both with bias."""
    with torch.device(dev):
        return nn.Sequential(nn.Linear(d_in, h), nn.GELU(), nn.Linear(h, h)).to(torch.bfloat16)


@torch.no_grad()
def init_like_kd_engine(module, gen):
    """kd-engine's init rule (presets::init_kind) by parameter name: biases 0, norm weights 1,
    everything else normal(0, 0.02). Same distribution as bench-step's weights, other RNG."""
    for name, p in module.named_parameters():
        parent = name.rsplit(".", 2)[-2] if "." in name else ""
        if name.endswith("bias"):
            p.zero_()
        elif name.endswith(".weight") and "norm" in parent:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def vision_features(tower, pixels, mode):
    """hidden_states[-2] without post-layernorm, first token dropped: [B, N−1, D]."""
    vm = getattr(tower, "vision_model", tower)  # transformers 5: the model is the transformer itself
    if mode == "full":
        out = tower(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]
    x = vm.embeddings(pixels)
    for layer in vm.encoder.layers[:-1]:  # the layers hidden_states[-2] needs, no more
        x = layer(x, None)
    return x[:, 1:]


def embed(llm, proj, ids, feats, before):
    """Token embeddings with the projected visual tokens spliced in at [before, before + N)."""
    tok = llm.model.embed_tokens(ids)
    vis = proj(feats)
    return torch.cat([tok[:, :before], vis, tok[:, before + vis.shape[1]:]], dim=1)


# ---------------------------------------------------------------- the objective

_kl = nn.KLDivLoss(reduction="batchmean")


def kd(s, t):
    """KL(p_t‖p_s) per row, batchmean over rows (τ = 1): s, t fp32 [rows, V]."""
    return _kl(F.log_softmax(s, dim=-1), F.softmax(t, dim=-1))


def dft_loss(ls, lt, ids, layout, kept):
    """LLaVA-KD DFT objective on full logits ls (student, grad) and lt (teacher): SPEC §1."""
    before, n_vis, after, _ = layout
    _, t_len, v = ls.shape
    r0 = before + n_vis + after  # first response position
    resp = slice(r0 - 1, t_len - 1)  # rows predicting a response token
    vis = slice(before, before + n_vis)  # rows at the visual positions
    s_resp = ls[:, resp].float()
    ce = F.cross_entropy(s_resp.reshape(-1, v), ids[:, r0:].reshape(-1))
    l_res = kd(s_resp[..., :kept].reshape(-1, kept), lt[:, resp, :kept].float().reshape(-1, kept))
    zs = ls[:, vis, :kept].float()  # [B, N, V]: used by L_vis and L_rel
    zt = lt[:, vis, :kept].float()
    l_vis = kd(zs.reshape(-1, kept), zt.reshape(-1, kept))
    rs = torch.bmm(zs, zs.transpose(1, 2))  # one N×N Gram per image
    rt = torch.bmm(zt, zt.transpose(1, 2))
    l_rel = (1.0 - F.cosine_similarity(rs.flatten(1), rt.flatten(1), dim=1)).mean()
    total = ce + ALPHA * l_res + BETA * l_vis + GAMMA * l_rel
    return total, dict(ce=ce, response=l_res, visual=l_vis, relation=l_rel)


def set_tf32(on):
    """TF32 for fp32 cuBLAS matmuls on/off. The legacy switch on purpose (as compare_torch.py): in
    PyTorch 2.11 it keeps the legacy and the new (fp32_precision) states consistent, whereas
    setting only the new one makes torch.get_float32_matmul_precision() raise ("mix of the legacy
    and new APIs") for any library that asks."""
    torch.backends.cuda.matmul.allow_tf32 = on
    return torch.backends.cuda.matmul.allow_tf32


# ---------------------------------------------------------------- the bench

class Clock:
    """Phase marks: CUDA events on the GPU (no host syncs inside a step), perf_counter on the CPU."""

    def __init__(self, cuda):
        self.cuda, self.marks = cuda, []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def laps_ms(self):
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide the anchor shapes by this (as bench-step --scale)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (the report gives their median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (per case)")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (before --scale)")
    ap.add_argument("--gram", choices=["fp32", "tf32", "both"], default="both",
                    help="relation Gram: fp32 without TF32 (upstream), fp32 with TF32 (strongest), both")
    ap.add_argument("--vision", choices=["trim", "full"], default="trim",
                    help="trim: run the tower only to hidden_states[-2] (bench-step's work); full: all layers")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="student LLM: keep each block's input only, recompute in the backward "
                         "(transformers' gradient_checkpointing_enable, non-reentrant)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0:
        raise SystemExit("--steps must be at least 1 and --warmup at least 0")
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: PyTorch sees no CUDA device")
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    torch.manual_seed(a.seed)
    import transformers

    sh = shapes(a)
    st, te, vi = sh["student"], sh["teacher"], sh["vision"]
    before, n_vis, after, n_resp = sh["layout"]
    b, t_len = sh["batch"], sh["seq_len"]
    kept = min(st["vocab"], te["vocab"])
    vision_layers = vi["layers"] - 1 if a.vision == "trim" else vi["layers"]
    flops = step_flops(sh, vision_layers)
    res = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "anchor": a.scale == 1,
        "scale": a.scale,
        "vision_mode": a.vision,
        "gradient_checkpointing": a.gradient_checkpointing,
        "shapes": {
            "student": f"{st['name']} /{a.scale}: {describe_llm(st)}",
            "teacher": f"{te['name']} /{a.scale}: {describe_llm(te)}",
            "vision": (f"{vi['name']} /{a.scale}: hidden {vi['hidden']}, {vi['layers']} layers, "
                       f"image {vi['image_size']}, {n_vis} visual tokens"),
            "batch": b,
            "seq_len": t_len,
            "layout": sh["layout"],
            "rows": {"ce": b * n_resp, "response": b * n_resp, "visual": b * n_vis, "images": b},
        },
        "steps": a.steps,
        "warmup": a.warmup,
        "tokens_per_step": b * t_len,
        "tflop_per_step": sum(flops.values()) / 1e12,
        "tflop_by_phase": {k: f / 1e12 for k, f in flops.items()},
        "cases": {},
    }
    print(f"PyTorch {torch.__version__}, transformers {transformers.__version__} on {res['device']}; "
          f"scale 1/{a.scale}: {b} × {t_len} tokens, layout {sh['layout']}", file=sys.stderr, flush=True)
    if not cuda:
        print("note: on the CPU these figures are a smoke test, NOT the GPU anchor", file=sys.stderr, flush=True)

    def emit():
        text = json.dumps(res, indent=1)
        if a.json:
            with open(a.json, "w") as f:
                f.write(text + "\n")
        return text

    # ---- models, inputs, optimizer (outside the timed steps)
    t0 = time.time()
    try:
        tower = siglip(vi, dev).eval().requires_grad_(False)
        s_llm = qwen2(st, dev).train()
        if a.gradient_checkpointing:
            s_llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        s_proj = projector(vi["hidden"], st["hidden"], dev).train()
        t_llm = qwen2(te, dev).eval().requires_grad_(False)
        t_proj = projector(vi["hidden"], te["hidden"], dev).eval().requires_grad_(False)
        wgen = torch.Generator(device=dev).manual_seed(a.seed)
        for m in (tower, s_llm, s_proj, t_llm, t_proj):
            init_like_kd_engine(m, wgen)
        gen = torch.Generator(device="cpu").manual_seed(a.seed ^ 0x5EEDBA7C)
        ids = torch.randint(0, kept, (b, t_len), generator=gen)
        ids[:, before:before + n_vis] = 0  # placeholders: replaced by the visual tokens
        ids = ids.to(dev)
        pixels = (torch.rand(b, 3, vi["image_size"], vi["image_size"], generator=gen) * 2 - 1).to(dev, torch.bfloat16)
        pos = torch.arange(t_len, device=dev).unsqueeze(0).expand(b, -1)
        trainable = list(s_proj.parameters()) + list(s_llm.parameters())  # parameters() dedups the tied head
        try:
            opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
            opt_kind = "fused"
        except Exception as e:  # fused not available for this device/dtype
            print(f"note: fused AdamW unavailable ({type(e).__name__}: {e}); using foreach", file=sys.stderr)
            opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True)
            opt_kind = "foreach"
    except Exception as e:
        traceback.print_exc()
        res["error"] = f"setup: {type(e).__name__}: {e}"
        print(emit())
        sys.exit(1)
    all_params = {id(p): p for m in (tower, s_proj, s_llm, t_proj, t_llm) for p in m.parameters()}
    weights_bytes = nbytes(all_params.values())
    grads_bytes = nbytes(trainable)
    res["params"] = {
        "total": sum(p.numel() for p in all_params.values()),
        "trainable": sum(p.numel() for p in trainable),
        "vision": sum(p.numel() for p in tower.parameters()),
        "student_llm": sum(p.numel() for p in s_llm.parameters()),
        "teacher_llm": sum(p.numel() for p in t_llm.parameters()),
    }
    res["optimizer"] = f"AdamW {opt_kind}, lr {LR}, bf16 parameters and moments, clip_grad_norm_ 1.0"
    res["setup_s"] = time.time() - t0
    print(f"  setup {res['setup_s']:.1f} s: {res['params']['total'] / 1e9:.3f} B parameters "
          f"({res['params']['trainable'] / 1e6:.1f} M trainable), AdamW {opt_kind}", file=sys.stderr, flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_step():
        clock = Clock(cuda)
        clock.mark()
        with torch.no_grad():
            feats = vision_features(tower, pixels, a.vision)
        clock.mark()
        with torch.no_grad():
            xt = embed(t_llm, t_proj, ids, feats, before)
            ht = t_llm.model(inputs_embeds=xt, position_ids=pos, use_cache=False).last_hidden_state
            lt = t_llm.lm_head(ht)
            del xt, ht
        clock.mark()
        xs = embed(s_llm, s_proj, ids, feats, before)
        hs = s_llm.model(inputs_embeds=xs, position_ids=pos, use_cache=False).last_hidden_state
        clock.mark()
        ls = s_llm.lm_head(hs)
        total, parts = dft_loss(ls, lt, ids, sh["layout"], kept)
        clock.mark()
        total.backward()
        del ls, lt, hs, xs, feats
        clock.mark()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.mark()
        return clock, total.detach(), {k: v.detach() for k, v in parts.items()}

    def case(gram):
        tf32 = set_tf32(gram == "tf32")
        for _ in range(a.warmup):
            one_step()
        sync()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            at_rest = torch.cuda.memory_allocated()
        step_ms, phase_ms, last = [], {p: [] for p in PHASES}, None
        for _ in range(a.steps):
            sync()
            w0 = time.perf_counter()
            clock, total, parts = one_step()
            sync()
            step_ms.append((time.perf_counter() - w0) * 1e3)
            for p, ms in zip(PHASES, clock.laps_ms()):
                phase_ms[p].append(ms)
            last = (total, parts)
        peak = torch.cuda.max_memory_allocated() if cuda else None
        total, parts = last
        loss = {"total": total.item(), **{k: v.item() for k, v in parts.items()}}
        if not all(math.isfinite(v) for v in loss.values()):
            raise RuntimeError(f"non-finite loss {loss}")
        opt_bytes = nbytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        med = statistics.median(step_ms)
        return {
            "gram": "fp32 with TF32 (strongest)" if gram == "tf32" else "fp32, TF32 off (upstream)",
            "cuda_matmul_allow_tf32": tf32,
            "step_ms": med,
            "step_ms_mean": statistics.fmean(step_ms),  # bench-step reports the mean
            "step_ms_min": min(step_ms),
            "step_ms_all": step_ms,
            "tokens_per_s": b * t_len / (med * 1e-3),
            "tflop_per_s": sum(flops.values()) / (med * 1e-3) / 1e12,
            "phases": {p: {"ms": statistics.median(v), "tflop": flops[p] / 1e12} for p, v in phase_ms.items()},
            "memory": {
                "peak_bytes": peak,
                "peak_source": "torch.cuda.max_memory_allocated over the timed steps" if cuda else "n/a on the CPU",
                "at_rest_bytes": at_rest if cuda else None,
                "weights_bytes": weights_bytes,
                "grads_bytes": grads_bytes,
                "optimizer_bytes": opt_bytes,
                # SPEC §5: transient = peak − (weights + gradients + optimizer state).
                "transient_bytes": None if peak is None else peak - (weights_bytes + grads_bytes + opt_bytes),
            },
            "loss": loss,
        }

    grams = ["fp32", "tf32"] if a.gram == "both" else [a.gram]
    for g in grams:
        t1 = time.time()
        try:
            res["cases"][g] = case(g)
        except Exception as e:  # record and go on: one failing case must not cost the others
            traceback.print_exc()
            res["cases"][g] = {"error": f"{type(e).__name__}: {e}"}
            opt.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        r = res["cases"][g]
        if "error" in r:
            print(f"  gram {g}: FAILED {r['error']} ({time.time() - t1:.1f} s)", file=sys.stderr, flush=True)
        else:
            m = r["memory"]
            gib = lambda x: "n/a" if x is None else f"{x / 2**30:.3f} GiB"
            print(f"  gram {g}: step {r['step_ms']:.2f} ms (median of {a.steps}), {r['tokens_per_s']:.1f} tok/s, "
                  f"{r['tflop_per_s']:.1f} TFLOP/s; peak {gib(m['peak_bytes'])}, weights {gib(m['weights_bytes'])}, "
                  f"grads {gib(m['grads_bytes'])}, optimizer {gib(m['optimizer_bytes'])}, transient "
                  f"{gib(m['transient_bytes'])}; loss {r['loss']['total']:.4f} (ce {r['loss']['ce']:.4f}, "
                  f"res {r['loss']['response']:.4f}, vis {r['loss']['visual']:.4f}, rel {r['loss']['relation']:.4f}); "
                  f"phases ms " + ", ".join(f"{p} {r['phases'][p]['ms']:.2f}" for p in PHASES)
                  + f" ({time.time() - t1:.1f} s)", file=sys.stderr, flush=True)
    print(emit())
    sys.exit(0 if all("error" not in r for r in res["cases"].values()) else 1)


if __name__ == "__main__":
    main()
