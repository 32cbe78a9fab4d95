"""benchmarks/real_catalog.py installs nothing: without its image collections it says what to
install, in one message, and writes no catalog."""

from __future__ import annotations

import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_catalog.py"


def test_missing_collection_names_the_install_command(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    prefix = tmp_path / "npm"
    assert main([str(tmp_path / "out"), "--npm-prefix", str(prefix)]) == 2
    error = capsys.readouterr().err
    assert f"npm install --prefix {prefix} emoji-datasource-twitter@16.0.0" in error
    assert not (tmp_path / "out").exists()


def test_unknown_collection_is_refused_with_the_known_names(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    assert main([str(tmp_path / "out"), "--collections", "emoji,flickr"]) == 2
    error = capsys.readouterr().err
    assert "emoji, adwaita, oxygen, tango" in error and "flickr" in error
    assert not (tmp_path / "out").exists()


def test_icon_theme_collection_lists_one_row_per_icon_labelled_by_theme_and_folder(
        tmp_path, monkeypatch):
    namespace = runpy.run_path(str(SCRIPT))
    theme = tmp_path / "theme"
    for size in ("16x16", "32x32"):
        for folder, name in (("devices", "printer"), ("places", "folder"), ("ui", "arrow")):
            (theme / size / folder).mkdir(parents=True, exist_ok=True)
            (theme / size / folder / f"{name}.png").write_bytes(b"png")
    monkeypatch.setitem(namespace["ICON_THEMES"], "tango", (theme, "tango-icon-theme"))
    rows = namespace["icon_rows"]("tango")
    assert [(row["id"], row["label"], row["source"]) for row in rows] == [
        ("tango-devices-printer", "tango devices", "tango-icon-theme"),
        ("tango-places-folder", "tango places", "tango-icon-theme")]
    assert all(Path(row["image"]).parent.parent.parent == theme for row in rows)
