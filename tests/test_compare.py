"""`python -m minipar.compare`: the seed's four-column table, each column backed by numbers.
Serial: the scalability formula and the line counts. MPI (8 ranks): the measured columns."""
import json
import pathlib

import pytest

from minipar import compare

pytestmark = getattr(pytest.mark, "3d")
GB = 1e9


def test_largest_model_follows_the_zero_formulas():
    # 80 GB per device, mixed precision + Adam: DP 16Φ, ZeRO-1 4Φ+12Φ/N, ZeRO-2 2Φ+14Φ/N, ZeRO-3 16Φ/N
    assert compare.largest_model({}, {}, 64) == pytest.approx(80 * GB / 16)
    assert compare.largest_model(dict(zero=1), {}, 64) == pytest.approx(80 * GB / (4 + 12 / 64))
    assert compare.largest_model(dict(zero=2), {}, 64) == pytest.approx(80 * GB / (2 + 14 / 64))
    assert compare.largest_model(dict(zero=3), {}, 64) == pytest.approx(80 * GB * 64 / 16)
    # Offload: only fp16 params and the fp16 gradient shard stay on the device
    assert compare.largest_model(dict(zero=2, offload=True), {}, 8) == pytest.approx(80 * GB / (2 + 2 / 8))
    # TP inside a node of 8, then DP replicas; 3D: tp 8 x pp 8 x ZeRO-1 over the remaining dp
    assert compare.largest_model({}, dict(tp=8), 512) == pytest.approx(80 * GB * 8 / 16)
    assert compare.largest_model(dict(zero=1), dict(tp=8, pp=8), 512) == pytest.approx(
        80 * GB * 64 / (4 + 12 / 8))
    assert compare.largest_model({}, dict(tp=8), 4) == pytest.approx(80 * GB * 4 / 16)   # fewer than a node


def test_scalability_word_follows_the_growth_from_8_to_512_devices():
    words = {name: compare.scalability_word([compare.largest_model(lay, scale, n) for n in compare.DEVICE_COUNTS])
             for name, lay, scale, *_ in compare.RUNS}
    assert words["DP"] == words["TP"] == words["ZeRO-1"] == "Low"     # bounded: Φ_max hardly grows
    assert words["ZeRO-3"] == "High" and words["PP"] == "Medium"


def test_code_lines_count_the_strategy_s_own_files():
    dp = compare.code_lines(("parallel.data.ddp",))
    source = pathlib.Path(compare.__file__).parent / "parallel" / "data" / "ddp.py"
    lines = source.read_text().splitlines()
    assert 0 < dp == sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#")) < len(lines)
    files = {name: f for name, *_, f in compare.RUNS}
    assert compare.code_lines(files["3D"]) > compare.code_lines(files["TP"]) > dp


def test_the_legend_explains_every_column_and_zero3():
    text = compare.legend()
    for column in ("memory efficiency", "communication cost", "implementation complexity", "scalability"):
        assert column in text
    assert "ZeRO-3 m=1" in text and "1.5x" in text


@pytest.mark.mpi
def test_compare_table(world, tmp_path_factory):
    if world.size != 8:
        pytest.skip("minipar.compare is laid out for 8 ranks")
    # rank 0 writes the report; every rank reads that one file, so all reach the same verdict
    path = pathlib.Path(world.bcast_object(str(tmp_path_factory.getbasetemp() / "compare.json")))
    assert compare.main(["--steps", "1", "--batch-size", "16", "--report", str(path)]) == 0
    world.barrier()
    rows = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {name for name, *_ in compare.RUNS}
    for r in rows.values():
        assert set(r["words"]) == {"memory efficiency", "communication cost", "implementation complexity",
                                   "scalability"}
        assert r["lines"] > 0 and len(r["largest_model"]) == len(compare.DEVICE_COUNTS)
    assert rows["DP"]["memory_x_dp"] == rows["DP"]["sent_x_dp"] == 1.0
    # the ZeRO ladder: each stage holds less model state per rank; offload moves the rest to the host
    assert rows["DP"]["model_state"] > rows["ZeRO-1"]["model_state"] > rows["ZeRO-2"]["model_state"] \
        > rows["ZeRO-3"]["model_state"]
    assert rows["Offload"]["host"] > 0 and rows["Offload"]["model_state"] < rows["ZeRO-2"]["model_state"]
    # ZeRO-1/2 cost what DP costs; ZeRO-3 1.5x at one micro-batch (the paper), 1.5m x at m = 2
    assert rows["ZeRO-1"]["sent_x_dp"] == pytest.approx(1.0, rel=1e-3)
    assert rows["ZeRO-3 m=1"]["sent_x_dp"] == pytest.approx(1.5, rel=1e-2)
    assert rows["ZeRO-3"]["sent_x_dp"] == pytest.approx(3.0, rel=1e-2)
    assert rows["PP"]["bubble"] > 0 and rows["DP"]["bubble"] is None
