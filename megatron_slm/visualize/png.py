"""The selection picture as a PNG (matplotlib, imported only when a picture is drawn): each token
a box coloured by excess loss (the HTML report's scale), selected tokens underlined in black, one
panel per document with its statistics. Used by ``--format png`` and the trainer's TensorBoard
image."""

from __future__ import annotations

import io
import math

import numpy as np

from megatron_slm.visualize.colors import excess_rgb, scale_limit

COLUMNS = 100  # characters per line: monospace layout, so a token's box width is len(text)
MAX_TOKEN_CHARS = 16


def _label(text: str) -> str:
    text = text.replace("\u2581", " ").replace("\n", "\u21b5").replace("\t", " ")
    text = "".join(c if c.isprintable() else "?" for c in text) or "?"
    return text[:MAX_TOKEN_CHARS]


def _layout(tokens: list[str]):
    """(line, column, text) per token, wrapped at COLUMNS characters."""
    out, line, col = [], 0, 0
    for t in tokens:
        text = _label(t)
        if col + len(text) > COLUMNS and col > 0:
            line, col = line + 1, 0
        out.append((line, col, text))
        col += len(text)
    return out, line + 1


def _figure(selections, title: str | None):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    limit = scale_limit([s.excess for s in selections])
    layouts = [_layout(s.tokens) for s in selections]
    lines = sum(n + 2.2 for _, n in layouts) + (1.5 if title else 0) + 1.5
    char_w, line_h = 0.085, 0.22  # inches at fontsize 8 monospace
    fig = Figure(figsize=(COLUMNS * char_w + 0.4, lines * line_h + 0.2), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-2, COLUMNS + 2)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    y = 0.2
    if title:
        ax.text(0, y, title, fontsize=9, va="top", fontweight="bold")
        y += 1.5
    for sel, (layout, n_lines) in zip(selections, layouts):
        st = sel.stats
        ex = st["mean_excess_selected"]
        head = (
            f"document {sel.doc}: {st['tokens']} tokens, {st['selected_share'] * 100:.0f}% "
            f"selected, mean excess {st['mean_excess']:.3f} (selected "
            f"{'n/a' if math.isnan(ex) else f'{ex:.3f}'})"
        )
        ax.text(0, y, head, fontsize=8, va="top", color="#333")
        y += 1.2
        for i, (line, col, text) in enumerate(layout):
            rgb = np.array(excess_rgb(float(sel.excess[i]), limit)) / 255.0
            top = y + line
            ax.add_patch(Rectangle((col, top), len(text), 0.9, color=rgb, lw=0))
            if sel.selected[i]:
                ax.plot([col + 0.05, col + len(text) - 0.05], [top + 0.92] * 2, color="black",
                        lw=1.2, solid_capstyle="butt")  # fmt: skip
            ax.text(col, top + 0.45, text, fontsize=8, family="monospace", va="center")
        y += n_lines + 1.0
    ax.text(0, y, f"colour: excess loss, blue -{limit:.2f} ... white 0 ... red +{limit:.2f} "
            "nats; underlined: selected; grey: no reference loss", fontsize=7,
            va="top", color="#555")  # fmt: skip
    return fig


def render_png(selections, title: str | None = None) -> bytes:
    fig = _figure(selections, title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_rgb(selections, title: str | None = None) -> np.ndarray:
    """``[H, W, 3]`` uint8 image (for TensorBoard's ``add_image(..., dataformats="HWC")``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = _figure(selections, title)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
