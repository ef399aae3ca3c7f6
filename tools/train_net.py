#!/usr/bin/env python
"""Train or evaluate Mask R-CNN with acp-data's config keys, in the style of detectron2's ``tools/train_net.py``.

    tools/train_net.py --config acp_lvis.yaml                      # a bare name is looked up in configs/
    tools/train_net.py --config-file configs/lvis_baseline_12ep.yaml --num-gpus 8
    tools/train_net.py --config lvis_baseline_12ep.yaml --eval-only MODEL.WEIGHTS output/x/model_final.pth
    tools/train_net.py --config acp_lvis.yaml --num-gpus 2 MODEL.DEVICE cpu    # 2 processes on CPU (gloo)

Before anything heavy runs it checks (``acp_data.d2.checks``, in the order of docs/design.md "detectron2 integration
(contract)") the config values, the data files (dataset json and image directories under $DETECTRON2_DATASETS, the
ACP cache manifests) and the model; a failure prints one message and exits with status 2 (as do acp_data's own
errors raised later, e.g. by the ACP loader; ``ACP_DEBUG=1`` shows their traceback). Evaluation writes
``metrics.json`` (AP, APr, APc, APf, ...) into OUTPUT_DIR; detectron2's per-iteration training scalars go to
``train_metrics.json``; ``train_status.json`` says whether training finished (a training that raised is not
evaluated). The trainer and the setup live in ``acp_data.d2.engine``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO_ROOT))
# detectron2 decorates a few functions with torch.jit.script at import; newer torch warns on each. Keep the
# output (and the one-message check failures) readable.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import launch  # noqa: E402

from acp_data.d2.checks import CheckError, run_checks  # noqa: E402
from acp_data.d2.engine import Trainer, argument_parser, setup  # noqa: E402

logger = logging.getLogger("acp_data.train_net")


def main(args):
    cfg = setup(args)
    logger.info("Mask format: %s (INPUT.MASK_FORMAT)", cfg.INPUT.MASK_FORMAT)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        ckpt = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS,
                                                                                    resume=args.resume)
        it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
        iteration = None if it is None else int(it) + 1  # the checkpoint stores the last finished iteration index
        return Trainer.test(cfg, model, Trainer.build_evaluators(cfg, iteration))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv: list[str] | None = None) -> int:
    args = argument_parser().parse_args(argv)
    try:
        cfg = run_checks(args)
    except CheckError as e:
        print(f"train_net.py: error: {e}", file=sys.stderr)
        return 2
    if args.num_gpus * args.num_machines > 1 and str(cfg.MODEL.DEVICE).startswith("cpu"):
        # detectron2's launch picks gloo when its processes see no CUDA device: a CPU run hides the GPUs from them
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(args,))
    except Exception as e:
        # acp_data's own error classes (ConfigError, DatasetFormatError, ACPLoaderError, ...) carry a complete
        # message naming the key, file or value at fault: show it as one line, not a traceback.
        if type(e).__module__.startswith("acp_data.") and not os.environ.get("ACP_DEBUG"):
            print(f"train_net.py: error: {e} (ACP_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(cli())
