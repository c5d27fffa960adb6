"""House rules that a test can check: the method files' cover page and size, and the seams between
the method files, common/ and the toy data (DESIGN.md, "Layout" and "Style")."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = sorted(p for p in REPO.glob("*.py"))  # every top-level file is a method file
METHOD_NAMES = {p.stem for p in METHODS}


def imported_modules(path: Path) -> set:
    """The top-level names of every module `path` imports ("common.run" -> "common.run" and "common")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names | {name.split(".")[0] for name in names}


def test_there_are_method_files():
    assert "dshmp" in METHOD_NAMES


@pytest.mark.parametrize("path", METHODS, ids=lambda p: p.name)
def test_method_file_cover_page_and_size(path):
    source = path.read_text()
    docstring = ast.get_docstring(ast.parse(source)) or ""
    assert "Deviations" in docstring, f"{path.name}: the docstring lists no Deviations"
    lines = source.splitlines()
    assert len(lines) <= 750, f"{path.name} has {len(lines)} lines"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert not long, f"{path.name}: lines over 100 characters: {long}"


# Each paper as its text names it (title, authors in order, venue); VATEX's text is the earlier
# arXiv version of the WACV 2025 paper, whose title differs; MRaCL's page BibTeX says 2025, its
# arXiv version is of March 2026; DsHmp's text has no author block: its authors as the official
# repository and DMVS's reference [18] give them.
PAPERS = {
    "dshmp": ("Decoupling Static and Hierarchical Motion Perception for Referring Video Segmentation",
              ["Shuting He", "Henghui Ding"], "CVPR 2024"),
    "dmvs": ("Decoupled Motion Expression Video Segmentation",
             ["Hao Fang", "Runmin Cong", "Xiankai Lu", "Xiaofei Zhou", "Sam Kwong", "Wei Zhang"], "CVPR 2025"),
    "vatex": ("Improving Referring Image Segmentation using Vision-Aware Text Features",
              ["Hai Nguyen-Truong", "E-Ro Nguyen", "Tuan-Anh Vu", "Minh-Triet Tran", "Binh-Son Hua",
               "Sai-Kit Yeung"], "WACV 2025"),
    "mracl": ("Towards Motion-aware Referring Image Segmentation",
              ["Chaeyun Kim", "Seunghoon Yi", "Yejin Kim", "Yohan Jo", "Joonseok Lee"], "2603.17413"),
}


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_method_file_names_its_paper(name):
    """The docstring gives the paper's title, its authors in order, and the venue."""
    title, authors, venue = PAPERS[name]
    docstring = " ".join((ast.get_docstring(ast.parse((REPO / f"{name}.py").read_text())) or "").split())
    assert title in docstring, f"{name}.py does not name its paper {title!r}"
    where = [docstring.find(a) for a in authors]
    assert -1 not in where and where == sorted(where), f"{name}.py: the authors {authors} in this order"
    assert venue in docstring


@pytest.mark.parametrize("path", METHODS, ids=lambda p: p.name)
def test_method_files_do_not_import_each_other(path):
    others = METHOD_NAMES - {path.stem}
    assert not imported_modules(path) & others, f"{path.name} imports another method file"


@pytest.mark.parametrize("path", sorted([*(REPO / "common").glob("*.py"), *(REPO / "data").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_common_and_data_lines_are_at_most_100_characters(path):
    lines = path.read_text().splitlines()
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert not long, f"{path.parent.name}/{path.name}: lines over 100 characters: {long}"


def test_common_imports_no_method_file_and_no_toy_data():
    for path in sorted((REPO / "common").glob("*.py")):
        imports = imported_modules(path)
        assert not imports & METHOD_NAMES, f"{path} imports a method file"
        assert not imports & {"data", "data.toy"}, f"{path} imports the toy data"


# What each module of common/ may import from common/: the modules of the models it builds on,
# so that it can be copied without the toolkit (README, "The shared package"); run.py is the toolkit.
COMMON_NEEDS = {"vita": {"mask2former", "backbones", "matching"}, "backbones": {"mask2former"},
                "datasets": {"coco_mask"}}


@pytest.mark.parametrize("path", sorted((REPO / "common").glob("*.py")), ids=lambda p: p.name)
def test_common_modules_import_only_the_models_they_build_on(path):
    if path.stem in ("run", "__init__"):
        return
    imports = {name.split(".", 1)[1] for name in imported_modules(path) if name.startswith("common.")}
    extra = imports - COMMON_NEEDS.get(path.stem, set())
    assert not extra, f"common/{path.name} imports common.{sorted(extra)} (README: The shared package)"


def test_the_checks_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""No cover page."""\nimport dshmp\nfrom data.toy import make_toy\n' + "x = 1  # " + "y" * 100)
    assert "dshmp" in imported_modules(bad) and "data" in imported_modules(bad)
    assert "Deviations" not in ast.get_docstring(ast.parse(bad.read_text()))
