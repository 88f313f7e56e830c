"""MkDocs hook: the CLI reference and the Python API page, generated from the code at build time.

``docs/cli.md`` holds the marker ``<!-- generated: cli reference -->``; it is replaced by every command of
``tlpipe.pipeline.cli.app`` (typer's click command, as ``tlpipe --help`` sees it): its help, usage, arguments
and options with their help and defaults. ``docs/api.md`` holds ``<!-- generated: python api -->``; it is
replaced by one mkdocstrings block per name of ``tlpipe.__all__``, pointing at the object the name resolves
to (its ``__module__`` and ``__qualname__``), so the page follows the code when it moves. A public name that
does not resolve stops the build: the page would otherwise advertise a name that raises.

Two helpers for the build: mkdocstrings reads the sources from a temporary tree laid out as the package is
installed (``source_tree``: the repository's ``features/`` is ``tlpipe.features`` only through
``[tool.setuptools.package-dir]``), and a page's link to a repository file outside ``docs/`` (e.g.
``../benchmarks/results/extract.json``) is served from a copy carried by the site (``on_files``).

Of the project, only ``tlpipe``, ``tlpipe.pipeline.cli`` and ``typer`` are imported (none of them imports
TensorFlow or ONNX Runtime).
"""

from __future__ import annotations

import html
import inspect
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the docs extra brings tomli
    import tomli as tomllib

from mkdocs.plugins import event_priority

CLI_MARKER = "<!-- generated: cli reference -->"
API_MARKER = "<!-- generated: python api -->"


def _html(text: str) -> str:
    """Plain help text as HTML: escaped, with `code` spans kept as code."""
    escaped = html.escape(text, quote=False)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _paragraphs(text: str) -> str:
    blocks = [" ".join(block.split()) for block in re.split(r"\n\s*\n", inspect.cleandoc(text or "")) if block.strip()]
    return "\n".join(f"<p>{_html(block)}</p>" for block in blocks)


def _row(cells: list[str]) -> str:
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def cli_commands() -> tuple[dict[str, Any], Any]:
    """The CLI's commands, in the order ``tlpipe --help`` lists them, as click command objects, and the root
    context they run under."""
    import typer

    from tlpipe.pipeline.cli import app

    group: Any = typer.main.get_command(app)  # a click group: the app has several commands
    root = group.context_class(group, info_name="tlpipe")
    return {name: group.get_command(root, name) for name in group.list_commands(root)}, root


def cli_reference() -> str:
    """Markdown (with HTML tables) for every visible command of the CLI."""
    commands, root = cli_commands()
    lines = ["## Commands", "", "| command | what it does |", "|---|---|"]
    visible = {name: cmd for name, cmd in commands.items() if cmd is not None and not cmd.hidden}
    for name, cmd in visible.items():
        summary = cmd.get_short_help_str(limit=10_000).replace("|", "\\|")
        lines.append(f"| [`{name}`](#{name}) | {summary} |")
    lines.append("")
    for name, cmd in visible.items():
        ctx = cmd.context_class(cmd, info_name=name, parent=root)
        params = [p for p in cmd.params if not p.hidden]
        usage = ["tlpipe", name, "[OPTIONS]"]
        for p in params:
            if p.param_type_name == "argument":
                metavar = (p.metavar or p.name).upper()
                usage.append(metavar if p.required else f"[{metavar}]")
        lines += [f"## tlpipe {name} {{#{name}}}", "", _paragraphs(cmd.help or ""), ""]
        lines += ["```text", " ".join(usage), "```", ""]
        for kind, title in (("argument", "Arguments"), ("option", "Options")):
            rows = []
            for p in params:
                if p.param_type_name != kind:
                    continue
                spelling, help_text = p.get_help_record(ctx)
                rows.append(_row([f"<code>{html.escape(spelling)}</code>", _html(help_text or "")]))
            if rows:
                lines += [f"**{title}**", "", "<table>", "<thead><tr><th>name</th><th>meaning</th></tr></thead>"]
                lines += ["<tbody>", *rows, "</tbody>", "</table>", ""]
    return "\n".join(lines)


def api_entries() -> list[tuple[str, str | None, Any]]:
    """(public name, dotted path of the object it resolves to or None for a plain value, the value)."""
    import tlpipe

    entries: list[tuple[str, str | None, Any]] = []
    for name in tlpipe.__all__:
        try:
            value = getattr(tlpipe, name)
        except Exception as error:  # a public name that raises: the build must say so, not skip it
            from mkdocs.exceptions import PluginError

            raise PluginError(f"tlpipe.{name} is in tlpipe.__all__ but does not resolve: {error!r}") from error
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        is_code = inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value)
        if inspect.ismodule(value):
            entries.append((name, value.__name__, value))
        elif is_code and module and qualname:
            entries.append((name, f"{module}.{qualname}", value))
        else:
            entries.append((name, None, value))
    return entries


def _summary(value: Any) -> str:
    doc = inspect.getdoc(value) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def api_reference() -> str:
    """A table of the public names, then one mkdocstrings block per name, headed by the name users type
    (``tlpipe.fit_head``), with an anchor of that name (``api.md#tlpipe.fit_head``)."""
    entries = api_entries()
    lines = ["| name | defined as | what it does |", "|---|---|---|"]
    for name, path, value in entries:
        summary = _summary(value) if path else f"`{value!r}`"
        lines.append(f"| [`tlpipe.{name}`](#tlpipe.{name}) | `{path or 'tlpipe.' + name}` | {summary} |")
    lines.append("")
    for name, path, value in entries:
        public = f"tlpipe.{name}"
        if path is None:
            lines += [f'<a id="{public}"></a>', "", f"## `{public}`", ""]
            lines += [f"`{public}` = `{value!r}` ({type(value).__name__}).", ""]
            continue
        if path != public:
            lines += [f'<a id="{public}"></a>', ""]
        lines += [f"::: {path}", "    options:", f'      heading: "{public}"', f'      toc_label: "{public}"', ""]
    return "\n".join(lines)


# -- the sources, as installed ---------------------------------------------------------------------------------------
_trees: list[Path] = []


def source_tree(root: Path) -> Path:
    """A temporary folder in which the installed layout is laid out as links: ``tlpipe/`` holding the files of
    the repository's ``tlpipe/`` and, for each ``[tool.setuptools.package-dir]`` entry ``tlpipe.X = "DIR"``, a
    link ``tlpipe/X`` to ``DIR`` (as ``make lint`` does for mypy). mkdocstrings reads the sources from there,
    statically: the repository's ``features/`` is ``tlpipe.features`` only once installed."""
    mapping = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})
    tree = Path(tempfile.mkdtemp(prefix="tlpipe-docs-src-"))
    _trees.append(tree)
    for package, folder in sorted(mapping.items(), key=lambda item: item[0].count(".")):
        target = tree.joinpath(*package.split("."))
        if "." not in package:  # the top-level package: its own files, so the mapped sub-packages fit beside them
            target.mkdir(parents=True)
            for child in (root / folder).iterdir():
                if child.name != "__pycache__":
                    (target / child.name).symlink_to(child)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(root / folder, target_is_directory=True)
    return tree


@event_priority(100)  # before mkdocstrings reads its handlers' configuration
def on_config(config):
    root = Path(config.config_file_path).resolve().parent
    handlers = config.plugins["mkdocstrings"].config.handlers
    handlers.setdefault("python", {})["paths"] = [str(source_tree(root))]
    return config


def on_shutdown() -> None:
    while _trees:
        shutil.rmtree(_trees.pop(), ignore_errors=True)


# -- links to repository files -------------------------------------------------------------------------------------
# A page may link a file of the repository outside docs/, e.g. docs/benchmarks.md -> ../benchmarks/results/x.json,
# as a link that works when the Markdown is read in the repository. The site carries a copy of each such file
# under REPOSITORY/ and the link is pointed there; a link to a file that does not exist is left alone, so
# `--strict` reports it.
REPOSITORY = "repository"
LINK = re.compile(r"(\]\()([^)\s#]+)([^)\s]*\))")


def _repository_file(target: str, page_uri: str, config) -> str | None:
    """The repository-relative path of ``target``, a link on the page ``page_uri``, when it is a file of the
    repository outside the docs folder; else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
        return None
    docs = Path(config.docs_dir).resolve()
    root = Path(config.config_file_path).resolve().parent
    resolved = ((docs / page_uri).parent / target).resolve()
    if resolved.is_relative_to(docs) or not resolved.is_relative_to(root) or not resolved.is_file():
        return None
    return resolved.relative_to(root).as_posix()


def on_files(files, config):
    from mkdocs.structure.files import File

    for page in list(files.documentation_pages()):
        for _, target, _ in LINK.findall(page.content_string):
            path = _repository_file(target, page.src_uri, config)
            if path and files.get_file_from_path(f"{REPOSITORY}/{path}") is None:
                root = Path(config.config_file_path).resolve().parent
                files.append(File.generated(config, f"{REPOSITORY}/{path}", abs_src_path=str(root / path)))
    return files


def _point_to_copy(markdown: str, page_uri: str, config) -> str:
    def replace(match: re.Match) -> str:
        path = _repository_file(match.group(2), page_uri, config)
        if path is None:
            return match.group(0)
        depth = page_uri.count("/")
        return match.group(1) + "../" * depth + f"{REPOSITORY}/{path}" + match.group(3)

    return LINK.sub(replace, markdown)


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = _point_to_copy(markdown, page.file.src_uri, config)
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if API_MARKER in markdown:
        markdown = markdown.replace(API_MARKER, api_reference())
    return markdown
