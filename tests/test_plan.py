"""`python -m minipar.plan`: the ZeRO paper's numbers, Φ from a model shape, and
clean failure on bad input (one stderr line, exit code 2, no traceback)."""
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from minipar.formulas import gb, model_state_bytes_formula
from minipar.plan import main
from minipar.sizing import gpt_param_count
from minipar.zero_tables import PUBLISHED_TABLE1, TABLE1_DP, TABLE1_MODELS, figure1_round, table1, table1_round

pytestmark = pytest.mark.core   # the core part (make test-core): the serial machinery everything builds on

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minipar.plan", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def gb_column(text):
    """The GB/GPU numbers of the DP, ZeRO-1, ZeRO-2, ZeRO-3 rows."""
    rows = [line for line in text.splitlines() if re.match(r"\s+(DP \(|ZeRO-\d)", line)]
    return [line.split()[-1] for line in rows]


# ----------------------------------------------------------------------------- formulas

def test_gpt_param_count():
    # GPT-2 small: L=12, h=768, V=50257, s=1024
    assert gpt_param_count(12, 768, 50257, 1024) == 12 * 12 * 768 ** 2 + (50257 + 1024) * 768 == 124_318_464
    assert gpt_param_count(12, 768, 50257, 1024, biases=True) == 124_439_808   # Hugging Face's count
    assert gpt_param_count(1, 4, 10, 3, tied_embeddings=False) == 12 * 16 + 13 * 4 + 10 * 4


def test_rounding_helpers():
    assert [figure1_round(x) for x in (120.0, 31.40625, 16.640625, 1.875, 0.04)] == \
        ["120", "31.4", "16.6", "1.9", "0"]
    assert [table1_round(x) for x in (4187.5, 2218.75, 100.0, 41.25, 15.625, 62.5, 1.875, 0.46875, 8.0)] == \
        ["4187", "2218", "100", "41.3", "15.6", "62.5", "1.88", "0.47", "8"]


def test_table1_matches_the_published_table():
    """Every cell printed exactly as the paper prints it..."""
    assert table1() == PUBLISHED_TABLE1


def test_table1_published_cells_are_the_formula_to_their_last_digit():
    """...and, independently of the rounding rule, each published value is within
    one unit of its last digit of the formula (the paper truncates from 100 up)."""
    for name, phi in TABLE1_MODELS:
        for n in TABLE1_DP:
            for stage, text in zip((1, 2, 3), PUBLISHED_TABLE1[name][n]):
                ulp = 10.0 ** Decimal(text).as_tuple().exponent
                exact = gb(model_state_bytes_formula(phi, n, stage))
                assert abs(exact - float(text)) < ulp, (name, n, stage, text, exact)


# ----------------------------------------------------------------------------- the CLI

def test_main_prints_figure1_numbers(capsys):
    assert main(["--params", "7.5e9", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert gb_column(out) == ["120", "31.4", "16.6", "1.9"]
    assert "4Φ + 12Φ/N" in out and "2Φ + 14Φ/N" in out and "16Φ/N" in out


@pytest.mark.parametrize("precision, expected", [
    ("fp32", ["120", "60.9", "31.4", "1.9"]),        # 16Φ, 8Φ+8Φ/N, 4Φ+12Φ/N, 16Φ/N
    ("fp64", ["240", "121.9", "62.8", "3.8"]),       # twice fp32
])
def test_main_other_precisions(capsys, precision, expected):
    main(["--params", "7.5e9", "--gpus", "64", "--precision", precision])
    assert gb_column(capsys.readouterr().out) == expected


def test_main_offload_splits_device_and_host(capsys):
    main(["--params", "7.5e9", "--gpus", "64", "--offload"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "ZeRO-2" in line]
    # device 2Φ + 2Φ/N = 15.23 GB, host 12Φ/N = 1.41 GB
    assert rows[0][-1] == "1.4" and rows[0][-3] == "15.2"


def test_main_table1(capsys):
    main(["--table1"])
    lines = capsys.readouterr().out.splitlines()
    row64 = next(line.split() for line in lines if line.split()[:1] == ["64"])
    assert row64 == ["64", "31.4", "16.6", "1.88", "536", "284", "32", "4187", "2218", "250"]


def test_main_with_a_model_shape(capsys):
    main(["--gpus", "16", "--tp", "4", "--pp", "2", "--micro-batches", "4", "--layers", "4",
          "--hidden", "64", "--heads", "4", "--seq", "32", "--batch", "2", "--vocab", "100"])
    out = capsys.readouterr().out
    phi = gpt_param_count(4, 64, 100, 32)
    assert f"{phi:,} parameters" in out
    assert "N = 2 data-parallel" in out                       # 16 / (4 * 2)
    assert "TP+SP t=4" in out and "ZeRO-3" in out and "PP p=2" in out
    # TP: 8bsh(t-1)/t per layer x 2 layers per stage x 4 micro-batches
    comm = out[out.index("Communication per step"):]
    tp_row = next(line for line in comm.splitlines() if line.strip().startswith("TP t=4"))
    assert float(tp_row.split()[-2]) == pytest.approx(8 * 2 * 32 * 64 * 3 / 4 * 2 * 4, rel=1e-3)


def test_cli_subprocess_figure1_and_first_line():
    first = (ROOT / "minipar" / "plan.py").read_text().splitlines()[0]
    assert first == "# python -m minipar.plan --params 7.5e9 --gpus 64"
    res = run_cli("--params", "7.5e9", "--gpus", "64")
    assert res.returncode == 0, res.stderr
    assert gb_column(res.stdout) == ["120", "31.4", "16.6", "1.9"]


@pytest.mark.parametrize("args", [
    ("--params", "-7.5e9", "--gpus", "64"),
    ("--params", "0", "--gpus", "64"),
    ("--params", "seven", "--gpus", "64"),
    ("--params", "nan", "--gpus", "64"),
    ("--params", "inf", "--gpus", "64"),
    ("--params", "7.5e9", "--gpus", "0"),
    ("--params", "7.5e9", "--gpus", "2.5"),
    ("--params", "7.5e9", "--gpus", "-4"),
    ("--params", "7.5e9"),                                   # no --gpus
    ("--gpus", "8"),                                         # no Φ
    ("--params", "7.5e9", "--gpus", "6", "--tp", "4"),       # 6 % 4
    ("--gpus", "8", "--layers", "4"),                        # incomplete shape
    ("--params", "7.5e9", "--gpus", "64", "--precision", "bf16"),
])
def test_cli_bad_input_one_line_exit_2(args):
    res = run_cli(*args)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], res.stderr
    assert res.stdout == ""


def test_main_bad_input_raises_system_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--params", "-1", "--gpus", "64"])
    assert exc.value.code == 2
    assert "--params" in capsys.readouterr().err
