"""The first sheet of an Excel workbook (.xlsx) as rows of text, read with the standard library.

Clinical tables are published as .xlsx (BCNB's patient-clinical-data.xlsx); pandas reads them only through
openpyxl, which dinoscale does not install. An .xlsx is a zip of XML parts (ECMA-376): the workbook lists its
sheets, the first sheet's cells hold numbers or indices into the shared-string table. Cells are placed by their
reference (``C7``), so empty cells that Excel leaves out keep their columns. Numbers that are whole come back
without a decimal part (``3`` not ``3.0``: an ID or a count as the table shows it); formulas give their cached
value. ``write_xlsx`` writes the same minimal parts (for replicas); Excel, LibreOffice and openpyxl open them.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree
from xml.sax.saxutils import escape

from dinoscale.data.errors import DataError

_NS = {
    "m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
    "r": "http://schemas.openxmlformats.org/officeDocument/2006/relationships",
    "rel": "http://schemas.openxmlformats.org/package/2006/relationships",
}
_REF = re.compile(r"([A-Z]+)(\d+)")


def _column(ref: str) -> int:
    letters = _REF.fullmatch(ref).group(1)
    n = 0
    for ch in letters:
        n = n * 26 + ord(ch) - 64
    return n - 1


def _first_sheet(z: zipfile.ZipFile) -> str:
    wb = ElementTree.fromstring(z.read("xl/workbook.xml"))
    sheet = wb.find("m:sheets/m:sheet", _NS)
    rid = sheet.get(f"{{{_NS['r']}}}id")
    rels = ElementTree.fromstring(z.read("xl/_rels/workbook.xml.rels"))
    target = next(r.get("Target") for r in rels.findall("rel:Relationship", _NS) if r.get("Id") == rid)
    return target.lstrip("/") if target.startswith("/") else f"xl/{target}"


def _text(node) -> str:
    """A string item's text: plain (<t>) or rich text runs (<r><t>)."""
    return "".join(t.text or "" for t in node.iter(f"{{{_NS['m']}}}t"))


def _value(cell, shared: list[str]) -> str:
    kind = cell.get("t", "n")
    if kind == "inlineStr":
        node = cell.find("m:is", _NS)
        return _text(node) if node is not None else ""
    v = cell.find("m:v", _NS)
    if v is None or v.text is None:
        return ""
    if kind == "s":
        return shared[int(v.text)]
    if kind == "n":
        x = float(v.text)
        return str(int(x)) if x.is_integer() else v.text
    return v.text  # str (a formula's text), b (0 / 1), e (an error such as #N/A)


def read_xlsx(path: str | Path) -> list[list[str]]:
    """The first sheet's rows (the header first), each as long as the widest row; empty cells are ''."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            shared = []
            if "xl/sharedStrings.xml" in names:
                sst = ElementTree.fromstring(z.read("xl/sharedStrings.xml"))
                shared = [_text(si) for si in sst.findall("m:si", _NS)]
            sheet = ElementTree.fromstring(z.read(_first_sheet(z)))
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError, AttributeError, StopIteration, OSError) as e:
        raise DataError(f"{path}: not a readable .xlsx workbook ({type(e).__name__}: {e})") from e
    rows: list[list[str]] = []
    for row in sheet.findall("m:sheetData/m:row", _NS):
        cells: dict[int, str] = {}
        for i, cell in enumerate(row.findall("m:c", _NS)):
            ref = cell.get("r")
            cells[_column(ref) if ref else i] = _value(cell, shared).strip()
        width = max(cells) + 1 if cells else 0
        rows.append([cells.get(k, "") for k in range(width)])
    width = max((len(r) for r in rows), default=0)
    return [r + [""] * (width - len(r)) for r in rows]


def _ref(col: int, row: int) -> str:
    letters = ""
    col += 1
    while col:
        col, rem = divmod(col - 1, 26)
        letters = chr(65 + rem) + letters
    return f"{letters}{row}"


def write_xlsx(path: str | Path, rows: list[list[object]], sheet: str = "Sheet1") -> None:
    """A one-sheet workbook: numbers as numbers, everything else as shared strings (as Excel saves them)."""
    shared: dict[str, int] = {}
    xml_rows = []
    for r, row in enumerate(rows, start=1):
        cells = []
        for c, v in enumerate(row):
            if v is None or v == "":
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                cells.append(f'<c r="{_ref(c, r)}"><v>{v}</v></c>')
            else:
                k = shared.setdefault(str(v), len(shared))
                cells.append(f'<c r="{_ref(c, r)}" t="s"><v>{k}</v></c>')
        xml_rows.append(f'<row r="{r}">{"".join(cells)}</row>')
    main = _NS["m"]
    parts = {
        "[Content_Types].xml": '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
        '<Override PartName="/xl/sharedStrings.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sharedStrings+xml"/></Types>',
        "_rels/.rels": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships xmlns="{_NS["rel"]}">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/'
        'officeDocument" Target="xl/workbook.xml"/></Relationships>',
        "xl/workbook.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><workbook xmlns="{main}" '
        f'xmlns:r="{_NS["r"]}"><sheets><sheet name="{escape(sheet)}" sheetId="1" r:id="rId1"/></sheets></workbook>',
        "xl/_rels/workbook.xml.rels": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><Relationships '
        f'xmlns="{_NS["rel"]}"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/'
        '2006/relationships/worksheet" Target="worksheets/sheet1.xml"/><Relationship Id="rId2" '
        'Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/sharedStrings" '
        'Target="sharedStrings.xml"/></Relationships>',
        "xl/worksheets/sheet1.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><worksheet '
        f'xmlns="{main}"><sheetData>{"".join(xml_rows)}</sheetData></worksheet>',
        "xl/sharedStrings.xml": f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><sst xmlns="{main}" '
        f'count="{len(shared)}" uniqueCount="{len(shared)}">'
        + "".join(f'<si><t xml:space="preserve">{escape(s)}</t></si>' for s in shared)
        + "</sst>",
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in parts.items():
            z.writestr(name, text)
