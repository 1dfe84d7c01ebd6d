"""Certificates on the command lines: a missing or unreadable file is one line naming the flag;
plaintext only when asked for (``--insecure``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from amp4ec import pki
from amp4ec.cli import cli
from amp4ec.node_agent.cli import parse_args


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--tls-ca: required for mutual TLS (or pass --insecure)"),
        (["--tls-ca", "/nonexistent/ca.crt", "--tls-cert", "c", "--tls-key", "k"], "--tls-ca: cannot read"),
        (
            ["--insecure", "--monitor-interval", "5"],
            "--control-port: the monitor role serves Monitor.Profile",
        ),
    ],
)
def test_agent_refuses_to_start_without_its_certificates(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_key_of_another_certificate_or_a_non_pem_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = pki.CertificateAuthority.create()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert, _ = ca.issue(pki.MONITOR).write(tmp_path, "a")
    _, other_key = ca.issue(pki.MONITOR).write(tmp_path, "b")
    flags = ["--tls-ca", str(tmp_path / "ca.crt"), "--tls-cert", str(cert)]
    for key, message in ((other_key, "key: does not belong to cert"), (tmp_path / "ca.crt", "key: not")):
        with pytest.raises(SystemExit):
            parse_args([*flags, "--tls-key", str(key)])
        assert message in capsys.readouterr().err


def test_agent_reads_its_identity_from_its_certificate(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create()
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    cert, key = ca.issue(pki.stage_identity("ns", "d", 2)).write(tmp_path, "tls")
    settings, *_ = parse_args(
        ["--tls-ca", str(tmp_path / "ca.crt"), "--tls-cert", str(cert), "--tls-key", str(key)]
    )
    assert settings.security.identity == "stage-2.d.ns.amp4ec" and settings.control_port is None
    assert parse_args(["--insecure"])[0].security.insecure


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--ca: required for mutual TLS (or pass --insecure)"),
        (["--ca", "/nonexistent.crt", "--cert", "x", "--key", "y"], "--ca: cannot read /nonexistent.crt"),
    ],
)
def test_infer_needs_a_client_certificate_or_insecure(tmp_path: Path, extra: list[str], message: str) -> None:
    import torch

    torch.save(torch.zeros(1, 3), tmp_path / "x.pt")
    result = CliRunner().invoke(
        cli, ["infer", "--endpoint", "127.0.0.1:1", "--input", str(tmp_path / "x.pt"), *extra]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("insecure", [False, True])
def test_amp4ec_run_says_which_transport_it_used_and_matches_the_monolith(
    tmp_path: Path, insecure: bool
) -> None:
    import json

    out = tmp_path / "run.json"
    args = ["run", "--model", "mobilenet_v2", "--input-shape", "1,3,32,32", "--nodes", "1.0,0.5"]
    args += ["--strategy", "equal", "--requests", "4", "--cpu-limits", "none", "--json", str(out)]
    result = CliRunner().invoke(cli, args + (["--insecure"] if insecure else []))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["transport"] == ("insecure" if insecure else "mutual TLS")
    assert data["max_abs_diff"] < 1e-4 and len(data["plan"]) == 2
