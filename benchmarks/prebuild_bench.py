"""Prebuild benchmark: kept samples per second through the whole pipeline (prior planner -> GLIGEN -> SAM -> CLIS-L ->
CLIS-I with open_clip -> selection -> cache) at 1 rank and at 2 ranks (two ``acp-data prebuild --shard r/2``
processes run concurrently over the same units), and each stage's share of the time.

    .venv/bin/python benchmarks/prebuild_bench.py                  # CPU, tiny random-init models, about 1.5 min
    .venv/bin/python benchmarks/prebuild_bench.py --device cuda    # full-size random-init SD-1.5 GLIGEN UNet,
                                                                   # SAM ViT-H, CLIP ViT-B/16 (GPU; 2 ranks share
                                                                   # the GPU unless there are 2)
    .venv/bin/python benchmarks/prebuild_bench.py --models full --device cpu --units 1 --candidates 1 --steps 1 \
        --size 128 --ranks 1 --repeats 1 --threads 2                 # smoke test of the full-size path (~6 min)

Models are built with random weights, saved like real checkpoints and loaded by path through the production code.
Each rank uses one intra-op thread on CPU (the prebuild default). Rates use the unit loop only (model loading
excluded); the 2-rank rate is all kept samples over the union of both loops' wall time. Each measurement runs
``--repeats`` times, interleaved, and the best counts (other work on a shared machine only slows a run down).
Target (issue 12): two_rank_speedup >= 1.8 on 2 CPU cores. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

STAGES = ("plan", "generate", "segment", "clis_l", "clis_i", "select", "encode", "write")


# ----- models ---------------------------------------------------------------------------------------------------------
def build_tiny_models(out: Path) -> dict[str, str]:
    """The tests' tiny GLIGEN (64 px), SAM (64 px input) and open_clip (32 px) models."""
    from tiny_models import make_tiny_open_clip
    from tiny_models_gen import make_tiny_gligen, make_tiny_sam

    return {"gligen": make_tiny_gligen(out / "gligen"), "sam": make_tiny_sam(out / "sam"),
            "clip": make_tiny_open_clip(out / "clip")}


def build_full_size_models(out: Path, device: str) -> dict[str, str]:
    """Random-init models of the real architectures: a GLIGEN pipeline with the SD-1.5 UNet (gated attention), the SD
    VAE and the CLIP ViT-L/14 text encoder; SAM ViT-H (1024 px input); open_clip ViT-B-16. Saved in float16
    (GLIGEN, SAM) / float32 (open_clip) and loaded back by path by the prebuild."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionGLIGENPipeline, UNet2DConditionModel
    from tiny_models_gen import make_clip_tokenizer
    from transformers import CLIPTextConfig, CLIPTextModel, SamConfig, SamImageProcessor, SamModel, SamProcessor

    from acp_data.clis.openclip_io import save_open_clip_local_dir

    init = torch.device(device if device.startswith("cuda") else "cpu")
    torch.manual_seed(0)
    tok = make_clip_tokenizer(out / "_tok")
    with init:
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_type="gated")
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, sample_size=512)
    sched = PNDMScheduler(skip_prk_steps=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          steps_offset=1)
    pipe = StableDiffusionGLIGENPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                         safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out / "gligen")
    del pipe, unet, vae, text
    with init:
        sam = SamModel(SamConfig(vision_config={"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16,
                                                "global_attn_indexes": [7, 15, 23, 31]}))
    sam.to(torch.float16).save_pretrained(out / "sam")
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(out / "sam")
    del sam
    cfg = open_clip.get_model_config("ViT-B-16")
    clip = open_clip.create_model("ViT-B-16")  # random init: no pretrained tag
    save_open_clip_local_dir(clip, cfg, out / "clip", overwrite=True)
    if init.type == "cuda":
        torch.cuda.empty_cache()
    return {"gligen": str(out / "gligen"), "sam": str(out / "sam"), "clip": f"local-dir:{out / 'clip'}"}


# ----- runs -----------------------------------------------------------------------------------------------------------
def make_config(models: dict[str, str], priors: str, categories: str, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "categories": categories, "concepts": "all", "priors": priors, "images_per_category": 50, "seed": 0,
        "max_objects": 3, "candidates": args.candidates, "planner": {"name": "prior"},
        "generator": {"name": "gligen", "model": models["gligen"], "steps": args.steps, "guidance": 5.0,
                      "height": args.size, "width": args.size, "scheduler": "plms"},
        "segmenter": {"name": "sam", "model": models["sam"]},
        "scorer": {"name": "clip", "model": models["clip"], "batch_size": 64},
        "layout_score": True, "selection": {"min_clis_i": 60, "min_clis_l": 0}, "keep": "all",
        "unit_batch": args.unit_batch, "shard_size": 256,
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_ranks(config: Path, cache: Path, world: int, args: argparse.Namespace, n_gpus: int) -> list[dict[str, Any]]:
    """``world`` concurrent prebuild processes (ranks 0..world-1) over the first ``args.units`` units; their
    summaries."""
    procs = []
    for r in range(world):
        device = f"cuda:{r % n_gpus}" if args.device == "cuda" else args.device
        cmd = [sys.executable, "-m", "acp_data.cli", "prebuild", "--config", str(config), "--out", str(cache),
               "--shard", f"{r}/{world}", "--max-units", str(args.units), "--device", device, "--no-progress"]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        procs.append(subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"prebuild rank failed (exit {p.returncode}):\n{err[-4000:]}")
    summaries = [json.loads(s.read_text()) for s in sorted((cache / "summary").glob("*.json"))]
    if len(summaries) != world or any(s["status"] != "complete" for s in summaries):
        raise SystemExit(f"expected {world} complete summaries in {cache}/summary, got "
                         f"{[s.get('status') for s in summaries]}")
    return summaries


def rate(summaries: list[dict[str, Any]]) -> float:
    """All kept samples over the union of the ranks' loop wall times."""
    kept = sum(s["kept"] for s in summaries)
    span = max(s["loop_end"] for s in summaries) - min(s["loop_start"] for s in summaries)
    return kept / span if span > 0 else 0.0


def _cpu_per_wall(summary: dict[str, Any]) -> float:
    """CPU seconds per wall second of a rank's loop: about its thread count when it had its cores to itself, less
    when other processes took them (then the speedup says more about the machine than about the prebuild)."""
    t = summary["time_s"]
    return round(t["loop_cpu"] / t["loop"], 3) if t["loop"] > 0 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--models", choices=("tiny", "full"), default=None,
                    help="tiny random models (CPU default) or full-size random-init ones (cuda default)")
    ap.add_argument("--units", type=int, default=None, help="work units per measurement (default 96 tiny, 16 full)")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default 4 tiny, 50 full)")
    ap.add_argument("--size", type=int, default=None, help="image side (default 64 tiny, 512 full)")
    ap.add_argument("--unit-batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default: 1 on CPU)")
    ap.add_argument("--ranks", type=int, choices=(1, 2), default=2, help="1: skip the 2-rank measurement")
    ap.add_argument("--repeats", type=int, default=2, help="measurements of each (the best counts)")
    ap.add_argument("--workdir", default=None, help="keep models and caches here (default: a temp dir, removed)")
    args = ap.parse_args()
    full = (args.models or ("full" if args.device.startswith("cuda") else "tiny")) == "full"
    args.units = args.units or (16 if full else 96)
    args.steps = args.steps or (50 if full else 4)
    args.size = args.size or (512 if full else 64)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        n_gpus = torch.cuda.device_count()
        args.device = "cuda"
    else:
        n_gpus = 0

    import yaml
    from tiny_models_gen import synthetic_lvis

    from acp_data.priors import Priors

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="prebuild_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        data = synthetic_lvis(n_images=200, seed=0)
        (work / "lvis.json").write_text(json.dumps(data))
        Priors.build(data, seed=0).save(work / "priors.npz")
        models = build_full_size_models(work / "models", args.device) if full else build_tiny_models(work / "models")
        build_s = time.perf_counter() - t0
        conf = work / "prebuild.yaml"
        conf.write_text(yaml.safe_dump(make_config(models, str(work / "priors.npz"), str(work / "lvis.json"), args)))

        # 1 rank, then 2 ranks, `repeats` times interleaved; the best rate of each (other work on the machine only
        # ever slows a run down)
        one: list[dict[str, Any]] = []
        two: list[dict[str, Any]] = []
        for rep in range(args.repeats):
            for world, runs in ((1, one), (2, two))[:args.ranks]:
                cache = work / f"cache_{world}_{rep}"
                shutil.rmtree(cache, ignore_errors=True)
                runs.append(run_ranks(conf, cache, world, args, n_gpus))
                shutil.rmtree(cache, ignore_errors=True)
        best1 = max(one, key=rate)
        rate1 = rate(best1)
        s1 = best1[0]
        result: dict[str, Any] = {
            "device": args.device, "models": "full" if full else "tiny", "units": args.units,
            "candidates_per_unit": args.candidates, "steps": args.steps, "size": args.size, "repeats": args.repeats,
            "cpu_count": os.cpu_count(), "gpus": n_gpus, "threads_per_rank": s1["threads"],
            "kept_1rank": s1["kept"], "kept_per_s_1rank": round(rate1, 3),
            "kept_per_s_1rank_runs": [round(rate(r), 3) for r in one],
            "units_per_s_1rank": round(s1["units"]["processed"] / s1["time_s"]["loop"], 3),
            "load_s_1rank": s1["time_s"]["load"], "cpu_per_wall_1rank": _cpu_per_wall(s1),
            "stage_share": s1["time_share"],
            "stage_s_1rank": {k: s1["time_s"][k] for k in STAGES}, "model_build_s": round(build_s, 1),
        }
        if args.ranks == 2:
            best2 = sorted(max(two, key=rate), key=lambda s: s["rank"])
            rate2 = rate(best2)
            result.update({"kept_2rank": sum(s["kept"] for s in best2), "kept_per_s_2rank": round(rate2, 3),
                           "kept_per_s_2rank_runs": [round(rate(r), 3) for r in two],
                           "per_rank_kept_per_s_2rank": [s["kept_per_s"] for s in best2],
                           "cpu_per_wall_2rank": [_cpu_per_wall(s) for s in best2],
                           "two_rank_speedup": round(rate2 / rate1, 3) if rate1 > 0 else None})
            # what the speedup would be had each rank had its core to itself as the single rank did (an estimate for
            # machines shared with other work; the measured figure above is the one that counts)
            busy2 = sum(result["cpu_per_wall_2rank"]) / 2
            if rate1 > 0 and busy2 > 0:
                result["two_rank_speedup_cpu_adjusted"] = round(rate2 / rate1 * result["cpu_per_wall_1rank"] / busy2, 3)
        else:
            result.update({"kept_per_s_2rank": None, "two_rank_speedup": None})
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    print(f"prebuild bench ({result['models']} models on {result['device']}, {args.units} units x "
          f"{args.candidates} candidates, {args.size} px, {args.steps} steps)")
    print(f"  1 rank : {result['kept_per_s_1rank']:.2f} kept samples/s (model load {result['load_s_1rank']:.1f} s)")
    if result["kept_per_s_2rank"] is not None:
        print(f"  2 ranks: {result['kept_per_s_2rank']:.2f} kept samples/s, speedup {result['two_rank_speedup']:.2f}x "
              f"(target >= 1.8; {result.get('two_rank_speedup_cpu_adjusted')} adjusted for CPU stolen by other work)")
    print(f"  CPU s per wall s of each rank's loop: 1 rank {result['cpu_per_wall_1rank']}, 2 ranks "
          f"{result.get('cpu_per_wall_2rank')} (below the threads per rank: cores shared with other work)")
    print("  time per stage (1 rank): " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in result["stage_share"].items()
                                                  if v >= 0.005))
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
