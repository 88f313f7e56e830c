"""The Jinja2 templates of the HTML reports (:mod:`.html`): plain HTML and inline CSS, no script, no network."""

__all__ = ["TEMPLATES"]

_BASE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 0 1.2em 3em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .6em 0; } th, td { border: 1px solid #ddd; padding: 3px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } tr.best td { background: #e9f7ec; font-weight: 600; }
table.cm td { text-align: center; min-width: 2.6em; } table.cm a { display: block; color: inherit; font-weight: 700; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure.tile { margin: 0; width: 168px; font-size: 12px; word-break: break-all; }
figure.tile img { width: 160px; height: 160px; object-fit: cover; border: 1px solid #ccc; display: block; }
.missing { width: 160px; height: 160px; background: #eee; color: #922; display: flex; align-items: center;
  justify-content: center; text-align: center; font-size: 12px; border: 1px dashed #aaa; }
.charts img { max-width: 100%; margin: .4em 0; } .note { color: #555; } .bad { color: #b22; font-weight: 600; }
nav a { margin-right: 1em; }
</style>
</head>
<body>
{% block body %}{% endblock %}
</body>
</html>
"""

_MACROS = """{% macro tile(t) %}
<figure class="tile" data-path="{{ t.path }}"{% for k, v in t.data.items() %} data-{{ k }}="{{ v }}"{% endfor %}>
{% if t.thumb %}<a href="{{ t.large }}" class="zoom"><img src="{{ t.thumb }}" alt="{{ t.path }}" loading="eager"></a>
{% else %}<div class="missing" title="{{ t.reason }}">image not shown: {{ t.reason }}</div>
{% endif %}
<figcaption>{% for line in t.caption %}{{ line }}<br>{% endfor %}</figcaption>
</figure>
{% endmacro %}
{% macro confusion(cells, labels) %}
<table class="cm"><tr><th>true \\ predicted</th>{% for l in labels %}<th>{{ l }}</th>{% endfor %}</tr>
{% for row in cells %}<tr><th>{{ labels[loop.index0] }}</th>
{% for c in row %}<td style="background: rgba(31,119,180,{{ c.shade }})" title="true {{ c.true }}, predicted {{ c.predicted }}">
{% if c.href %}<a href="{{ c.href }}" class="cell-link" data-true="{{ c.true }}" data-predicted="{{ c.predicted }}">{{ c.count }}</a>{% else %}{{ c.count }}{% endif %}</td>
{% endfor %}</tr>
{% endfor %}</table>
{% endmacro %}
{% macro gallery(sections, shown, total) %}
{% if not total %}<p>No image was misclassified.</p>{% endif %}
{% if shown < total %}<p class="note">The {{ shown }} most confident of {{ total }} mistakes are shown (the CSV lists all).</p>{% endif %}
{% for s in sections %}
<section id="{{ s.anchor }}" class="cell"><h3>true {{ s.true }} &rarr; predicted {{ s.predicted }} ({{ s.tiles|length }})</h3>
<div class="gallery">{% for t in s.tiles %}{{ tile(t) }}{% endfor %}</div></section>
{% endfor %}
{% endmacro %}
{% macro per_class(rows) %}
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for name, r in rows.items() %}{% if r is mapping and 'support' in r and name not in ('macro avg', 'weighted avg') %}
<tr><td>{{ name }}</td><td class="num">{{ '%.3f' % r['precision'] }}</td><td class="num">{{ '%.3f' % r['recall'] }}</td>
<td class="num">{{ '%.3f' % r['f1-score'] }}</td><td class="num">{{ r['support']|int }}</td></tr>{% endif %}
{% endfor %}</table>
{% endmacro %}
"""

_COMPARE = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block body %}
<h1>Head comparison: {{ r.feature_key }}</h1>
<nav><a href="#table">comparison</a><a href="#per-class">per class</a><a href="#confusion">confusion</a>
<a href="#gallery">misclassified</a><a href="#figures">figures</a><a href="report.md">report.md</a></nav>
<p>Best head: <strong>{{ r.best }}</strong>. Why: {{ r.choice }}.</p>
{% if r.holdout %}<p>Held out: {{ r.holdout.head }} refitted on {{ r.holdout.train_rows }} training rows, scored once on
{{ r.holdout.rows }} held-out rows ({{ r.holdout.description }}): <strong>accuracy {{ '%.4f' % r.holdout.accuracy }}</strong>,
macro-F1 {{ '%.4f' % r.holdout.macro_f1 }}, ECE {{ '%.3f' % r.holdout.ece }}.</p>
{% else %}<p>No row was held out (every labelled row was cross-validated).</p>{% endif %}
<h2 id="table">Cross-validation</h2>
<p>{{ r.cv }}-fold CV on {{ r.rows }} rows: {{ r.setup }}. Chance level: accuracy {{ '%.3f' % r.chance }}.</p>
<table><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}<th>ECE</th></tr>
{% for h, cells in heads %}<tr{% if h.name == r.best %} class="best"{% endif %}>{% for c in cells %}<td{% if 0 < loop.index0 < 6 %} class="num"{% endif %}>{{ c }}</td>{% endfor %}
<td class="num">{{ '%.3f' % h.ece if h.ece is not none else '?' }}</td></tr>
{% endfor %}</table>
<h2 id="per-class">Per-class metrics of {{ r.best }}</h2>
{% if r.holdout %}<h3>held out</h3>{{ m.per_class(r.holdout.per_class) }}{% endif %}
<h3>out of fold</h3>{{ m.per_class(best.per_class) }}
<h2 id="confusion">Confusion matrix</h2>
<p>{{ source }}. A count links to the images behind it.</p>
{{ m.confusion(cells, labels) }}
<h2 id="gallery">Misclassified images</h2>
<p class="note">Most confident mistakes first within each cell; a click opens the larger image.</p>
{{ m.gallery(sections, shown, total) }}
<h2 id="figures">Figures</h2>
<div class="charts">{% for name, alt in charts %}<img src="{{ name }}" alt="{{ alt }}"><br>{% endfor %}</div>
<h2>Class balance</h2>
<table><tr><th>class</th><th>rows</th></tr>{% for name, n in r.balance.counts.items() if n %}<tr><td>{{ name }}</td><td class="num">{{ n }}</td></tr>{% endfor %}</table>
<p class="note">Cache {{ r.cache_id }}; backbone {{ r.backbone.get('backbone', '?') }}; {{ '%.1f' % r.seconds }} s.</p>
{% endblock %}
"""

_EVALUATE = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block body %}
<h1>Evaluation of {{ head }}</h1>
<p>{{ r.rows_used }}: {{ r.n }} rows. <strong>Accuracy {{ '%.4f' % r.accuracy }}</strong>, macro-F1 {{ '%.4f' % r.macro_f1 }}{% if r.log_loss is not none %}, log-loss {{ '%.4f' % r.log_loss }}{% endif %}.
{% if r.excluded %}{{ r.excluded }} rows excluded by the exclude list.{% endif %}</p>
<h2 id="per-class">Per-class metrics</h2>{{ m.per_class(r.report) }}
<h2 id="confusion">Confusion matrix</h2><p>A count links to the images behind it.</p>
{{ m.confusion(cells, r.labels) }}
<h2 id="gallery">Misclassified images</h2>
{{ m.gallery(sections, shown, total) }}
{% if chart %}<div class="charts"><img src="{{ chart }}" alt="confusion matrix"></div>{% endif %}
{% endblock %}
"""

_AUDIT = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block body %}
<h1>Audit: {{ r.feature_key }}</h1>
<nav><a href="#duplicates">duplicates</a><a href="#labels">label errors</a><a href="#outliers">outliers</a><a href="report.md">report.md</a></nav>
<p>{{ r.rows }} rows of {{ r.cache }}; {{ summary.clusters }} duplicate clusters ({{ summary.split_leaks }} leaking across splits,
{{ summary.label_conflicts }} with conflicting labels), {{ summary.label_issues_flagged }} likely label errors, {{ summary.outliers_flagged }} outliers.</p>
{% for note in r.notes %}<p class="note">{{ note }}</p>{% endfor %}
<h2 id="duplicates">Duplicate clusters</h2>
{% if clipped.clusters %}<p class="note">The first {{ clusters|length }} of {{ r.clusters|length }} clusters (duplicates.csv lists all).</p>{% endif %}
{% for c, ts in clusters %}<section id="cluster-{{ c.id }}"><h3>#{{ c.id }} {{ c.kind }}{% if c.leak %} <span class="bad">split leak</span>{% endif %}{% if c.conflict %} <span class="bad">label conflict</span>{% endif %}
 (min cosine {{ '%.3f' % c.min_cosine }})</h3><div class="gallery">{% for t in ts %}{{ m.tile(t) }}{% endfor %}</div></section>
{% else %}<p>No duplicates.</p>{% endfor %}
<h2 id="labels">Likely label errors</h2>
<div class="gallery">{% for t in issues %}{{ m.tile(t) }}{% else %}<p>None flagged.</p>{% endfor %}</div>
<h2 id="outliers">Outliers</h2>
<div class="gallery">{% for t in outliers %}{{ m.tile(t) }}{% else %}<p>None flagged.</p>{% endfor %}</div>
{% if chart %}<div class="charts"><img src="{{ chart }}" alt="nearest-neighbour similarity"></div>{% endif %}
{% endblock %}
"""

TEMPLATES = {
    "base.html": _BASE,
    "macros.html": _MACROS,
    "compare.html": _COMPARE,
    "evaluate.html": _EVALUATE,
    "audit.html": _AUDIT,
}
