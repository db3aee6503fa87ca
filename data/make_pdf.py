"""Regenerate data/sample-project/docs/plot-map.pdf, the sample project's two-page PDF with a text layer.

The PDF is written byte by byte with no third-party library: a catalog, a page tree, two pages, one
built-in Helvetica font (no embedding) and one content stream per page. Text lines are drawn with
`BT /F1 <size> Tf <x> <y> Td (<text>) Tj ET`, so pypdf's extract_text() gives each line back as written.
Page 1 also carries a simple schematic of the beds (stroked rectangles with bed numbers).

The output is deterministic (no dates, no random /ID), so running this again gives the same bytes:

    .venv/bin/python data/make_pdf.py            # writes the file
    .venv/bin/python data/make_pdf.py --check    # exits 1 if the file on disk differs
"""

from __future__ import annotations

import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "sample-project" / "docs" / "plot-map.pdf"

PAGE_W, PAGE_H = 612, 792  # US Letter, points
LEFT = 72

# (font size, text); an empty text is a blank line. Keep lines under ~85 characters at 11 pt.
PAGE_1: list[tuple[int, str]] = [
    (16, "Fennimore Street Garden Co-op - Plot Map, 2026 season"),
    (11, "Printed for members. Not to scale. North is at the top of the page."),
    (11, ""),
    (13, "How the site is laid out"),
    (11, "The only entrance is the north gate on Fennimore Street. The tool shed stands in the"),
    (11, "north-east corner, with the three compost bays directly behind it and the rain barrels"),
    (11, "along its back wall. The herb spiral and the bench sit in the middle of the site, and"),
    (11, "the pollinator strip runs the full length of the west fence."),
    (11, ""),
    (13, "Bed numbers"),
    (11, "Beds 1 to 12 are on the east side, numbered from the gate southwards."),
    (11, "Beds 13 to 24 are on the west side, numbered from the gate southwards."),
    (11, "Beds 25 to 31 run along the south fence, numbered from west to east."),
    (11, "The fruit bushes form a row between the east beds and the east fence."),
    (11, ""),
    (13, "Plot holders new this season"),
    (11, "Plot 3 - Bea Lindgren, shared with her sister."),
    (11, "Plot 9 - Samir Haddad, taking over from the Petersen family."),
    (11, "Plot 22 - the Delacroix-Nguyen household."),
    (11, "Please introduce yourself to your bed neighbours; they will water for you in a pinch."),
]

PAGE_2: list[tuple[int, str]] = [
    (16, "Plot Map, page 2 - special beds and utilities"),
    (11, ""),
    (13, "Shared and special beds"),
    (11, "Plot 1, just inside the gate, is the seed club bed. Please leave it to the children."),
    (11, "Plots 6 and 18 are shared beds marked with yellow stakes; anyone may harvest there."),
    (11, "The cold frame for plant-sale seedlings stands at the south end of plot 11."),
    (11, "Plot 14 is the acid bed, edged in dark stained boards and mulched with pine needles."),
    (11, "The blueberry bed in plot 14 is kept at a soil pH target of 4.8."),
    (11, "Water plot 14 from the rain barrels only, because tap water slowly raises its pH."),
    (11, "Plot 27 is the trial bed, used each year to test a new green manure or cover crop."),
    (11, ""),
    (13, "Utilities and safety"),
    (11, "The standpipe is beside the shed door. The main shut-off valve is under the square"),
    (11, "iron cover one step west of the standpipe; turn it clockwise to close."),
    (11, "There is no electricity on site. The drip-line timers run on batteries."),
    (11, "The first-aid kit and fire blanket are just inside the shed door."),
    (11, "In an emergency, gather on the pavement outside the north gate and count heads."),
    (11, ""),
    (13, "Paths and access"),
    (11, "The main path from the gate to the south fence is wide enough for a wheelbarrow."),
    (11, "Side paths between beds are narrow; please keep them clear of tools and hoses."),
    (11, "The south-west corner floods after heavy rain; lay planks there in winter."),
]


def pdf_string(text: str) -> bytes:
    """A PDF literal string: parentheses and backslashes escaped; ASCII only."""
    escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return b"(" + escaped.encode("ascii") + b")"


def text_ops(lines: list[tuple[int, str]], top: int = 720) -> list[bytes]:
    """One BT..ET block per line, placed absolutely, with extra space above headings."""
    ops, y = [], top
    for size, text in lines:
        if size > 11 and y != top:
            y -= 6
        if text:
            ops.append(b"BT /F1 %d Tf %d %d Td " % (size, LEFT, y) + pdf_string(text) + b" Tj ET")
        y -= size + 5
    return ops


def map_ops() -> list[bytes]:
    """Page 1's schematic: the site outline, the shed and the numbered beds, drawn below the text."""
    ops = [b"0.5 w 0 0 0 RG"]
    x0, y0, x1, y1 = 120, 72, 492, 372  # site outline
    ops.append(b"%d %d %d %d re S" % (x0, y0, x1 - x0, y1 - y0))
    ops.append(b"BT /F1 8 Tf 280 378 Td (north gate - Fennimore Street) Tj ET")
    ops.append(b"%d %d 54 36 re S" % (x1 - 62, y1 - 44))  # shed, north-east corner
    ops.append(b"BT /F1 8 Tf %d %d Td (SHED) Tj ET" % (x1 - 48, y1 - 30))
    bed_w, bed_h, gap = 44, 18, 4
    # West beds 13-24 and east beds 1-12, two columns of six on each side, numbered down each column;
    # drawn row by row, left to right, so that text extraction reads each row in order.
    columns = [(x0 + 20, 13), (x0 + 20 + bed_w + gap, 19), (x1 - 70 - 2 * bed_w - gap, 1), (x1 - 70 - bed_w, 7)]
    for row in range(6):
        by = y1 - 70 - row * (bed_h + gap)
        for bx, first in columns:
            ops.append(b"%d %d %d %d re S" % (bx, by, bed_w, bed_h))
            ops.append(b"BT /F1 8 Tf %d %d Td (%d) Tj ET" % (bx + 4, by + 6, first + row))
    for i in range(7):  # south beds 25-31, west to east
        bx = x0 + 20 + i * (bed_w + gap)
        ops.append(b"%d %d %d %d re S" % (bx, y0 + 10, bed_w, bed_h))
        ops.append(b"BT /F1 8 Tf %d %d Td (%d) Tj ET" % (bx + 4, y0 + 16, 25 + i))
    ops.append(b"BT /F1 8 Tf 276 240 Td (herb spiral) Tj ET")
    return ops


def build() -> bytes:
    """The whole file: objects 1-2 catalog and pages, 3-6 two (page, contents) pairs, 7 the font."""
    contents = [b"\n".join(text_ops(PAGE_1, 740) + map_ops()), b"\n".join(text_ops(PAGE_2))]
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R 5 0 R] /Count 2 >>",
    ]
    for i, stream in enumerate(contents):
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] /Contents %d 0 R "
            b"/Resources << /Font << /F1 7 0 R >> >> >>" % (PAGE_W, PAGE_H, 4 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")

    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def main(argv: list[str]) -> int:
    data = build()
    if argv == ["--check"]:
        same = OUT.exists() and OUT.read_bytes() == data
        print(f"{OUT}: {'up to date' if same else 'differs'}")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(data)
    print(f"wrote {OUT} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
