"""`llmq_fx.plots`: PNGs of a quantize output folder, the default site, and the errors a user can act on."""

import json
import logging
import shutil
import statistics

import pytest
import torch
from matplotlib.image import imread
from safetensors.torch import load_file

from llmq_fx.cli import main
from llmq_fx.errors import CheckpointError, LlmqError
from llmq_fx.plots import default_site, load_site_stats, write_plots

from conftest import STATIC

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("channel_ranges.png", "clusters.png", "ppl_vs_clusters.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One small quantize run with a cluster sweep; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("plots") / "run"
    config = out.parent / "static.json"  # smoothing and clusters: what the plots show
    config.write_text(json.dumps(STATIC))
    rc = main(["quantize", "--model", "opt-tiny-random", "--out", str(out), "--seq-len", "64", "--calib-samples", "4",
               "--config", str(config),
               "--eval", "eval", "--eval-windows", "2", "--no-onnx", "--quiet", "--cluster-sweep", "1", "2", "4"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def written(run_dir):
    return write_plots(run_dir)


def _copy(run_dir, tmp_path, *names):
    dst = tmp_path / "copy"
    dst.mkdir()
    for name in names:
        shutil.copy(run_dir / name, dst / name)
    return dst


def test_writes_three_valid_pngs_and_no_temp_files(run_dir, written):
    assert [p.name for p in written] == list(PLOTS)
    for path in written:
        assert path.parent == run_dir
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width = imread(path).shape[:2]
        assert 400 <= height <= 2000 and 600 <= width <= 2500, (path.name, width, height)
    assert not list(run_dir.glob(".*.tmp"))


def test_default_site_has_largest_max_over_median_absmax_before_smoothing(run_dir):
    tensors = load_file(str(run_dir / "stats.safetensors"))
    ratios = {}
    for key in tensors:
        site, _, field = key.rpartition("/")
        if field != "smoothing_scale" or torch.all(tensors[key] == 1):
            continue
        # Before smoothing x = x_smoothed * s, and s > 0, so absmax scales channel by channel.
        absmax = torch.maximum(tensors[f"{site}/min"].abs(), tensors[f"{site}/max"].abs()) * tensors[key]
        ratios[site] = absmax.max().item() / statistics.median(absmax.tolist())
    expected = max(ratios, key=ratios.get)

    assert default_site(load_site_stats(run_dir)) == expected
    report = json.loads((run_dir / "report.json").read_text())
    assert report["smoothing"][expected]["smoothed"]


def test_site_argument_picks_the_site(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path, "stats.safetensors", "report.json")
    paths = write_plots(copy, site="model.decoder.layers.1.fc2")
    assert {p.name for p in paths} == set(PLOTS)


def test_unknown_site_names_it_and_lists_available_sites(run_dir, tmp_path):
    copy = _copy(run_dir, tmp_path, "stats.safetensors", "report.json")
    with pytest.raises(LlmqError, match=r"unknown site 'model.decoder.layers.9.fc2'.*model\.decoder\.layers\.0\.") as err:
        write_plots(copy, site="model.decoder.layers.9.fc2")
    assert isinstance(err.value, ValueError)
    assert not list(copy.glob("*.png"))


@pytest.mark.parametrize("present, missing", [("report.json", "stats.safetensors"), ("stats.safetensors", "report.json")])
def test_missing_input_file_is_a_checkpoint_error_naming_it(run_dir, tmp_path, present, missing):
    copy = _copy(run_dir, tmp_path, present)
    with pytest.raises(CheckpointError, match=f"no {missing} in"):
        write_plots(copy)


def test_no_ppl_plot_without_cluster_sweep(run_dir, tmp_path, caplog):
    copy = _copy(run_dir, tmp_path, "stats.safetensors", "report.json")
    report = json.loads((copy / "report.json").read_text())
    del report["cluster_sweep"]
    (copy / "report.json").write_text(json.dumps(report))
    with caplog.at_level(logging.INFO, logger="llmq_fx.plots"):
        paths = write_plots(copy)
    assert [p.name for p in paths] == ["channel_ranges.png", "clusters.png"]
    assert not (copy / "ppl_vs_clusters.png").exists()
    assert "no cluster_sweep" in caplog.text


def test_inspect_plots_prints_written_paths(run_dir, tmp_path, capsys):
    copy = _copy(run_dir, tmp_path, "stats.safetensors", "report.json")
    assert main(["inspect", str(copy), "--plots"]) == 0
    out = capsys.readouterr().out
    assert all(f"wrote {copy / name}" in out for name in PLOTS)
