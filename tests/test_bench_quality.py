"""bench/quality.py: recipes, rows, tables and the RESULTS.md splice, on the tiny random OPT."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from llmq_fx.config import SITE_ROLES, QuantConfig
from llmq_fx.errors import ConfigError

_PATH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
_spec = importlib.util.spec_from_file_location("bench_quality", _PATH)
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_every_recipe_is_a_valid_config_and_ours_is_the_default():
    for name, recipe in quality.RECIPES.items():
        cfg = quality.resolve_recipe(recipe).to_dict()
        if name == "ours":
            assert cfg == QuantConfig().to_dict()
        else:  # baselines do not inherit methods from the project default
            assert cfg["rotate"] is False and cfg["a_dynamic"] is False and cfg["w_clip"] is False, name
            assert cfg["a_clip_ratio"] == 1.0 and cfg["gptq"] is (name == "RPTQ-style"), name  # RPTQ4LLM uses GPTQ
    rptq = quality.resolve_recipe(quality.RECIPES["RPTQ-style"])
    assert set(rptq.n_clusters) <= set(SITE_ROLES) and rptq.smooth_alpha is None and rptq.cluster_features == "minmax"
    assert quality.resolve_recipe(quality.RECIPES["RTN"]).n_clusters == 1


def test_extra_overrides_the_default_or_a_named_base():
    name, recipe = quality.parse_extra('ours-no-smooth={"smooth_alpha": null}')
    assert name == "ours-no-smooth"
    assert quality.resolve_recipe(recipe).to_dict() == {**QuantConfig().to_dict(), "smooth_alpha": None}
    _, based = quality.parse_extra('rptq-gptq={"base": "RPTQ-style", "gptq": true}')
    cfg = quality.resolve_recipe(based)
    assert cfg.gptq and cfg.n_clusters == quality.RPTQ_CLUSTERS
    with pytest.raises(ConfigError, match="n_cluster"):
        quality.parse_extra('bad={"n_cluster": 4}')
    with pytest.raises(ValueError, match="not JSON"):
        quality.parse_extra("bad={rotate: true}")


def test_rows_float_first_with_pytorch_and_onnxruntime(opt_gm, calib, eval_ids):
    methods = {k: quality.RECIPES[k] for k in ("RTN", "ours")}
    seen = []
    rows = quality.evaluate_methods(opt_gm, calib, eval_ids.reshape(-1), methods, model="tiny", seq_len=20, eval_windows=1,
                                    on_row=lambda r: seen.append(len(r)))
    assert [r["method"] for r in rows] == ["float", "RTN", "ours"] and seen == [1, 2, 3]
    assert not any("error" in r for r in rows)
    assert rows[0]["ratio_to_float"] == 1.0 and rows[0]["config"] is None
    assert math.isclose(rows[0]["ppl_ort"], rows[0]["ppl_torch"], rel_tol=1e-4) and not rows[0]["ort_flag"]
    for r in rows[1:]:
        assert r["quantize_s"] > 0 and r["onnx_bytes"] > 0 and r["eval_tokens"] == 19
        assert r["ort_flag"] == (abs(r["ppl_ort"] / r["ppl_torch"] - 1) > quality.ORT_TOLERANCE)
    assert rows[2]["config"] == QuantConfig().to_dict()


def test_seeded_rows_report_every_text_as_mean_and_range(opt_gm, calib, eval_ids):
    """ours runs once per seed; every text gets mean, per-seed values and range; baselines run once."""
    stream = eval_ids.reshape(-1)
    other = stream.flip(0)
    methods = {k: quality.RECIPES[k] for k in ("RTN", "ours")}
    rows = quality.evaluate_methods(opt_gm, calib, stream, methods, model="tiny", seq_len=20, eval_windows=1, ort=False,
                                    texts={"other": other}, seeds=(0, 1))
    float_row, rtn, ours = rows
    assert "seeds" not in rtn and ours["seeds"] == [0, 1] and len(ours["quantize_s_seeds"]) == 2
    for text in ("eval", "other"):
        t = ours["texts"][text]
        assert len(t["ppl_torch_seeds"]) == 2 and t["ppl_torch_min"] <= t["ppl_torch"] <= t["ppl_torch_max"]
        assert math.isclose(t["ppl_torch"], sum(t["ppl_torch_seeds"]) / 2)
        assert math.isclose(t["ratio_to_float"], t["ppl_torch"] / float_row["texts"][text]["ppl_torch"])
    assert ours["ppl_torch"] == ours["texts"]["eval"]["ppl_torch"]  # the primary text at the top level
    assert ours["texts"]["eval"]["ppl_torch_seeds"][0] != ours["texts"]["eval"]["ppl_torch_seeds"][1]  # the seed matters
    report = {"machine": quality.machine(quality.torch.device("cpu")), "date": "today", "complete": True, "command": "cmd",
              "setup": {"seq_len": 20, "calib_samples": 1, "eval_windows": 1, "texts": ["eval", "other"], "seeds": [0, 1]},
              "recipes": {}, "models": ["tiny"], "model_setup": {}, "rows": rows}
    md = quality.markdown(report)
    t = ours["texts"]["other"]
    assert f"{t['ppl_torch']:.2f} ({t['ppl_torch_min']:.2f}–{t['ppl_torch_max']:.2f})" in md


def test_markdown_flags_and_splice_keeps_other_content(tmp_path):
    row = dict(model="m", method="ours", ppl_torch=20.0, ppl_ort=21.0, ort_vs_torch=0.05, ort_flag=True, ratio_to_float=2.0,
               quantize_s=1.0, onnx_bytes=2**20, eval_tokens=10)
    report = {"machine": quality.machine(quality.torch.device("cpu")), "date": "today", "complete": False, "command": "cmd",
              "setup": {"seq_len": 8, "calib_samples": 1, "eval_windows": 1},
              "recipes": {"ours": {**quality.RECIPES["ours"], "resolved": QuantConfig().to_dict()}},
              "models": ["m"], "model_setup": {}, "rows": [row, dict(model="m", method="RTN", error="ExportError: boom")]}
    md = quality.markdown(report)
    assert "| ours | 20.00 | 21.00 ⚠ +5.0% vs PyTorch | 2.000 | 1.0 | 1.00 |" in md
    assert "| RTN | failed: ExportError: boom |" in md and "incomplete run" in md
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nspeed table\n")
    quality.splice_results_md(path, md)
    quality.splice_results_md(path, "second")
    text = path.read_text()
    assert text.startswith("# Results\n\nspeed table\n") and text.count(quality.BEGIN) == 1 and "second" in text and "⚠" not in text


def test_main_writes_json_md_and_results_section(tmp_path):
    out, results = tmp_path / "q" / "quality", tmp_path / "RESULTS.md"
    rc = quality.main(["--models", "opt-tiny-random", "--recipes", "rtn", "--seq-len", "32", "--calib-samples", "1",
                       "--eval-windows", "1", "--no-ort", "--out", str(out), "--results-md", str(results)])
    assert rc == 0
    data = json.loads(out.with_name("quality.json").read_text())
    assert data["complete"] and [r["method"] for r in data["rows"]] == ["float", "RTN"]
    assert data["rows"][1]["ppl_torch"] > 0 and "ppl_ort" not in data["rows"][1]
    assert "### opt-tiny-random" in results.read_text() and "not run" in out.with_name("quality.md").read_text()


def _bench_readme():
    path = Path(__file__).resolve().parents[1] / "bench" / "readme.py"
    spec = importlib.util.spec_from_file_location("bench_readme", path)
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    return readme


def test_readme_results_table_is_generated_from_the_bench_json():
    """The README's figures are bench/readme.py's output for the committed quality.json, not typed."""
    readme = _bench_readme()
    report = json.loads(readme.QUALITY_JSON.read_text())
    block = readme.current_block()
    assert block == readme.readme_block(report), "README.md results block is stale: run python bench/readme.py"
    ours = next(r for r in report["rows"] if r["model"] == "opt-mini" and r["method"] == "ours")
    assert f"**{ours['ppl_torch']:.2f}**" in block


def test_readme_deployment_table_is_generated_from_the_deploy_json():
    readme = _bench_readme()
    report = json.loads(readme.DEPLOY_JSON.read_text())
    block = readme.current_block(begin=readme.DEPLOY_BEGIN, end=readme.DEPLOY_END)
    assert block == readme.deploy_block(report), "README.md deployment block is stale: run python bench/readme.py"
    ours = next(r for r in report["rows"] if r["row"] == "ours-w4a4" and "mib" in r)
    assert f"{ours['decode_tokens_per_s']:.1f}" in block


@pytest.mark.parametrize("extra, message", [("a16=[16]", "must be an object"), ('a16={"a_group_size": 0}', "a_group_size"),
                                            ('={"a_group_size": 16}', "takes NAME=JSON")])
def test_deploy_extra_rows_are_checked_before_any_work(extra, message, capsys, tmp_path):
    """bench/deploy.py --extra NAME=JSON: a bad row stops the run at once, naming the argument (argparse's exit 2)."""
    path = Path(__file__).resolve().parents[1] / "bench" / "deploy.py"
    spec = importlib.util.spec_from_file_location("bench_deploy", path)
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    with pytest.raises(SystemExit) as exit_info:
        deploy.main(["--models", "opt-mini", "--extra", extra, "--out", str(tmp_path / "d")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
