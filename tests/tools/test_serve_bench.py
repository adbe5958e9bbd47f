"""scripts/serve_bench.py runs end to end with --tiny on a CPU: every rate has engine and static figures, and the
JSON and the plot are written."""

import json

import pytest

from tests.tools.test_scripts import _load


@pytest.mark.slow
def test_serve_bench_tiny_writes_every_rate(tmp_path):
    _load("serve_bench").main(["--tiny", "--loads", "1.0", "--requests", "12", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "serve_bench.json").read_text())
    assert [row["load"] for row in results["rates"]] == [0.5, 1.0]
    for row in results["rates"]:
        for kind in ("engine", "static"):
            figures = row[kind]
            assert figures["tokens_per_s"] > 0 and 0 <= figures["occupancy"] <= 1
            assert 0 < figures["ttft"]["p50_ms"] <= figures["ttft"]["p99_ms"]
            assert 0 < figures["itl"]["p50_ms"] <= figures["itl"]["p99_ms"]
    assert results["static_decode_tokens_per_s"] > 0 and results["unloaded_ttft_ms"]["p50_ms"] > 0
    assert set(results["targets"]) == {"throughput_tokens_per_s", "itl_p99_ms", "ttft_p50_half_load_ms"}
    assert (tmp_path / "serve_latency.png").stat().st_size > 10_000
