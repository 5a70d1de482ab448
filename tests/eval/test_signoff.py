"""Recorded sign-off (issue 34): `align gate sign` binds a reviewer's decision to the hashes of every piece of
evidence in the run (manifests, model files, gate records), optionally signed with the reviewer's SSH key;
`align gate verify` and the run report say which file changed since, and whether the signature holds."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from align.cli import main
from data_schemas.gates import Check, GateResult
from eval.gates import write_gate
from eval.signoff import verify


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "adapter").mkdir(parents=True)
    manifest = {"stage": "sft", "status": "complete", "key": "k" * 16, "started_at": "2026-12-07T00:00:00Z"}
    (run / "sft" / "manifest.json").write_text(json.dumps(manifest))
    (run / "sft" / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00weights\x01" * 100)
    write_gate(GateResult(gate="bias", candidate=str(run / "sft"), checks=[Check(metric="m", candidate=0.5, passed=True)]),
               run / "gates" / "sft-bias")  # fmt: skip
    (run / "pipeline.json").write_text(json.dumps({"stages": {}}))
    return run


@pytest.fixture
def ssh_key(tmp_path):
    if shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH's ssh-keygen is not installed")
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qa", "-f", str(key)], check=True)
    return key


def _flip(path, at=3):
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "evidence", ["gates/sft-bias/gate.json", "sft/manifest.json", "sft/adapter/adapter_model.safetensors"]
)
def test_any_edited_byte_of_signed_evidence_is_named(run, ssh_key, evidence, capsys):
    assert (
        main(
            [
                "gate",
                "sign",
                str(run),
                "--reviewer",
                "R. Chen",
                "--decision",
                "approve",
                "--key",
                str(ssh_key),
            ]
        )
        == 0
    )
    (v,) = verify(run)
    assert v.intact and v.signature == "valid" and len(v.record["evidence"]) == 3
    assert main(["gate", "verify", str(run)]) == 0
    _flip(run / evidence)
    capsys.readouterr()
    assert main(["gate", "verify", str(run)]) == 1
    said = capsys.readouterr().out.replace("\n", " ")
    assert "CHANGED" in said and f"changed: {evidence}" in said
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "R. Chen" in html and "CHANGED: changed: " + evidence in html


def test_a_forged_or_edited_sign_off_does_not_verify(run, ssh_key, tmp_path):
    assert main(["gate", "sign", str(run), "--reviewer", "R. Chen", "--decision", "conditions",
                 "--note", "only for the internal pilot", "--key", str(ssh_key)]) == 0  # fmt: skip
    log = run / "signoffs.jsonl"
    rec = json.loads(log.read_text())
    rec["decision"] = "approve"  # the record edited after signing
    log.write_text(json.dumps(rec) + "\n")
    (v,) = verify(run)
    assert not v.intact and v.signature.startswith("does not verify")
    # tied to names: the key must be the one allowed_signers lists for the reviewer
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'R.Chen namespaces="align-signoff" {(tmp_path / "other.pub").read_text()}')
    rec["decision"] = "conditions"
    log.write_text(json.dumps(rec) + "\n")
    assert verify(run)[0].signature == "valid"
    (v,) = verify(run, allowed)
    assert v.signature.startswith(
        "does not verify"
    )  # a valid signature, by a key not listed for this reviewer


def test_an_unsigned_sign_off_still_binds_the_evidence_and_bad_requests_are_sentences(run, capsys):
    assert (
        main(["gate", "sign", str(run / "gates" / "sft-bias"), "--reviewer", "QA", "--decision", "reject"])
        == 0
    )
    (v,) = verify(run / "gates" / "sft-bias")
    assert v.intact and v.signature == "unsigned" and list(v.record["evidence"]) == ["gate.json"]
    capsys.readouterr()
    assert main(["gate", "sign", str(run), "--reviewer", "QA", "--decision", "conditions"]) == 2
    assert "say the conditions" in capsys.readouterr().err
    assert main(["gate", "sign", str(run / "sft"), "--reviewer", "QA", "--decision", "approve"]) == 2
