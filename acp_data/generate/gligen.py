"""``gligen`` generator: diffusers' ``StableDiffusionGLIGENPipeline`` (box-grounded SD), N candidates per layout in
one call, with an optional img2img refiner (e.g. the SDXL refiner at strength 0.3, as the paper does).

Phrases and boxes come from the SceneGraph (``scene.phrases()``, ``scene.boxes_xyxy()``: the one conversion point);
the prompt is the caption without its ``(name-k)`` tags. The initial noise is drawn from a CPU ``torch.Generator``
seeded with the unit's seed, so a seed gives the same latents on any device.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from ..scene import SceneGraph
from ..stages import Generator, StageContext
from .common import (
    RANDOM_INIT,
    BackendOptionError,
    TooManyBoxes,
    check_model_ref,
    load_checked_pipeline,
    plain_caption,
    resolve_device,
    resolve_dtype,
    resolve_options,
    to_uint8_images,
)

logger = logging.getLogger(__name__)

# GLIGEN's position net holds at most 30 grounding tokens (the pipeline silently drops the rest: we refuse instead).
GLIGEN_MAX_BOXES = 30

GLIGEN_DEFAULTS: dict[str, Any] = {
    "revision": None,
    "dtype": "auto",  # float16 on CUDA, float32 on CPU
    "device": None,  # default: the stage context's device
    "steps": 50,
    "guidance": 7.5,
    "height": 512,
    "width": 512,
    "scheduler": None,  # None keeps the checkpoint's; else one of SCHEDULERS
    "beta": 0.3,  # gligen_scheduled_sampling_beta: fraction of steps with grounding on
    "prompt_template": "{caption}",
    "negative_prompt": None,
    "max_boxes": GLIGEN_MAX_BOXES,
    "safety_checker": False,  # True keeps the checkpoint's safety checker (flagged candidates come back black)
    "refiner": None,  # {"model": ..., "revision", "strength": 0.3, "steps": 20, "guidance": 5.0, "dtype", ...}
    "offload": False,  # enable_model_cpu_offload (needs accelerate; saves GPU memory, same images)
    RANDOM_INIT: False,  # True: weights missing from the checkpoint(s) only warn (tests; docs/plugins.md)
}

REFINER_DEFAULTS: dict[str, Any] = {
    "revision": None,
    "dtype": "auto",
    "strength": 0.3,
    "steps": 20,  # diffusers img2img semantics: about steps * strength denoising steps run
    "guidance": 5.0,
    "negative_prompt": None,
}

# scheduler name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "plms": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler by short name, configured from the checkpoint's scheduler config."""
    import diffusers

    key = str(name).lower()
    if key not in SCHEDULERS:
        raise BackendOptionError(f"generator gligen: unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    cls_name, extra = SCHEDULERS[key]
    return getattr(diffusers, cls_name).from_config(base_config, **extra)


class GligenGenerator(Generator):
    """Options: ``model`` (required; hub id or path of a GLIGEN pipeline, e.g. a ``save_pretrained`` folder),
    ``revision``, ``dtype``, ``device``, ``steps``, ``guidance``, ``height``, ``width``, ``scheduler``, ``beta``,
    ``prompt_template``, ``negative_prompt``, ``max_boxes``, ``safety_checker``, ``refiner``, ``offload``.
    Models load on first use (``load()``), so building the generator checks options without loading weights."""

    DEFAULTS = GLIGEN_DEFAULTS

    def __init__(self, ctx: StageContext, **options: Any) -> None:
        super().__init__(ctx, **options)
        o = resolve_options("generator gligen", options, GLIGEN_DEFAULTS, required=("model",))
        o["model"] = check_model_ref(o["model"], "generator gligen")
        if not 1 <= int(o["max_boxes"]) <= GLIGEN_MAX_BOXES:
            raise BackendOptionError(f"generator gligen: max_boxes must be in 1..{GLIGEN_MAX_BOXES}, "
                                     f"got {o['max_boxes']}")
        for k in ("height", "width"):
            if int(o[k]) < 8 or int(o[k]) % 8:
                raise BackendOptionError(f"generator gligen: {k} must be a positive multiple of 8, got {o[k]}")
        if int(o["steps"]) < 1:
            raise BackendOptionError(f"generator gligen: steps must be >= 1, got {o['steps']}")
        if not 0.0 <= float(o["beta"]) <= 1.0:
            raise BackendOptionError(f"generator gligen: beta must be in [0, 1], got {o['beta']}")
        if o["scheduler"] is not None and str(o["scheduler"]).lower() not in SCHEDULERS:
            raise BackendOptionError(f"generator gligen: unknown scheduler {o['scheduler']!r}; known: "
                                     f"{', '.join(SCHEDULERS)}")
        if "{caption}" not in str(o["prompt_template"]):
            raise BackendOptionError("generator gligen: prompt_template must contain '{caption}'")
        if o["refiner"] is not None:
            if not isinstance(o["refiner"], dict):
                raise BackendOptionError("generator gligen: refiner must be a mapping with at least 'model'")
            r = resolve_options("generator gligen refiner", o["refiner"], REFINER_DEFAULTS, required=("model",))
            r["model"] = check_model_ref(r["model"], "generator gligen refiner")
            if not 0.0 < float(r["strength"]) <= 1.0:
                raise BackendOptionError(f"generator gligen refiner: strength must be in (0, 1], got {r['strength']}")
            o["refiner"] = r
        self.opts = o
        self.max_boxes = int(o["max_boxes"])
        self._pipe: Any = None
        self._refiner: Any = None

    def settings(self) -> dict[str, Any]:
        """Everything that changes the images (device and offloading do not)."""
        s = {k: v for k, v in self.opts.items()
             if k not in ("device", "offload") and not (k == RANDOM_INIT and not v)}  # keys unchanged by default
        if s.get("refiner"):
            s["refiner"] = dict(s["refiner"])
        return {"name": type(self).__name__, **s}

    # ----- loading ------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the pipeline (and refiner) once; called lazily by ``generate``."""
        if self._pipe is not None:
            return
        import diffusers
        import torch

        o = self.opts
        device = resolve_device(o["device"], self.ctx.device)
        dtype = resolve_dtype(o["dtype"], device, self.ctx.dtype)
        kwargs: dict[str, Any] = {}
        if not o["safety_checker"]:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        logger.info("loading GLIGEN %s (revision %s, %s on %s)", o["model"], o["revision"], dtype, device)
        pipe = load_checked_pipeline(diffusers.StableDiffusionGLIGENPipeline, o["model"], "generator gligen",
                                     bool(o[RANDOM_INIT]), revision=o["revision"], dtype=dtype, **kwargs)
        if pipe.unet.config.get("attention_type") not in ("gated", "gated-text-image"):
            raise BackendOptionError(f"generator gligen: {o['model']!r} is not a GLIGEN checkpoint (its UNet has "
                                     f"attention_type={pipe.unet.config.get('attention_type')!r}, expected 'gated')")
        if o["scheduler"] is not None:
            pipe.scheduler = make_scheduler(o["scheduler"], pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self._place(pipe, device, o["offload"])
        self._pipe = pipe
        self._device = device
        self._torch = torch
        r = o["refiner"]
        if r is not None:
            rdtype = resolve_dtype(r["dtype"], device, self.ctx.dtype)
            logger.info("loading refiner %s (revision %s, %s on %s)", r["model"], r["revision"], rdtype, device)
            ref = load_checked_pipeline(diffusers.AutoPipelineForImage2Image, r["model"], "generator gligen refiner",
                                        bool(o[RANDOM_INIT]), revision=r["revision"], dtype=rdtype)
            if getattr(ref, "safety_checker", None) is not None and not o["safety_checker"]:
                ref.safety_checker = None
            ref.set_progress_bar_config(disable=True)
            self._place(ref, device, o["offload"])
            self._refiner = ref

    @staticmethod
    def _place(pipe: Any, device: str, offload: bool) -> None:
        if offload and device.startswith("cuda"):
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.to(device)

    # ----- generation ---------------------------------------------------------------------------------------------
    def _fit_phrase(self, phrase: str) -> str:
        """Drop words from the front (attributes first) until the phrase fits the text encoder (the GLIGEN pipeline
        tokenizes phrases without truncation)."""
        tok = self._pipe.tokenizer
        limit = int(getattr(tok, "model_max_length", 77) or 77)
        words = phrase.split()
        while len(words) > 1 and len(tok(" ".join(words)).input_ids) > limit:
            words = words[1:]
        return " ".join(words)

    def check_scene(self, scene: SceneGraph) -> tuple[list[str], list[list[float]]]:
        """Phrases and normalised XYXY boxes for the pipeline; raises ``TooManyBoxes`` or ``ValueError``."""
        boxes = scene.boxes_xyxy()
        if len(boxes) > self.max_boxes:
            raise TooManyBoxes(len(boxes), self.max_boxes, "generator gligen")
        if len(boxes) == 0:
            raise ValueError("generator gligen: the scene graph has no objects")
        if not np.isfinite(boxes).all():
            raise ValueError("generator gligen: every object needs a layout box")
        boxes = np.clip(boxes, 0.0, 1.0)
        return scene.phrases(), [[float(v) for v in b] for b in boxes]

    def generate(self, scene: SceneGraph, n: int, seed: int) -> list[np.ndarray]:
        """``n`` candidates (H x W x 3 uint8) for one layout; the same seed gives the same images."""
        phrases, boxes = self.check_scene(scene)
        if n < 1:
            raise ValueError(f"generator gligen: n must be >= 1, got {n}")
        self.load()
        torch, o = self._torch, self.opts
        prompt = str(o["prompt_template"]).format(caption=plain_caption(scene))
        phrases = [self._fit_phrase(p) for p in phrases]
        gen = torch.Generator("cpu").manual_seed(int(seed))
        with torch.inference_mode():
            out = self._pipe(
                prompt=prompt, gligen_phrases=phrases, gligen_boxes=boxes, num_images_per_prompt=int(n),
                num_inference_steps=int(o["steps"]), guidance_scale=float(o["guidance"]),
                gligen_scheduled_sampling_beta=float(o["beta"]), height=int(o["height"]), width=int(o["width"]),
                negative_prompt=o["negative_prompt"], generator=gen, output_type="np",
            )
        images = out.images
        flagged = getattr(out, "nsfw_content_detected", None)
        if flagged and any(flagged):
            logger.warning("generator gligen: the safety checker blanked %d of %d candidates", sum(flagged), n)
        if self._refiner is not None:
            images = self._refine(images, prompt, seed)
        return to_uint8_images(images)

    def _refine(self, images: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        torch, r = self._torch, self.opts["refiner"]
        gens = [torch.Generator("cpu").manual_seed(int(seed) + 1_000_003 * (i + 1)) for i in range(len(images))]
        h, w = images.shape[1:3]
        with torch.inference_mode():
            out = self._refiner(
                prompt=[prompt] * len(images), image=images, strength=float(r["strength"]),
                num_inference_steps=max(int(r["steps"]), math.ceil(1 / float(r["strength"]))),
                guidance_scale=float(r["guidance"]), negative_prompt=None if r["negative_prompt"] is None
                else [r["negative_prompt"]] * len(images), generator=gens, output_type="np",
            )
        refined = out.images
        if refined.shape[1:3] != (h, w):  # a refiner working at another resolution: back to the layout's size
            import cv2

            refined = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in refined])
        return refined
