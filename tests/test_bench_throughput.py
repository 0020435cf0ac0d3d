"""bench/throughput.py --quick: every ratio is measured, side by side, from medians of real runs."""
import json

import pytest

from bench.throughput import RATIOS, main


@pytest.mark.slow
def test_throughput_quick_reports_every_ratio(tmp_path):
    out = tmp_path / "throughput"
    result = main(["--quick", "--out", str(out)])
    assert [r["ratio"] for r in result["ratios"]] == [what for what, *_ in RATIOS]
    for r in result["ratios"]:
        num, den = r["numerator_per_s"], r["denominator_per_s"]
        assert num["min"] <= num["median"] <= num["max"] and num["median"] > 0 and den["median"] > 0
        # the value is rounded to 3 decimals
        assert r["value"] == pytest.approx(num["median"] / den["median"], rel=0.01, abs=0.0006)
        assert r["meets_target"] is (None if r["target"] is None else r["value"] >= r["target"])
    # ingest must decode what the bare loop decodes, and more: it cannot be several times faster
    ingest = next(r for r in result["ratios"] if r["ratio"] == "ingest / bare decode loop")
    assert ingest["value"] < 3
    assert any(k.startswith("IVF near-dup query") for k in result["rates"])
    assert json.loads(out.with_suffix(".json").read_text())["ratios"] == result["ratios"]
    assert "| embed / bare forward |" in out.with_suffix(".md").read_text()
