"""BCNB: the clinical workbook's value spellings -> binary slide labels (anything else refused, naming the column,
the row and the value), the standard-library .xlsx reader, and the adapter on its replica (JPEG slides cut on the
tile-slides grid, one bag per patient, 5-fold cross-validation by patient)."""

from __future__ import annotations

import zipfile

import pandas as pd
import pytest
from PIL import Image

from dinoscale.data import prepare_dataset
from dinoscale.data.bcnb import TABLE, TILE, binary_labels
from dinoscale.data.dataset import DataError
from dinoscale.data.replicas import get_replica
from dinoscale.data.xlsx import read_xlsx, write_xlsx
from dinoscale.spec import DatasetSpec

LABELS = ["ER", "PR", "HER2", "ALN"]


def _table(**overrides) -> pd.DataFrame:
    rows = {
        "Patient ID": ["1", "2", "3", "4"],
        "ER": ["Positive", "Negative", "Positive", "Negative"],
        "PR": ["Negative", "Positive", "Positive", "Negative"],
        "HER2": ["Negative", "Negative", "Positive", "Positive"],
        "ALN status": ["N0", "N+(1-2)", "N+(>2)", "N0"],
    }
    rows.update(overrides)
    return pd.DataFrame(rows)


def test_the_release_spellings_map_to_binary_labels():
    labels = binary_labels(_table(), LABELS, TABLE)
    assert labels.to_dict("list") == {
        "ER": [1, 0, 1, 0],
        "PR": [0, 1, 1, 0],
        "HER2": [0, 0, 1, 1],
        "ALN": [0, 1, 1, 0],  # N0 vs N+: both N+(1-2) and N+(>2) are metastatic
    }
    assert list(binary_labels(_table(), ["ALN"], TABLE).columns) == ["ALN"]


@pytest.mark.parametrize(
    "column,value",
    [
        ("ER", "positive"),  # a spelling the release does not use: refused, never folded
        ("PR", ""),  # an empty cell
        ("HER2", "Equivocal"),
        ("ALN status", "N+(1~2)"),  # the sample folders' spelling, not the table's
        ("ALN status", "N1"),
    ],
)
def test_an_unknown_value_is_refused_naming_the_column_row_and_value(column, value):
    table = _table(
        **{column: ["Positive", "Negative", value, "N0"] if column != "ALN status" else ["N0", value, "N0", "N0"]}
    )
    row = 4 if column != "ALN status" else 3  # spreadsheet rows: the header is row 1
    with pytest.raises(DataError) as e:
        binary_labels(table, LABELS, TABLE)
    msg = str(e.value)
    assert msg.startswith(f"{TABLE}, row {row} (Patient ID {row - 1}): {column} value '{value or '(empty)'}'"), msg
    assert "is not one of" in msg and "\n" not in msg


def test_xlsx_round_trip_and_cells_excel_leaves_out(tmp_path):
    path = tmp_path / "t.xlsx"
    write_xlsx(
        path, [["Patient ID", "Age(years)", "Ki67", "ALN status"], [1, 52, 0.3, "N+(>2)"], [2, None, 0.05, "N0"]]
    )
    assert read_xlsx(path) == [
        ["Patient ID", "Age(years)", "Ki67", "ALN status"],
        ["1", "52", "0.3", "N+(>2)"],
        ["2", "", "0.05", "N0"],  # the empty cell keeps its column
    ]
    # a sheet as other writers save it: inline and rich-text strings, a whole number stored as 3.0, no r= on a cell
    with zipfile.ZipFile(path) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    parts["xl/sharedStrings.xml"] = f"<sst {ns}><si><r><t>Pos</t></r><r><t>itive</t></r></si></sst>".encode()
    parts["xl/worksheets/sheet1.xml"] = (
        f'<worksheet {ns}><sheetData><row r="1"><c r="B1" t="s"><v>0</v></c></row>'
        '<row r="2"><c t="inlineStr"><is><t>N0</t></is></c><c><v>3.0</v></c></row></sheetData></worksheet>'
    ).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    assert read_xlsx(path) == [["", "Positive"], ["N0", "3"]]
    (tmp_path / "bad.xlsx").write_bytes(b"Patient ID,ER\n1,Positive\n")  # a CSV saved under the .xlsx name
    with pytest.raises(DataError, match=r"bad\.xlsx: not a readable \.xlsx workbook"):
        read_xlsx(tmp_path / "bad.xlsx")


def test_the_adapter_tiles_each_slide_and_cross_validates_by_patient(tmp_path):
    root, store = tmp_path / "BCNB", tmp_path / "store"
    spec = DatasetSpec(name="bcnb", root=str(root), split={"folds": 5, "test_fraction": 0.2, "seed": 0})
    get_replica("bcnb").write(root, spec)
    ds = prepare_dataset(spec, store)
    m = ds.manifest
    assert ds.task == "mil" and ds.classes == LABELS
    assert m["bag_id"].nunique() == 20 and (m["bag_id"] == m["patient_id"]).all()  # one slide per patient
    bags = m.drop_duplicates("bag_id")
    assert (bags.loc[bags["split"] == "test", "fold"] == -1).all() and (bags["split"] == "test").sum() == 4
    assert sorted(bags.loc[bags["split"] != "test", "fold"].value_counts()) == [3, 3, 3, 3, 4]
    with Image.open(m["path"].iloc[0]) as tile:
        assert tile.size == (TILE, TILE) and tile.mode == "RGB"
    x, y = (int(v) for v in m["path"].iloc[0].rsplit("tile_", 1)[1].removesuffix(".png").split("_"))
    assert x % TILE == 0 and y % TILE == 0  # the tile-slides grid, level-0 offsets
    assert m.groupby("bag_id").size().max() < 6  # glass tiles of the 2 x 3 grid left out
    table = pd.DataFrame(read_xlsx(root / TABLE)[1:], columns=read_xlsx(root / TABLE)[0])
    want = binary_labels(table, LABELS, TABLE).set_axis(table["Patient ID"])
    pd.testing.assert_frame_equal(bags.set_index("bag_id")[LABELS].rename_axis("Patient ID"), want, check_dtype=False)

    one = prepare_dataset(spec.model_copy(update={"classes": ["ALN"]}), store)  # one task per spec
    assert one.classes == ["ALN"] and list(one.manifest["path"]) == list(m["path"])  # tiles cut once, reused
    with pytest.raises(DataError, match=r"dataset.classes: \['Ki67'\] are not BCNB labels"):
        prepare_dataset(spec.model_copy(update={"classes": ["Ki67"]}), store)
    (root / "WSIs" / "7.jpg").unlink()
    with pytest.raises(DataError, match=r"WSIs/7\.jpg not found \(patient-clinical-data\.xlsx lists the patient\)"):
        prepare_dataset(spec, store)
    skipping = prepare_dataset(spec.model_copy(update={"on_bad_file": "skip"}), store)
    assert skipping.manifest["bag_id"].nunique() == 19 and skipping.skipped[0]["path"].endswith("7.jpg")
