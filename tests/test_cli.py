from hetmm.cli import main


def test_demo_runs_and_finds_the_defect(capsys):
    assert main(["demo", "--size", "16", "--channels", "16", "--templates", "4"]) == 0
    out = capsys.readouterr().out
    assert "torch backend vs reference" in out
    line = next(l for l in out.splitlines() if l.startswith("anomaly score"))
    defect = float(line.split("defect ")[1].split(",")[0])
    elsewhere = float(line.split("elsewhere ")[1])
    assert defect > 2 * elsewhere
