"""The HTML reports: one page per report, escaped names, thumbnails beside it, cells linking to their images."""

from __future__ import annotations

import re

import pytest
from markupsafe import escape

from .conftest import NASTY_CLASSES


def test_compare_page_escapes_names_and_links_cells_to_their_images(compare_report):
    result, paths = compare_report
    page = paths["index.html"].read_text(encoding="utf-8")
    folder = paths["index.html"].parent
    assert "<b>bold</b>" not in page and str(escape(NASTY_CLASSES[1])) in page
    assert str(escape('say "cheese"')) in page and "café ünïcode" in page
    assert "bad\\xff-byte" in page  # the non-UTF-8 byte shown as the cache stores it
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing from a network
    # every thumbnail named on the page is a file beside it; the unreadable one says why
    thumbs = re.findall(r'src="(thumbs/[^"]+)"', page)
    assert len(thumbs) == len(result.misclassified) - 1 and all((folder / t).is_file() for t in thumbs)
    assert "image not shown: file changed since extraction" in page
    # each off-diagonal count links to a section holding exactly that cell's images
    links = re.findall(r'<a href="#(cell-\d+-\d+)" class="cell-link"[^>]*>(\d+)</a>', page)
    assert links
    for anchor, count in links:
        i, j = map(int, anchor.split("-")[1:])
        section = page.split(f'id="{anchor}"')[1].split("</section>")[0]
        true, predicted = str(escape(result.class_names[i])), str(escape(result.class_names[j]))
        assert section.count('<figure class="tile"') == int(count) == result.misclassified_confusion[i][j]
        assert section.count(f'data-true="{true}"') == int(count) == section.count(f'data-predicted="{predicted}"')


def _assert_page_works(index, tmp_path, *, links: bool):
    from .browser import check_page

    verdict = check_page(index, tmp_path / f"{index.parent.name}.png")
    print(f"screenshot: {verdict['screenshot']}")
    assert verdict["console_errors"] == []
    assert verdict["imgs"] and all(i["ok"] for i in verdict["imgs"]), [i for i in verdict["imgs"] if not i["ok"]]
    assert all(z["ok"] for z in verdict["zooms"]), [z for z in verdict["zooms"] if not z["ok"]]
    if links:
        assert verdict["links"]
        assert all(k["match"] and k["loaded"] and k["tiles"] == k["count"] for k in verdict["links"]), verdict["links"]
    assert verdict["screenshot"] is not None and verdict["screenshot"].stat().st_size > 10_000


def test_compare_page_in_a_real_browser(compare_report, tmp_path):
    _assert_page_works(compare_report[1]["index.html"], tmp_path, links=True)


def test_evaluate_page_lists_every_mistake_under_its_cell(evaluate_report):
    result, paths = evaluate_report
    page = paths["index.html"].read_text(encoding="utf-8")
    assert str(escape('head "<1>".joblib')) in page and "<1>" not in page
    wrong = int(result.confusion.sum() - result.confusion.trace())
    assert len(result.misclassified) == wrong and page.count('<figure class="tile"') == wrong
    probabilities = [item["probability"] for item in result.misclassified]
    assert probabilities == sorted(probabilities, reverse=True)


def test_evaluate_page_in_a_real_browser(evaluate_report, tmp_path):
    _assert_page_works(evaluate_report[1]["index.html"], tmp_path, links=True)


def test_audit_page_shows_clusters_label_errors_and_outliers_in_a_real_browser(tmp_path):
    pytest.importorskip("cleanlab", reason="tlpipe audit needs tlpipe[audit] (cleanlab)")
    from tests.pipeline.audit.test_checks import planted_cache
    from tlpipe.pipeline.audit.checks import audit

    cache, planted = planted_cache(tmp_path)
    result = audit(cache, report=tmp_path / "report", cv=4)
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    for c in result.clusters:
        section = page.split(f'id="cluster-{c.id}"')[1].split("</section>")[0]
        assert all(f'data-path="{m.path}"' in section for m in c.members)
    flagged = [i for i in result.label_issues if i.flagged]
    assert flagged and all(f'data-given="{i.given}" data-suggested="{i.suggested}"' in page for i in flagged)
    assert f'data-path="{result.outliers[0].path}"' in page
    _assert_page_works(tmp_path / "report" / "index.html", tmp_path, links=False)
