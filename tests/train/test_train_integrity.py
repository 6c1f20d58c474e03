"""distiq.integrity: truncated / damaged safetensors files give a clear error naming the file,
and checksums recorded by a run catch a weight file whose bytes changed afterwards."""

import json
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from distiq.integrity import (
    CHECKSUMS_FILE,
    IntegrityError,
    check_safetensors,
    file_sha256,
    load_safetensors,
    record_hashes,
    verify_hashes,
)


def _tensors():
    return {
        "w": torch.randn(5, 7),
        "b": torch.arange(3, dtype=torch.int64),
        "h": torch.randn(4, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "flag": torch.tensor([True, False]),
        "f8": torch.randn(6).to(torch.float8_e4m3fn),
    }


def test_good_files_load_exactly_as_safetensors_loads_them(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    header = check_safetensors(path, "the model")
    assert set(header) == set(_tensors())
    assert header["w"]["shape"] == [5, 7] and header["h"]["dtype"] == "BF16"
    ours, reference = load_safetensors(path, what="the model"), load_file(str(path))
    assert set(ours) == set(reference)
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype
        assert torch.equal(
            ours[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        )


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1])
def test_truncated_files_are_named_with_what_to_do(tmp_path, keep):
    path = tmp_path / "quant_state.safetensors"
    save_file(_tensors(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-3])
    with pytest.raises(SafetensorError):  # what a user saw before: a bare library error
        load_file(str(path))
    for call in (
        lambda: check_safetensors(path, "the quantization state"),
        lambda: load_safetensors(path, what="the quantization state"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "the quantization state" in message and str(path) in message
        assert "truncated or damaged" in message and "re-run" in message
        assert "re-export" in message


def test_damaged_headers_are_refused_before_reading_data(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(path))
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])

    def write(new_header, tail=b""):
        raw = json.dumps(new_header).encode()
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + header_len :]) + tail)

    write({**header, "w": {**header["w"], "shape": [4, 5]}})  # shape disagrees with the bytes
    with pytest.raises(ValueError, match=r"tensor 'w' \(F32, shape \[4, 5\]\) spans 64 bytes"):
        check_safetensors(path, "the model")
    write({**header, "w": {**header["w"], "data_offsets": [8, 72]}})
    with pytest.raises(ValueError, match="starts at byte 8, not 0"):
        check_safetensors(path, "the model")
    write(header, tail=b"junk")
    with pytest.raises(ValueError, match="longer than its tensors"):
        load_safetensors(path, what="the model")
    garbled = bytearray(path.read_bytes())
    garbled[9] = ord("#")  # a flipped byte inside the JSON header
    path.write_bytes(bytes(garbled))
    with pytest.raises(ValueError, match="header is not valid JSON"):
        load_safetensors(path, what="the model")
    with pytest.raises(FileNotFoundError, match="the model not found"):
        load_safetensors(tmp_path / "missing.safetensors", what="the model")


def test_checksums_catch_a_flipped_bit(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    assert verify_hashes(tmp_path) is False  # no checksums.json: an older run, not checked
    hashes = record_hashes(tmp_path, ["model.safetensors", "config.json"])
    assert hashes["model.safetensors"] == file_sha256(tmp_path / "model.safetensors")
    manifest = json.loads((tmp_path / CHECKSUMS_FILE).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json"}
    assert verify_hashes(tmp_path) is True

    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x04  # one bit of one weight: the file still loads fine
    weights.write_bytes(bytes(data))
    load_safetensors(weights, what="the model")
    with pytest.raises(IntegrityError) as info:
        verify_hashes(tmp_path)
    message = str(info.value)
    assert message.startswith("model.safetensors changed since the run wrote it (SHA-256 ")
    assert hashes["model.safetensors"] in message and "re-run or restore it" in message
    assert info.value.path == weights
    assert verify_hashes(tmp_path, ["config.json"]) is True  # a subset can be checked alone

    weights.write_bytes(bytes(data[:-1]))
    with pytest.raises(IntegrityError, match="bytes recorded"):
        verify_hashes(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        verify_hashes(tmp_path)


def test_recording_again_updates_only_the_named_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"a" * 3_000_000)  # several hashing chunks
    (tmp_path / "b.bin").write_bytes(b"b")
    record_hashes(tmp_path, ["a.bin", "b.bin"])
    (tmp_path / "b.bin").write_bytes(b"bb")
    record_hashes(tmp_path, ["b.bin"])
    files = json.loads((tmp_path / CHECKSUMS_FILE).read_text())["files"]
    assert files["b.bin"]["bytes"] == 2 and files["a.bin"]["bytes"] == 3_000_000
    assert verify_hashes(tmp_path)


@pytest.mark.parametrize(
    "name", ["../model.safetensors", "sub/model.safetensors", "/etc/passwd", "..", ".", ""]
)
def test_names_outside_the_directory_are_refused_before_opening_anything(
    tmp_path, monkeypatch, name
):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    with pytest.raises(ValueError, match="not a plain file name"):
        record_hashes(tmp_path, ["model.safetensors", name])
    assert opened == [] and not (tmp_path / CHECKSUMS_FILE).exists()


def test_a_tampered_manifest_cannot_point_outside(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s")
    run = tmp_path / "run"
    run.mkdir()
    body = {
        "format": "distiq.checksums/1",
        "algorithm": "sha256",
        "files": {"../secret.bin": {"sha256": file_sha256(secret), "bytes": 1}},
    }
    (run / CHECKSUMS_FILE).write_text(json.dumps(body))
    with pytest.raises(IntegrityError, match="not a plain file name"):
        verify_hashes(run)
    (run / CHECKSUMS_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match="not readable JSON"):
        verify_hashes(run)
