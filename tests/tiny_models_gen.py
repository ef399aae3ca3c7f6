"""Tiny random-init models for the generation tests, saved like real checkpoints and loaded back by path through the
production code: a GLIGEN pipeline, a plain Stable Diffusion pipeline (img2img refiner), SAM, a Llama chat LM; and a
small synthetic LVIS-format json for priors.

    from tiny_models_gen import make_tiny_gligen, make_tiny_sd, make_tiny_sam, make_tiny_llm, synthetic_lvis
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

# name, frequency, typical sqrt(area fraction), log aspect (w/h); LVIS-like names incl. qualifiers and multi-word names
SYNTH_CATEGORIES: list[tuple[str, str, float, float]] = [
    ("person", "f", 0.35, -0.9),
    ("dog", "f", 0.3, 0.3),
    ("frisbee", "c", 0.1, 0.2),
    ("bench", "f", 0.35, 0.8),
    ("bow_(weapon)", "r", 0.25, -0.5),
    ("fire_hydrant", "c", 0.2, -0.4),
    ("cap_(headwear)", "c", 0.08, 0.3),
    ("armadillo", "r", 0.2, 0.4),
    ("hippopotamus", "r", 0.45, 0.5),
    ("teapot", "c", 0.15, 0.2),
    ("table", "f", 0.5, 0.9),
    ("lonely_rare_thing", "r", 0.2, 0.0),  # only ever seen alone: companions come from the global fallback
    ("never_seen", "r", 0.2, 0.0),  # no annotation at all: size defaults, no pairs
]


def synthetic_lvis(n_images: int = 80, seed: int = 0) -> dict[str, Any]:
    """An LVIS-format json (dict): categories above, images with 1-5 boxes whose sizes follow each category's
    typical size; rare categories appear in few images; ``lonely_rare_thing`` always alone; ``never_seen`` never."""
    rng = np.random.default_rng(seed)
    cats = [{"id": i, "name": n, "synonyms": [n], "def": "", "frequency": f}
            for i, (n, f, _, _) in enumerate(SYNTH_CATEGORIES, start=1)]
    common = [i for i, (_, f, _, _) in enumerate(SYNTH_CATEGORIES, start=1) if f in "cf"]
    rare = {i: 3 for i, (n, f, _, _) in enumerate(SYNTH_CATEGORIES, start=1) if f == "r" and n != "never_seen"}
    images, anns = [], []
    for im_id in range(1, n_images + 1):
        w, h = int(rng.choice([640, 480, 512])), int(rng.choice([480, 640, 512]))
        k = int(rng.integers(1, 6))
        members = [int(c) for c in rng.choice(common, size=k)]
        for cid, left in list(rare.items()):
            if left and rng.uniform() < 0.1:
                rare[cid] -= 1
                members = [cid] if SYNTH_CATEGORIES[cid - 1][0] == "lonely_rare_thing" else members[:-1] + [cid]
                break
        images.append({"id": im_id, "width": w, "height": h, "file_name": f"{im_id:06d}.jpg",
                       "neg_category_ids": [], "not_exhaustive_category_ids": []})
        for cid in members:
            _, _, s, a = SYNTH_CATEGORIES[cid - 1]
            s = float(np.clip(rng.normal(s, s * 0.3), 0.02, 0.9))
            a = float(rng.normal(a, 0.2))
            bw, bh = min(s * np.exp(a / 2), 0.95) * w, min(s * np.exp(-a / 2), 0.95) * h
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": im_id, "category_id": cid, "iscrowd": 0,
                         "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)], "area": bw * bh,
                         "segmentation": [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]})
    return {"images": images, "annotations": anns, "categories": cats}


# ----- CLIP tokenizer from the BPE vocabulary bundled with open_clip -----------------------------------------------
def make_clip_tokenizer(out_dir: str | os.PathLike) -> Any:
    """A real ``CLIPTokenizer`` (49408 tokens, model_max_length 77) from open_clip's bundled BPE merges."""
    import open_clip.tokenizer as ot
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Path(ot.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(ot.bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)


def _tiny_text_encoder(tok: Any, dim: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=dim, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    # 4 blocks -> vae_scale_factor 8, as in SD: 64 px images <-> 8 x 8 latents
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         norm_num_groups=8, layers_per_block=1, sample_size=64)


def _tiny_unet(dim: int, gated: bool) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=8,
        attention_type="gated" if gated else "default")


def _scheduler() -> Any:
    from diffusers import PNDMScheduler

    return PNDMScheduler(skip_prk_steps=True, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         steps_offset=1)


def _tiny_sd_pipeline(pipeline_cls: Any, gated: bool, out_dir: str | os.PathLike, seed: int) -> str:
    """A random-init Stable Diffusion style pipeline of ``pipeline_cls`` (64 px images) saved with
    ``save_pretrained``."""
    import torch

    out = Path(out_dir)
    torch.manual_seed(seed)
    tok = make_clip_tokenizer(out / "_tok")
    pipe = pipeline_cls(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tok, 32), tokenizer=tok, unet=_tiny_unet(32, gated=gated),
        scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return str(out)


def make_tiny_gligen(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A random-init ``StableDiffusionGLIGENPipeline`` (gated UNet) saved with ``save_pretrained``; 64 px images."""
    from diffusers import StableDiffusionGLIGENPipeline

    return _tiny_sd_pipeline(StableDiffusionGLIGENPipeline, True, out_dir, seed)


def make_tiny_sd(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A random-init plain ``StableDiffusionPipeline`` (for ``AutoPipelineForImage2Image``: the refiner)."""
    from diffusers import StableDiffusionPipeline

    return _tiny_sd_pipeline(StableDiffusionPipeline, False, out_dir, seed)


def make_tiny_sam(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A random-init ``SamModel`` (64 px input, 8 x 8 embeddings) with a matching ``SamProcessor``."""
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(seed)
    cfg = SamConfig(
        vision_config=dict(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64,
                           num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )
    model = SamModel(cfg)
    proc = SamProcessor(image_processor=SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64,
                                                                                               "width": 64}))
    model.save_pretrained(out_dir)
    proc.save_pretrained(out_dir)
    return str(out_dir)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tiny_llm(out_dir: str | os.PathLike, seed: int = 0) -> str:
    """A random-init Llama with a hand-built byte-level tokenizer (256 byte tokens + specials) and a chat template."""
    import torch
    from tiny_models import byte_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = byte_tokenizer([], CHAT_TEMPLATE)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16384,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return str(out_dir)
