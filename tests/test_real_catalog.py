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
