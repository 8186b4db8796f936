"""llmq_fx.save / llmq_fx.load: the quantized graph round-trips through torch.export's .pt2 format."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

import llmq_fx
from llmq_fx.errors import CheckpointError, ExportError
from conftest import STATIC


@pytest.fixture(scope="module")
def saved(opt_gm, calib, tmp_path_factory):
    qgm = llmq_fx.quantize(opt_gm, calib, progress=False)
    path = llmq_fx.save(qgm, tmp_path_factory.mktemp("graph") / "graph.pt2")
    return qgm, path


def test_loaded_graph_computes_the_same_logits(saved):
    qgm, path = saved
    loaded = llmq_fx.load(path)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for shape in ((1, 1), (3, 17), (2, 64)):  # batch and sequence stay dynamic, seq 1 included
            ids = torch.randint(0, 96, shape, generator=gen)
            assert torch.equal(loaded(ids), qgm(ids)), shape


def test_loaded_graph_keeps_its_record_and_summary(saved):
    qgm, path = saved
    loaded = llmq_fx.load(path)
    meta = loaded.meta["llmq_fx"]
    assert meta["config"] == qgm.meta["llmq_fx"]["config"] and meta["recipe"] == qgm.meta["llmq_fx"]["recipe"]
    assert meta["linears"] == qgm.meta["llmq_fx"]["linears"]
    assert "site_stats" not in meta  # tensors: the CLI writes them to stats.safetensors
    assert llmq_fx.summary(loaded) == llmq_fx.summary(qgm)
    ops = [n.target for n in loaded.graph.nodes if "llmq" in str(n.target)]
    assert torch.ops.llmq.quantize_dequantize_dynamic.default in ops and torch.ops.llmq.dequantize_weight.default in ops


def test_static_graph_round_trips(opt_gm, calib, eval_ids, tmp_path):
    qgm = llmq_fx.quantize(opt_gm, calib, STATIC, progress=False)
    loaded = llmq_fx.load(llmq_fx.save(qgm, tmp_path / "static.pt2"))
    with torch.no_grad():
        assert torch.equal(loaded(eval_ids), qgm(eval_ids))


def _rewrite(src, dst, edit):
    """Copy a zip archive, passing every member through ``edit(name, bytes) -> bytes``."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for name in a.namelist():
            b.writestr(name, edit(name, a.read(name)))


def test_a_file_from_another_version_is_refused(saved, tmp_path):
    _, path = saved

    def older(name, data):
        if name.endswith("extra/llmq_fx.json"):
            record = json.loads(data)
            record["llmq_fx_version"] = "0.0.1"
            return json.dumps(record).encode()
        return data

    _rewrite(path, tmp_path / "old.pt2", older)
    with pytest.raises(CheckpointError, match=r"old.pt2 was saved by llmq_fx 0.0.1 .*this is llmq_fx " + llmq_fx.__version__):
        llmq_fx.load(tmp_path / "old.pt2")


def test_an_archive_with_pickled_entries_is_refused(saved, tmp_path):
    _, path = saved

    def pickled(name, data):
        if name.endswith("weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    _rewrite(path, tmp_path / "pickled.pt2", pickled)
    with pytest.raises(CheckpointError, match="pickled tensor .*refusing"):
        llmq_fx.load(tmp_path / "pickled.pt2")

    def unsafe_inputs(name, data):
        if "sample_inputs" in name:
            import fractions
            import io

            buf = io.BytesIO()
            torch.save({"x": fractions.Fraction(1, 3)}, buf)  # an arbitrary class: not loadable weights-only
            return buf.getvalue()
        return data

    _rewrite(path, tmp_path / "inputs.pt2", unsafe_inputs)
    with pytest.raises(CheckpointError, match="sample inputs"):
        llmq_fx.load(tmp_path / "inputs.pt2")


def test_files_that_are_not_llmq_graphs_are_refused(opt_gm, tmp_path):
    with pytest.raises(CheckpointError, match="graph file not found"):
        llmq_fx.load(tmp_path / "missing.pt2")
    (tmp_path / "text.pt2").write_text("not a zip")
    with pytest.raises(CheckpointError, match="text.pt2 is not a .pt2 archive"):
        llmq_fx.load(tmp_path / "text.pt2")
    ep = torch.export.export(opt_gm, (torch.zeros(2, 8, dtype=torch.long),), strict=False)
    torch.export.save(ep, tmp_path / "plain.pt2")
    with pytest.raises(CheckpointError, match="not one written by llmq_fx.save"):
        llmq_fx.load(tmp_path / "plain.pt2")


def test_save_to_a_missing_folder_fails_cleanly(saved, tmp_path):
    qgm, _ = saved
    with pytest.raises(ExportError, match="cannot write"):
        llmq_fx.save(qgm, tmp_path / "no" / "such" / "graph.pt2")
    assert list(tmp_path.iterdir()) == []
