"""`bench overhead` on the tiny preset: the static program's invariants as the benchmark reports them (no host sync
inside the loop, a step that compiles as one graph), and the counters themselves catch what they claim to."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from magnet_engine.bench import __main__ as dispatcher
from magnet_engine.bench import overhead


def test_overhead_row(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    threads = torch.get_num_threads()
    try:
        assert dispatcher.main(["overhead", "--model", "tiny", "--duration", "0.3", "--steps", "2,1,1,1",
                                "--variants", "eager", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (row,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert row["model"] == "tiny" and row["steps"] == [2, 1, 1, 1] and row["passes"] == 5 and row["frames"] == 15
    assert row["host_syncs_in_loop"] == 0 and row["sync_ops"] == {} and row["tolist_in_loop"] == 0
    assert 0 < row["ops_per_pass"]["median"] < row["ops_per_step"]["median"]
    assert 0 < row["pass_ms"]["median"] <= row["step_ms"]["max"]
    c = row["compile"]
    assert c["graphs"] == 1 and c["graph_breaks"] == 0 and c["break_reasons"] == []
    assert 0.0 <= c["fraction_in_graphs"] <= 1.0 and c["aten_ops_in_graphs"] > 0
    assert c["fraction_in_graphs"] == 1.0 and not c["recompiled_on_replay"]
    assert row["requests"]["eager"]["median_s"] > 0 and row["host"]["threads"] == 1
    assert row["command"].startswith("python -m magnet_engine.bench overhead --model tiny")


def test_counters_see_syncs_and_breaks() -> None:
    """A loop that reads the device (.item(), nonzero, tolist) is counted as such, and its step breaks the graph:
    the row's zeros above are measured, not assumed."""
    x = torch.arange(8.0)
    state = {"done": 0}

    def new(wrap):  # noqa: ANN001, ANN202 - a Program factory
        lm_pass = wrap(lambda t: t * 2)

        def step() -> None:
            y = lm_pass(x)
            if y.sum().item() > 0:  # a data-dependent branch: a sync and a graph break
                state["n"] = int(torch.nonzero(y).shape[0]) + len(y.tolist())
            state["done"] += 1

        def restart() -> None:
            state["done"] = 0

        restart()
        return overhead.Program(step, lambda: state["done"] >= 2, restart)

    ops = overhead.count_ops(new)
    assert ops["passes"] == 2 and ops["ops_per_pass"]["median"] == 1
    assert ops["sync_ops"] == {"aten._local_scalar_dense.default": 2, "aten.nonzero.default": 2}
    assert ops["host_syncs_in_loop"] == 4 and ops["tolist_in_loop"] == 2
    c = overhead.compile_report(new)
    assert c["graph_breaks"] >= 1 and 0.0 < c["fraction_in_graphs"] < 1.0
