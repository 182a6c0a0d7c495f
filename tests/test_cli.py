from __future__ import annotations

import json
import subprocess
import sys

from tokenmix import list_mixers, mixer_info
from tokenmix.cli import main


def test_list_shows_every_mixer_with_options(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_mixers():
        assert f"\n{name}\n" in f"\n{out}"
        for option, default in mixer_info(name).options.items():
            assert f"{option}={default!r}" in out


def test_list_json_is_machine_readable(capsys):
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list_mixers()
    assert all(row["causal"] and row["decoding_state"] for row in rows)


def test_python_dash_m_runs_and_rejects_no_command():
    ok = subprocess.run([sys.executable, "-m", "tokenmix", "list"], capture_output=True, text=True)
    assert ok.returncode == 0 and "pointwise" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tokenmix"], capture_output=True, text=True)
    assert bad.returncode != 0 and "COMMAND" in bad.stderr
