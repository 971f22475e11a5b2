"""The profile form a user sees before starting a server: only the profiles their groups allow,
the default preselected, unavailable ones disabled with the reason."""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from ..profiles import Profile


@dataclass(frozen=True)
class FormEntry:
    profile: Profile
    unavailable: str | None = None  # reason, if it cannot be started now
    capacity: str | None = None  # e.g. "2 of 7 free"
    where: str | None = None  # per site, with a federation: "at site-a 1 free, site-b 2 free"


STYLE = """
<style>
.mlaas-profiles{display:grid;gap:.6rem;margin:1rem 0}
.mlaas-profile{display:grid;grid-template-columns:auto 1fr;gap:.1rem .8rem;padding:.7rem .9rem;
  border:1px solid #ccc;border-radius:6px;cursor:pointer}
.mlaas-profile:has(input:checked){border-color:#1976d2;box-shadow:0 0 0 1px #1976d2}
.mlaas-profile.unavailable{opacity:.6;cursor:not-allowed}
.mlaas-profile input{grid-row:span 3;align-self:center}
.mlaas-profile .name{font-weight:600}
.mlaas-profile .summary{color:#444;font-family:monospace}
.mlaas-profile .desc{color:#555}
.mlaas-profile .why{color:#a33;grid-column:2}
.mlaas-profile .capacity{color:#2a7a2a;grid-column:2}
.mlaas-profile .where{color:#555;grid-column:2;font-size:.9em}
.mlaas-notice{background:#e8f0fe;border:1px solid #90b0e0;padding:.5rem .8rem;border-radius:4px}
.mlaas-warning{background:#fff3cd;border:1px solid #e0c060;padding:.5rem .8rem;border-radius:4px}
</style>
"""


def render_form(entries: list[FormEntry], preselect: str | None, admin_warning: str | None = None,
                notices: list[str] | None = None) -> str:
    parts = [STYLE]
    if admin_warning:
        parts.append(f'<p class="mlaas-warning" role="alert">{escape(admin_warning)}</p>')
    for notice in notices or []:
        parts.append(f'<p class="mlaas-notice" role="status">{escape(notice)}</p>')
    if not entries:
        parts.append(
            '<p class="mlaas-empty">No resource profile is open to your groups. '
            "Ask the platform admins for access.</p>"
        )
        return "\n".join(parts)
    parts.append('<div class="mlaas-profiles" role="radiogroup" aria-label="Resource profile">')
    for entry in entries:
        p = entry.profile
        checked = " checked" if p.slug == preselect and not entry.unavailable else ""
        disabled = " disabled" if entry.unavailable else ""
        css = "mlaas-profile unavailable" if entry.unavailable else "mlaas-profile"
        parts.append(
            f'<label class="{css}" data-profile="{escape(p.slug)}">'
            f'<input type="radio" name="profile" value="{escape(p.slug)}"{checked}{disabled}>'
            f'<span class="name">{escape(p.display_name)}</span>'
            f'<span class="summary">{escape(p.summary())}</span>'
            f'<span class="desc">{escape(p.description)}</span>'
        )
        if entry.unavailable:
            parts.append(f'<span class="why">Unavailable: {escape(entry.unavailable)}</span>')
        elif entry.capacity:
            parts.append(f'<span class="capacity">{escape(entry.capacity)}</span>')
        if entry.where:
            parts.append(f'<span class="where">Sites: {escape(entry.where)}</span>')
        parts.append("</label>")
    parts.append("</div>")
    return "\n".join(parts)
