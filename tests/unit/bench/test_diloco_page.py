"""bench/results/diloco.md quotes the WAN bench's link efficiency from wan.json, never a literal."""

import json

from bench import bench_diloco
from tests.support.paths import REPO


def by_world() -> dict[int, dict]:
    saved = json.loads((REPO / "bench" / "results" / "diloco.json").read_text())
    return {int(world): value for world, value in saved.items() if world.isdigit()}


def test_the_page_quotes_the_link_efficiency_wan_json_holds_and_nothing_without_it(tmp_path, monkeypatch):
    rows = [
        dict(bench_diloco.WAN_ROW, link_efficiency=0.55),
        dict(bench_diloco.WAN_ROW, compression="int8", link_efficiency=0.99),
    ]
    (tmp_path / "wan.json").write_text(json.dumps({"setup": {}, "rows": rows}))
    monkeypatch.setattr(bench_diloco, "RESULTS", tmp_path)
    assert bench_diloco.wan_link_efficiency(tmp_path / "wan.json") == 0.55
    assert "(`bench/results/wan.md`: 0.55 of 100 Mbit/s for fp32)" in bench_diloco._markdown(by_world())
    (tmp_path / "wan.json").unlink()
    page = bench_diloco._markdown(by_world())
    assert "the link sets the pace.\n" in page and "of 100 Mbit/s for fp32" not in page
