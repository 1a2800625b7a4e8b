#!/usr/bin/env python3
"""Check that a folder kd-engine exported loads in transformers as ONE LlavaForConditionalGeneration
and computes what kd-engine computes.

Run by hand (it needs PyTorch + transformers; CI never runs it), from the repository root:

    /opt/kdfix/bin/python scripts/check_hf_export.py                      # a tiny random student
    /opt/kdfix/bin/python scripts/check_hf_export.py --model out/student  # a real export
        [--image photo.jpg] [--prompt "<image>\\nWhat is in the picture?"] [--work DIR] [--tol 1e-4]
        [--variant llama]   # the tiny student with LLaMA, tied, f16, vision_feature_layer -3, "full"

The flow (kd-engine has no CLI for MLLM logits; its half is an ignored Rust test):

 1. `cargo test --release --test export_roundtrip -- --ignored --exact python_check_bundle` with
    KD_EXPORT_CHECK_WORK=<work> (and KD_EXPORT_CHECK_MODEL / _IMAGE / _PROMPT). Without --model that
    test first exports a tiny random student (SigLIP 28px/patch 7 + Qwen2, untied, bf16, or --variant
    llama, with the real Qwen tokenizer from ../shared when present) to <work>/model with kd_engine::model::export_llava.
    It then loads the folder with kd-engine's load_llava, preprocesses the image with kd-engine's
    SigLIP processor, tokenises the prompt with the folder's tokenizer.json, expands <image> to
    image_seq_length copies, runs kd-engine's CPU forward in f32 and writes
    <work>/kd_reference.safetensors (input_ids, pixel_values, logits).
 2. This script loads the folder with transformers (`LlavaForConditionalGeneration.from_pretrained`,
    float32, eager attention) and requires no missing / unexpected / mismatched tensors; builds its own
    inputs without kd-engine (pixel_values from SiglipImageProcessor.from_pretrained(folder) on the PIL
    image, input_ids from AutoTokenizer with <image> expanded to config.image_seq_length), compares
    them to kd-engine's, and when the folder has processor_config.json also checks that AutoProcessor
    builds the same inputs; then runs the model on its own inputs and compares the logits.
    Pass: max |logit diff| / max |logit| <= --tol (default 1e-4), ids identical, pixels within 1e-5.

--skip-cargo reuses an existing <work>/kd_reference.safetensors (and <work>/model).
"""

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlavaForConditionalGeneration, SiglipImageProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_rust(work, model, image, prompt, variant):
    env = dict(os.environ, KD_EXPORT_CHECK_WORK=work, KD_EXPORT_CHECK_VARIANT=variant)
    if model:
        env["KD_EXPORT_CHECK_MODEL"] = model
    if image:
        env["KD_EXPORT_CHECK_IMAGE"] = image
    if prompt is not None:
        env["KD_EXPORT_CHECK_PROMPT"] = prompt
    cmd = ["cargo", "test", "--release", "--test", "export_roundtrip", "--", "--ignored", "--exact",
           "python_check_bundle", "--nocapture"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="exported folder (default: export a tiny random student to WORK/model)")
    ap.add_argument("--image", default=os.path.join(ROOT, "tests/fixtures/data/images/chelsea_strip.png"))
    ap.add_argument("--prompt", default="<image>\nWhat is in the picture?")
    ap.add_argument("--work", default=os.path.join(ROOT, "target/tmp/hf_export_check"))
    ap.add_argument("--tol", type=float, default=1e-4, help="max |Δlogit| / max |logit|")
    ap.add_argument("--variant", choices=["qwen2", "llama"], default="qwen2",
                    help="tiny student without --model: qwen2 (untied, bf16, layer -2, 'default') or "
                         "llama (tied, f16, layer -3, 'full')")
    ap.add_argument("--skip-cargo", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    work = os.path.abspath(args.work)
    model_dir = os.path.abspath(args.model) if args.model else os.path.join(work, "model")
    if not args.skip_cargo:
        run_rust(work, os.path.abspath(args.model) if args.model else None, os.path.abspath(args.image), args.prompt,
                 args.variant)
    kd = load_file(os.path.join(work, "kd_reference.safetensors"))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; folder {model_dir}")
    print("files:", sorted(os.listdir(model_dir)))
    failures = []

    # 1. One model, every tensor accounted for.
    model, info = LlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    model.eval()
    problems = {k: v for k, v in info.items() if v}
    print("loading info:", problems or "no missing / unexpected / mismatched tensors")
    if problems:
        failures.append(f"loading info {problems}")
    cfg = model.config
    print(f"config: text {cfg.text_config.model_type}, vision {cfg.vision_config.model_type}, "
          f"image_token_id {cfg.image_token_id}, image_seq_length {cfg.image_seq_length}, "
          f"vision_feature_layer {cfg.vision_feature_layer}, strategy {cfg.vision_feature_select_strategy}, "
          f"tied {cfg.tie_word_embeddings}, stored dtype {json.load(open(os.path.join(model_dir, 'config.json')))['dtype']}")

    # Config keys: ours against what transformers writes for the same config (informational, except
    # that a key transformers writes must not be missing).
    import tempfile
    ours = json.load(open(os.path.join(model_dir, "config.json")))
    with tempfile.TemporaryDirectory() as t:
        cfg.save_pretrained(t)
        theirs = json.load(open(os.path.join(t, "config.json")))
    for part in (None, "text_config", "vision_config"):
        a, b = (ours, theirs) if part is None else (ours[part], theirs[part])
        # A re-save of a loaded model also writes the load dtype into the nested configs.
        missing = sorted(set(b) - set(a) - ({"dtype"} if part else set()))
        extra = sorted(set(a) - set(b))
        print(f"config keys{'' if part is None else ' ' + part}: missing {missing}, extra {extra}")
        if missing:
            failures.append(f"config.json{'' if part is None else ' ' + part} lacks {missing}")

    # 2. Inputs built by transformers alone.
    image = Image.open(args.image).convert("RGB")
    # (AutoImageProcessor needs torchvision in transformers 5; SiglipImageProcessor falls back to PIL.)
    image_processor = SiglipImageProcessor.from_pretrained(model_dir)
    pixel_values = image_processor(images=image, return_tensors="pt")["pixel_values"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = []
    for i in tokenizer(args.prompt)["input_ids"]:
        ids.extend([i] * cfg.image_seq_length if i == cfg.image_token_id else [i])
    input_ids = torch.tensor([ids])
    kd_ids = kd["input_ids"]
    if kd_ids.tolist() != ids:
        failures.append(f"input ids differ: transformers {ids} vs kd-engine {kd_ids.tolist()}")
    dpx = (pixel_values[0] - kd["pixel_values"]).abs().max().item()
    print(f"inputs: {len(ids)} ids (identical: {kd_ids.tolist() == ids}), pixel_values {tuple(pixel_values.shape)} "
          f"max |Δ| vs kd-engine {dpx:.3g}")
    if dpx > 1e-5:
        failures.append(f"pixel values differ by {dpx:.3g}")
    if os.path.exists(os.path.join(model_dir, "processor_config.json")):
        from transformers import AutoProcessor
        proc = AutoProcessor.from_pretrained(model_dir)
        out = proc(images=image, text=args.prompt, return_tensors="pt")
        same = out["input_ids"][0].tolist() == ids and torch.equal(out["pixel_values"], pixel_values)
        print(f"AutoProcessor: {type(proc).__name__}, same inputs: {same}")
        if not same:
            failures.append("AutoProcessor builds other inputs")

    # 3. Logits.
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False).logits[0].float()
    ref = kd["logits"]
    if logits.shape != ref.shape:
        failures.append(f"logits shape {tuple(logits.shape)} vs kd-engine {tuple(ref.shape)}")
    else:
        d = (logits.double() - ref.double()).abs().max().item()
        scale = ref.abs().max().item()
        img = input_ids[0] == cfg.image_token_id
        dv = (logits[img].double() - ref[img].double()).abs().max().item()
        print(f"logits {tuple(logits.shape)}: max |Δ| {d:.3g} (visual rows {dv:.3g}), max |logit| {scale:.3g}, "
              f"relative {d / scale:.3g}; argmax agree {(logits.argmax(-1) == ref.argmax(-1)).float().mean().item():.3f}")
        if d / scale > args.tol:
            failures.append(f"logits differ: relative {d / scale:.3g} > {args.tol}")
    if failures:
        print("FAIL:\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("PASS")


if __name__ == "__main__":
    main()
