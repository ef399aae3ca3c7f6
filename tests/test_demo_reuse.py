"""The demo reuses a finished run only while the config it would train with is unchanged (file, bases, overrides)."""

from __future__ import annotations

from acp_data.shapes.demo import CONFIG_DIR, DemoPaths, resolved_config_hash, train_args


def test_the_hash_follows_the_resolved_config(tmp_path):
    paths = DemoPaths(tmp_path / "demo")
    acp = train_args("acp", paths, None, 42, 0)
    assert resolved_config_hash(acp) == resolved_config_hash(list(acp))
    assert resolved_config_hash(acp) != resolved_config_hash(acp + ["ACP.MIN_CLIS_I", "33.0"])
    assert resolved_config_hash(acp) != resolved_config_hash(train_args("baseline", paths, None, 42, 0))
    # where the run writes is part of the command, not of the config
    assert resolved_config_hash(acp) == resolved_config_hash(acp + ["OUTPUT_DIR", str(tmp_path / "elsewhere")])


def test_an_edited_base_file_changes_the_hash(tmp_path):
    """A value edited in acp.yaml's file (here a copy of it with its own base) retrains the run."""
    base = tmp_path / "Base-Shapes.yaml"
    base.write_text((CONFIG_DIR / "Base-Shapes.yaml").read_text().replace(
        '_BASE_: "../Base-MaskRCNN-LVIS.yaml"', f'_BASE_: "{CONFIG_DIR.parent / "Base-MaskRCNN-LVIS.yaml"}"'))
    child = tmp_path / "acp.yaml"
    child.write_text((CONFIG_DIR / "acp.yaml").read_text())
    args = ["--config-file", str(child), "ACP.CACHE_DIRS", '["x"]']
    before = resolved_config_hash(args)
    base.write_text(base.read_text() + "\nSEED: 7\n")
    assert resolved_config_hash(args) != before
