"""The training text of quire's shipped default model: the running Python's standard library.

Source: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` of the interpreter that
runs this module (its docstrings, comments and code), read in sorted path order. That text is
distributed under the Python Software Foundation License (PSF License Agreement), which allows
copying and derived works; the model trained on it says so in its model card.

Excluded (a fixed rule, independent of the machine): the test suites (any directory named
``test``, ``tests`` or ``idle_test``, and files named ``test_*.py``), installed third-party
packages (``site-packages``, ``dist-packages``), build configuration (``config-*``), and
``encodings`` and ``turtledemo`` (code-page tables and demo scripts, not prose or library code).

Held out: every file whose SHA-256 of its POSIX path relative to the stdlib directory falls in
the lowest ``HELD_OUT_PERCENT`` of 100 buckets. The model never trains on these files; they
measure its held-out loss and perplexity.

Three kinds of document come from the training files, in this order per file:
  * ``source``: the whole file;
  * ``doc``: each module, class and function docstring on its own (``inspect.cleandoc``);
  * ``chat``: a conversation asking about that module, class or function, answered with its
    docstring, rendered with the chat template the tokenizer ships (``CHAT_TEMPLATE``), so
    that a chat answer reads like documentation. The question's wording is drawn from
    ``QUESTIONS`` with ``random.Random(seed)``.
Everything here is deterministic given the Python version and the seed.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import pathlib
import random
import re
import sysconfig
from typing import NamedTuple

from quire.cluster.tools.default_model import BOS, CHAT_TEMPLATE, EOS

HELD_OUT_PERCENT = 3
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "encodings", "turtledemo"})
MAX_ANSWER_CHARS = 1500  # a docstring longer than this is cut at a paragraph break for chat answers
WORD = re.compile(r"[A-Za-z_]+")

# {name}: the short name; {qualname}: module-qualified (json.dumps, json.JSONEncoder.encode).
QUESTIONS = {
    "module": ("What is the `{qualname}` module for?", "Describe the `{qualname}` module.",
               "What does the {qualname} module do?"),
    "class": ("Explain the class `{name}`.", "What is `{qualname}`?", "What does the {qualname} class do?",
              "Describe `{qualname}`."),
    "function": ("What does {qualname} do?", "Explain the function `{name}`.", "What does `{qualname}` return?",
                 "How do I use `{qualname}`?", "Describe `{qualname}`."),
}


class Document(NamedTuple):
    kind: str  # "source", "doc" or "chat"
    text: str  # for "chat": already rendered with CHAT_TEMPLATE (it holds BOS/EOS itself)


def stdlib_dir() -> pathlib.Path:
    """The running interpreter's standard-library directory."""
    return pathlib.Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative: str) -> bool:
    """Whether the stdlib file at POSIX path `relative` is held out (see the module docstring)."""
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100 < HELD_OUT_PERCENT


def stdlib_files(root: pathlib.Path | None = None) -> list[tuple[str, pathlib.Path]]:
    """`(relative POSIX path, path)` of every corpus file (training and held out), sorted."""
    root = root or stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d in EXCLUDED_DIRS or d.startswith("config-") for d in dirs) or rel.name.startswith("test_"):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def split_files(max_files: int | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`(train, held_out)` lists of `(relative path, text)`; `max_files` keeps only the first
    that many of each (for quick runs). Undecodable files are skipped."""
    train, held = [], []
    for rel, path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (held if is_held_out(rel) else train).append((rel, text))
    if max_files is not None:
        train, held = train[:max_files], held[:max_files]
    return train, held


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """`messages` rendered with CHAT_TEMPLATE exactly as the shipped tokenizer renders them."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, bos_token=BOS, eos_token=EOS,
                                                 add_generation_prompt=add_generation_prompt)


def _module_name(relative: str) -> str:
    parts = relative[:-3].split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def docstrings(relative: str, text: str) -> list[tuple[str, str, str, str]]:
    """`(kind, name, qualname, docstring)` for the module and each documented class and
    public function of one file, in source order; private names (leading underscore) skipped."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    module = _module_name(relative)
    found = []
    doc = ast.get_docstring(tree)
    if doc:
        found.append(("module", module.rsplit(".", 1)[-1], module, inspect.cleandoc(doc)))

    def visit(node, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if child.name.startswith("_"):
                    continue
                qualname = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child)
                if doc:
                    kind = "class" if isinstance(child, ast.ClassDef) else "function"
                    found.append((kind, child.name, qualname, inspect.cleandoc(doc)))
                if isinstance(child, ast.ClassDef):
                    visit(child, qualname)

    visit(tree, module)
    return found


def _answer(doc: str) -> str:
    if len(doc) <= MAX_ANSWER_CHARS:
        return doc
    cut = doc.rfind("\n\n", 0, MAX_ANSWER_CHARS)
    return doc[:cut] if cut > 0 else doc[:MAX_ANSWER_CHARS]


def documents(files: list[tuple[str, str]], seed: int) -> list[Document]:
    """The documents of `files` (see the module docstring), in file order."""
    rng = random.Random(seed)
    out = []
    for rel, text in files:
        out.append(Document("source", text))
        for kind, name, qualname, doc in docstrings(rel, text):
            out.append(Document("doc", doc))
            question = rng.choice(QUESTIONS[kind]).format(name=name, qualname=qualname)
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": _answer(doc)}]
            out.append(Document("chat", render_chat(messages)))
    return out


def training_words(max_files: int | None = None) -> set[str]:
    """The words (regex ``[A-Za-z_]+``) of the training text: the training files (which hold
    every docstring) and the chat questions' own words. Held-out files do not count."""
    train, _ = split_files(max_files)
    words = set()
    for _, text in train:
        words.update(WORD.findall(text))
    for templates in QUESTIONS.values():
        for template in templates:
            words.update(WORD.findall(template.replace("{name}", "").replace("{qualname}", "")))
    words.update(("user", "assistant"))
    return words
