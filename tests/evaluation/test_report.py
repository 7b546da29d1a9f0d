from pipelines.evaluation import METRICS, markdown_table, metrics_rows


def _metrics():
    b = {"AP": 0.2371, "AP50": 0.5, "AP75": 0.0, "APs": None, "APm": 0.1, "APl": 1.0}
    a = dict.fromkeys(METRICS, 0.33)
    return {"split": "nonvoc", "sets": {"A": [1], "B": [2]},
            "segm": {"B": b, "A": a}, "bbox": {"B": a, "A": b}, "config": {}}


def test_metrics_rows_flattens_in_order():
    rows = metrics_rows(_metrics())
    assert list(rows) == ["segm B", "segm A", "bbox B", "bbox A"]
    assert rows["segm B"]["AP"] == 0.2371 and rows["segm B"]["APs"] is None


def test_markdown_table():
    text = markdown_table(metrics_rows(_metrics()))
    lines = text.splitlines()
    assert lines[0] == "| | AP | AP50 | AP75 | APs | APm | APl |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| segm B | 23.7 | 50.0 | 0.0 | n/a | 10.0 | 100.0 |"
    assert lines[3] == "| segm A | 33.0 | 33.0 | 33.0 | 33.0 | 33.0 | 33.0 |"
    assert len(lines) == 6 and text.endswith("\n")
    assert markdown_table({"x": {"AP": 0.5}}, columns=["AP", "AP50"]).splitlines()[2] == "| x | 50.0 | n/a |"
