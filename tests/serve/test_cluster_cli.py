"""`mambastep serve --ray` as a user runs it: a local Ray cluster started and stopped by the command."""

import pytest

from mambastep.cli import main

from servers import client, start_server


def test_serve_on_ray_from_the_command_line(tmp_path):
    server = start_server(tmp_path / "data", "--ray", "--replicas", "1")
    try:
        with client(server, key=None) as http:
            session = http.post("/v1/sessions", json={"prompt": "import "}).json()["id"]
            answer = http.post(f"/v1/sessions/{session}/generate", json={"max_tokens": 4, "temperature": 0})
            assert answer.status_code == 200 and answer.json()["session"]["position"] == len("import ") + 4
    finally:
        code = server.stop()
    log = server.log.read_text()
    assert code == 0, log
    assert "ready on http://127.0.0.1" in log and "stopped; every session is in the store" in log


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "2"], "--ray-address and --replicas need --ray"),
        (["--ray-address", "auto"], "need --ray"),
        (["--ray", "--store", "postgresql://nobody@127.0.0.1:1/none"], "cannot reach PostgreSQL at 127.0.0.1:1"),
    ],
)
def test_scale_out_flags_are_checked_first(args, message, capsys):
    assert main(["serve", *args]) == 1
    assert message in capsys.readouterr().err


def test_replicas_are_counted_or_auto(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--ray", "--replicas", "0"])
    assert "expected a positive number of replicas or 'auto'" in capsys.readouterr().err
