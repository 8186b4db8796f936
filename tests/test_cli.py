import json

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM, T5Config

from llmq_fx.cli import main
from llmq_fx.errors import CheckpointError
from llmq_fx.models import load_model


def test_quantize_writes_report_and_graph_then_inspect(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["quantize", "--model", "opt-tiny-random", "--out", str(out), "--seq-len", "64", "--calib-samples", "4",
               "--eval", "eval", "--eval-windows", "2", "--no-onnx", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["w_bits"] == 4 and report["calibration"]["tokens"] == 4 * 64
    assert {"rotate", "observe", "gptq", "quantize", "trace"} <= set(report["timings_s"])  # the default recipe
    # Sequential GPTQ calibrates inside its own stage.
    assert report["gptq_sequential"] is True and "calibrate" not in report["timings_s"]
    assert report["peak_rss_mb"] > 0
    assert report["eval"]["float"]["tokens"] == 2 * 63
    assert report["eval"]["quantized"]["ppl"] > 1
    assert "llmq.quantize_dequantize" in (out / "graph.txt").read_text()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.decoder.layers.1.fc2" in table and "lm_head" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "--model", "/no/such/model", "--out", "{tmp}/o"], "no model folder or built-in model named '/no/such/model'"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "/no/such.txt", "--out", "{tmp}/o"], "text file not found: /no/such.txt"),
        (["quantize", "--model", "{tmp}/t5", "--out", "{tmp}/o"], "not a causal language model"),
        (["quantize", "--model", "opt-tiny-random", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/o"], "unknown config key 'n_cluster'"),
        (["quantize", "--model", "opt-tiny-random", "--out", "{tmp}/o", "--eval", "eval", "--cluster-sweep", "1", "4"],
         "--cluster-sweep varies n_clusters of static activations, but the config has a_dynamic: true"),
        (["inspect", "{tmp}/nothing"], "no report.json"),
        (["eval", "--onnx", "{tmp}/missing.onnx"], "ONNX model not found"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    T5Config().save_pretrained(tmp_path / "t5")
    (tmp_path / "bad.yaml").write_text("n_cluster: 8\n")
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("llmq-fx: error:") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("preset", ["opt-125m", "opt-350m"])
def test_loader_reads_real_opt_shaped_folders(tmp_path, preset):
    # The real configs of facebook/opt-125m and opt-350m (no checkpoint can be downloaded here),
    # random-init, saved in float16 as a user's local Hugging Face folder would be.
    cfg = dict(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
               max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True)
    if preset == "opt-350m":
        cfg.update(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                   word_embed_proj_dim=512, do_layer_norm_before=False)
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(**cfg)).half().save_pretrained(tmp_path / preset)
    model, tokenizer = load_model(tmp_path / preset)
    assert isinstance(model, OPTForCausalLM) and tokenizer is None
    assert model.config.hidden_size == cfg["hidden_size"] and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[2, 100, 200]])).logits).all()


def test_folder_without_weights_is_a_clear_error(tmp_path):
    OPTConfig().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)
