"""benchmarks/longtail_ablation.py without training: run specs, grid files, the plan, and a resumed ablation whose
runs all have metrics (nothing is trained; tables, report and the headline JSON come from the metrics files)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import longtail_ablation as abl  # noqa: E402


def test_parse_run_splits_overrides_only_before_keys():
    spec = abl.parse_run('acp=configs/shapes/acp.yaml:ACP.CACHE_DIRS=["a","b"],ACP.MIN_CLIS_I=50,SOLVER.STEPS=(3,4)',
                         seeds=(7,))
    assert spec.name == "acp" and spec.config == "configs/shapes/acp.yaml" and spec.seeds == (7,)
    assert spec.overrides == {"ACP.CACHE_DIRS": '["a","b"]', "ACP.MIN_CLIS_I": "50", "SOLVER.STEPS": "(3,4)"}
    assert abl.parse_run("b=configs/shapes/baseline.yaml").overrides == {}


@pytest.mark.parametrize("text, msg", [
    ("configs/shapes/acp.yaml", "NAME=CONFIG"),
    ("a b=configs/x.yaml", "run name"),
    ("x_seed1=configs/x.yaml", "_seed"),
    ("a=", "no config"),
    ("a=configs/x.yaml:ACP.MIN_CLIS_I", "KEY=VALUE"),
])
def test_parse_run_rejects_bad_specs(text, msg):
    with pytest.raises(abl.AblationError, match=msg):
        abl.parse_run(text)


def test_grid_file(tmp_path):
    (tmp_path / "acp.yaml").write_text("_BASE_: x\n")
    grid = {"seeds": [3, 4], "iters": 50, "common": {"MODEL.DEVICE": "cpu"},
            "runs": [{"name": "base", "config": "configs/shapes/baseline.yaml"},
                     {"name": "acp", "config": "acp.yaml", "seeds": [5],
                      "overrides": {"ACP.CACHE_DIRS": ["c1"], "ACP.MAX_IMAGES": "@match:base"}}]}
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(grid))
    specs, common, iters = abl.load_grid(p)
    assert [s.name for s in specs] == ["base", "acp"] and iters == 50 and common == {"MODEL.DEVICE": "cpu"}
    assert specs[0].seeds == (3, 4) and specs[1].seeds == (5,)
    assert specs[1].config == str(tmp_path / "acp.yaml")  # relative to the grid file when it exists there
    assert specs[1].overrides == {"ACP.CACHE_DIRS": '["c1"]', "ACP.MAX_IMAGES": "@match:base"}

    p.write_text(yaml.safe_dump({**grid, "epochs": 3}))
    with pytest.raises(abl.AblationError, match="unknown keys"):
        abl.load_grid(p)
    p.write_text(yaml.safe_dump({"runs": [{"name": "a"}]}))
    with pytest.raises(abl.AblationError, match="'name' and 'config'"):
        abl.load_grid(p)


def test_plan_marks_finished_runs_and_checks_match_targets(tmp_path):
    specs = [abl.RunSpec("base", "configs/shapes/baseline.yaml", {}, (1, 2)),
             abl.RunSpec("acp", "configs/shapes/acp.yaml", {"ACP.MAX_IMAGES": "@match:base"}, (1, 2))]
    (tmp_path / "base_seed2").mkdir()
    (tmp_path / "base_seed2" / "metrics.json").write_text("{}")
    (tmp_path / "acp_seed1").mkdir()  # a crashed run: no metrics.json, trained again
    runs = abl.plan(specs, tmp_path, {"MODEL.DEVICE": "cpu"}, iters=40)
    assert [(r.name, r.status) for r in runs] == [("base_seed1", "pending"), ("base_seed2", "done"),
                                                  ("acp_seed1", "pending"), ("acp_seed2", "pending")]
    assert runs[2].overrides == {"MODEL.DEVICE": "cpu", "ACP.MAX_IMAGES": "@match:base", "SOLVER.MAX_ITER": "40",
                                 "SOLVER.WARMUP_ITERS": "4"}
    assert [r.seed for r in abl.plan(specs, tmp_path, {}, None, seeds=(9,))] == [9, 9]
    with pytest.raises(abl.AblationError, match="names no run"):
        abl.plan([abl.RunSpec("a", "x.yaml", {"ACP.MAX_IMAGES": "@match:nope"})], tmp_path, {}, None)
    with pytest.raises(abl.AblationError, match="unique"):
        abl.plan([specs[0], specs[0]], tmp_path, {}, None)


def test_train_args_end_with_seed_and_output_dir(tmp_path):
    spec = abl.RunSpec("acp", "configs/shapes/acp.yaml", {}, (1,))
    run = abl.PlannedRun(spec, 1, tmp_path / "acp_seed1", {"ACP.MAX_IMAGES": "@match:x"})
    args = abl.train_args(run, {"ACP.MAX_IMAGES": "120"}, ["--num-gpus", "1"])
    assert args == ["--num-gpus", "1", "--config-file", str(ROOT / "configs/shapes/acp.yaml"), "ACP.MAX_IMAGES", "120",
                    "SEED", "1", "OUTPUT_DIR", str(tmp_path / "acp_seed1")]


def _fake_run(run_dir: Path, seed: int, config: str, apr: float, ap: float, **overrides: str) -> None:
    """A finished run: metrics.json and the full config.yaml detectron2 saves (the config it would train with)."""
    run_dir.mkdir(parents=True)
    cfg = abl.load_cfg(config, {**{k.replace("__", "."): v for k, v in overrides.items()}, "SEED": str(seed),
                                "OUTPUT_DIR": str(run_dir)})
    metrics = {t: {"AP": ap, "AP50": None, "AP75": None, "APs": None, "APm": None, "APl": None, "APr": apr,
                   "APc": ap - 1, "APf": ap + 1} for t in ("bbox", "segm")}
    # the report refuses a run whose metrics are not of its last iteration: a finished run evaluates MAX_ITER
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "dataset": "shapes_val",
                                                      "iter": int(cfg.SOLVER.MAX_ITER), "config_sha": "x"}))
    (run_dir / "config.yaml").write_text(cfg.dump())


def test_resumed_ablation_trains_nothing_and_reports(tmp_path, capsys):
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    values = {"baseline": (1.0, 3.0), "unfiltered": (10.0, 14.0), "filtered": (16.0, 17.0)}
    for group, aprs in values.items():
        for seed, apr in zip((1, 2), aprs):
            _fake_run(runs_dir / f"{group}_seed{seed}", seed,
                      f"configs/shapes/{'baseline' if group == 'baseline' else 'acp'}.yaml", apr, 20.0 + seed)
    argv = [f"--run={g}=configs/shapes/{'baseline' if g == 'baseline' else 'acp'}.yaml" for g in values]
    argv += ["--seeds", "1,2", "--out", str(runs_dir), "--results", str(results), "--no-progress"]
    assert abl.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert all("done" in line for line in lines if line.startswith("[ablation]"))
    head = json.loads(lines[-1])
    assert head["apr_baseline"] == 2.0 and head["apr_unfiltered"] == 12.0 and head["apr_filtered"] == 16.5
    assert head["apr_std"] == round(math.sqrt(8.0), 2)  # the unfiltered seeds' sample std, the largest of the three
    assert head["groups"]["filtered"]["seeds"] == [1, 2]
    assert head["groups"]["baseline"]["segm_AP_mean"] == 21.5
    with open(results / "ablation.csv") as f:
        rows = f.read().splitlines()
    assert len(rows) == 7 and rows[0].startswith("run,group,seed,status")
    md = (results / "ablation.md").read_text()
    assert "| filtered | 1,2 | 21.5 ± 0.7 | 16.5 ± 0.7 |" in md and "--seeds 1,2" in md
    assert (results / "report.md").is_file() and (results / "ap_groups_segm.png").is_file()


def test_ratio_sweep_plot_and_single_seed_rows(tmp_path, capsys):
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    _fake_run(runs_dir / "baseline_seed1", 1, "configs/shapes/baseline.yaml", 1.0, 20.0)
    _fake_run(runs_dir / "filtered_seed1", 1, "configs/shapes/acp.yaml", 15.0, 21.0)  # concat: SYNTH_RATIO unused
    for r, apr in ((0.1, 6.0), (0.5, 12.0)):
        _fake_run(runs_dir / f"ratio_{r}_seed1", 1, "configs/shapes/acp.yaml", apr, 20.0, ACP__MIX_MODE="ratio",
                  ACP__SYNTH_RATIO=str(r))
    argv = ["--run=baseline=configs/shapes/baseline.yaml", "--run=filtered=configs/shapes/acp.yaml",
            "--run=ratio_0.1=configs/shapes/acp.yaml:ACP.MIX_MODE=ratio,ACP.SYNTH_RATIO=0.1",
            "--run=ratio_0.5=configs/shapes/acp.yaml:ACP.MIX_MODE=ratio,ACP.SYNTH_RATIO=0.5",
            "--seeds", "1", "--out", str(runs_dir), "--results", str(results), "--no-progress"]
    assert abl.main(argv) == 0
    head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert head["apr_filtered"] == 15.0 and head["apr_unfiltered"] is None and head["apr_std"] == 0.0
    assert (results / "apr_sweep.png").is_file()  # the concat group is no point of it (tests/test_report.py)
    md = (results / "ablation.md").read_text()
    assert "| ratio_0.1 | 1 | 20.0 | 6.0 | 19.0 | 21.0 |" in md  # one seed: no "± 0.0"
    assert "4 trained by this invocation" not in md and "0 trained by this invocation" in md


def test_finished_runs_with_another_config_are_stale(tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    _fake_run(runs_dir / "acp_seed1", 1, "configs/shapes/acp.yaml", 15.0, 21.0, ACP__MIN_CLIS_I="60.0")
    _fake_run(runs_dir / "base_seed1", 1, "configs/shapes/baseline.yaml", 1.0, 20.0)
    # the runs now ask for another instance threshold and, through a @match key, a count that is not compared
    argv = ["--run=base=configs/shapes/baseline.yaml",
            "--run=acp=configs/shapes/acp.yaml:ACP.MIN_CLIS_I=20.0,ACP.MAX_IMAGES=@match:base",
            "--seeds", "1", "--out", str(runs_dir), "--results", str(tmp_path / "results"), "--no-progress"]
    assert abl.main(argv) == 2
    err = capsys.readouterr().err
    assert "acp_seed1" in err and "ACP.MIN_CLIS_I: 60.0 -> 20.0" in err and "--retrain-stale" in err
    assert "base_seed1" not in err and "MAX_IMAGES" not in err

    specs = [abl.RunSpec("base", "configs/shapes/baseline.yaml", {}, (1,)),
             abl.RunSpec("acp", "configs/shapes/acp.yaml", {"ACP.MIN_CLIS_I": "20.0"}, (1,))]
    runs = abl.plan(specs, runs_dir, {}, None)
    abl.mark_stale(runs, retrain=True)
    assert [r.status for r in runs] == ["done", "pending"]
    moved = [p.name for p in runs_dir.iterdir() if p.name.startswith("acp_seed1.stale-")]
    assert len(moved) == 1 and not (runs_dir / "acp_seed1").exists()
    assert "stale, trained again: acp_seed1" in capsys.readouterr().out


def test_also_adds_groups_to_the_default_grid(tmp_path, capsys):
    argv = ["--dry-run", "--also", "mine=configs/shapes/acp.yaml:ACP.MIN_CLIS_I=0.0", "--out", str(tmp_path / "runs"),
            "--shapes-dir", str(tmp_path / "shapes"), "--no-progress"]
    assert abl.main(argv) == 0
    planned = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith("[ablation]")]
    assert planned[:2] == ["baseline_seed1", "baseline_seed2"] and planned[-2:] == ["mine_seed1", "mine_seed2"]
    assert "filtered_min60_seed1" in planned and "filtered_min60_seed2" not in planned and len(planned) == 14


def test_final_grid_on_a_held_out_world(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default directories are relative: output/ablation/world3/...
    assert abl.main(["--dry-run", "--grid", "final", "--world-seed", "3", "--no-progress"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("[ablation]")]
    planned = [x[1] for x in lines]
    three = [f"{g}_seed{s}" for g in ("baseline", "unfiltered", "filtered", "oracle") for s in (1, 2, 3)]
    # acp.yaml's policy is ignore: the other two policies and the in_domain judge get one seed each
    assert planned == three + ["filtered_background_seed1", "filtered_erase_seed1", "filtered_in_domain_seed1"]
    by_name = {x[1]: x for x in lines}
    world = tmp_path / "output/ablation/world3"
    cache = json.dumps([str(world / "cache")])
    assert by_name["oracle_seed2"][3].endswith("configs/shapes/oracle.yaml")
    assert f"ACP.CACHE_DIRS={cache}" in by_name["oracle_seed2"] and "ACP.MAX_IMAGES=@match:filtered" in \
        by_name["oracle_seed2"]
    assert "ACP.MAX_IMAGES=@match:filtered" in by_name["unfiltered_seed1"]
    assert "ACP.DROPPED_INSTANCES=erase" in by_name["filtered_erase_seed1"]
    assert f"ACP.CACHE_DIRS={json.dumps([str(world / 'cache_in_domain')])}" in by_name["filtered_in_domain_seed1"]
    assert all(x[2] == "pending" for x in lines)
    with pytest.raises(SystemExit):
        abl.main(["--grid", "final", "--world-seed", "x"])


def test_final_headline_has_the_held_out_keys(tmp_path, capsys):
    runs_dir, results = tmp_path / "runs", tmp_path / "results"
    values = {"baseline": (1.0, 2.0, 3.0), "unfiltered": (10.0, 11.0, 12.0), "filtered": (15.0, 16.0, 17.0),
              "oracle": (16.0, 17.0, 18.0)}
    configs = {"baseline": "baseline", "unfiltered": "acp", "filtered": "acp", "oracle": "oracle"}
    for group, aprs in values.items():
        for seed, apr in zip((1, 2, 3), aprs):
            _fake_run(runs_dir / f"{group}_seed{seed}", seed, f"configs/shapes/{configs[group]}.yaml", apr,
                      20.0 + seed + (group == "filtered"))
    argv = [f"--run={g}=configs/shapes/{c}.yaml" for g, c in configs.items()]
    argv += ["--seeds", "1,2,3", "--out", str(runs_dir), "--results", str(results), "--no-progress"]
    assert abl.main(argv) == 0
    head = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("apr_baseline", "apr_unfiltered", "apr_filtered", "apr_oracle", "apr_std", "ap_baseline",
                "ap_filtered", "gap_closed", "seeds", "world_seed"):
        assert key in head, key
    assert head["apr_oracle"] == 17.0 and head["apr_std"] == 1.0 and head["seeds"] == 3
    assert head["gap_closed"] == round((16.0 - 11.0) / (17.0 - 11.0), 3)
    assert head["ap_filtered"] == 23.0 and head["ap_baseline"] == 22.0
    assert head["world_seed"] is None  # --run groups: no Shapes world of the driver's own
    saved = json.loads((results / "results.json").read_text().strip().splitlines()[-1])
    assert saved == {k: v for k, v in head.items() if k != "groups"}


def test_gap_closed_edges():
    assert abl.gap_closed(10.0, 18.0, 20.0) == 0.8
    assert abl.gap_closed(10.0, 8.0, 20.0) == -0.2
    assert abl.gap_closed(10.0, 12.0, 10.0) is None and abl.gap_closed(None, 1.0, 2.0) is None
    groups = {"oracle": {"seeds": [1], "segm_APr_mean": 5.0, "segm_APr_std": 0.0}}
    head = abl.headline(groups, world_seed=4)
    assert head["world_seed"] == 4 and head["seeds"] == 1 and head["gap_closed"] is None
