"""Train quire's shipped default model from the Python standard library, on CPU, offline.

    python scripts/train_default_model.py --threads 2      # writes cluster/assets/default-model

Data: the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``): its
source files, their docstrings, and chat examples made from them (see
``scripts/default_model_corpus.py`` for the exact rule, including the held-out files). That
text is under the Python Software Foundation License (PSF License Agreement), which permits
derived works; the model card written beside the weights says so. Nothing is downloaded.

Output (``--out``): a Hugging Face Llama checkpoint with weights in bfloat16
(config.json, generation_config.json, model.safetensors), its byte-level BPE tokenizer with
quire's chat template (tokenizer.json, tokenizer_config.json, ...), README.md (the model
card) and training.json (seed, steps, tokens seen, parameters, threads, wall time, final
train loss, held-out loss and perplexity, corpus and Python version).

Determinism: for a given Python (its stdlib is the data), library versions, seed and
``--threads``, the output is identical: files are read in sorted order, documents shuffled
with ``random.Random(seed)``, batches drawn with a seeded ``torch.Generator``, weights
initialised after ``torch.manual_seed(seed)``, and torch runs on exactly ``--threads``
threads (the reduction order of CPU kernels depends on it). The run length is a fixed number
of steps, never a wall-clock budget. The defaults are sized to take about 40 minutes on two
CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import platform
import random
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "cluster" / "assets" / "default-model"


def load_corpus_module():
    """scripts/default_model_corpus.py, imported by path (scripts/ is not a package)."""
    path = pathlib.Path(__file__).resolve().with_name("default_model_corpus.py")
    spec = importlib.util.spec_from_file_location("default_model_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory (replaced files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (part of what determines the result)")
    p.add_argument("--steps", type=int, default=2300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--tie-embeddings", action="store_true", help="share input and output embeddings")
    p.add_argument("--max-files", type=int, default=None, help="train on the first N training files only (tests)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows of --seq-len tokens scored")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args(argv)
    if args.threads < 1 or args.steps < 1 or args.hidden_size % args.heads or args.heads % args.kv_heads:
        p.error("need --threads, --steps >= 1, --hidden-size divisible by --heads, --heads by --kv-heads")
    return args


def encode_documents(tokenizer, docs) -> list[int]:
    """One token stream: each plain document as BOS + text + EOS (as a completion prompt is
    encoded when served), each chat document as rendered (its template already holds BOS/EOS,
    and the server encodes chat text without adding special tokens)."""
    backend = tokenizer.backend_tokenizer
    plain = backend.encode_batch([d.text for d in docs if d.kind != "chat"], add_special_tokens=False)
    chat = backend.encode_batch([d.text for d in docs if d.kind == "chat"], add_special_tokens=False)
    plain_it, chat_it = iter(plain), iter(chat)
    stream: list[int] = []
    for doc in docs:
        if doc.kind == "chat":
            stream.extend(next(chat_it).ids)
        else:
            stream.append(tokenizer.bos_token_id)
            stream.extend(next(plain_it).ids)
            stream.append(tokenizer.eos_token_id)
    return stream


def lr_at(step: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay to a tenth of it at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def held_out_loss(model, stream, seq_len: int, windows: int) -> tuple[float, int]:
    """Mean next-token loss over up to `windows` evenly spaced, non-overlapping windows of the
    held-out stream, and the number of tokens scored."""
    import torch
    import torch.nn.functional as F

    count = min(windows, (len(stream) - 1) // (seq_len + 1))
    if count < 1:
        return float("nan"), 0
    stride = (len(stream) - 1) // count
    total, scored = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(count):
            window = stream[i * stride: i * stride + seq_len + 1].unsqueeze(0)
            logits = model(input_ids=window[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), window[:, 1:].reshape(-1),
                                   reduction="sum")
            total += loss.item()
            scored += seq_len
    model.train()
    return total / scored, scored


def model_card(report: dict) -> str:
    held = report["held_out"]
    m = report["model"]
    return f"""# quire default model

A small Llama-architecture language model ({report['parameters'] / 1e6:.1f}M parameters, bfloat16,
vocabulary {m['vocab_size']}) that quire serves when no model is given. It was trained from
scratch on CPU by `scripts/train_default_model.py` (seed {report['seed']}, {report['steps']} steps,
{report['tokens_seen'] / 1e6:.1f}M tokens, {report['threads']} threads, {report['wall_time_s'] / 60:.0f} minutes).

**Data**: the standard library of Python {report['python_version']}: source code, docstrings
and comments, plus chat examples (a question about a module, class or function answered with
its docstring). Test suites are excluded. That text is distributed under the Python Software
Foundation License (PSF License Agreement). {held['files']} whole files ({held['rule']}) were held out:
held-out loss {held['loss']:.3f}, perplexity {held['perplexity']:.1f}.

**What it does**: continues text in the style of Python's documentation and code, and answers
chat messages in the style of a docstring.

**What it is not for**: facts, reasoning, correct code, or anything beyond a demonstration
that quire serves a real model offline. It knows only the standard library's text, makes
things up, and has seen no instruction tuning or safety training.
"""


def main(argv: list[str] | None = None) -> dict:
    """Train and write the checkpoint (see the module docstring); returns training.json's content."""
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import tokenizers
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from quire.cluster.tools.default_model import train_tokenizer

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    corpus = load_corpus_module()
    train_files, held_files = corpus.split_files(args.max_files)
    docs = corpus.documents(train_files, args.seed)
    random.Random(args.seed).shuffle(docs)  # mix files, docstrings and chats before packing
    tokenizer = train_tokenizer((d.text for d in docs), args.vocab_size)
    stream = torch.tensor(encode_documents(tokenizer, docs), dtype=torch.long)
    held_docs = [corpus.Document("source", text) for _, text in held_files]
    held_stream = torch.tensor(encode_documents(tokenizer, held_docs), dtype=torch.long)
    kinds = {k: sum(d.kind == k for d in docs) for k in ("source", "doc", "chat")}
    print(f"[train] {len(train_files)} training files ({kinds}), {len(stream):,} tokens; "
          f"{len(held_files)} held-out files, {len(held_stream):,} tokens; vocab {len(tokenizer)}", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq_len), rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=args.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(torch.float32).train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    batches = torch.Generator().manual_seed(args.seed)
    high = len(stream) - args.seq_len - 1
    if high < 1:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one window of --seq-len {args.seq_len}")
    losses, curve = [], []
    train_started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        starts = torch.randint(0, high, (args.batch_size,), generator=batches)
        batch = torch.stack([stream[s: s + args.seq_len + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            window = losses[-args.log_every:]
            curve.append([step + 1, round(sum(window) / len(window), 4)])
            rate = (step + 1) * args.batch_size * args.seq_len / (time.perf_counter() - train_started)
            print(f"[train] step {step + 1}/{args.steps} loss {curve[-1][1]:.3f} {rate:,.0f} tokens/s", flush=True)
    train_seconds = time.perf_counter() - train_started
    eval_loss, eval_tokens = held_out_loss(model, held_stream, args.seq_len, args.eval_windows)

    args.out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "training.json"):
        (args.out / stale).unlink(missing_ok=True)
    model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    tail = losses[-min(len(losses), args.log_every):]
    report = {
        "seed": args.seed, "steps": args.steps, "threads": args.threads,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup_steps": args.warmup_steps,
        "tokens_seen": args.steps * args.batch_size * args.seq_len, "parameters": params,
        "model": {"vocab_size": len(tokenizer), "hidden_size": args.hidden_size,
                  "intermediate_size": args.intermediate_size, "layers": args.layers, "heads": args.heads,
                  "kv_heads": args.kv_heads, "tied_embeddings": args.tie_embeddings},
        "initial_train_loss": round(losses[0], 4), "final_train_loss": round(sum(tail) / len(tail), 4),
        "loss_curve": curve,
        "held_out": {"loss": round(eval_loss, 4), "perplexity": round(math.exp(eval_loss), 3),
                     "tokens": eval_tokens, "files": len(held_files),
                     "rule": f"SHA-256 of the stdlib-relative path in the lowest {corpus.HELD_OUT_PERCENT}% "
                             "of 100 buckets"},
        "corpus": {"description": "Python standard library source, docstrings and docstring chat examples "
                                  "(PSF License); test suites excluded",
                   "training_files": len(train_files), "documents": kinds, "tokens": len(stream),
                   "max_files": args.max_files},
        "python_version": platform.python_version(), "torch_version": torch.__version__,
        "transformers_version": transformers.__version__, "tokenizers_version": tokenizers.__version__,
        "train_seconds": round(train_seconds, 1), "wall_time_s": round(time.perf_counter() - started, 1),
        "tokens_per_second": round(args.steps * args.batch_size * args.seq_len / train_seconds, 1),
    }
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(report))
    for path in args.out.iterdir():  # safetensors writes owner-only files; package data must be readable by all
        path.chmod(0o644)
    print(f"[train] wrote {args.out}: held-out loss {eval_loss:.3f} (perplexity {math.exp(eval_loss):.1f}), "
          f"{report['wall_time_s'] / 60:.1f} min", flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
