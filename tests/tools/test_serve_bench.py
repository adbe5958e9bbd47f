"""scripts/serve_bench.py runs end to end with --tiny on a CPU: every rate has engine and static figures, and the
JSON and the plot are written."""

import json

import pytest

from tests.tools.test_scripts import _load


@pytest.mark.slow
def test_serve_bench_tiny_writes_every_rate(tmp_path):
    _load("serve_bench").main(["--tiny", "--rates", "100,400", "--requests", "12", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "serve_bench.json").read_text())
    assert [row["rate"] for row in results["rates"]] == [100.0, 400.0]
    for row in results["rates"]:
        for kind in ("engine", "static"):
            figures = row[kind]
            assert figures["tokens_per_s"] > 0 and 0 <= figures["occupancy"] <= 1
            assert 0 < figures["ttft"]["p50_ms"] <= figures["ttft"]["p99_ms"]
            assert 0 < figures["itl"]["p50_ms"] <= figures["itl"]["p99_ms"]
    assert results["static_decode_tokens_per_s"] > 0 and len(results["unloaded_ttft_ms"]) == 3
    assert (tmp_path / "serve_latency.png").stat().st_size > 10_000
