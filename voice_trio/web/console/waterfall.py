"""A call's per-turn latency waterfall (the t0…t5 ledger) as inline SVG, drawn on the server:
no script, and every text in it escaped."""

from __future__ import annotations

from markupsafe import Markup, escape

from voice_trio.store import TurnEntry

STAGES = (
    ("t0", "t1", "turn end → LLM request", "#8c8c8c"),
    ("t1", "t2", "LLM first token", "#4e79a7"),
    ("t2", "t3", "first sentence → TTS", "#59a14f"),
    ("t3", "t4", "TTS first audio", "#f28e2b"),
    ("t4", "t5", "first audio to Telnyx", "#e15759"),
)
STAMPS = ("t0", "t1", "t2", "t3", "t4", "t5")
WIDTH, LABEL, ROW, TOP = 760, 150, 24, 28


def waterfall_svg(turns: list[TurnEntry]) -> Markup:
    """One row per turn with stamps, each stage a bar from its start to its end, in ms
    from the turn's first stamp (t0 for a reply, t3 for a fixed phrase)."""
    rows = [t for t in turns if sum(getattr(t, s) is not None for s in STAMPS) >= 2]
    if not rows:
        return Markup('<p class="empty">No turn has latency stamps.</p>')
    spans = [_span(t) for t in rows]
    longest = max(end - start for start, end in spans) or 1.0
    scale = (WIDTH - LABEL - 60) / longest
    height = TOP + ROW * len(rows) + 24
    out = [
        f'<svg class="waterfall" role="img" viewBox="0 0 {WIDTH} {height}"'
        f' width="{WIDTH}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        "<title>Per-turn latency waterfall (t0…t5)</title>",
    ]
    x = LABEL
    for _, _, name, color in STAGES:
        out.append(f'<rect x="{x}" y="6" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="15" font-size="10">{escape(name)}</text>')
        x += 14 + 5 * len(name) + 12
    for i, (turn, (start, end)) in enumerate(zip(rows, spans, strict=True)):
        y = TOP + i * ROW
        label = f"#{turn.index} {turn.kind}"
        out.append(f'<text x="4" y="{y + 15}" font-size="11">{escape(label)}</text>')
        for a, b, name, color in STAGES:
            t_a, t_b = getattr(turn, a), getattr(turn, b)
            if t_a is None or t_b is None:
                continue
            bar_x = LABEL + (t_a - start) * scale
            bar_w = max(1.0, (t_b - t_a) * scale)
            out.append(
                f'<rect class="stage" data-stage="{a}-{b}" x="{bar_x:.1f}" y="{y + 4}"'
                f' width="{bar_w:.1f}" height="14" fill="{color}">'
                f"<title>{escape(f'{a}→{b} {name}: {t_b - t_a:.0f} ms')}</title></rect>"
            )
        total_x = LABEL + (end - start) * scale + 4
        out.append(
            f'<text x="{total_x:.1f}" y="{y + 15}" font-size="11">{end - start:.0f} ms</text>'
        )
    axis_y = TOP + ROW * len(rows) + 14
    out.append(f'<text x="{LABEL}" y="{axis_y}" font-size="10">0 ms</text>')
    out.append(
        f'<text x="{WIDTH - 60}" y="{axis_y}" font-size="10" text-anchor="end">'
        f"{longest:.0f} ms</text>"
    )
    out.append("</svg>")
    return Markup("".join(out))


def _span(turn: TurnEntry) -> tuple[float, float]:
    stamps = [getattr(turn, s) for s in STAMPS if getattr(turn, s) is not None]
    return min(stamps), max(stamps)
