"""Text that a caller named (a limit, a key, a holder, an application) shown where it could do harm:
on a terminal, in a line-based format, on a web page.

A caller can put any character in those. The ones below move the cursor, retitle a window, write
a clipboard (ESC, CSI, OSC and the C1 controls), hide text, reverse it (bidirectional overrides) or
start a new line for some reader but not for another (CR, VT, FF, the separators str.splitlines
splits on): they are shown escaped, as ``\\x1b`` or ``\\u2028``.
"""

from __future__ import annotations

UNPRINTABLE: tuple[int, ...] = (
    *range(0x00, 0x20),  # C0 controls, ESC among them
    *range(0x7F, 0xA0),  # DEL and the C1 controls (CSI, OSC, NEL...)
    0x2028,  # line separator
    0x2029,  # paragraph separator
    *range(0x202A, 0x202F),  # bidirectional embeddings and overrides
    *range(0x2066, 0x206A),  # bidirectional isolates
    0xFEFF,  # zero-width no-break space
)

ESCAPES: dict[int, str] = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in UNPRINTABLE}


def shown(text: str) -> str:
    """``text`` with every character of UNPRINTABLE written as an escape (``\\x1b``), so it stays
    on one line and cannot act on the terminal that prints it."""
    return text.translate(ESCAPES)
