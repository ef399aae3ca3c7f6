"""The Shapes judge: trained on a few hundred real crops it ranks right crops above wrong-category crops; it is an
open_clip local-dir checkpoint that loads in a fresh process and in the clip CLIS-I scorer; it is cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("open_clip")

from acp_data.shapes.judge import (  # noqa: E402
    EVAL_TEMPLATE,
    MEAN,
    MODEL_CFG,
    STAMP_NAME,
    JudgeOptions,
    evaluate_judge,
    train_judge,
)
from acp_data.shapes.judge_data import box_view, letterbox, load_instances  # noqa: E402
from acp_data.shapes.world import build_world  # noqa: E402

# small enough to train in well under 30 s on one core
TEST_OPTIONS = JudgeOptions(steps=200, batch_instances=48, batch_shapes=32, batch_background=4, batch_images=4,
                            distractors=3, seed=0)


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("judge")
    world = build_world(root / "world", seed=0, size="small", progress=False)
    threads = torch.get_num_threads()
    spec = train_judge(world.root, root / "judge", TEST_OPTIONS, progress=False, threads=1)
    assert torch.get_num_threads() == threads  # restored
    return world, spec


def test_ranks_right_crops_above_wrong_ones(judged):
    import open_clip

    world, spec = judged
    assert spec.startswith("local-dir:")
    path = spec[len("local-dir:"):]
    stamp = json.loads(open(os.path.join(path, STAMP_NAME)).read())
    assert stamp["world"] == {"version": 1, "seed": 0, "size": "small"}
    assert stamp["metrics"]["crop"]["pair_rank"] > 0.9, stamp["metrics"]
    # the same through open_clip's own loader, on the held-out validation crops
    model, _, _ = open_clip.create_model_and_transforms(spec)
    model.eval()
    metrics = evaluate_judge(model, open_clip.get_tokenizer(spec), load_instances(world.val_json, world.image_root))
    assert metrics["instances"] > 100
    assert metrics["pair_rank"] > 0.9 and metrics["top1"] > 3 / 30, metrics


def _embed_script(spec: str, crop_path: str) -> str:
    return f"""
import json, numpy as np, open_clip, torch
model, _, _ = open_clip.create_model_and_transforms({spec!r})
tok = open_clip.get_tokenizer({spec!r})
model.eval()
x = torch.from_numpy(np.load({crop_path!r}))
with torch.no_grad():
    i = model.encode_image(x)
    t = model.encode_text(tok([{EVAL_TEMPLATE.format("red circle")!r}, {EVAL_TEMPLATE.format("blue star")!r}]))
print(json.dumps({{"image": i.tolist(), "text": t.tolist()}}))
"""


def test_reloads_in_a_fresh_process(judged, tmp_path):
    import open_clip
    import torch

    world, spec = judged
    inst = load_instances(world.val_json, world.image_root, max_images=2)
    fill = tuple(int(round(255 * m)) for m in MEAN)
    views = [letterbox(box_view(inst.images[i], b, 0.0, 0.5), MODEL_CFG["vision_cfg"]["image_size"], fill) for i, b in zip(inst.inst_image, inst.inst_box)]
    x = (np.stack(views).astype(np.float32) / 255.0).transpose(0, 3, 1, 2).copy()
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run([sys.executable, "-c", _embed_script(spec, str(tmp_path / "x.npy"))], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    model, _, _ = open_clip.create_model_and_transforms(spec)
    model.eval()
    tok = open_clip.get_tokenizer(spec)
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(x)).numpy()
        txt = model.encode_text(tok([EVAL_TEMPLATE.format("red circle"), EVAL_TEMPLATE.format("blue star")])).numpy()
    np.testing.assert_allclose(np.asarray(got["image"]), img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["text"]), txt, rtol=1e-4, atol=1e-5)


def test_cached_and_refuses_foreign_dir(judged, tmp_path):
    world, spec = judged
    weights = os.path.join(spec[len("local-dir:"):], "open_clip_model.safetensors")
    mtime = os.stat(weights).st_mtime_ns
    assert train_judge(world.root, spec[len("local-dir:"):], TEST_OPTIONS, progress=False) == spec
    assert os.stat(weights).st_mtime_ns == mtime
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="holds no Shapes judge"):
        train_judge(world.root, tmp_path / "other", TEST_OPTIONS, progress=False)
    with pytest.raises(ValueError, match="steps = 0"):
        train_judge(world.root, tmp_path / "j", JudgeOptions(steps=0), progress=False)


def test_clip_scorer_uses_the_judge(judged):
    """The clip CLIS-I scorer loads the judge by path and scores a drawn object above the same scene drawn with
    the wrong colour."""
    from acp_data.registry import SCORERS
    from acp_data.scene import SceneGraph, SceneObject
    from acp_data.shapes.generator import FAILURES, ShapesGenerator
    from acp_data.stages import Candidate, StageContext

    world, spec = judged
    ctx = StageContext(world.categories())
    scorer = SCORERS.build("clip", ctx, model=spec, batch_size=16)
    clean = ShapesGenerator(ctx, **{f"p_{f}": 0.0 for f in FAILURES})
    wrong = ShapesGenerator(ctx, **{**{f"p_{f}": 0.0 for f in FAILURES}, "p_wrong_colour": 1.0})
    cands, tags = [], []
    for k, name in enumerate(["red circle", "blue square", "green triangle", "yellow cross", "blue ring",
                              "red star"]):
        cid = ctx.categories.id_of(name)
        scene = SceneGraph([SceneObject(f"{name.replace(' ', '_')}-1", cid, [], (0.25, 0.25, 0.5, 0.5))],
                           caption=f"A photo of a {name}({name.replace(' ', '_')}-1).")
        boxes = scene.boxes_xyxy(160, 160)
        for gen, tag in ((clean, "clean"), (wrong, "wrong")):
            img = gen.generate(scene, 1, seed=k)[0]
            cands.append(Candidate(img, scene, boxes, [np.ones((160, 160), bool)]))
            tags.append(tag)
    scores = [s.instances[0] for s in scorer.score(cands)]
    clean_s = np.array([s for s, t in zip(scores, tags) if t == "clean"])
    wrong_s = np.array([s for s, t in zip(scores, tags) if t == "wrong"])
    assert (clean_s > wrong_s).mean() >= 5 / 6, (clean_s, wrong_s)


def test_cli_judge_errors(tmp_path, capsys):
    from acp_data.cli import main

    assert main(["shapes", "judge", "--world", str(tmp_path / "none"), "--out", str(tmp_path / "j")]) == 2
    assert "acp-data shapes build" in capsys.readouterr().err
