"""`python -m minipar.compare` runs every strategy and its measured columns obey the expected order."""
import json
import pathlib

import pytest

from minipar import compare

pytestmark = [pytest.mark.mpi, getattr(pytest.mark, "3d")]


def test_compare_table(world, tmp_path_factory):
    if world.size != 8:
        pytest.skip("minipar.compare is laid out for 8 ranks")
    # rank 0 writes the report; every rank reads that one file, so all reach the same verdict
    path = pathlib.Path(world.bcast_object(str(tmp_path_factory.getbasetemp() / "compare.json")))
    assert compare.main(["--steps", "1", "--batch-size", "16", "--report", str(path)]) == 0
    world.barrier()
    rows = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"DP", "TP", "PP", "3D", "ZeRO-1", "ZeRO-2", "ZeRO-3", "Offload", "CP"}
    # the ZeRO ladder: each stage holds less model state per rank; offload moves the rest to the host
    assert rows["DP"]["model_state"] > rows["ZeRO-1"]["model_state"] > rows["ZeRO-2"]["model_state"] \
        > rows["ZeRO-3"]["model_state"]
    assert rows["Offload"]["host"] > 0 and rows["Offload"]["model_state"] < rows["ZeRO-2"]["model_state"]
    assert rows["PP"]["bubble"] > 0 and rows["DP"]["bubble"] is None
