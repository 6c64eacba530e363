"""The command contract: `rlhfkit annotate serve|user add|project add|import|simulate|export|stats|agreement`."""

from __future__ import annotations

import json

import httpx
import pytest
from annotate_helpers import ServerProcess, free_port

from rlhfkit.cli import run_command
from rlhfkit.data import load_preferences
from rlhfkit.errors import UserError


def test_user_add_prints_a_token_that_serve_accepts(cli, tmp_path):
    db = str(tmp_path / "fb.db")
    r = cli("annotate", "user", "add", "alice", "role=admin", f"db={db}")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert len(token) >= 40 and "\n" not in token
    r = cli("annotate", "user", "add", "alice", "role=admin", f"db={db}")
    assert r.returncode == 2 and "already exists" in r.stderr
    r = cli("annotate", "user", "add", "bob", "role=boss", f"db={db}")
    assert r.returncode == 2 and "role: expected admin or annotator" in r.stderr
    with open(tmp_path / "server.log", "ab") as log:
        server = ServerProcess(db, free_port(), log).start()
        try:
            assert httpx.get(server.url + "/api/me").status_code == 401
            me = httpx.get(server.url + "/api/me", headers={"Authorization": f"Bearer {token}"})
            assert me.status_code == 200 and me.json() == {"id": 1, "name": "alice", "role": "admin"}
        finally:
            server.stop()


def test_user_deactivate_and_undo_from_the_command_line(cli, tmp_path):
    from rlhfkit.annotate.store import Store

    db = str(tmp_path / "fb.db")
    token = cli("annotate", "user", "add", "carol", f"db={db}").stdout.strip()
    r = cli("annotate", "user", "deactivate", "carol", f"db={db}")
    assert r.returncode == 0 and "carol: deactivated" in r.stdout
    assert "carol\tannotator\tdeactivated" in cli("annotate", "user", "list", f"db={db}").stdout
    store = Store(db)
    try:
        assert store.user_by_token(token) is None
        r = cli("annotate", "user", "deactivate", "carol", "undo=true", f"db={db}")
        assert r.returncode == 0 and "carol: active" in r.stdout and store.user_by_token(token).name == "carol"
    finally:
        store.close()
    r = cli("annotate", "user", "deactivate", "nobody", f"db={db}")
    assert r.returncode == 2 and "nobody" in r.stderr and "Traceback" not in r.stderr
    missing = tmp_path / "typo.db"  # a command that only opens a database names the missing file, creates nothing
    for argv in (["user", "deactivate", "carol"], ["user", "list"], ["stats"]):
        r = cli("annotate", *argv, f"db={missing}")
        assert r.returncode == 2 and "typo.db not found" in r.stderr and not missing.exists(), (argv, r.stderr)


def test_import_reports_file_line_and_writes_nothing(cli, tmp_path):
    db = str(tmp_path / "fb.db")
    bad = tmp_path / "cands.jsonl"
    bad.write_text('{"prompt": "a", "completions": ["x", "y"]}\n{"prompt": "b", "completions": ["x"], "gold": "A"}\n')
    r = cli("annotate", "import", str(bad), f"db={db}", "project=p")
    assert r.returncode == 2
    assert f"{bad}:2: field 'gold': a pairwise gold answer needs exactly 2 completions" in r.stderr
    assert "Traceback" not in r.stderr
    from rlhfkit.annotate.store import Store

    store = Store(db)
    assert store.items(project_id=store.get_project(name="p").id) == []
    store.close()


def test_project_import_simulate_export_commands(tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    cands = tmp_path / "cands.jsonl"
    cands.write_text("".join(json.dumps({"prompt": f"q{i}", "completions": [f"no {i}", f"yes yes {i}"]}) + "\n"
                             for i in range(6)))
    prefs = tmp_path / "prefs.py"
    prefs.write_text("def score(prompts, completions):\n    return [float(c.count('yes')) for c in completions]\n")
    run_command(["annotate", "project", "add", "p", f"db={db}", "kinds=pairwise,rating", "k=2",
                 "criteria=helpful,fluent", "scale_max=5", "gold_rate=0"])
    with pytest.raises(UserError, match="project 'p' already exists"):
        run_command(["annotate", "project", "add", "p", f"db={db}"])
    out = run_command(["annotate", "import", str(cands), f"db={db}", "project=p"])
    assert out["added"] == 6 * 3 and run_command(["annotate", "import", str(cands), f"db={db}",
                                                   "project=p"])["added"] == 0
    sim = run_command(["annotate", "simulate", f"db={db}", "project=p", f"preference={prefs}:score", "crowd=2",
                       "temperature=0", f"report={tmp_path / 'report.json'}"])
    assert sim["labels"] == 6 * 3 * 2 and sim["agreement_with_noise_free"] == 1.0
    assert json.loads((tmp_path / "report.json").read_text())["labels"] == sim["labels"]
    out = run_command(["annotate", "export", f"db={db}", "project=p", f"output={tmp_path / 'out.jsonl'}"])
    pairs = load_preferences(tmp_path / "out.jsonl").pairs
    assert out["rows"] == len(pairs) == 6 and all(p.chosen.startswith("yes") for p in pairs)
    stats = run_command(["annotate", "stats", f"db={db}", "project=p"])
    assert stats["p"]["progress"]["complete_items"] == 18
    assert sorted(a["annotator"] for a in stats["p"]["annotators"]) == ["sim0", "sim1"]
    agree = run_command(["annotate", "agreement", f"db={db}", "project=p"])
    assert agree["pairwise"]["percent_agreement"] == 1.0
    with pytest.raises(UserError, match="kind: expected one of"):
        run_command(["annotate", "export", f"db={db}", "project=p", "kind=votes", "output=x.jsonl"])
    with pytest.raises(UserError, match="none.db not found"):
        run_command(["annotate", "export", f"db={tmp_path / 'none.db'}", "project=p", "output=x.jsonl"])
    assert not (tmp_path / "none.db").exists()
    capsys.readouterr()
