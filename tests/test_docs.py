"""The documentation works as written: README.md and docs/**/*.md.

* Every YAML block (a fence opened with ```yaml or ```yml) is checked by the program
  that reads it. The line right before the fence must be a marker comment,
  ``<!-- check: KIND -->``, naming the kind (KINDS below); a YAML block without one
  fails, so that a new block cannot go unchecked. Snippets are made whole in one
  documented way each: ``prometheus-scrape-jobs`` (a list of jobs) goes under
  ``scrape_configs:``, ``prometheus-rules-snippet`` (a list of rules) into one rule
  group. Exporter configurations are checked by the installed entry point as a
  subprocess, ``pop3_exporter --config.check``, with the files they name created by
  the test: ``/etc/pop3_exporter/`` (and relative paths) become a temporary
  directory holding a generated CA certificate (``ca_file``, ``client_ca_file``) and
  a certificate and key signed by it (``cert_file``, ``key_file``), and a one-line
  secret for ``password_file``, ``token_file`` and ``secret_file``.
* Every ``promql`` block: each expression (separated by blank lines) becomes a
  recording rule, checked with ``promtool check rules``.
* Every relative link points to an existing file, and its anchor to a heading there.
* Every metric name, failure reason, phase, flag and alert the code or the rules
  define is documented; shell blocks do not hard-wire sudo; the README stays short.

The tools run once per kind over all blocks where they take several files, and the
exporter's checks run in parallel, so the whole file takes a few seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pop3_exporter.cli import build_parser
from pop3_exporter.config import (
    AUTH_SECTION,
    DELIVERY_SECTION,
    MAILBOX_SECTION,
    MODULE_SECTION,
    SMTP_AUTH_SECTION,
    SMTP_SECTION,
    TLS_CONFIG_SECTION,
    Module,
    parse_config,
)
from pop3_exporter.metrics import ExporterMetrics
from pop3_exporter.result import FailureReason, Phase
from tests.support import prom
from tests.support.certs import TestPKI

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
PACKAGE = REPO / "pop3_exporter"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"

# Issue 11 asks for a README of "at most about 200 lines"; reference goes to docs/.
README_MAX_LINES = 220
# Where the documented example files live; the test replaces it by a directory of its own.
EXAMPLE_DIR = "/etc/pop3_exporter/"
# *_file keys that name a secret (one line of text), not a PEM file.
SECRET_FILE_KEYS = frozenset({"password_file", "token_file", "secret_file"})
# Linked from the docs, written on another branch; accepted while missing so that this
# branch's tests pass before that branch is merged. Once the file exists it is checked
# like every other link.
ADDED_BY_OTHER_BRANCHES = frozenset({"docs/container.md"})
TOOL_TIMEOUT_SECONDS = 60


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def relative(path: Path) -> str:
    return str(path.relative_to(REPO))


# ---------------------------------------------------------------- Markdown


_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\s`]*)")
_MARKER = re.compile(
    r"^\s*<!--\s*check:\s*(?P<kind>[a-z][a-z-]*)\s*(?::\s*(?P<reason>.*?))?\s*-->\s*$"
)
_MARKER_START = re.compile(r"^\s*<!--\s*check\b")


@dataclass(frozen=True)
class Fence:
    """One fenced code block; ``line`` is the 1-based line of its opening fence."""

    source: str
    line: int
    language: str
    text: str
    kind: str | None = None
    reason: str = ""

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class Document:
    source: str
    lines: tuple[str, ...]
    fences: tuple[Fence, ...]
    code_lines: frozenset[int]  # 0-based indexes of lines inside fences, fences included
    problems: tuple[str, ...]


def parse_markdown(text: str, source: str) -> Document:
    """Fenced blocks with the marker on the line before each, and structural problems
    (unterminated fences, markers that do not precede a YAML block)."""
    lines = tuple(text.splitlines())
    fences: list[Fence] = []
    code: set[int] = set()
    problems: list[str] = []
    index = 0
    while index < len(lines):
        opening = _FENCE_OPEN.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent = len(opening["indent"])
        char, length = opening["fence"][0], len(opening["fence"])
        closing = re.compile(rf"^[ \t]*{re.escape(char)}{{{length},}}[ \t]*$")
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            end += 1
        if end == len(lines):
            problems.append(f"{source}:{index + 1}: fence never closed")
        body = [_dedent(line, indent) for line in lines[index + 1 : end]]
        marker = _MARKER.match(lines[index - 1]) if index > 0 else None
        fences.append(
            Fence(
                source=source,
                line=index + 1,
                language=opening["info"].lower(),
                text="\n".join(body) + "\n",
                kind=marker["kind"] if marker else None,
                reason=(marker["reason"] or "") if marker else "",
            )
        )
        code.update(range(index, end + 1))
        index = end + 1
    yaml_lines = {fence.line for fence in fences if fence.language in ("yaml", "yml")}
    for number, line in enumerate(lines, start=1):
        if number - 1 in code or not _MARKER_START.match(line):
            continue
        if not _MARKER.match(line):
            problems.append(f"{source}:{number}: malformed marker {line.strip()!r}")
        elif number + 1 not in yaml_lines:
            problems.append(f"{source}:{number}: marker not right before a ```yaml fence")
    return Document(source, lines, tuple(fences), frozenset(code), tuple(problems))


def _dedent(line: str, indent: int) -> str:
    stripped = len(line) - len(line.lstrip(" "))
    return line[min(indent, stripped) :]


def load_document(path: Path) -> Document:
    return parse_markdown(path.read_text(encoding="utf-8"), relative(path))


DOCUMENTS = [load_document(path) for path in doc_files()]
FENCES = [fence for document in DOCUMENTS for fence in document.fences]
YAML_FENCES = [fence for fence in FENCES if fence.language in ("yaml", "yml")]
PROMQL_FENCES = [fence for fence in FENCES if fence.language == "promql"]
SHELL_FENCES = [fence for fence in FENCES if fence.language in ("sh", "bash", "shell", "console")]


# ---------------------------------------------------------------- checking blocks


@dataclass(frozen=True)
class Outcome:
    ok: bool
    output: str


@dataclass(frozen=True)
class Kind:
    tool: str  # "exporter", "promtool-config", "promtool-rules", "amtool" or "yaml"
    description: str


KINDS: Mapping[str, Kind] = {
    "exporter-config": Kind("exporter", "pop3_exporter --config.check --config.file"),
    "exporter-config-defaults": Kind(
        "exporter", "exporter-config, and every module equals the defaults and names every key"
    ),
    "exporter-web-config": Kind("exporter", "pop3_exporter --config.check --web.config.file"),
    "prometheus-config": Kind("promtool-config", "promtool check config"),
    "prometheus-scrape-jobs": Kind(
        "promtool-config", "a list of scrape jobs under scrape_configs:, promtool check config"
    ),
    "prometheus-rules": Kind("promtool-rules", "promtool check rules"),
    "prometheus-rules-snippet": Kind(
        "promtool-rules", "a list of rules in one group, promtool check rules"
    ),
    "alertmanager-config": Kind("amtool", "amtool check-config"),
    "yaml-only": Kind("yaml", "yaml.safe_load only; the marker must give the reason"),
}

# The binaries each tool needs, found (or skipped, or failed in CI) by tests/support/prom.
REQUIRE_TOOL: Mapping[str, Callable[[], str]] = {
    "promtool-config": prom.promtool_binary,
    "promtool-rules": prom.promtool_binary,
    "amtool": prom.amtool_binary,
}
FIND_TOOL: Mapping[str, Callable[[], str | None]] = {
    "promtool-config": lambda: prom.find_binary("promtool"),
    "promtool-rules": lambda: prom.find_binary("promtool"),
    "amtool": lambda: prom.find_binary("amtool"),
}


def exporter_binary() -> str:
    """The venv's console script, as users run it."""
    binary = Path(sys.executable).with_name("pop3_exporter")
    if not binary.exists():
        pytest.fail(f"{binary} missing: install the package (pip install -e .)", pytrace=False)
    return str(binary)


def run(command: Sequence[str], cwd: Path | None = None) -> Outcome:
    completed = subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_SECONDS,
        check=False,
        cwd=cwd,
    )
    return Outcome(completed.returncode == 0, (completed.stdout + completed.stderr).strip())


def run_batch(command: Sequence[str], files: Mapping[str, Path]) -> dict[str, Outcome]:
    """One run over every file; only when it fails, one run per file to tell which."""
    if not files:
        return {}
    together = run([*command, *map(str, files.values())])
    if together.ok:
        return dict.fromkeys(files, together)
    return {key: run([*command, str(path)]) for key, path in files.items()}


def walk_files(data: Any) -> Iterator[tuple[str, str]]:
    """(key, value) of every ``*_file`` setting in a loaded YAML document."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            if isinstance(key, str) and key.endswith("_file") and isinstance(value, str):
                yield key, value
            else:
                yield from walk_files(value)
    elif isinstance(data, list):
        for item in data:
            yield from walk_files(item)


def provide_example_files(text: str, directory: Path, pki: TestPKI) -> str | None:
    """Create the files an exporter config names; None if it names one we cannot
    provide (an absolute path outside EXAMPLE_DIR), else the text to check."""
    localized = text.replace(EXAMPLE_DIR, f"{directory}/")
    good = pki.variants["good"]
    sources = {"cert_file": good.cert_path, "key_file": good.key_path}
    for key, value in walk_files(yaml.safe_load(localized)):
        path = Path(value)
        if path.is_absolute() and directory not in path.parents:
            return None
        target = directory / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if key in SECRET_FILE_KEYS:
            # A password or token file: one line, readable by its owner only (others
            # being able to read it is a warning, and examples should not earn one).
            target.write_text("example-secret\n")
            target.chmod(0o600)
        else:
            target.write_bytes(sources.get(key, pki.ca_file).read_bytes())
    return localized


def defaults_problems(fence: Fence) -> list[str]:
    """For exporter-config-defaults: modules that differ from the defaults, and module
    or tls_config keys the block does not name (commented out counts)."""
    problems = []
    config = parse_config(fence.text, fence.where)
    names = list(yaml.safe_load(fence.text).get("modules") or {})
    if not names:
        problems.append("no modules in the block")
    for name in names:
        expected = Module(name=name)
        if config.modules[name] != expected:
            differing = [
                f.name
                for f in dataclasses.fields(Module)
                if getattr(config.modules[name], f.name) != getattr(expected, f.name)
            ]
            problems.append(f"module {name}: not the default: {', '.join(differing)}")
    # Every key of every section a module can have; those of sections a module has only
    # when it uses them (auth, mailbox, delivery) are named commented out.
    keys = [
        key
        for section in (
            MODULE_SECTION,
            TLS_CONFIG_SECTION,
            AUTH_SECTION,
            MAILBOX_SECTION,
            DELIVERY_SECTION,
            SMTP_SECTION,
            SMTP_AUTH_SECTION,
        )
        for key in section.keys
    ]
    for key in keys:
        if not re.search(rf"^[ \t]*(#[ \t]*)?{key}:", fence.text, flags=re.MULTILINE):
            problems.append(f"key {key} is not named")
    return problems


def promql_rule_file(fence: Fence) -> dict[str, Any]:
    """A rule file with one recording rule per expression of a promql block."""
    chunks = [chunk.strip() for chunk in re.split(r"\n[ \t]*\n", fence.text)]
    expressions = [
        chunk
        for chunk in chunks
        if any(line.strip() and not line.lstrip().startswith("#") for line in chunk.splitlines())
    ]
    rules = [
        {"record": f"docs:expression_{number}", "expr": expression}
        for number, expression in enumerate(expressions, start=1)
    ]
    return {"groups": [{"name": f"docs-{fence.where}", "rules": rules}]}


def check_fences(
    yaml_fences: Iterable[Fence],
    promql_fences: Iterable[Fence],
    workdir: Path,
    pki: TestPKI,
) -> dict[str, Outcome]:
    """Check blocks; the result is keyed by Fence.where. Tools that are not installed
    are not run (the per-block tests skip, or fail in CI, through REQUIRE_TOOL)."""
    outcomes: dict[str, Outcome] = {}
    exporter_jobs: dict[str, tuple[list[str], Path]] = {}
    batches: dict[str, dict[str, Path]] = {tool: {} for tool in FIND_TOOL}
    for number, fence in enumerate(yaml_fences):
        directory = workdir / f"block{number}"
        directory.mkdir(parents=True)
        kind = KINDS.get(fence.kind or "")
        if kind is None:
            known = ", ".join(KINDS)
            outcomes[fence.where] = Outcome(
                False,
                f"{fence.where}: YAML block without a valid marker; put"
                f" '<!-- check: KIND -->' on the line before the fence, KIND one of: {known}",
            )
            continue
        try:
            data = yaml.safe_load(fence.text)
        except yaml.YAMLError as exc:
            outcomes[fence.where] = Outcome(False, f"not YAML: {exc}")
            continue
        if kind.tool == "yaml":
            ok = bool(fence.reason.strip())
            outcomes[fence.where] = Outcome(ok, "" if ok else "yaml-only needs a reason")
        elif kind.tool == "exporter":
            text = provide_example_files(fence.text, directory, pki)
            if text is None:
                outcomes[fence.where] = Outcome(
                    False, f"names a file outside {EXAMPLE_DIR}, which the test cannot provide"
                )
                continue
            path = directory / "config.yml"
            path.write_text(text, encoding="utf-8")
            flag = "--web.config.file" if fence.kind == "exporter-web-config" else "--config.file"
            exporter_jobs[fence.where] = (["--config.check", flag, str(path)], directory)
        else:
            if fence.kind == "prometheus-scrape-jobs":
                data = {"scrape_configs": data}
            elif fence.kind == "prometheus-rules-snippet":
                data = {"groups": [{"name": "docs", "rules": data}]}
            path = directory / "check.yml"
            path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            batches[kind.tool][fence.where] = path
    for fence in promql_fences:
        path = workdir / f"promql-{len(batches['promtool-rules'])}.yml"
        path.write_text(yaml.safe_dump(promql_rule_file(fence), sort_keys=False))
        batches["promtool-rules"][fence.where] = path

    commands = {
        "promtool-config": ["check", "config"],
        "promtool-rules": ["check", "rules"],
        "amtool": ["check-config"],
    }
    exporter = exporter_binary() if exporter_jobs else ""
    # Each exporter check is a Python start-up (about a second); run them side by side.
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {
            where: pool.submit(run, [exporter, *arguments], cwd)
            for where, (arguments, cwd) in exporter_jobs.items()
        }
        for tool, files in batches.items():
            binary = FIND_TOOL[tool]()
            if binary is not None:
                outcomes.update(run_batch([binary, *commands[tool]], files))
        outcomes.update({where: future.result() for where, future in futures.items()})
    return outcomes


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory: pytest.TempPathFactory, pki: TestPKI) -> dict[str, Outcome]:
    return check_fences(YAML_FENCES, PROMQL_FENCES, tmp_path_factory.mktemp("docs"), pki)


def tool_of(fence: Fence) -> str | None:
    if fence.language == "promql":
        return "promtool-rules"
    kind = KINDS.get(fence.kind or "")
    return kind.tool if kind is not None else None


def fence_params(fences: Iterable[Fence]) -> list[Any]:
    params = []
    for fence in fences:
        needs_prometheus = tool_of(fence) in REQUIRE_TOOL
        marks = [pytest.mark.prometheus] if needs_prometheus else []
        params.append(pytest.param(fence, id=fence.where, marks=marks))
    return params


@pytest.mark.parametrize("fence", fence_params(YAML_FENCES + PROMQL_FENCES))
def test_block_passes_its_tool(fence: Fence, outcomes: Mapping[str, Outcome]) -> None:
    tool = tool_of(fence)
    if tool is not None and tool in REQUIRE_TOOL:
        REQUIRE_TOOL[tool]()
    outcome = outcomes[fence.where]
    assert outcome.ok, f"{fence.where} ({fence.kind or fence.language}):\n{outcome.output}"
    if fence.kind == "exporter-config-defaults":
        assert not defaults_problems(fence), defaults_problems(fence)


def test_the_docs_have_the_blocks_this_file_checks() -> None:
    """Guards against a parser that silently finds nothing: the kinds the docs use."""
    kinds = Counter(fence.kind for fence in YAML_FENCES)
    for kind in (
        "exporter-config",
        "exporter-config-defaults",
        "exporter-web-config",
        "prometheus-config",
        "prometheus-rules-snippet",
        "alertmanager-config",
        "yaml-only",
    ):
        assert kinds[kind] >= 1, (kind, kinds)
    assert kinds["exporter-config"] >= 7
    readme = [fence for fence in YAML_FENCES if fence.source == "README.md"]
    assert {fence.kind for fence in readme} >= {"exporter-config", "prometheus-config"}
    assert len(PROMQL_FENCES) >= 2


def test_markdown_structure() -> None:
    """Every fence is closed; every marker is well-formed and right before a YAML block."""
    problems = [problem for document in DOCUMENTS for problem in document.problems]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- the checker can fail


BAD_BLOCKS = {
    "exporter-config": "modules:\n  extra:\n    retries: 3\n",
    "exporter-config-defaults": "modules:\n  example:\n    timeout: 30s\n",
    "exporter-web-config": "basic_auth_users:\n  bob: not-a-hash\n",
    "prometheus-config": "scrape_configs:\n  - job_name: x\n    bogus: 1\n",
    "prometheus-scrape-jobs": "- job_name: x\n  scrape_interval: soon\n",
    "prometheus-rules": "groups:\n  - name: g\n    rules:\n      - record: r\n        expr: up +\n",
    "prometheus-rules-snippet": "- alert: A\n  expr: sum(\n",
    "alertmanager-config": "route: {receiver: nobody}\nreceivers: []\n",
    "yaml-only": "a: 1\n",
}


def test_the_checks_reject_broken_blocks(tmp_path: Path, pki: TestPKI) -> None:
    prom.promtool_binary()
    prom.amtool_binary()
    fences = [
        Fence(source="bad.md", line=number, language="yaml", text=text, kind=kind)
        for number, (kind, text) in enumerate(BAD_BLOCKS.items(), start=1)
    ]
    unmarked = Fence(source="bad.md", line=100, language="yaml", text="a: 1\n")
    outside = Fence(
        source="bad.md",
        line=101,
        language="yaml",
        text="modules:\n  m:\n    tls: implicit\n    tls_config: {ca_file: /srv/ca.crt}\n",
        kind="exporter-config",
    )
    promql = Fence(source="bad.md", line=102, language="promql", text="rate(up[5m]\n")
    results = check_fences([*fences, unmarked, outside], [promql], tmp_path, pki)
    for fence in [*fences, unmarked, outside, promql]:
        if fence.kind == "exporter-config-defaults":
            # Valid as a configuration; what is wrong is that 30s is not the default.
            assert results[fence.where].ok
            assert defaults_problems(fence)
        else:
            assert not results[fence.where].ok, (fence.kind, results[fence.where])
    assert "without a valid marker" in results[unmarked.where].output
    assert "modules.extra.retries: unknown key" in results[fences[0].where].output


def test_the_checks_accept_good_blocks_and_provide_example_files(
    tmp_path: Path, pki: TestPKI
) -> None:
    """The other side of the negative test: a block naming files in the example
    directory and relative to itself passes, and its files exist afterwards."""
    text = (
        "modules:\n  m:\n    tls: implicit\n    tls_config:\n"
        "      ca_file: /etc/pop3_exporter/sub/ca.crt\n"
        "      cert_file: client.crt\n      key_file: /etc/pop3_exporter/client.key\n"
    )
    fence = Fence(source="good.md", line=1, language="yaml", text=text, kind="exporter-config")
    results = check_fences([fence], [], tmp_path, pki)
    assert results[fence.where].ok, results[fence.where].output
    assert "valid; modules: m, pop3, pop3_starttls, pop3s" in results[fence.where].output
    assert (tmp_path / "block0" / "sub" / "ca.crt").read_bytes() == pki.ca_file.read_bytes()


def test_markdown_parser_finds_markers_indented_fences_and_tildes() -> None:
    document = parse_markdown(
        "<!-- check: yaml-only: because -->\n"
        "```yaml\na: 1\n```\n"
        "- item\n\n"
        "  <!-- check: exporter-config -->\n"
        "  ```yaml\n  modules: {}\n  ```\n"
        "~~~promql\nup\n~~~\n"
        "<!-- check: exporter-config -->\n\n"
        "```yaml\nb: 2\n```\n"
        "````yaml\nc: 3\n```\n````\n",
        "t.md",
    )
    found = [(f.line, f.language, f.kind, f.reason, f.text) for f in document.fences]
    assert found == [
        (2, "yaml", "yaml-only", "because", "a: 1\n"),
        (8, "yaml", "exporter-config", "", "modules: {}\n"),
        (11, "promql", None, "", "up\n"),
        (16, "yaml", None, "", "b: 2\n"),
        (19, "yaml", None, "", "c: 3\n```\n"),
    ]
    assert document.problems == ("t.md:14: marker not right before a ```yaml fence",)


# ---------------------------------------------------------------- links


_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_INLINE_CODE = re.compile(r"(`+).*?\1")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(document: Document) -> set[str]:
    seen: Counter[str] = Counter()
    found = set()
    for index, line in enumerate(document.lines):
        match = _HEADING.match(line)
        if match is None or index in document.code_lines:
            continue
        anchor = heading_anchor(match.group(2))
        found.add(anchor if not seen[anchor] else f"{anchor}-{seen[anchor]}")
        seen[anchor] += 1
    return found


def links(document: Document) -> Iterator[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    for index, line in enumerate(document.lines):
        if index in document.code_lines:
            continue
        prose = _INLINE_CODE.sub("", line)
        for match in _LINK.finditer(prose):
            yield index + 1, match.group(1)
        reference = _REFERENCE.match(prose)
        if reference:
            yield index + 1, reference.group(1)


def link_problems(document: Document, path: Path) -> list[str]:
    problems = []
    for number, target in links(document):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.IGNORECASE):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        where = f"{document.source}:{number}: {target}"
        if not file_part:
            if anchor not in anchors(document):
                problems.append(f"{where}: no heading with anchor #{anchor}")
            continue
        linked = (path.parent / file_part).resolve()
        if REPO not in linked.parents and linked != REPO:
            problems.append(f"{where}: outside the repository")
        elif not linked.exists():
            if relative(linked) not in ADDED_BY_OTHER_BRANCHES:
                problems.append(f"{where}: {relative(linked)} does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(load_document(linked)):
            problems.append(f"{where}: no heading with anchor #{anchor}")
    return problems


def test_relative_links_point_to_existing_files_and_anchors() -> None:
    problems = [
        problem
        for path, document in zip(doc_files(), DOCUMENTS, strict=True)
        for problem in link_problems(document, path)
    ]
    assert not problems, "\n".join(problems)
    assert sum(1 for document in DOCUMENTS for _ in links(document)) >= 30


def test_link_check_catches_missing_files_and_anchors(tmp_path: Path) -> None:
    text = (
        "# Top\n\n## A `code` (thing) / other\n\n## Top\n\n"
        "[ok](#a-code-thing--other) [ok](#top-1) [ok](README.md#quick-start)"
        " [ok](https://example.com/x) `[not a link](nowhere.md)`\n"
        "[bad](#nothing) [bad](missing.md) [bad](README.md#no-such-heading)\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    path = REPO / "virtual.md"  # resolved against the repository root; never written
    problems = link_problems(parse_markdown(text, "virtual.md"), path)
    assert [problem.split(": ", 2)[1] for problem in problems] == [
        "#nothing",
        "missing.md",
        "README.md#no-such-heading",
    ]


# ---------------------------------------------------------------- completeness


def metric_names() -> set[str]:
    """Metric names the package defines: string literals in its source, and the
    families of the exporter's own registry."""
    names = set()
    for path in PACKAGE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        names.update(re.findall(r"[\"']((?:probe|pop3_exporter)_[a-z0-9_]+)[\"']", text))
    for family in ExporterMetrics().registry.collect():
        if family.name.startswith("pop3_exporter_"):
            names.add(family.name)
    return names


def documented(name: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(name)}(_total)?\b", text) is not None


def test_every_metric_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    names = metric_names()
    assert len(names) >= 20
    assert [name for name in sorted(names) if not documented(name, text)] == []
    assert "`process_*`" in text and "`python_info`" in text


def test_every_failure_reason_and_phase_is_documented() -> None:
    text = (DOCS / "metrics.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z_0-9]+)` \|", text, flags=re.MULTILINE))
    missing = [v.value for v in [*FailureReason, *Phase] if v.value not in rows]
    assert missing == []


def test_every_flag_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    flags = [
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]
    assert len(flags) >= 8
    assert [flag for flag in flags if f"`{flag}" not in text] == []


def test_every_alert_is_documented() -> None:
    text = (DOCS / "alerting.md").read_text(encoding="utf-8")
    alerts = [
        rule["alert"]
        for path in sorted(RULES_DIR.glob("*.yml"))
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert len(alerts) >= 10
    assert [alert for alert in alerts if f"`{alert}`" not in text] == []


# ---------------------------------------------------------------- commands and size


def test_shell_blocks_do_not_hard_wire_sudo() -> None:
    """Commands are written for root; the text says to prefix them with sudo otherwise
    (as root in a container there is no sudo)."""
    offending = [
        f"{fence.where}: {line.strip()}"
        for fence in SHELL_FENCES
        for line in fence.text.splitlines()
        if re.search(r"(^|[;&|(]\s*|\$\s+)sudo\b", line.strip())
    ]
    assert SHELL_FENCES
    assert offending == []


# Commands that need root on a Debian machine; "sudo LINE" covers only the first command
# of a line, so these must stand alone on theirs.
ROOT_COMMANDS = frozenset({"apt-get", "apt", "dpkg", "install", "mkdir", "cp", "tee", "systemctl"})


def commands_needing_root_in_chains(fences: Iterable[Fence]) -> list[str]:
    offending = []
    for fence in fences:
        for line in fence.text.splitlines():
            segments = [s.split() for s in re.split(r"&&|\|\||;|\|", line.split(" #")[0])]
            words = [s[0] for s in segments if s]
            if len(words) > 1 and ROOT_COMMANDS.intersection(words):
                offending.append(f"{fence.where}: {line.strip()}")
    return offending


def test_commands_that_need_root_stand_alone() -> None:
    assert commands_needing_root_in_chains(SHELL_FENCES) == []
    chained = Fence("t.md", 1, "sh", "mkdir -p /etc/x && cp a /etc/x/\nls && true\n")
    assert commands_needing_root_in_chains([chained]) == ["t.md:1: mkdir -p /etc/x && cp a /etc/x/"]


def test_readme_is_short_and_starts_with_the_essentials() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES
    text = "\n".join(lines)
    for needed in ("## Install", "## Quick start", "relabel_configs", "policy:", "ca_file"):
        assert needed in text, needed
    assert "bash .ci/setup.sh && bash .ci/check.sh" in text
