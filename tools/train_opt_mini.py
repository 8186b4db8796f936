#!/usr/bin/env python3
"""Train the built-in ``opt-mini`` model of llmq_fx: a byte-level BPE tokenizer and a
small Hugging Face ``OPTForCausalLM`` trained from scratch (real OPT architecture:
pre-LN, ReLU, learned positions, tied embeddings).

Stages (run in this order; ``tokenizer`` on CPU, ``train`` on a GPU, ``evaluate`` anywhere):

    # 1. byte-level BPE tokenizer (CPU) + pre-tokenized training stream
    python3 tools/train_opt_mini.py tokenizer --train-text /tmp/llmq_corpus/train.txt \
        --out .corpus

    # 2. model training (GPU, bf16 autocast, AdamW, cosine schedule, seq 512)
    python3 tools/train_opt_mini.py train --data .corpus --out $OUT/opt-mini \
        --time-budget 330 --device cuda

    # 3. single-file fp16 model folder with tokenizer + loss curve (the shipped layout)
    python3 tools/train_opt_mini.py package --src <train --out folder> --dst llmq_fx/assets/opt-mini

    # 4. held-out perplexity on llmq_fx/data/eval.txt + activation outlier stats
    python3 tools/train_opt_mini.py evaluate --model llmq_fx/assets/opt-mini --device cpu

Documents in the text files are separated by "\\n\\n\\n" (see tools/build_corpus.py).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_EVAL = os.path.join(REPO, "llmq_fx", "data", "eval.txt")
DEFAULT_CALIB = os.path.join(REPO, "llmq_fx", "data", "calib.txt")
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # ids 0..3, as in OPT's vocabulary
BOS = EOS = 2
PAD = 1


def read_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in f.read().split("\n\n\n") if d.strip()]


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(train_text, out_dir, vocab_size=8192, min_frequency=2):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    docs = read_docs(train_text)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    assert [tok.token_to_id(t) for t in SPECIALS] == [0, 1, 2, 3]
    # like OPT's tokenizer: every encoded text starts with </s>
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", BOS)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=2048, clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    # name the class that both transformers 4.x and 5.x resolve to the fast tokenizer
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return hf


def tokenize_docs(tok, docs):
    """Token stream: for every document ``</s> doc``; returns uint16 numpy array."""
    out = []
    enc = tok.backend_tokenizer if hasattr(tok, "backend_tokenizer") else tok._tokenizer
    B = 256
    for i in range(0, len(docs), B):
        for e in enc.encode_batch(docs[i:i + B], add_special_tokens=False):
            out.append(BOS)
            out.extend(e.ids)
    return np.asarray(out, dtype=np.uint16)


def stage_tokenizer(args):
    t0 = time.time()
    tok_dir = os.path.join(args.out, "tokenizer")
    tok = build_tokenizer(args.train_text, tok_dir, args.vocab_size)
    docs = read_docs(args.train_text)
    rng = random.Random(0)
    idx = list(range(len(docs)))
    rng.shuffle(idx)
    n_val = max(1, int(len(docs) * args.val_frac))
    val_docs = [docs[i] for i in idx[:n_val]]
    trn_docs = [docs[i] for i in idx[n_val:]]
    trn = tokenize_docs(tok, trn_docs)
    val = tokenize_docs(tok, val_docs)
    np.save(os.path.join(args.out, "train_ids.npy"), trn)
    np.save(os.path.join(args.out, "val_ids.npy"), val)
    info = {"train_text": args.train_text, "train_docs": len(trn_docs), "val_docs": len(val_docs),
            "train_tokens": int(trn.size), "val_tokens": int(val.size),
            "train_chars": sum(len(d) for d in trn_docs), "vocab_size": len(tok),
            "seconds": round(time.time() - t0, 1)}
    with open(os.path.join(args.out, "data_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    # sanity: AutoTokenizer loads it offline and round-trips
    from transformers import AutoTokenizer
    at = AutoTokenizer.from_pretrained(tok_dir)
    s = "The quick brown fox: SELECT * FROM t; def f(x): return x\n"
    ids = at(s).input_ids
    assert ids[0] == BOS, ids[:5]
    assert at.decode(ids, skip_special_tokens=True) == s, at.decode(ids)
    print("AutoTokenizer OK:", type(at).__name__, ids[:12])


# ----------------------------------------------------------------------------- model
def make_config(args):
    from transformers import OPTConfig
    assert args.hidden % 64 == 0
    return OPTConfig(
        vocab_size=args.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
        ffn_dim=4 * args.hidden, num_attention_heads=args.hidden // 64,
        max_position_embeddings=args.max_pos, do_layer_norm_before=True,
        word_embed_proj_dim=args.hidden, activation_function="relu", dropout=args.dropout,
        attention_dropout=0.0, layerdrop=0.0, enable_bias=True, layer_norm_elementwise_affine=True,
        tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
        init_std=0.02, use_cache=True,
    )


def lm_loss(model, x):
    """Mean next-token cross entropy of a batch of windows (all positions but the last)."""
    logits = model(input_ids=x).logits.float()
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))


@torch.no_grad()
def stream_loss(model, ids, seq, device, max_windows=None, bs=16, amp=True):
    """Loss over non-overlapping windows of a 1-D token stream."""
    n = ids.numel() // seq
    if max_windows:
        n = min(n, max_windows)
    w = ids[: n * seq].view(n, seq)
    tot, cnt = 0.0, 0
    model.eval()
    for i in range(0, n, bs):
        x = w[i:i + bs].to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=amp and device.type == "cuda"):
            tot += lm_loss(model, x).item() * x.size(0)
        cnt += x.size(0)
    return tot / max(cnt, 1)


def stage_train(args):
    from transformers import OPTForCausalLM, AutoTokenizer
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    env = {"torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"}
    import transformers
    env["transformers"] = transformers.__version__
    print(env, flush=True)

    trn = torch.from_numpy(np.load(os.path.join(args.data, "train_ids.npy")).astype(np.int64))
    val = torch.from_numpy(np.load(os.path.join(args.data, "val_ids.npy")).astype(np.int64))
    tok = AutoTokenizer.from_pretrained(os.path.join(args.data, "tokenizer"))
    args.vocab_size = len(tok)
    cfg = make_config(args)
    model = OPTForCausalLM(cfg).to(dev)
    try:
        model.config._attn_implementation = "sdpa"
    except Exception:
        pass
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}  train tokens {trn.numel():,}  val tokens {val.numel():,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            fused=dev.type == "cuda")
    sched_state = {"total": args.max_steps}

    def lr_at(step):
        total = sched_state["total"]
        warm = max(1, int(args.warmup_frac * total))
        if step < warm:
            return args.lr * (step + 1) / warm
        p = min(1.0, (step - warm) / max(1, total - warm))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * p)))

    fwd = model
    if args.compile:
        try:
            fwd = torch.compile(model)
        except Exception as e:  # pragma: no cover
            print("torch.compile unavailable:", e)
    seq, bs = args.seq_len, args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    max_start = trn.numel() - seq - 1

    def batch():
        st = torch.randint(0, max_start, (bs,), generator=gen)
        x = torch.stack([trn[s:s + seq] for s in st.tolist()])
        return x.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else x

    curve, val_curve = [], []
    best = (float("inf"), None, -1)
    t_start = time.time()
    t_timing = None
    step = 0
    tokens = 0
    x = batch()
    while step < sched_state["total"]:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        model.train()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            try:
                loss = lm_loss(fwd, x)
            except Exception as e:
                if fwd is model:
                    raise
                print("compiled forward failed, falling back to eager:", repr(e)[:300], flush=True)
                fwd = model
                loss = lm_loss(fwd, x)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        x = batch()  # overlap host work with GPU
        step += 1
        tokens += bs * seq
        # after warm-up steps, fit the schedule to the time budget
        if args.time_budget and step == 10:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_timing = time.time()
        if args.time_budget and step == 60 and t_timing is not None:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per = (time.time() - t_timing) / 50
            elapsed = time.time() - t_start
            # leave ~4% for periodic validation
            fit = int(step + (args.time_budget - elapsed) * 0.96 / per)
            sched_state["total"] = max(step + 1, min(args.max_steps, fit))
            print(f"step time {per*1000:.1f} ms -> total steps {sched_state['total']}", flush=True)
        if step % args.log_every == 0 or step == 1:
            l = loss.item()
            rec = {"step": step, "tokens": tokens, "loss": round(l, 4), "lr": lr_at(step - 1),
                   "grad_norm": round(float(gn), 3), "time_s": round(time.time() - t_start, 1)}
            curve.append(rec)
            print(json.dumps(rec), flush=True)
        if step % args.val_every == 0 or step == sched_state["total"]:
            vl = stream_loss(model, val, seq, dev, max_windows=args.val_windows)
            val_curve.append({"step": step, "tokens": tokens, "val_loss": round(vl, 4),
                              "time_s": round(time.time() - t_start, 1)})
            print(json.dumps(val_curve[-1]), flush=True)
            if vl < best[0]:
                best = (vl, {k: v.detach().clone() for k, v in model.state_dict().items()}, step)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    wall = time.time() - t_start
    if best[1] is not None and best[2] != step:
        print(f"restoring best validation checkpoint from step {best[2]}", flush=True)
        model.load_state_dict(best[1])

    out = args.out
    os.makedirs(out, exist_ok=True)
    model.config.dropout = args.dropout
    model_h = model.to(torch.float16)
    model_h.save_pretrained(out, max_shard_size=args.max_shard_size)
    tok.save_pretrained(out)
    model.to(torch.float32)
    summary = {"env": env, "params": n_params, "steps": step, "tokens_seen": tokens,
               "train_wall_s": round(wall, 1), "batch_size": bs, "seq_len": seq,
               "lr": args.lr, "best_val_step": best[2], "best_val_loss": best[0],
               "train_stream_tokens": int(trn.numel()),
               "epochs": round(tokens / trn.numel(), 2), "argv": sys.argv}
    with open(os.path.join(out, "loss_curve.json"), "w") as f:
        json.dump({"train": curve, "val": val_curve, "summary": summary}, f, indent=0)
    print(json.dumps(summary), flush=True)
    if args.eval_after:
        res = evaluate(out, dev, args)
        with open(os.path.join(out, f"eval_{dev.type}.json"), "w") as f:
            json.dump(res, f, indent=1)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def perplexity(model, tok, text_path, dev, seq=512, bs=8):
    """GPTQ-style: encode the whole file once (one leading </s>), cut into non-overlapping
    windows of ``seq`` tokens (remainder dropped), ppl = exp(mean next-token NLL)."""
    text = open(text_path, encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    nll = stream_loss(model, ids, seq, dev, bs=bs, amp=False)
    return {"file": os.path.relpath(text_path, REPO), "tokens": int(ids.numel()),
            "windows": int(ids.numel() // seq), "seq_len": seq, "nll": nll, "ppl": math.exp(nll)}


@torch.no_grad()
def outlier_stats(model, tok, calib_path, dev, n=16, seq=512, seed=0):
    """Per Linear input site, per-channel absmax over n x seq calibration tokens
    (windows drawn with a fixed seed), then max/median of those channel absmaxes."""
    text = open(calib_path, encoding="utf-8").read()
    ids = tok(text, return_tensors="pt").input_ids[0]
    nwin = ids.numel() // seq
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(nwin, generator=g)[:n].sort().values
    x = torch.stack([ids[i * seq:(i + 1) * seq] for i in pick.tolist()])
    layers = model.model.decoder.layers
    acc, hooks = {}, []
    sites = {"qkv_in (self_attn_layer_norm out)": "self_attn.q_proj", "out_proj_in": "self_attn.out_proj",
             "fc1_in (final_layer_norm out)": "fc1", "fc2_in": "fc2"}
    for li, layer in enumerate(layers):
        for site, name in sites.items():
            mod = layer.get_submodule(name)

            def hook(m, inp, out, key=(site, li)):
                a = inp[0].detach().float().abs().reshape(-1, inp[0].shape[-1]).amax(0)
                acc[key] = torch.maximum(acc[key], a) if key in acc else a
            hooks.append(mod.register_forward_hook(hook))
    model.eval()
    for i in range(0, n, 4):
        model(input_ids=x[i:i + 4].to(dev))
    for h in hooks:
        h.remove()
    table = {}
    for site in sites:
        rows = []
        for li in range(len(layers)):
            a = acc[(site, li)]
            med = a.median().item()
            rows.append({"layer": li, "absmax": a.max().item(), "median": med,
                         "ratio": a.max().item() / max(med, 1e-12),
                         "top_channel": int(a.argmax())})
        ratios = [r["ratio"] for r in rows]
        worst = max(rows, key=lambda r: r["ratio"])
        table[site] = {"mean_ratio": sum(ratios) / len(ratios), "worst_layer": worst["layer"],
                       "worst_ratio": worst["ratio"], "worst_absmax": worst["absmax"],
                       "per_layer": rows}
    return {"file": os.path.relpath(calib_path, REPO), "windows": n, "seq_len": seq,
            "seed": seed, "sites": table}


def evaluate(model_dir, dev, args):
    from transformers import AutoTokenizer, OPTForCausalLM
    model = OPTForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    tok = AutoTokenizer.from_pretrained(model_dir)
    res = {"model": model_dir, "device": str(dev), "dtype": "float32 (from fp16 weights)",
           "params": sum(p.numel() for p in model.parameters())}
    res["eval"] = perplexity(model, tok, args.eval_text, dev, seq=args.seq_len)
    print("eval:", json.dumps(res["eval"]), flush=True)
    res["outliers"] = outlier_stats(model, tok, args.calib_text, dev, n=args.calib_windows, seq=args.seq_len)
    for site, v in res["outliers"]["sites"].items():
        print(f"{site:34s} mean max/median {v['mean_ratio']:8.2f}  worst L{v['worst_layer']} "
              f"{v['worst_ratio']:8.2f} (absmax {v['worst_absmax']:.2f})", flush=True)
    return res


def stage_evaluate(args):
    res = evaluate(args.model, torch.device(args.device), args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def stage_package(args):
    """Re-save a (possibly sharded) trained folder as one float16 model.safetensors and add
    the tokenizer files and the loss curve: the shipped llmq_fx/assets/opt-mini layout."""
    import shutil
    from transformers import OPTForCausalLM
    os.makedirs(args.dst, exist_ok=True)
    m = OPTForCausalLM.from_pretrained(args.src, dtype=torch.float16)
    m.save_pretrained(args.dst)  # default shard size: a single model.safetensors
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, f), os.path.join(args.dst, f))
    shutil.copy(os.path.join(args.src, "loss_curve.json"), os.path.join(args.dst, "loss_curve.json"))
    for f in os.listdir(args.dst):
        os.chmod(os.path.join(args.dst, f), 0o644)
    print("packaged", sorted(os.listdir(args.dst)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    t = sub.add_parser("tokenizer", help="train the BPE tokenizer and pre-tokenize the corpus (CPU)")
    t.add_argument("--train-text", default="/tmp/llmq_corpus/train.txt")
    t.add_argument("--out", default=".corpus")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--val-frac", type=float, default=0.01, help="train docs held out for validation")

    def common(p):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--seq-len", type=int, default=512)
        p.add_argument("--eval-text", default=DEFAULT_EVAL)
        p.add_argument("--calib-text", default=DEFAULT_CALIB)
        p.add_argument("--calib-windows", type=int, default=16)

    r = sub.add_parser("train", help="train the model (GPU)")
    common(r)
    r.add_argument("--data", default=".corpus", help="output folder of the tokenizer stage")
    r.add_argument("--out", required=True)
    r.add_argument("--hidden", type=int, default=256)
    r.add_argument("--layers", type=int, default=8)
    r.add_argument("--max-pos", type=int, default=2048)
    r.add_argument("--dropout", type=float, default=0.1)
    r.add_argument("--vocab-size", type=int, default=8192)
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--min-lr-frac", type=float, default=0.1)
    r.add_argument("--wd", type=float, default=0.1)
    r.add_argument("--warmup-frac", type=float, default=0.02)
    r.add_argument("--clip", type=float, default=1.0)
    r.add_argument("--max-steps", type=int, default=100000)
    r.add_argument("--time-budget", type=float, default=0, help="seconds of training; fits the cosine schedule")
    r.add_argument("--log-every", type=int, default=50)
    r.add_argument("--val-every", type=int, default=500)
    r.add_argument("--val-windows", type=int, default=64)
    r.add_argument("--compile", action="store_true")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-shard-size", default="15MB")
    r.add_argument("--eval-after", action="store_true", help="ppl + outlier stats after training")

    e = sub.add_parser("evaluate", help="held-out perplexity + activation outlier stats")
    common(e)
    e.add_argument("--model", default=os.path.join(REPO, "llmq_fx", "assets", "opt-mini"))
    e.add_argument("--json", default=None)
    k = sub.add_parser("package", help="write the shipped single-file fp16 model folder")
    k.add_argument("--src", required=True, help="output folder of the train stage")
    k.add_argument("--tokenizer", default=".corpus/tokenizer")
    k.add_argument("--dst", default=os.path.join(REPO, "llmq_fx", "assets", "opt-mini"))
    args = ap.parse_args(argv)
    {"tokenizer": stage_tokenizer, "train": stage_train, "evaluate": stage_evaluate,
     "package": stage_package}[args.stage](args)


if __name__ == "__main__":
    main()
