"""The README (and docs/) still work: tagged Python snippets run on CPU, shell commands name real programs and
parse, CI runs the README's test command, and every linked or quoted repository file exists.

Python blocks carry a tag on the line before the fence: ``<!-- readme-test: run -->`` (executed here, small
sizes) or ``<!-- readme-test: compile-only (why) -->`` (needs a GPU or model weights: only compiled). Every
Python block of the README must be tagged; in docs/ only tagged blocks are checked.
"""
import contextlib
import importlib
import io
import re
import shlex
import shutil
from importlib.metadata import metadata
from pathlib import Path

import pytest

from lvsa_kernels.__main__ import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))

_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<tag>[\w-]+)[^>]*-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def blocks(path: Path, lang: str):
    """(tag or None, body, line number) of every ``lang`` fenced block in ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(m["tag"], m["body"], text.count("\n", 0, m.start("body")) + 1)
            for m in _BLOCK.finditer(text) if m["lang"] == lang]


def python_cases():
    cases = [(README, *b) for b in blocks(README, "python")]
    cases += [(doc, *b) for doc in DOCS for b in blocks(doc, "python") if b[0] is not None]
    return pytest.mark.parametrize("path, tag, body, line", cases,
                                   ids=[f"{p.relative_to(ROOT)}:{n}" for p, _, _, n in cases])


@python_cases()
def test_python_snippet(path, tag, body, line, monkeypatch, isolated_dispatch_cache):
    assert tag in ("run", "compile-only"), f"{path.name}:{line}: tag the block with <!-- readme-test: run|compile-only -->"
    code = compile(body, f"{path.name}:{line}", "exec")
    if tag == "compile-only":
        return
    # backend="auto" would time Triton's interpreter (conftest sets TRITON_INTERPRET=1 on CPU), which a user's
    # CPU run without that variable never does; the documented override keeps the snippets on the reference.
    monkeypatch.setenv("LVSA_KERNELS_BACKEND", "reference")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code, {"__name__": f"readme_snippet_{line}"})
    if "LVSAPattern(window=3" in body:  # the quickstart prints what its comment says
        assert printed.getvalue().splitlines()[0] == "9 0.174"


def shell_commands(path: Path):
    """Every simple command (split at ``;``, ``&&``, ``||``, pipes) of the ``bash`` blocks of ``path``."""
    commands = []
    for _, body, _ in blocks(path, "bash"):
        body = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", body, flags=re.S)  # heredoc bodies are file contents
        body = body.replace("\\\n", " ")  # a backslash continues the command on the next line
        for line in body.splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split, lexer.commenters = True, "#"
            words, redirect = [], False
            for token in list(lexer) + [";"]:
                if token.startswith((">", "<")):
                    redirect = True  # the next token is the redirection's file
                elif redirect:
                    redirect = False
                elif set(token) <= set(";&|"):
                    if words:
                        commands.append(words)
                    words = []
                elif not re.fullmatch(r"\w+=\S*", token) or words:  # skip leading VAR=value
                    words.append(token)
    return commands


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_commands_exist_and_parse(path):
    extras = set(metadata("lvsa_kernels").get_all("Provides-Extra") or [])
    text = path.read_text(encoding="utf-8")
    for words in shell_commands(path):
        program = words[0]
        assert program in ("python3", "bash", "cat", "torchrun") or shutil.which(program), f"unknown program: {words}"
        args = words[1:]
        if program == "torchrun":
            args = args[[a.endswith(".py") for a in args].index(True):]
        if program in ("bash", "torchrun") or (program == "python3" and args and args[0].endswith(".py")):
            written = f"> {args[0]}" in text  # a file the block itself writes first
            assert written or (ROOT / args[0]).is_file(), f"{words}: {args[0]} does not exist"
        if program != "python3" or args[:1] != ["-m"]:
            continue
        module, rest = args[1], args[2:]
        if module == "lvsa_kernels":
            build_parser().parse_args(rest)  # a bad command line exits 2 and fails the test
        elif module == "pytest":
            assert all((ROOT / a).exists() for a in rest if not a.startswith("-")), words
        elif module == "pip" and "-e" in rest:
            spec = rest[rest.index("-e") + 1]
            wanted = set(re.findall(r"\[(.*)\]", spec)[0].split(",")) if "[" in spec else set()
            assert wanted <= extras, f"{words}: unknown extras {wanted - extras}"


def test_ci_runs_the_readme_test_command():
    test_command = [b for _, b, _ in blocks(README, "bash") if "pytest" in b][0].strip()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert ci[-1] == test_command


def _linked_files(path: Path):
    """Repository files that ``path`` links to or quotes in backticks, relative to the repository root."""
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"\w+://", target):
            yield (path.parent / target).resolve().relative_to(ROOT).as_posix()
    for quoted in re.findall(r"`([\w./-]+/[\w.-]+\.(?:py|md|csv|json|sh|png|log))`", text):
        if not quoted.startswith(("/", "~")):
            yield quoted


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_linked_files_exist(path):
    for rel in _linked_files(path):
        assert (ROOT / rel).exists(), f"{path.relative_to(ROOT)} refers to {rel}, which does not ship"


def test_readme_names_no_unshipped_files():
    text = README.read_text(encoding="utf-8")
    assert "svoo-pattern.md" not in text and "wan_1_3b.csv" not in text
    assert all(f"docs/{d.name}" in text for d in DOCS)  # every page is linked


def _resolves(dotted: str) -> bool:
    """Whether ``dotted`` (``lvsa_kernels.<module>[.<attribute>...]``) imports: its longest importable module
    prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_quoted_python_names_exist(path):
    """Every ``lvsa_kernels.x.y`` name the page quotes in backticks imports (diffusers-dependent names need diffusers)."""
    pytest.importorskip("diffusers")
    names = set(re.findall(r"`(lvsa_kernels(?:\.\w+)+)", path.read_text(encoding="utf-8")))
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"{path.relative_to(ROOT)} names {missing}, which do not import"
