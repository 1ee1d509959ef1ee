"""`hispec bench-transport`: a real run between two Ray actors, few round trips."""

from __future__ import annotations

import json

import pytest

from hispec.bench import transport

pytestmark = pytest.mark.slow


def test_every_transport_and_shape_is_timed(tmp_path):
    out = tmp_path / "transport.json"
    assert transport.main(["--repeats", "10", "--rounds", "2", "--warmup", "2", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["transport"], str(r["shape"])): r for r in results["results"]}
    shapes = [str(list(s)) for s in transport.SHAPES]
    assert set(rows) == ({(transport.GLOO, s) for s in shapes} | {(transport.RAY, s) for s in shapes}
                         | {(transport.CONTROL, "None"), (transport.RAY_EMPTY, "None")})
    for row in rows.values():
        assert row["repeats"] == 10 and 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert rows[(transport.GLOO, "[8, 4, 256]")]["bytes"] == 8 * 4 * 256 * 4
    assert set(results["ray_call_over_gloo_p2p"]) == set(shapes)
    assert out.with_suffix(".png").stat().st_size > 1000
