"""Tiny random-init models for the CLIS tests, saved like real checkpoints and loaded back by path through the
production code (no download):

    from tiny_models import make_tiny_open_clip, make_tiny_judge_llm

``make_tiny_open_clip(dir)`` returns a ``local-dir:`` spec (open_clip's format, written by
``acp_data.clis.openclip_io.save_open_clip_local_dir``); ``make_tiny_judge_llm(dir, answer)`` a Llama whose greedy
output repeats one fixed token that decodes to ``answer`` (``answer=None``: random weights, garbage output).
"""

from __future__ import annotations

import os
from typing import Any

TINY_OPEN_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_open_clip(dirpath: str | os.PathLike, seed: int = 0) -> str:
    """A 1-layer ViT / 1-layer text transformer open_clip model (32-d, 32 px input, CLIP BPE tokenizer, context 32)
    saved as an open_clip ``local-dir``; returns ``"local-dir:PATH"``."""
    import open_clip
    import torch

    from acp_data.clis.openclip_io import save_open_clip_local_dir

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_OPEN_CLIP_CFG)
    return save_open_clip_local_dir(model, TINY_OPEN_CLIP_CFG, dirpath, overwrite=True)


def byte_bpe(extra: list[str], specials: list[str]) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` without merges: ``extra`` tokens first (ids 0..), then the 256 byte
    symbols, then ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for t in extra:  # stored in byte-level form so the ByteLevel decoder gives back ``t``
        vocab["".join(_BYTES[b] for b in t.encode("utf-8"))] = len(vocab)
    for c in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(c, len(vocab))
    for s in specials:
        vocab[s] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    return core


def byte_tokenizer(extra: list[str], chat_template: str = CHAT_TEMPLATE) -> Any:
    """``byte_bpe`` with the chat specials, as a ``PreTrainedTokenizerFast`` carrying ``chat_template``."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(extra, specials), pad_token="<|pad|>",
                                  bos_token="<|begin|>", eos_token="<|end|>")
    tok.chat_template = chat_template
    return tok


def save_random_init(model_cls: Any, cfg: Any, dirpath: str | os.PathLike, seed: int, answer: str | None,
                     *companions: Any) -> str:
    """Build ``model_cls(cfg)`` from ``seed`` (without disturbing the caller's RNG), zero its output head when it must
    repeat ``answer``, and save it with ``companions`` (tokenizer, processor) in ``dirpath``."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(cfg)
    if answer:
        with torch.no_grad():
            model.lm_head.weight.zero_()
    model.save_pretrained(dirpath)
    for c in companions:
        c.save_pretrained(dirpath)
    return str(dirpath)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenisation produces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


_BYTES = _bytes_to_unicode()


def make_tiny_judge_llm(dirpath: str | os.PathLike, answer: str | None = '{"score": 4}', seed: int = 0) -> str:
    """A 2-layer, 32-d Llama chat model with a byte-level tokenizer and chat template, saved with
    ``save_pretrained``. With ``answer``, that string is token 0 and the output head is zeroed, so greedy decoding
    emits it over and over (a judge with a known answer); with None the weights stay random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer([answer] if answer else [])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    return save_random_init(LlamaForCausalLM, cfg, dirpath, seed, answer, tok)


QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_qwen2_vl(dirpath: str | os.PathLike, answer: str | None = "a red object", seed: int = 0) -> str:
    """A tiny random Qwen2-VL (1 vision block, 1 text layer, 32-d) with a byte-level tokenizer carrying Qwen's
    vision tokens, a small image processor (at most 112 x 112 px) and a chat template, saved with
    ``save_pretrained``: loads through ``AutoProcessor`` + ``AutoModelForImageTextToText``. With ``answer`` the
    output head is zeroed so greedy decoding repeats the token that decodes to ``answer``."""
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                "<|box_end|>"]
    core = byte_bpe([answer] if answer else [], specials)
    vocab = core.get_vocab()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  extra_special_tokens={"image_token": "<|image_pad|>",
                                                        "video_token": "<|video_pad|>"})
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=112 * 112),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": vocab["<|im_start|>"], "eos_token_id": vocab["<|im_end|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    return save_random_init(Qwen2VLForConditionalGeneration, cfg, dirpath, seed, answer, proc)


TINY_OPEN_CLIP_ARCH = "acp-tiny-clip"


def register_tiny_open_clip_arch() -> str:
    """Register the tiny architecture with open_clip in this process (no weights: building it by name is a random
    init, which production refuses unless ``allow_random_init: true``); returns its name."""
    import json
    import tempfile
    from pathlib import Path

    import open_clip

    d = Path(tempfile.mkdtemp(prefix="acp-tiny-arch-"))
    (d / f"{TINY_OPEN_CLIP_ARCH}.json").write_text(json.dumps(TINY_OPEN_CLIP_CFG))
    open_clip.add_model_config(d)
    return TINY_OPEN_CLIP_ARCH


def drop_weight(model_dir: str | os.PathLike, subfolder: str = "") -> str:
    """Remove one tensor from a saved checkpoint's safetensors file (a damaged or mismatched download); returns its
    name."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    files = sorted((Path(model_dir) / subfolder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors file in {Path(model_dir) / subfolder}")
    state = load_file(files[0])
    name = sorted(k for k in state if k.endswith(".weight"))[0]
    del state[name]
    save_file(state, files[0], metadata={"format": "pt"})
    return name
