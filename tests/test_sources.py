import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from covid_spark.inputs.sources import (
    DICOM_EXTENSIONS,
    IMAGE_EXTENSIONS,
    LISTED_TWICE,
    Record,
    class_of,
    count_per_input,
    discover,
    patient_key,
    skip_reason,
)


def _png(path, value=0) -> str:
    """A tiny real PNG at ``path`` (folders made as needed); returns the path as str."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, np.uint8), "L").save(path)
    return str(path)


@pytest.mark.parametrize("name, expected", [
    ("COVID", "covid"), ("COVID-19", "covid"), ("covid_19", "covid"), ("Viral Pneumonia", "pneumonia"),
    ("NORMAL", "normal"), ("bacterial_pneumonia", "pneumonia"), ("Lung_Opacity", None), ("", None),
])
def test_class_names_map_case_insensitively(name, expected):
    assert class_of(name) == expected


def test_manifest_relative_paths_and_optional_columns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("label,path,extra,view\nCOVID-19,a/x.png,1,AP Supine\nnormal,a/.hidden.png,2,\n")
    inv = discover(str(tmp_path / "m.csv"))
    # no source column: the source is the name of the manifest's folder; the view is normalised
    assert inv.records == [Record(path=str(tmp_path / "a" / "x.png"), label="covid", patient_id="",
                                  source=tmp_path.name, view="AP", input=0)]
    assert inv.skipped == [{"path": str(tmp_path / "a" / ".hidden.png"), "reason": "hidden file .hidden.png",
                            "input": 0}]
    assert inv.inputs == 2
    assert inv.per_input == [{"input": str(tmp_path / "m.csv"), "found": 1, "skipped": 1}]


def test_missing_manifest_file_row_is_kept_for_rejection(tmp_path):
    (tmp_path / "manifest.csv").write_text("path,label,patient_id\nnope.jpg,normal,p1\n")
    inv = discover(str(tmp_path))
    assert inv.records[0].path.endswith("nope.jpg") and inv.records[0].patient_id == f"{tmp_path.name}:p1"


def test_file_url_is_accepted(tmp_path):
    (tmp_path / "covid").mkdir()
    (tmp_path / "covid" / "x.jpg").write_bytes(b"")
    assert len(discover("file://" + str(tmp_path)).records) == 1


def test_unlabelled_manifest_is_fine_for_prediction_only(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "m.csv").write_text("path\nx.png\n")
    assert discover(str(tmp_path / "m.csv"), labelled=False).records[0].label == ""
    with pytest.raises(ValueError, match="lacks column\\(s\\) label"):
        discover(str(tmp_path / "m.csv"))


def test_patient_key_form():
    assert patient_key("kaggle", "p1") == "kaggle:p1"
    assert patient_key("kaggle", " p1 ") == "kaggle:p1"
    assert patient_key("kaggle", "") == ""
    assert patient_key("kaggle", "kaggle:p1") == "kaggle:p1"      # already namespaced: kept
    assert patient_key("ieee", "kaggle:p1") == "ieee:kaggle:p1"


def test_two_inputs_sources_patients_and_counts(tmp_path):
    clinic_a = tmp_path / "clinicA"                               # folders per class
    a1 = _png(clinic_a / "covid" / "a1.png", 1)
    a2 = _png(clinic_a / "normal" / "a2.png", 2)
    (clinic_a / "normal" / ".DS_Store").write_bytes(b"")
    clinic_b = tmp_path / "clinicB"                               # a manifest, given as a file
    b1 = _png(clinic_b / "img" / "b1.png", 3)
    b2 = _png(clinic_b / "img" / "b2.png", 4)
    b3 = _png(clinic_b / "img" / "b3.png", 5)
    b4 = _png(clinic_b / "img" / "b4.png", 6)
    (clinic_b / "list.csv").write_text(
        "path,label,patient_id,source\n"
        "img/b1.png,covid,p1,hospX\n"
        "img/b2.png,normal,p1,\n"              # empty source cell: the manifest's folder name
        "img/b3.png,pneumonia,,hospX\n"        # no patient id: stays empty
        "img/b4.png,normal,hospX:p1,hospX\n")  # already namespaced: the same patient as b1
    inv = discover([str(clinic_a), str(clinic_b / "list.csv")])
    got = {r.path: (r.label, r.source, r.patient_id, r.input) for r in inv.records}
    assert got == {
        a1: ("covid", "clinicA", "", 0),
        a2: ("normal", "clinicA", "", 0),
        b1: ("covid", "hospX", "hospX:p1", 1),
        b2: ("normal", "clinicB", "clinicB:p1", 1),
        b3: ("pneumonia", "hospX", "", 1),
        b4: ("normal", "hospX", "hospX:p1", 1),
    }
    # the same raw id "p1" in two sources is two patients
    assert len({r.patient_id for r in inv.records if r.patient_id}) == 2
    assert inv.skipped == [{"path": str(clinic_a / "normal" / ".DS_Store"),
                            "reason": "hidden file .DS_Store", "input": 0}]
    assert inv.per_input == [{"input": str(clinic_a), "found": 2, "skipped": 1},
                             {"input": str(clinic_b / "list.csv"), "found": 4, "skipped": 0}]
    assert inv.inputs == 7


def test_one_str_and_a_list_of_one_read_the_same(tmp_path):
    _png(tmp_path / "data" / "covid" / "a.png")
    one, listed = discover(str(tmp_path / "data")), discover([str(tmp_path / "data")])
    assert one.records == listed.records and one.per_input == listed.per_input


def test_file_listed_twice_in_one_manifest_is_read_once(tmp_path):
    x = _png(tmp_path / "img" / "x.png")
    y = _png(tmp_path / "img" / "y.png")
    (tmp_path / "manifest.csv").write_text(
        "path,label\nimg/x.png,covid\nimg/y.png,normal\nimg/../img/x.png,covid\n" + f"{x},covid\n")
    inv = discover(str(tmp_path))
    assert [r.path for r in inv.records] == [x, y]
    assert inv.skipped == [{"path": x, "reason": LISTED_TWICE, "input": 0}] * 2
    assert inv.inputs == 4 and inv.per_input[0]["found"] == 2 and inv.per_input[0]["skipped"] == 2


def test_file_listed_twice_across_inputs_is_read_once(tmp_path):
    data = tmp_path / "data"
    a = _png(data / "covid" / "a.png", 1)
    b = _png(data / "normal" / "b.png", 2)
    other = tmp_path / "other"
    c = _png(other / "c.png", 3)
    other.joinpath("manifest.csv").write_text(f"path,label\n{a},covid\nc.png,normal\n")
    inv = discover([str(data), str(other)])
    assert [(r.path, r.input) for r in inv.records] == [(a, 0), (b, 0), (c, 1)]
    assert inv.skipped == [{"path": a, "reason": LISTED_TWICE, "input": 1}]
    assert inv.per_input[1] == {"input": str(other), "found": 1, "skipped": 1}


def test_same_folder_given_twice_lists_every_file_twice(tmp_path):
    data = tmp_path / "data"
    paths = [_png(data / "covid" / "a.png"), _png(data / "normal" / "b.png")]
    inv = discover([str(data), str(data) + "/"])
    assert [r.path for r in inv.records] == paths
    assert inv.skipped == [{"path": p, "reason": LISTED_TWICE, "input": 1} for p in paths]
    assert [p["found"] for p in inv.per_input] == [2, 0] and inv.inputs == 4


def test_symlink_to_the_same_file_is_not_listed_twice(tmp_path):
    a = _png(tmp_path / "data" / "covid" / "a.png")
    link = tmp_path / "data" / "covid" / "link.png"
    os.symlink(a, link)
    inv = discover(str(tmp_path / "data"))
    assert sorted(r.path for r in inv.records) == sorted([a, str(link)])
    assert inv.skipped == []


def test_manifest_may_list_absolute_paths_outside_its_folder(tmp_path):
    outside = _png(tmp_path / ".cache" / "xrays" / "far.png")      # hidden folders above: not judged
    hidden = _png(tmp_path / "elsewhere" / ".far.png")              # hidden file name: judged
    inside = _png(tmp_path / "m" / "sub" / "near.png")
    (tmp_path / "m" / "manifest.csv").write_text(
        f"path,label\n{outside},covid\n{hidden},normal\n{inside},normal\n")
    inv = discover(str(tmp_path / "m"))
    assert [r.path for r in inv.records] == [outside, inside]
    assert inv.skipped == [{"path": hidden, "reason": "hidden file .far.png", "input": 0}]


def test_relative_path_climbing_out_of_the_manifest_folder_is_refused(tmp_path):
    _png(tmp_path / "x.png")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text("path,label\n../x.png,covid\n")
    with pytest.raises(ValueError, match=r"manifest .*manifest\.csv line 2: path '\.\./x\.png' lies outside"):
        discover([str(tmp_path / "m")])


def test_data_below_a_hidden_directory_is_read(tmp_path):
    root = tmp_path / ".hidden" / "data"
    a = _png(root / "covid" / "a.png")
    below = _png(root / "covid" / ".thumbs" / "b.png")                # hidden below the root: skipped
    inv = discover(str(root))
    assert [r.path for r in inv.records] == [a]
    assert inv.skipped == [{"path": below, "reason": "inside hidden folder .thumbs", "input": 0}]
    # the same through a manifest in a hidden folder, and an unlabelled flat folder for prediction
    snap = tmp_path / "data" / ".snapshots"
    m1 = _png(snap / "img" / "m1.png")
    m2 = _png(snap / ".trash" / "m2.png")
    (snap / "manifest.csv").write_text("path,label\nimg/m1.png,covid\n.trash/m2.png,normal\n")
    inv = discover(str(snap / "manifest.csv"))
    assert [r.path for r in inv.records] == [m1]
    assert inv.skipped == [{"path": m2, "reason": "inside hidden folder .trash", "input": 0}]
    flat = tmp_path / ".local" / "share" / "new"
    f1 = _png(flat / "f1.png")
    assert [r.path for r in discover(str(flat), labelled=False).records] == [f1]


def test_stray_file_in_a_class_folder_root_below_a_hidden_directory(tmp_path):
    root = tmp_path / ".x" / "data"
    _png(root / "covid" / "a.png")
    stray = _png(root / "stray.png")
    assert discover(str(root)).skipped == [{"path": stray, "reason": "not inside a class folder", "input": 0}]


def test_errors_name_the_input(tmp_path):
    _png(tmp_path / "ok" / "covid" / "a.png")
    (tmp_path / "empty" / "normal").mkdir(parents=True)
    (tmp_path / "empty" / "normal" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="input .*nowhere does not exist"):
        discover([str(tmp_path / "ok"), str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=f"input {tmp_path / 'empty'} holds no images"):
        discover([str(tmp_path / "ok"), str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="no input given"):
        discover([])


def test_count_per_input_adds_counts_by_index():
    per_input = [{"input": "a", "found": 2, "skipped": 0}, {"input": "b", "found": 1, "skipped": 1}]
    out = count_per_input(per_input, written=[{"input": 0}, {"input": 1}], rejected=[{"input": 0}])
    assert out == [{"input": "a", "found": 2, "skipped": 0, "written": 1, "rejected": 1},
                   {"input": "b", "found": 1, "skipped": 1, "written": 1, "rejected": 0}]
    assert "written" not in per_input[0]                            # the input is not modified


def test_input_digest_records_the_list_of_inputs(tmp_path):
    from covid_spark.stages.pipeline import input_digest

    a = _png(tmp_path / "a" / "covid" / "x.png", 7)
    b = _png(tmp_path / "b" / "normal" / "y.png", 9)
    digest = input_digest([str(tmp_path / "a"), str(tmp_path / "b")])
    assert digest["input"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    with open(b, "rb") as handle:
        assert digest["files"][b] == ["normal", "", "b", hashlib.sha256(handle.read()).hexdigest()]
    assert set(digest["files"]) == {a, b}
    assert input_digest([str(tmp_path / "a"), str(tmp_path / "b")]) == digest     # rerun: same key
    assert input_digest([str(tmp_path / "b"), str(tmp_path / "a")]) != digest     # another list: not
    assert input_digest(str(tmp_path / "a"))["input"] == [str(tmp_path / "a")]


@pytest.mark.parametrize("job, extra", [
    ("preprocess", ["--output", "o"]),
    ("pipeline", ["--run-dir", "r"]),
    ("predict", ["--model-dir", "m", "--output", "o.csv"]),
])
def test_jobs_take_input_repeatedly(job, extra):
    import importlib

    parse_args = importlib.import_module(f"jobs.{job}").parse_args
    assert parse_args(["--input", "d1", "--input", "d2"] + extra).input == ["d1", "d2"]
    assert parse_args(["--input", "d1"] + extra).input == ["d1"]
    with pytest.raises(SystemExit):
        parse_args(extra)


# ---------------------------------------------------------------- skip_reason


@pytest.mark.parametrize("path, expected", [
    (".DS_Store", "hidden file .DS_Store"),
    ("data/covid/._scan.jpg", "macOS resource-fork file ._scan.jpg"),
    ("a/.hidden/x.jpg", "inside hidden folder .hidden"),
    ("C:\\data\\.git\\x.png", "inside hidden folder .git"),
    ("Thumbs.db", "Windows system file Thumbs.db"),
    ("covid/desktop.ini", "Windows system file desktop.ini"),
])
def test_skip_reason_names_the_problem(path, expected):
    assert skip_reason(path) == expected


def test_skip_reason_unsupported_extension_names_it():
    reason = skip_reason("x.txt")
    assert reason is not None and "'.txt'" in reason and ".dcm" in reason


@pytest.mark.parametrize("path", ["study/scan.dcm", "IMG.DICOM", "PACS/1.2.840/IM00001", "DICOMDIR"])
def test_skip_reason_reads_dicom_names_and_files_without_extension(path):
    """DICOM exports: .dcm, .dicom and extensionless files are read (and judged by content)."""
    assert skip_reason(path) is None


@pytest.mark.parametrize("path", [
    "x.JPG", "a/b/scan.png", "./data/x.jpeg", "hdfs://nn:8020/cxr/normal/img.TIFF",
    "file:/tmp/a.webp", "../shared/x.pgm",
])
def test_skip_reason_accepts_images(path):
    assert skip_reason(path) is None


def test_image_extensions():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff",
                                ".webp", ".pgm", ".ppm"}
    assert DICOM_EXTENSIONS == {".dcm", ".dicom"}
