"""One error style for every `acp-data` command: a usage or input error is one line on stderr with exit status 2,
checked before any work (outputs of the wrong kind first); `export` says what it skipped; config overrides accept an
int for a float key and suggest the nearest key for a typo."""

from __future__ import annotations

import importlib.util
import json

import pytest
from cache_helpers import make_categories, write_cache
from helpers import TRAIN_NET

from acp_data.cli import UsageError, check_output_path, main


def _one_line_error(capsys, prog: str) -> str:
    out, err = capsys.readouterr()
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("c") / "cache"
    write_cache(d, make_categories(), n_units=4, n_cand=3, fsync=False)
    return d


def test_check_output_path(tmp_path):
    f = tmp_path / "f.json"
    f.write_text("{}")
    assert check_output_path(f, "file", "--out") == f
    assert check_output_path(tmp_path / "new" / "x.json", "file", "--out")  # parents made later
    with pytest.raises(UsageError, match="--out .* is a directory; give a file path"):
        check_output_path(tmp_path, "file", "--out")
    with pytest.raises(UsageError, match="--html .* exists and is not a directory"):
        check_output_path(f, "dir", "--html")
    with pytest.raises(UsageError, match="is a file, not a directory"):
        check_output_path(f / "sub" / "x.json", "file", "--out")


def test_export_checks_outputs_first_and_reports_what_it_skipped(cache, tmp_path, capsys):
    assert main(["export", str(cache), "--out", str(tmp_path)]) == 2
    assert "--out" in _one_line_error(capsys, "acp-data export")
    blocker = tmp_path / "imgs"
    blocker.write_text("not a directory")
    assert main(["export", str(cache), "--out", str(tmp_path / "a.json"), "--images", str(blocker)]) == 2
    assert "--images" in _one_line_error(capsys, "acp-data export")
    assert not (tmp_path / "a.json").exists()  # nothing was done
    assert main(["export", str(tmp_path / "none"), "--out", str(tmp_path / "a.json")]) == 2
    _one_line_error(capsys, "acp-data export")

    out = tmp_path / "sel.json"
    assert main(["export", str(cache), "--out", str(out), "--select", "clis"]) == 0
    line = capsys.readouterr().out
    assert "4 images" in line and "from 12 samples; skipped 8: 8 not chosen by --select" in line
    assert json.loads(out.read_text())["info"]["skipped"] == {"not chosen by --select": 8}
    assert main(["export", str(cache), "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert "12 images" in line and line.rstrip().endswith("skipped none")


def test_report_eval_crops_rescore_generations_errors_on_stderr(cache, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["report", str(tmp_path / "run"), "--out", str(f)]) == 2
    assert "--out" in _one_line_error(capsys, "acp-data report")
    assert main(["eval", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"), "--out", str(f)]) == 2
    assert "--out" in _one_line_error(capsys, "acp-data eval")  # the output, before reading any input
    for argv, prog in ((["crops", str(tmp_path / "none")], "crops"),
                       (["rescore", str(tmp_path / "none"), "--scorer", "clip"], "rescore"),
                       (["generations", str(tmp_path / "none")], "generations")):
        assert main(argv) == 2
        _one_line_error(capsys, f"acp-data {prog}")
    assert main(["nosuchcommand"]) == 2
    assert capsys.readouterr().err.startswith("acp-data: unknown command")


def raise_usage_error(argv):
    raise UsageError(f"bad value {argv[0]!r}")


def test_main_prints_a_usage_error_raised_by_a_command(monkeypatch, capsys):
    from acp_data import cli

    monkeypatch.setitem(cli.COMMANDS, "boom", ("test_cli_errors:raise_usage_error", "raises"))
    assert main(["boom", "x"]) == 2
    assert _one_line_error(capsys, "acp-data boom") == "acp-data boom: error: bad value 'x'\n"


def test_help_shows_defaults(capsys):
    for cmd in ("export", "crops", "rescore"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert "default" in text, cmd
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "(default: all)" in capsys.readouterr().out


def test_config_overrides_int_for_float_and_nearest_key(capsys):
    from acp_data.d2.config import ConfigError, load_cfg

    cfg = load_cfg("configs/shapes/acp.yaml", ["ACP.MIN_CLIS_I", "3", "SOLVER.BASE_LR", "1"])
    assert cfg.ACP.MIN_CLIS_I == 3.0 and isinstance(cfg.ACP.MIN_CLIS_I, float) and cfg.SOLVER.BASE_LR == 1.0
    with pytest.raises(ConfigError, match=r"SEED 1\.5: expected int"):
        load_cfg("configs/shapes/acp.yaml", ["SEED", "1.5"])
    with pytest.raises(ConfigError, match="KEY VALUE pairs; 'SEED' has no value"):
        load_cfg("configs/shapes/acp.yaml", ["SEED"])

    spec = importlib.util.spec_from_file_location("acp_train_net_errors", TRAIN_NET)
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    assert train_net.cli(["--config", "shapes/acp.yaml", "ACP.MIN_CLIS_II", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train_net.py: error: ") and "unknown config key 'ACP.MIN_CLIS_II'" in err
    assert "did you mean ACP.MIN_CLIS_I" in err
