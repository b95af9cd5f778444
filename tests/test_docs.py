"""The manual: the config reference is generated from config.py and must be committed as generated; every
key has its one line of help; the pages the index and the README link exist."""
from __future__ import annotations

import os
import re

from conftest import REPO


def test_committed_config_reference_is_what_the_code_generates():
    from lthmpi.reference import COMMAND, DEFAULT_PATH, render

    assert DEFAULT_PATH == os.path.join(REPO, "docs", "config.md")
    with open(DEFAULT_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == render(), f"docs/config.md is stale: run `{COMMAND}` and commit it"


def test_every_key_has_one_line_of_help_and_its_real_default():
    from lthmpi.config import Config, keys
    from lthmpi.reference import render

    cfg, page, names = Config(), render(), [k[0] for k in keys()]
    assert len(names) == len(set(names)) and "train.lr" in names and "parallel.threads" in names
    for name, default, text in keys():
        assert text.strip() and "\n" not in text, f"config key {name} needs a one-line help in lthmpi/config.py"
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        assert obj == default, name
        assert f"| `{name}` |" in page, name


def test_mutable_defaults_are_not_shared_between_configs():
    from lthmpi.config import Config

    a, b = Config(), Config()
    a.reset.points.append("2ep")
    a.prune.layer_rates["fc1"] = 1.0
    assert "2ep" not in b.reset.points and "fc1" not in b.prune.layer_rates


def test_check_fails_on_a_stale_page_and_the_command_fixes_it(tmp_path, capsys):
    from lthmpi.reference import main

    page = tmp_path / "docs" / "config.md"
    assert main(["--check", "--out", str(page)]) == 1  # missing
    assert main(["--out", str(page)]) == 0 and main(["--check", "--out", str(page)]) == 0
    page.write_text(page.read_text().replace("learning rate", "learning speed"))
    assert main(["--check", "--out", str(page)]) == 1
    assert "is stale: run `python -m lthmpi.reference`" in capsys.readouterr().err
    assert main(["--out", str(page)]) == 0 and main(["--check", "--out", str(page)]) == 0
    assert [p.name for p in page.parent.iterdir()] == ["config.md"], "no temporary file left behind"


def test_help_lists_every_key_with_its_help():
    from lthmpi.config import keys
    from lthmpi.main import parser

    text = parser().format_help()
    for name, _, line in keys():
        assert f"  {name} = " in text and line in text, name


# The pages of the other parts of the manual, each written with its feature; docs/index.md says what each holds.
FEATURE_PAGES = {"docs/design.md", "docs/trainer.md", "docs/data.md", "docs/gpu.md", "docs/imp.md", "docs/stability.md"}


def _links(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        text = f.read()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if "://" in target or target.startswith("#"):
            continue
        yield os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))


def test_readme_is_short_and_its_links_and_commands_exist():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.count("\n") < 150
    for script in ("run/quickstart.sh", "run/test.sh", "run/slurm/multi_node.sbatch"):
        assert script in text and os.access(os.path.join(REPO, script), os.R_OK), script
    assert os.access(os.path.join(REPO, "run/quickstart.sh"), os.X_OK)
    links = set(_links("README.md"))
    assert {"docs/index.md", "docs/guide.md", "docs/clusters.md", "docs/config.md"} <= links
    assert any(link.endswith(".png") for link in links), "the README shows a figure from a real run"
    assert [link for link in links if not os.path.exists(os.path.join(REPO, link))] == []


def test_the_index_links_every_page_and_every_link_in_the_docs_resolves():
    pages = sorted(f"docs/{f}" for f in os.listdir(os.path.join(REPO, "docs")) if f.endswith(".md"))
    indexed = set(_links("docs/index.md"))
    assert [p for p in pages if p != "docs/index.md" and p not in indexed] == [], "link new pages from docs/index.md"
    assert FEATURE_PAGES <= indexed
    for page in pages:
        missing = [link for link in _links(page) if not os.path.exists(os.path.join(REPO, link))]
        assert missing == [], (page, missing)


def test_every_results_column_is_explained_in_the_guide():
    from lthmpi.results import TASK_COLUMNS

    with open(os.path.join(REPO, "docs", "guide.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", f.read(), re.M)
    documented = {c for row in rows for c in row if c}
    assert [c for c in TASK_COLUMNS if c not in documented] == [], "explain new results columns in docs/guide.md"
