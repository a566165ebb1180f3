"""A self-contained HTML selection report: inline CSS and JS, no network resource of any kind.

Every shown token is one ``<span class="tok">`` (``sel`` added when selected) whose background is
its excess loss on the diverging scale of :mod:`.colors`; ``data-*`` attributes carry token, loss,
reference loss and excess for the hover box (and a ``title`` for browsers without scripts). The
first token of a document is input only (no loss): a ``ctx`` span, not a token element.
"""

from __future__ import annotations

import html
import math

from megatron_slm.visualize.colors import (
    NEGATIVE,
    POSITIVE,
    UNSCORED,
    ZERO,
    excess_rgb,
    rgb_hex,
    scale_limit,
)

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:70em}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .3em}
.sub{color:#555;margin:0 0 1em}
.legend{display:flex;gap:1.5em;align-items:center;flex-wrap:wrap;font-size:.9em;margin-bottom:1em}
.bar{width:16em;height:.9em;border:1px solid #999;background:linear-gradient(to right,%s,%s,%s)}
.ticks{display:flex;justify-content:space-between;width:16em;font-size:.8em;color:#555}
.text{font-family:ui-monospace,monospace;line-height:1.9;white-space:pre-wrap;
 word-break:break-word;border:1px solid #ddd;padding:.6em;border-radius:4px}
.tok{padding:1px 0;border-bottom:2px solid transparent;cursor:default}
.tok.sel,.key-sel{border-bottom:2px solid #111;font-weight:600}
.ctx{color:#888}
.swatch{display:inline-block;padding:0 .4em;font-family:ui-monospace,monospace}
table.stats{border-collapse:collapse;font-size:.85em;margin:.3em 0}
table.stats td{padding:1px .8em 1px 0}
#tip{position:fixed;display:none;background:#fff;border:1px solid #888;padding:.4em .6em;
 font-size:.85em;box-shadow:0 2px 6px rgba(0,0,0,.25);pointer-events:none;white-space:pre}
"""

_JS = """
(function(){
  var tip=document.getElementById('tip');
  function show(e){
    var t=e.target; if(!t.classList||!t.classList.contains('tok')) return;
    var d=t.dataset;
    tip.textContent='token  '+JSON.stringify(d.token)+'\\nloss   '+d.loss+'\\nref    '+d.ref+
      '\\nexcess '+d.excess+'\\n'+(t.classList.contains('sel')?'selected':'not selected');
    tip.style.display='block';
    tip.style.left=Math.min(e.clientX+12,window.innerWidth-220)+'px';
    tip.style.top=(e.clientY+14)+'px';
  }
  document.addEventListener('mouseover',show);
  document.addEventListener('mouseout',function(e){
    if(e.target.classList&&e.target.classList.contains('tok')) tip.style.display='none';
  });
})();
"""


def _visible(text: str) -> str:
    """Sentencepiece's word marker as a space, line breaks kept visible."""
    return text.replace("\u2581", " ").replace("\n", "\u21b5\n")


def _num(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def _stats_table(st: dict) -> str:
    rows = [
        ("tokens shown", str(st["tokens"])),
        ("selected", f"{st['selected']} ({st['selected_share'] * 100:.1f}%)"),
        ("mean loss / ref. loss", f"{_num(st['mean_loss'])} / {_num(st['mean_ref_loss'])}"),
        ("mean excess: all", _num(st["mean_excess"])),
        ("mean excess: selected / unselected",
         f"{_num(st['mean_excess_selected'])} / {_num(st['mean_excess_unselected'])}"),
    ]  # fmt: skip
    cells = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td></tr>" for a, b in rows)
    return f'<table class="stats">{cells}</table>'


def _document(sel, limit: float) -> str:
    spans = [f'<span class="ctx" title="context (no loss)">{html.escape(_visible(sel.context))}'
             "</span>"]  # fmt: skip
    for i, text in enumerate(sel.tokens):
        loss, ref, ex = float(sel.loss[i]), float(sel.ref[i]), float(sel.excess[i])
        cls = "tok sel" if sel.selected[i] else "tok"
        attrs = (
            f'data-token="{html.escape(text, quote=True)}" data-loss="{_num(loss)}" '
            f'data-ref="{_num(ref)}" data-excess="{_num(ex)}"'
        )
        title = f"{text!r} loss {_num(loss)} ref {_num(ref)} excess {_num(ex)}"
        spans.append(
            f'<span class="{cls}" style="background:{rgb_hex(excess_rgb(ex, limit))}" {attrs} '
            f'title="{html.escape(title, quote=True)}">{html.escape(_visible(text))}</span>'
        )
    more = " (first tokens only)" if sel.truncated else ""
    src = f" of {html.escape(sel.source)}" if sel.source else ""
    return (
        f'<section class="doc" data-doc="{sel.doc}"><h2>Document {sel.doc}{src}{more}</h2>'
        f'{_stats_table(sel.stats)}<div class="text">{"".join(spans)}</div></section>'
    )


def render_html(selections, title: str, subtitle: str = "") -> str:
    """The report page for ``selections`` (:class:`.selection.DocumentSelection` list)."""
    limit = scale_limit([s.excess for s in selections])
    css = _CSS % tuple(rgb_hex(c) for c in (NEGATIVE, ZERO, POSITIVE))
    legend = (
        '<div class="legend"><div><div class="bar"></div><div class="ticks">'
        f"<span>{-limit:.2f}</span><span>excess loss (nats)</span><span>+{limit:.2f}</span>"
        "</div></div>"
        '<span class="swatch key-sel">selected</span>'
        '<span class="swatch">not selected</span>'
        f'<span class="swatch" style="background:{rgb_hex(UNSCORED)}">no reference loss</span>'
        "<span>excess = loss − reference loss; red: the reference knows it better (trained on "
        "first), blue: already learned</span></div>"
    )
    body = "".join(_document(s, limit) for s in selections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{css}</style></head><body>"
        f'<h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>{legend}'
        f'<div id="tip"></div>{body}<script>{_JS}</script></body></html>\n'
    )
