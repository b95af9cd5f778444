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
