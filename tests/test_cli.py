import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM, T5Config

import llmq_fx
from llmq_fx.cli import main
from llmq_fx.errors import CheckpointError
from llmq_fx.models import load_model, tiny_opt_config


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
    assert report["recipe"] == llmq_fx.recipe(llmq_fx.QuantConfig()).to_dict()
    assert (out / "graph.pt2").is_file() and (out / "stats.safetensors").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.decoder.layers.1.fc2" in table and "lm_head" in table and "SequentialGPTQPass(" in table

    # The saved graph is evaluated and exported again without recalibrating, with the same figures.
    assert main(["eval", "--graph", str(out), "--seq-len", "64", "--windows", "2", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == report["eval"]["quantized"]["ppl"]
    assert main(["export", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "model.onnx").is_file()
    assert main(["eval", "--onnx", str(out / "model.onnx"), "--seq-len", "64", "--windows", "2", "--quiet"]) == 0
    ort_ppl = json.loads(capsys.readouterr().out)["ppl"]
    assert abs(ort_ppl / report["eval"]["quantized"]["ppl"] - 1) < 0.01


def test_recipe_command_prints_the_passes_before_running_them(tmp_path, capsys):
    assert main(["recipe"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split()[:2] == ["rotate", "RotatePass(seed=0,"] and "SequentialGPTQPass(" in text
    (tmp_path / "static.yaml").write_text("rotate: false\na_dynamic: false\ngptq: false\nsmooth_alpha: 0.5\n")
    assert main(["recipe", "--config", str(tmp_path / "static.yaml"), "--json"]) == 0
    stages = [p["stage"] for p in json.loads(capsys.readouterr().out)]
    assert stages == ["observe", "calibrate", "smooth", "group", "quantize", "embeddings"]


def test_help_states_the_current_default_recipe(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert llmq_fx.recipe().summary() in text and "8 clusters" not in text


@pytest.mark.parametrize("suffix", [".npy", ".pt", ".safetensors"])
def test_token_id_calibration(tmp_path, suffix):
    ids = torch.randint(0, 8192, (4, 32), generator=torch.Generator().manual_seed(0))
    path = tmp_path / f"ids{suffix}"
    if suffix == ".npy":
        np.save(path, ids.numpy())
    elif suffix == ".pt":
        torch.save(ids, path)
    else:
        save_file({"input_ids": ids}, str(path))
    out = tmp_path / "run"
    assert main(["quantize", "--model", "opt-tiny-random", "--calib", str(path), "--out", str(out), "--no-onnx", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"] == {"ids": str(path), "samples": 4, "seq_len": 32, "tokens": 128}
    assert llmq_fx.load(out / "graph.pt2").meta["llmq_fx"]["calib_tokens"] == 128


def test_a_failed_run_leaves_nothing_and_keeps_the_previous_result(tmp_path):
    out = tmp_path / "run"
    args = ["quantize", "--model", "opt-tiny-random", "--out", str(out), "--seq-len", "32", "--calib-samples", "2",
            "--no-onnx", "--quiet"]
    assert main(args) == 0
    before = (out / "report.json").read_text()
    (tmp_path / "g24.json").write_text('{"calib_dtype": "bfloat16"}')  # CUDA only: fails inside quantize(), after the staging folder exists
    assert main(args + ["--config", str(tmp_path / "g24.json")]) == 2
    assert (out / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g24.json", "run"]
    deep = tmp_path / "new" / "deeper" / "run"
    assert main(args[:4] + [str(deep)] + args[5:] + ["--config", str(tmp_path / "g24.json")]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "--model", "/no/such/model", "--out", "{tmp}/o"], "no model folder or built-in model named '/no/such/model'"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "/no/such.txt", "--out", "{tmp}/o"], "text file not found: /no/such.txt"),
        (["quantize", "--model", "{tmp}/t5", "--out", "{tmp}/o"], "not a causal language model"),
        (["quantize", "--model", "opt-tiny-random", "--config", "{tmp}/bad.yaml", "--out", "{tmp}/o"], "unknown config key 'n_cluster'"),
        (["quantize", "--model", "opt-tiny-random", "--out", "{tmp}/o", "--eval", "eval", "--cluster-sweep", "1", "4"],
         "--cluster-sweep varies n_clusters of static activations, but the config has a_dynamic: true"),
        (["quantize", "--model", "opt-tiny-random", "--out", "{tmp}/o", "--host-weights"],
         "--host-weights keeps the model on the host and quantizes it on --device: pass --device cuda"),
        (["quantize", "--model", "opt-mini", "--out", "{tmp}/o", "--weights-dtype", "bfloat16", "--float-onnx"],
         "--float-onnx exports the float model, which --weights-dtype bfloat16 stores narrower"),
        (["quantize", "--model", "opt-tiny-random", "--out", "{tmp}/o", "--weights-dtype", "float32"],
         "built-in model 'opt-tiny-random' has no safetensors folder to read tensor by tensor"),
        (["inspect", "{tmp}/nothing"], "no report.json"),
        (["eval", "--onnx", "{tmp}/missing.onnx"], "ONNX model not found"),
        (["eval", "--graph", "{tmp}"], "graph file not found: {tmp}/graph.pt2"),
        (["export", "{tmp}/nothing.pt2"], "graph file not found: {tmp}/nothing.pt2"),
        (["quantize", "--model", "{tmp}/corrupt", "--out", "{tmp}/o"],
         "corrupt or unreadable weights file {tmp}/corrupt/model.safetensors: Error while deserializing header"),
        (["quantize", "--model", "{tmp}/truncated", "--out", "{tmp}/o"],
         "corrupt or unreadable weights file {tmp}/truncated/model.safetensors: Error while deserializing header: incomplete metadata"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}/latin1.txt", "--out", "{tmp}/o"],
         "text file {tmp}/latin1.txt is not UTF-8: byte 0xe9 at offset 3"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}", "--out", "{tmp}/o"], "{tmp} is a folder, not a text file"),
        (["quantize", "--model", "{tmp}/notok", "--out", "{tmp}/o"], "this model has no tokenizer; pass token ids"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}/float.npy", "--out", "{tmp}/o"],
         "token ids in {tmp}/float.npy must be integers, got torch.float32"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}/flat.npy", "--out", "{tmp}/o"],
         "token ids in {tmp}/flat.npy must be an [N, T] array, got shape (64,)"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}/big.npy", "--out", "{tmp}/o"],
         "token ids in {tmp}/big.npy range over [9000, 9000], outside the model's vocabulary [0, 8192)"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}/garbage.npy", "--out", "{tmp}/o"],
         "{tmp}/garbage.npy is not a NumPy .npy file"),
        (["quantize", "--model", "opt-tiny-random", "--calib", "{tmp}/dict.pt", "--out", "{tmp}/o"],
         "{tmp}/dict.pt must hold one tensor of token ids"),
        (["quantize", "--model", "opt-tiny-random", "--calib-samples", "0", "--out", "{tmp}/o"],
         "calibration needs at least one window of at least one token, got 0 x 512"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    T5Config().save_pretrained(tmp_path / "t5")
    (tmp_path / "bad.yaml").write_text("n_cluster: 8\n")
    torch.manual_seed(0)
    OPTForCausalLM(tiny_opt_config(64)).save_pretrained(tmp_path / "notok")
    data = (tmp_path / "notok" / "model.safetensors").read_bytes()
    for name, content in (("corrupt", b"\xff" * 8 + data[8:]), ("truncated", data[: len(data) // 2])):
        shutil.copytree(tmp_path / "notok", tmp_path / name)
        (tmp_path / name / "model.safetensors").write_bytes(content)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    np.save(tmp_path / "float.npy", np.zeros((4, 16), np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(64, np.int64))
    np.save(tmp_path / "big.npy", np.full((4, 16), 9000, np.int64))
    (tmp_path / "garbage.npy").write_bytes(b"not an array")
    torch.save({"a": torch.zeros(2, 4, dtype=torch.long), "b": torch.zeros(2, 4, dtype=torch.long)}, tmp_path / "dict.pt")
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # the set-up's own progress bars
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # progress bars of a model load may precede
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err
    assert errors[0].startswith("llmq-fx: error:") and message.replace("{tmp}", str(tmp_path)) in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, no output folder left


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


def test_quantize_writes_an_onnxruntime_genai_folder_that_generates(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "--model", "opt-tiny-random", "--out", str(out), "--seq-len", "32", "--calib-samples", "2",
                 "--eval", "eval", "--eval-windows", "2", "--latency-runs", "1", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "graph.pt2"} <= {p.name for p in out.iterdir()}
    assert report["onnx"]["format"] == "fast" and report["onnx"]["matmul_nbits_bits"] == {"4": 12, "8": 1}  # 2 x 6 + lm_head
    assert report["onnx"]["op_types"]["GatherBlockQuantized"] == 1
    # Accuracy level 4 by default: MatMulNBits requantizes its inputs to int8 per block, within 1% of the
    # PyTorch graph's perplexity (the exact level-0 decoder is tested in test_decoder.py)
    assert report["onnx"]["accuracy_level"] == 4
    assert abs(report["eval"]["onnxruntime"]["ppl"] / report["eval"]["quantized"]["ppl"] - 1) < 0.01
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The function", "--max-new-tokens", "8", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The function") and "tokens/s" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["generate", "{tmp}", "--prompt", "hi"], "is not an onnxruntime-genai folder"),
    (["generate", "{run}", "--prompt", ""], "the prompt is empty"),
    (["generate", "{run}", "--prompt", "hi " * 3000], "the model's context is 2048"),
])
def test_generate_errors_are_one_line(tmp_path_factory, capsys, argv, message):
    run = tmp_path_factory.getbasetemp() / "generate_run"
    if not (run / "model.onnx").is_file():
        assert main(["quantize", "--model", "opt-tiny-random", "--out", str(run), "--seq-len", "32",
                     "--calib-samples", "2", "--latency-runs", "0", "--quiet"]) == 0
    empty = tmp_path_factory.mktemp("empty")
    capsys.readouterr()
    rc = main([a.replace("{tmp}", str(empty)).replace("{run}", str(run)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("llmq-fx: error:") and message in err[-1]


def test_checkpoint_route_writes_a_genai_folder_without_a_float_model(tmp_path):
    """--weights-dtype: the folder captured on the meta device, its weights read one tensor at a time in that dtype
    (trace_checkpoint), quantized, and exported as an onnxruntime-genai folder whose decoder was captured on the
    meta device too. In float32 it is the ordinary route's model: the same PyTorch perplexity to the bit; in
    bfloat16 the float model is not evaluated (stored narrower than it computes) and the export computes the
    quantized graph's numbers (accuracy level 0: onnxruntime within 1%)."""
    common = ["--model", "opt-mini", "--seq-len", "64", "--calib-samples", "4", "--eval", "eval", "--eval-windows", "2",
              "--latency-runs", "0", "--quiet"]
    assert main(["quantize", "--out", str(tmp_path / "plain"), "--no-onnx", *common]) == 0
    assert main(["quantize", "--out", str(tmp_path / "f32"), "--no-onnx", "--weights-dtype", "float32", *common]) == 0
    plain, f32 = (json.loads((tmp_path / n / "report.json").read_text())["eval"] for n in ("plain", "f32"))
    assert f32["float"]["ppl"] == plain["float"]["ppl"] and f32["quantized"]["ppl"] == plain["quantized"]["ppl"]
    assert main(["quantize", "--out", str(tmp_path / "bf16"), "--weights-dtype", "bfloat16", "--accuracy-level", "0", *common]) == 0
    report = json.loads((tmp_path / "bf16" / "report.json").read_text())
    assert report["eval"]["float"] is None
    assert abs(report["eval"]["onnxruntime"]["ppl"] / report["eval"]["quantized"]["ppl"] - 1) < 0.01
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "bf16").iterdir()}
    assert report["onnx"]["op_types"].get("GroupQueryAttention", 0) > 0 and report["onnx"]["matmul_nbits"] > 0
