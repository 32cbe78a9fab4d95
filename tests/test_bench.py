"""`vae-run bench` and run_bench: every operation and match mode timed, within its budget."""

import json
import sys

import pytest
from click.testing import CliRunner

from vae_edge.runtime.bench import format_report, run_bench
from vae_edge.runtime.checks import MATCH_MODES
from vae_edge.runtime.cli import main as run_main

pytestmark = pytest.mark.slow  # needs the tiny trained bundle


@pytest.fixture(scope="module")
def report(runtime):
    return run_bench(runtime, seconds=1.0, batch=4, cold_runs=1)


def test_report_covers_every_operation_and_mode(report, runtime):
    rows = {(row["operation"], row["by"], row["batch"]) for row in report["operations"]}
    expected = {(name, None, size) for name in ("decode", "encode") for size in (1, 4)}
    expected |= {("nearest", mode, size) for mode in MATCH_MODES for size in (1, 4)}
    assert rows == expected
    for row in report["operations"]:
        assert row["calls"] >= 1
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["per_item_ms"] == pytest.approx(row["p50_ms"] / row["batch"])
    assert report["catalog_size"] == len(runtime.index) == 5000
    assert report["latent_dim"] == 8
    assert report["threads"]["onnxruntime"] == runtime.threads == 1
    assert report["bundle"] == str(runtime.root)


def test_cold_start_is_a_fresh_process(report):
    cold = report["cold_start"]
    assert cold["runs"] == 1 and cold["median_s"] > 0
    if sys.platform.startswith("linux"):
        # a process that imported numpy and onnxruntime holds tens of MB; well under 2 GB
        assert 20 < cold["peak_rss_mb"] < 2048
        assert report["bench_process_peak_rss_mb"] > 20


def test_report_is_json_and_a_table(report):
    assert json.loads(json.dumps(report)) == report
    text = format_report(report)
    assert "p50 ms" in text and "nearest by decoded" in text and "5000 catalog items" in text


@pytest.mark.parametrize("arguments", [{"seconds": 0}, {"seconds": "3"}, {"batch": 1},
                                       {"batch": 4.0}, {"cold_runs": 0}])
def test_bad_arguments_raise_value_error(runtime, arguments):
    with pytest.raises(ValueError):
        run_bench(runtime, **arguments)


def test_cli_json_and_table(tiny_bundle):
    result = CliRunner().invoke(run_main, ["bench", "--bundle", str(tiny_bundle), "--seconds",
                                           "0.5", "--batch", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {row["batch"] for row in report["operations"]} == {1, 3}
    result = CliRunner().invoke(run_main, ["bench", "--bundle", str(tiny_bundle), "--seconds",
                                           "0.5", "--batch", "3"])
    assert result.exit_code == 0, result.output
    assert "cold start" in result.output and "encode" in result.output


def test_cli_refuses_a_zero_budget(tiny_bundle):
    result = CliRunner().invoke(run_main, ["bench", "--bundle", str(tiny_bundle), "--seconds",
                                           "0"])
    assert result.exit_code == 2 and "--seconds" in result.output
