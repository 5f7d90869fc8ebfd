import pytest

from covid_spark.sources import class_of, discover


@pytest.mark.parametrize("name, expected", [
    ("COVID", "covid"), ("COVID-19", "covid"), ("covid_19", "covid"), ("Viral Pneumonia", "pneumonia"),
    ("NORMAL", "normal"), ("bacterial_pneumonia", "pneumonia"), ("Lung_Opacity", None), ("", None),
])
def test_class_names_map_case_insensitively(name, expected):
    assert class_of(name) == expected


def test_manifest_relative_paths_and_optional_columns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("label,path,extra\nCOVID-19,a/x.png,1\nnormal,a/.hidden.png,2\n")
    inv = discover(str(tmp_path / "m.csv"))
    assert inv.records == [{"path": str(tmp_path / "a" / "x.png"), "label": "covid", "patient_id": "", "source": ""}]
    assert [s["path"] for s in inv.skipped] == [str(tmp_path / "a" / ".hidden.png")]
    assert inv.inputs == 2


def test_missing_manifest_file_row_is_kept_for_rejection(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label,patient_id\nnope.jpg,normal,p1\n")
    inv = discover(str(tmp_path))
    assert inv.records[0]["path"].endswith("nope.jpg") and inv.records[0]["patient_id"] == "p1"


def test_file_url_is_accepted(tmp_path):
    (tmp_path / "covid").mkdir()
    (tmp_path / "covid" / "x.jpg").write_bytes(b"")
    assert len(discover("file://" + str(tmp_path)).records) == 1


def test_unlabelled_manifest_is_fine_for_prediction_only(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("path\nx.png\n")
    assert discover(str(tmp_path / "m.csv"), labelled=False).records[0]["label"] == ""
    with pytest.raises(ValueError, match="lacks column\\(s\\) label"):
        discover(str(tmp_path / "m.csv"))
