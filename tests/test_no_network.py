"""Nothing arbor does at run time touches the network: train, generate, grow and export are
run with every socket connection recorded and refused."""

from __future__ import annotations

import socket

from arbor.cli import main


def test_train_generate_grow_and_export_make_no_connection(tmp_path, monkeypatch, capsys):
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network access refused in this test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--no-progress", "--max-steps", "4", "--set", "seq_len=32",
            "--set", "vocab_size=300", "--set", "sample_tokens=3"]
    assert main(argv) == 0
    checkpoint = run / "checkpoints" / "step-00000004"
    assert main(["generate", str(checkpoint), "The", "--max-new-tokens", "3"]) == 0
    assert main(["grow", str(checkpoint), "--depth", "1", "--out", str(tmp_path / "grown")]) == 0
    assert main(["export", str(tmp_path / "grown"), "--to", "llama", str(tmp_path / "llama")]) == 0
    assert attempts == []
