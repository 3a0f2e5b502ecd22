"""The documentation: README.md and the site in docs/ (docs/development.md "These pages").

The options page is made from the table of options and must not drift from it;
every command block a reader would paste is run by a test or marked as an
example; the contract's options, replies, signals, metrics and program
variables each have a page that says what they are; and every citation of a
page and section in the code and the tests names one that exists.  The Quick
start's commands are run here as the README gives them.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import DOC_BLOCK, ROOT, docs_block

DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md")))
# A reader pastes these; a block in another language is a file's content or output.
COMMAND_LANGUAGES = {"sh", "bash", "console", "shell", "shell-session"}
MARKER = re.compile(r"^<!-- (?:tested: (?P<label>[\w-]+)|example: (?P<why>\S.*?)) -->$")


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def documents():
    """README.md and every page of the site, as paths relative to the repository."""
    return ["README.md"] + [f"docs/{page}" for page in PAGES]


def fenced_blocks(text: str):
    """(line number, language, marker line before it or None, indent) of every fenced block."""
    lines = text.split("\n")
    inside = False
    for number, line in enumerate(lines, 1):
        m = re.match(r"^(\s*)```(.*)$", line)
        if not m:
            continue
        if inside:
            inside = False
            continue
        inside = True
        before = lines[number - 3] if number >= 3 and lines[number - 2] == "" else None
        yield number, m.group(2).strip(), before, m.group(1)


# --- the options page --------------------------------------------------------------------

def test_options_page_is_made_from_the_table_of_options():
    """docs/options.md is exactly what ssmtpd.reference makes from config.OPTIONS."""
    from ssmtpd import reference
    assert read("docs/options.md") == reference.page(), (
        "docs/options.md differs from the table of options in ssmtpd/config.py; make it "
        "again with: python3 -m ssmtpd.reference > docs/options.md")


def test_options_page_lists_every_flag_of_the_command_line():
    """Every flag `ssmtpd --help` shows has an entry: the server's options with their
    variable and ini key, and those of the command line only."""
    from ssmtpd import config
    page = read("docs/options.md")
    for action in config.build_parser()._actions:
        for flag in action.option_strings:
            assert f"`{flag}`" in page, flag
    for opt in config.OPTIONS:
        assert f"`{config.ENV_PREFIX}{opt.attr.upper()}`" in page, opt.name
        assert f"- ini key: `{opt.name}`" in page, opt.name


def test_every_option_points_to_a_page_that_explains_it():
    """Each entry's "More in" link goes to a page that names the option."""
    from ssmtpd import config, reference
    assert set(reference.MORE) == {opt.name for opt in config.OPTIONS}
    for opt in config.OPTIONS:
        _, target = reference.MORE[opt.name]
        page = target.split("#")[0]
        assert page in PAGES, (opt.name, target)
        text = read(f"docs/{page}")
        assert opt.flag in text or f"--no-{opt.name}" in text, \
            f"docs/{page} does not name {opt.flag}"


# --- command blocks ----------------------------------------------------------------------

@pytest.mark.parametrize("path", documents())
def test_every_command_block_is_tested_or_marked_as_an_example(path):
    """Every fenced block names its language, starts a line (a fence indented into a
    list is not one on the site), and a command block is marked, on the line before
    it, `<!-- tested: LABEL -->` or `<!-- example: WHY -->`."""
    text = read(path)
    for number, language, before, indent in fenced_blocks(text):
        where = f"{path}:{number}"
        assert language, f"{where}: a fenced block without a language (sh, text, ini, ...)"
        assert not indent, f"{where}: an indented fence is not a code block on the site"
        if language in COMMAND_LANGUAGES:
            assert before is not None and MARKER.match(before), (
                f"{where}: a command block needs <!-- tested: LABEL --> or "
                "<!-- example: WHY --> on the line before it, then a blank line")


def test_every_tested_block_is_read_by_a_test():
    """A `tested` label is only a promise if a test reads the block: every label
    appears in a docs_block(PATH, LABEL) call of the tests, for the file it is in."""
    calls = set()
    for test in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        if os.path.basename(test) == "test_docs.py":
            continue
        with open(test, encoding="utf-8") as f:
            calls |= set(re.findall(r'docs_block\(\s*"([^"]+)",\s*"([\w-]+)"\)', f.read()))
    calls |= set(QUICK_START)
    for path in documents():
        for m in DOC_BLOCK.finditer(read(path)):
            assert (path, m.group("label")) in calls, (
                f"{path}: block tested: {m.group('label')} is read by no test")


# --- the contract, each part on the page a user would look at ---------------------------

def test_every_reply_is_on_the_dialogue_page():
    """Each reply the server can send (ssmtpd.replies) is on docs/dialogue.md with its
    code and enhanced code."""
    from ssmtpd import replies
    page = read("docs/dialogue.md")
    found = [value for value in vars(replies).values() if isinstance(value, replies.Reply)]
    assert len(found) > 40
    for reply in found + [replies.greeting("mx.test"), replies.ehlo("mx.test", "c", [])]:
        shown = f"{reply.code} {reply.enhanced}".strip()
        assert f"`{shown}" in page, f"docs/dialogue.md does not show {shown} ({reply.text})"


def test_every_signal_is_on_the_operations_page():
    page = read("docs/operations.md")
    for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR2"):
        assert f"`{name}`" in page, name
    assert "## Upgrading in place (SIGUSR2)" in page


def test_every_metric_is_on_the_monitoring_page():
    with open(os.path.join(ROOT, "ssmtpd", "metrics.py"), encoding="utf-8") as f:
        source = f.read()
    metrics = set(re.findall(r'(Counter|Gauge|Histogram)\(\s*"(ssmtpd_\w+)"', source))
    assert len(metrics) >= 9, metrics
    page = read("docs/monitoring.md")
    for kind, name in metrics:
        shown = name + "_total" if kind == "Counter" else name  # as Prometheus shows it
        assert f"| `{shown}` |" in page, shown


def test_every_program_variable_is_on_its_programs_page():
    """The variables the server sets for its programs, on the page of each program."""
    from ssmtpd import config
    pages = read("docs/auth-program.md") + read("docs/process-program.md")
    for variable in config.PROGRAM_VARIABLES:
        assert f"| `{variable}` |" in pages, variable


def test_every_page_is_in_the_navigation():
    """mkdocs.yml lists every page (mkdocs build --strict says so too, in .ci/run)."""
    listed = re.findall(r"^  - [^:\n]+: (\S+\.md)$", read("mkdocs.yml"), re.M)
    assert sorted(listed) == PAGES
    assert listed[0] == "index.md"


# --- citations ---------------------------------------------------------------------------

CITATION = re.compile(r'docs/([a-z0-9-]+\.md) "([^"]+)"')


def headings(page: str):
    text = re.sub(r"^```.*?^```", "", read(f"docs/{page}"), flags=re.M | re.S)
    return {re.sub(r"`", "", h).strip() for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_cited_page_and_section_exists():
    """Code, tests, configuration files and the bench cite the documentation as
    docs/PAGE.md "Section": each such page exists and has that heading."""
    sources = []
    for pattern in ("ssmtpd/*.py", "ssmtpd/examples/*", "tests/*.py", "bench/*.py",
                    "bench/*.md", "conf/*", "Dockerfile", "SECURITY.md", ".ci/run",
                    "setup.py", "tests/dialogues/*.txt"):
        sources += [p for p in glob.glob(os.path.join(ROOT, pattern)) if os.path.isfile(p)]
    cited = 0
    for source in sources:
        with open(source, encoding="utf-8", errors="replace") as f:
            text = " ".join(f.read().split())  # a citation may wrap
        for page, section in CITATION.findall(text):
            cited += 1
            where = os.path.relpath(source, ROOT)
            assert page in PAGES, f"{where} cites docs/{page}, which does not exist"
            assert section.replace("`", "") in headings(page), (
                f"{where} cites docs/{page} \"{section}\", which has no such heading")
    assert cited > 100


# --- the Quick start, run as the README gives it ------------------------------------------

# The tested blocks this module reads itself.
QUICK_START = [("README.md", "quick-start"), ("docs/install.md", "quick-start"),
               ("README.md", "first-message"), ("docs/install.md", "first-message")]


def test_quick_start_is_the_same_in_the_readme_and_on_the_site():
    for label in ("quick-start", "first-message"):
        assert docs_block("README.md", label) == docs_block("docs/install.md", label)


def commands(block: str):
    """The block's commands: its lines without comments, a backslash joining lines."""
    text = re.sub(r"\\\n\s*", " ", block)
    return [line for line in text.split("\n") if line.strip() and not line.startswith("#")]


def test_quick_start_installs_runs_and_delivers(tmp_path):
    """docs/install.md "Quick start" and "Sending a first message", in a copy of the clone: step
    1's venv and pip install as written, then its server, and the first message's
    commands word for word, in a network namespace of their own, so that port 8025
    is theirs.  Step 2, `bash .ci/run`, is what CI runs: this test is part of it."""
    step1, step2 = commands(docs_block("README.md", "quick-start"))
    assert step2 == "bash .ci/run" and os.path.isfile(os.path.join(ROOT, ".ci", "run"))
    install, serve = step1.rsplit(" && ", 1)
    assert serve == ".venv/bin/ssmtpd --config conf/ssmtpd.ini"
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a network namespace of its own")
    if not shutil.which("swaks"):
        pytest.fail("swaks is not installed (.ci/run installs it)")
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "site", "build", "dist", "*.egg-info", "__pycache__",
        ".pytest_cache", ".hypothesis"))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SSMTPD_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # python3 is the Python running the tests (.ci/run puts its venv first in PATH).
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    installed = subprocess.run(["bash", "-c", install], cwd=clone, env=env,
                               capture_output=True, timeout=900)
    assert installed.returncode == 0, installed.stdout[-4000:] + installed.stderr[-4000:]
    first = docs_block("README.md", "first-message")
    script = f"""set -e
ip link set lo up
{serve} 2>server.log &
server=$!
for i in $(seq 300); do
    if (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null; then break; fi
    kill -0 $server; sleep 0.1
done
{first}
kill -TERM $server
wait $server
"""
    ran = subprocess.run(["unshare", "--net", "bash", "-c", script], cwd=clone, env=env,
                         capture_output=True, timeout=300)
    log = (clone / "server.log").read_text(errors="replace")
    assert ran.returncode == 0, (ran.stdout.decode(errors="replace")[-4000:],
                                 ran.stderr.decode(errors="replace")[-4000:], log)
    (name,) = os.listdir(clone / "var" / "mail" / "alice" / "new")
    assert name in ran.stdout.decode()  # what `ls` showed
    with open(clone / "var" / "mail" / "alice" / "new" / name, "rb") as f:
        assert f.read().startswith(b"Received: ")
    assert "Traceback" not in log
