"""The runtime must work where torch and onnx cannot be imported (a kiosk, a Raspberry Pi)."""

import subprocess
import sys


def run_python(code, tmp_path):
    result = subprocess.run([sys.executable, "-c", code],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_runtime_api_without_torch(tiny_bundle, tmp_path, without_torch):
    out = run_python(without_torch(
        f"""
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("torch was importable")
        import numpy as np
        from vae_edge.runtime import Runtime
        rt = Runtime.load({str(tiny_bundle)!r})
        images = rt.decode(np.zeros((3, rt.latent_dim)))
        mu, log_sigma = rt.encode(images)
        matches = rt.nearest(mu, k=2)
        assert matches.ids.shape == (3, 2)
        assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "onnx")]
        print("ok", sorted(m for m in sys.modules if m.startswith("vae_edge")))
        """),
        tmp_path,
    )
    assert out.startswith("ok") and "vae_edge.training" not in out


def test_cli_without_torch(tiny_bundle, tmp_path, without_torch):
    out = run_python(without_torch(
        f"""
        from vae_edge.runtime.cli import main
        main(["nearest", "--bundle", {str(tiny_bundle)!r}, "--random", "--seed", "1",
              "--json", "--sheet", "s.png"], standalone_mode=False)
        """),
        tmp_path,
    )
    assert '"results"' in out and (tmp_path / "s.png").is_file()
