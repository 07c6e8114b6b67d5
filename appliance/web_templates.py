"""Jinja2 templates of the read-only job pages (served by ``appliance.web``, filled from ``appliance.web_pages``).

Kept in a Python module, not in ``.html`` files, so that they travel with the package whatever
way it is installed (``pip install PATH`` copies only Python files and the package data listed in
``pyproject.toml``). Every value is escaped: the environment has autoescape on, and no template
marks anything ``|safe``.
"""

from __future__ import annotations

BASE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}airt{% endblock %} - {{ node_ae }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #1b1b1b; background: #fafafa; }
header { background: #243b53; color: #fff; padding: 0.6em 1.2em; display: flex; gap: 1.5em; align-items: baseline; }
header a { color: #fff; }
header .node { font-weight: 600; font-size: 1.1em; }
.banner { background: #b42318; color: #fff; font-weight: 700; padding: 0.5em 1.2em; letter-spacing: 0.02em; }
main { padding: 0.8em 1.2em 2em; }
table { border-collapse: collapse; margin: 0.4em 0 1.2em; background: #fff; }
th, td { border: 1px solid #ccd; padding: 0.25em 0.55em; text-align: left; vertical-align: top; font-size: 0.92em; }
th { background: #e8edf3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { background: #d3f4dc; color: #0b5d1e; font-weight: 600; }
.fail { background: #fde0dc; color: #8a1c12; font-weight: 600; }
.na { background: #eee; color: #555; }
.held { background: #fff1c2; color: #7a4b00; font-weight: 600; }
.reason { max-width: 46em; }
.uid { font-family: ui-monospace, monospace; font-size: 0.85em; }
.box { background: #fff; border: 1px solid #ccd; padding: 0.6em 0.9em; margin: 0.6em 0 1em; max-width: 70em; }
.verdict { font-size: 1.15em; padding: 0.5em 0.9em; display: inline-block; margin: 0.3em 0 0.8em; }
img.report { max-width: 100%; border: 1px solid #ccd; background: #fff; display: block; margin: 0.3em 0 1em; }
nav.filter a { margin-right: 0.7em; }
</style>
</head>
<body>
<div class="banner" id="banner">Research output; not clinically approved. Review every plan in your own TPS.</div>
<header><span class="node">airt node {{ node_ae }}</span>
<a href="/">Jobs</a><a href="/readyz">Readiness</a><a href="/metrics">Metrics</a>
<span>times in UTC</span></header>
<main>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

JOBS = """{% extends "base.html" %}
{% block title %}Jobs{% endblock %}
{% block main %}
<h1>Jobs{% if state %} ({{ state }}){% endif %}</h1>
<nav class="filter">Show: <a href="/">all</a>{% for s in states %}<a href="/?state={{ s }}">{{ s }}</a>{% endfor %}</nav>
<p>The newest {{ limit }} jobs{% if state %} in state {{ state }}{% endif %}; as <code>airt jobs list</code>.</p>
<table id="jobs">
<thead><tr><th>ID</th><th>State</th><th>Created</th><th>Finished</th><th>Profile</th><th>Method</th>
<th>PTV D98 (Gy)</th><th>PTV HI</th><th>Goals</th><th>Send</th><th>Study Instance UID / reason</th></tr></thead>
<tbody>
{% for j in jobs %}
<tr>
<td class="num"><a href="/jobs/{{ j.id }}">{{ j.id }}</a></td>
<td>{{ j.state }}</td>
<td>{{ j.created }}</td>
<td>{{ j.finished }}</td>
<td>{{ j.profile }}</td>
<td>{{ j.method }}</td>
<td class="num">{{ j.d98 }}</td>
<td class="num">{{ j.hi }}</td>
<td class="{{ j.goals_class }}">{{ j.goals }}</td>
<td class="{{ 'held' if j.send == 'HELD' else '' }}">{{ j.send }}</td>
<td class="reason"><span class="uid">{{ j.study_uid }}</span>{% if j.reason %}<br>{{ j.reason }}{% endif %}</td>
</tr>
{% else %}
<tr><td colspan="11">(no jobs)</td></tr>
{% endfor %}
</tbody>
</table>
{% endblock %}
"""

JOB = """{% extends "base.html" %}
{% block title %}Job {{ job.id }}{% endblock %}
{% block main %}
<h1>Job {{ job.id }}: {{ job.state }}</h1>
{% if verdict %}
<div class="verdict {{ 'pass' if verdict.p1_met else 'fail' }}" id="verdict" title="{{ verdict.label }}">Clinical goals: {{ verdict.text }}</div>
{% endif %}
{% if job.hold_reason %}<div class="box held" id="hold">Deliveries HELD: {{ job.hold_reason }}</div>{% endif %}
{% if job.failure_reason %}<div class="box fail" id="failure">Reason: {{ job.failure_reason }}</div>{% endif %}
<table id="job">
<tr><th>Study Instance UID</th><td class="uid">{{ job.study_uid }}</td></tr>
<tr><th>CT series</th><td class="uid">{{ job.ct_series_uid }}</td></tr>
<tr><th>RT Structure Set</th><td class="uid">{{ job.rtstruct_uid }}</td></tr>
<tr><th>Profile</th><td id="profile">{{ job.profile }}{% if job.profile_reason %} ({{ job.profile_reason }}){% endif %}</td></tr>
<tr><th>Method</th><td>{{ job.method }}</td></tr>
<tr><th>Attempts / worker</th><td>{{ job.attempts }} / {{ job.worker }}</td></tr>
<tr><th>Created / started / finished</th><td>{{ job.created }} / {{ job.started }} / {{ job.finished }}</td></tr>
{% if plan %}<tr><th>Plan</th><td>{{ plan }}</td></tr>{% endif %}
{% if prescription %}<tr><th>Prescription</th><td>{{ prescription }}</td></tr>{% endif %}
</table>

{% if images %}
<h2>Report</h2>
{% for im in images %}<img class="report" id="{{ im.id }}" src="{{ im.url }}" alt="{{ im.alt }}">{% endfor %}
{% endif %}

{% if goals %}
<h2>Clinical goals</h2>
<table id="goals">
<thead><tr><th>Result</th><th>Priority</th><th>Structure</th><th>Metric</th><th>Goal</th><th>Value</th><th>Note</th></tr></thead>
<tbody>
{% for g in goals %}
<tr><td class="{{ g.css }}">{{ g.result }}</td><td class="num">P{{ g.priority }}</td><td>{{ g.structure }}</td>
<td>{{ g.metric }}</td><td>{{ g.goal }}</td><td class="num">{{ g.value }}</td><td>{{ g.note }}</td></tr>
{% endfor %}
</tbody>
</table>
{% endif %}

{% if dvh.rows %}
<h2>DVH metrics of the final dose</h2>
<table id="dvh">
<thead><tr><th>Role</th>{% for c in dvh.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in dvh.rows %}
<tr><td>{{ r.role }}</td>{% for v in r.cells %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% endif %}

{% if candidates %}
<h2>Candidate plans</h2>
<p>AI networks with OAR suppression s<sub>o</sub>; each sent as its own RT Plan and RT Dose.</p>
<table id="candidates">
<thead><tr><th>s bladder</th><th>s rectum</th><th>PTV HI</th><th>PTV D98 (Gy)</th><th>Bladder Dmean (Gy)</th>
<th>Rectum Dmean (Gy)</th><th>MU</th><th>Goals</th><th>Folder</th></tr></thead>
<tbody>
{% for c in candidates %}
<tr><td class="num">{{ c.s_bladder }}</td><td class="num">{{ c.s_rectum }}</td><td class="num">{{ c.hi }}</td>
<td class="num">{{ c.d98 }}</td><td class="num">{{ c.bladder }}</td><td class="num">{{ c.rectum }}</td>
<td class="num">{{ c.mu }}</td><td>{{ c.verdict }}</td><td>{{ c.folder }}</td></tr>
{% endfor %}
</tbody>
</table>
{% endif %}

<h2>History</h2>
<table id="events">
<thead><tr><th>At</th><th>From</th><th>To</th><th>Message</th></tr></thead>
<tbody>
{% for e in events %}
<tr><td>{{ e.at }}</td><td>{{ e.from_state }}</td><td>{{ e.to_state }}</td><td class="reason">{{ e.message }}</td></tr>
{% endfor %}
</tbody>
</table>

<h2>Deliveries</h2>
<table id="deliveries">
<thead><tr><th>Destination</th><th>Peer</th><th>State</th><th>Attempts</th><th>Next try</th><th>Delivered</th><th>Last error</th></tr></thead>
<tbody>
{% for d in deliveries %}
<tr><td>{{ d.destination }}</td><td>{{ d.peer }}</td><td>{{ d.state }}</td><td class="num">{{ d.attempts }}</td>
<td>{{ d.next_try }}</td><td>{{ d.delivered }}</td><td class="reason">{{ d.last_error }}</td></tr>
{% else %}
<tr><td colspan="7">{{ 'held until airt jobs release' if job.hold_reason else '(none)' }}</td></tr>
{% endfor %}
</tbody>
</table>

{% if timings %}
<h2>Timings (s)</h2>
<table id="timings">
{% for name, value in timings %}<tr><th>{{ name }}</th><td class="num">{{ value }}</td></tr>{% endfor %}
</table>
{% endif %}
{% endblock %}
"""

ERROR = """{% extends "base.html" %}
{% block title %}{{ code }}{% endblock %}
{% block main %}
<h1>{{ code }} {{ title }}</h1>
<p>{{ message }}</p>
<p><a href="/">All jobs</a></p>
{% endblock %}
"""

TEMPLATES: dict[str, str] = {"base.html": BASE, "jobs.html": JOBS, "job.html": JOB, "error.html": ERROR}
"""Template name -> source, for a ``jinja2.DictLoader``."""
