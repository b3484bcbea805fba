"""ckpt.save / load / open / verify end to end on S3 (moto's real server on 127.0.0.1)."""

from __future__ import annotations

import json

import pytest
import torch

import ckpt
from ckpt.cli import main as cli_main

pytestmark = [pytest.mark.s3, pytest.mark.timeout(180)]


def test_save_load_partial_read_and_verify_on_s3(s3_server, capsys):
    url = s3_server.url("roundtrip")
    opts = {**s3_server.storage_options, "part_size_bytes": 5 * 1024 * 1024}
    src = {"model": {"w": torch.randn(2048, 1024), "b": torch.randn(17).to(torch.bfloat16)}, "step": 11}
    ckpt.save(src, url, storage_options=opts)
    names = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_server.bucket,
                                                                   Prefix=url.split("/", 3)[3])["Contents"]]
    assert any(n.endswith("manifest.json") for n in names)
    dst = {"model": {"w": torch.zeros(2048, 1024), "b": torch.zeros(17, dtype=torch.bfloat16)}, "step": 0}
    ckpt.load(dst, url, storage_options=opts)
    assert torch.equal(dst["model"]["w"], src["model"]["w"]) and torch.equal(dst["model"]["b"], src["model"]["b"])
    assert dst["step"] == 11
    with ckpt.open(url, opts) as r:
        assert torch.equal(r.read("model/w", (slice(1000, 1010),)), src["model"]["w"][1000:1010])
        assert r.bytes_read <= 2 * 4 * 1024 * 1024  # one or two 4 MiB checksum blocks, not the 8 MiB tensor
    rc = cli_main(["verify", url, "--json", "--storage-options", json.dumps(opts)])
    assert rc == 0 and json.loads(capsys.readouterr().out)["ok"] is True


def test_s3_without_manifest_is_incomplete(s3_server):
    url = s3_server.url("incomplete")
    opts = s3_server.storage_options
    ckpt.save({"w": torch.ones(10)}, url, storage_options=opts)
    key = url.split("/", 3)[3] + "/manifest.json"
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=key)
    with pytest.raises(ckpt.IncompleteCheckpointError):
        ckpt.load({"w": torch.zeros(10)}, url, storage_options=opts)
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.open(s3_server.url("never-written"), opts)


def test_s3_outage_during_save_commits_nothing(s3_server_running):
    srv = s3_server_running
    url = srv.url("outage")
    opts = {**srv.storage_options, "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2,
                                                     "read_timeout": 5}}
    ckpt.save({"w": torch.ones(10)}, url + "/step_1", storage_options=opts)
    with srv.outage():
        with pytest.raises(ckpt.CheckpointError):
            ckpt.save({"w": torch.full((10,), 2.0)}, url + "/step_2", storage_options=opts)
    dst = {"w": torch.zeros(10)}
    ckpt.load(dst, url + "/step_1", storage_options=opts)
    assert torch.equal(dst["w"], torch.ones(10))
    with pytest.raises((ckpt.IncompleteCheckpointError, ckpt.CheckpointNotFoundError)):
        ckpt.load(dst, url + "/step_2", storage_options=opts)
