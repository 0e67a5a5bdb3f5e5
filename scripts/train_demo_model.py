"""Train the tiny Llama model that ships inside tierkv for `tierkv demo`.

Why this exists: `tierkv demo` must work offline, with no arguments and no download, and
still print text a person can recognise. No public checkpoint is small enough to bundle
(the package keeps the demo under ~10 MB), so we train one from scratch on a corpus every
Python install already has: the docstrings of the standard library. The result speaks a
plausible "docstring English" ("Return the number of ...") after ~25 minutes on two CPU
cores. Everything is rebuilt from scratch by this script; the corpus is never committed.

Output (default `tierkv/demo_model/`): config.json, generation_config.json,
model.safetensors (bf16), tokenizer.json, tokenizer_config.json, special_tokens_map.json,
README.md. The last line printed is a JSON summary.

Usage:  python scripts/train_demo_model.py --minutes 25
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sysconfig
import time
import warnings
from pathlib import Path

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}### Assistant:\n{{ message['content'] }}"
    "{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tierkv/demo_model", help="output directory")
    p.add_argument("--minutes", type=float, default=25.0, help="training wall-clock budget")
    p.add_argument("--max-steps", type=int, default=100_000, help="hard cap on optimizer steps")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; on a CPU shared with other jobs 1 is often faster, "
                        "because oversubscribed OpenMP threads wait on each other")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast mode; auto times a few steps of each and keeps the faster")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args()


# ----------------------------------------------------------------------------- corpus


def file_docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one source file ([] if unreadable)."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=str(path))
    except (UnicodeDecodeError, SyntaxError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.strip()) >= 8:
                docs.append(doc.strip())
    return docs


def build_corpus() -> list[str]:
    """Deduplicated docstrings of the standard library, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            for doc in file_docstrings(Path(dirpath) / name):
                if doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


# -------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab: int):
    """Byte-level BPE; any text round-trips because every byte is in the alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # BOS is prepended by tokenizer.json itself (as Llama 3 files do), so HF and raw
    # `tokenizers` users get the same ids; add_bos_token in tokenizer_config says the same.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                      special_tokens=[(BOS, 0)]),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, min_frequency=2, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer)
    probe = "Return the café — naïve 数据 \t\n x"
    assert tok.token_to_id(BOS) == 0, "special tokens must come first"
    assert tok.decode(tok.encode(probe).ids) == probe, "tokenizer does not round-trip"
    return tok


def save_tokenizer(tok, out: Path, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def encode_corpus(tok, docs: list[str]) -> torch.Tensor:
    """One long stream: <s> doc </s> <s> doc </s> ..., shuffled by document."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    order = list(range(len(docs)))
    random.Random(0).shuffle(order)
    stream: list[int] = []
    for enc in tok.encode_batch([docs[i] for i in order], add_special_tokens=False):
        stream.append(bos)
        stream.extend(enc.ids)
        stream.append(eos)
    return torch.tensor(stream, dtype=torch.long)


# ------------------------------------------------------------------------------ model


def build_model(args, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.hidden,
        intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
        bos_token_id=tok.token_to_id(BOS), eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD), initializer_range=0.02)
    model = LlamaForCausalLM(cfg)
    return model


def batch_of(data: torch.Tensor, args, gen: torch.Generator):
    starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch,), generator=gen)
    x = torch.stack([data[s:s + args.seq_len + 1] for s in starts.tolist()])
    return x[:, :-1], x[:, 1:]


def loss_on(model, x, y, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def time_step(model, x, y, bf16: bool) -> float:
    """Seconds for one forward+backward (no optimizer step, weights untouched)."""
    t0 = time.perf_counter()
    loss_on(model, x, y, bf16).backward()
    return time.perf_counter() - t0


def pick_precision(model, data, args) -> bool:
    """Time fp32 vs bf16 autocast, interleaved and taking the best of each, so that a
    neighbour's burst of CPU use does not decide it."""
    if args.precision != "auto":
        return args.precision == "bf16"
    x, y = batch_of(data, args, torch.Generator().manual_seed(123))
    best = {False: float("inf"), True: float("inf")}
    for i in range(10):
        bf16 = bool(i % 2)
        dt = time_step(model, x, y, bf16)
        if i >= 2:  # first of each is warm-up
            best[bf16] = min(best[bf16], dt)
    model.zero_grad(set_to_none=True)
    print(f"timing: fp32 {best[False]:.3f}s/step, bf16 autocast {best[True]:.3f}s/step",
          flush=True)
    return best[True] < best[False] * 0.9


def lr_at(step: int, frac: float, args) -> float:
    """Linear warm-up, then cosine decay over progress `frac` (time or steps) to 10%."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(model, data, args, bf16: bool) -> tuple[float, int, float]:
    """Train until the time budget or step cap is hit. Returns (loss, steps, seconds)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60.0
    t0, step, ema = time.perf_counter(), 0, None
    model.train()
    while step < args.max_steps:
        elapsed = time.perf_counter() - t0
        if elapsed >= budget:
            break
        frac = max(elapsed / budget, step / args.max_steps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, frac, args)
        x, y = batch_of(data, args, gen)
        loss = loss_on(model, x, y, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % args.log_every == 0:
            print(f"step {step:6d}  loss {ema:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{elapsed / 60:5.1f} min", flush=True)
    return ema, step, time.perf_counter() - t0


# ----------------------------------------------------------------------------- output


def save_model(model, out: Path) -> int:
    from transformers import GenerationConfig

    model = model.to(torch.bfloat16).eval()
    model.config.dtype = "bfloat16"
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    os.chmod(out / "model.safetensors", 0o644)  # written 0600; must be readable once installed
    cfg = model.config
    # transformers 5 writes only `rope_parameters`; keep the classic top-level key as well so
    # readers that expect older Llama config.json files (tierkv.config among them) find it.
    cfg_path = out / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    cfg_json.setdefault("rope_theta", cfg_json.get("rope_parameters", {}).get("rope_theta", 1e4))
    cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                     pad_token_id=cfg.pad_token_id).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def write_readme(out: Path, args, params: int, n_docs: int, n_tokens: int) -> None:
    text = f"""# tierkv demo model

A tiny Llama-architecture language model bundled with tierkv so that `tierkv demo` runs
offline with no arguments. It is not useful for anything except showing that the runtime
works end to end: it writes English-like Python docstring prose and nothing more.

- Architecture: `LlamaForCausalLM`, {args.layers} layers, hidden {args.hidden},
  {args.heads} attention heads / {args.kv_heads} KV heads (GQA), MLP {args.intermediate},
  tied embeddings, bf16 weights, {params:,} parameters.
- Tokenizer: byte-level BPE, {args.vocab} tokens, special tokens `<s>`, `</s>`, `<pad>`.
- Training data: {n_docs:,} deduplicated docstrings ({n_tokens:,} tokens) extracted from the
  Python {sysconfig.get_python_version()} standard library.
- Produced by `scripts/train_demo_model.py` (trained from scratch on CPU, about
  {args.minutes:g} minutes). Re-run that script to reproduce it.

License note: the training text is the docstrings of the Python standard library, which are
distributed under the Python Software Foundation License. The weights are released with
tierkv under its own license.
"""
    (out / "README.md").write_text(text)


def dir_size(out: Path) -> int:
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())


def show_samples(out: Path) -> list[str]:
    """Reload from disk (as a user would) and print greedy and sampled continuations."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    samples = []
    for prompt in ["Return the", "This module provides", "Create a new"]:
        ids = tok(prompt, return_tensors="pt").input_ids
        for sample in (False, True):
            torch.manual_seed(1)
            kw = {"temperature": 0.8, "top_k": 40} if sample else {}
            with torch.no_grad():
                gen = model.generate(ids, max_new_tokens=40, do_sample=sample,
                                     repetition_penalty=1.1 if sample else 1.0,
                                     pad_token_id=tok.pad_token_id, **kw)
            text = tok.decode(gen[0], skip_special_tokens=True)
            samples.append(text)
            print(f"--- {'sampled' if sample else 'greedy '} | {text!r}", flush=True)
    return samples


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = build_corpus()
    chars = sum(len(d) for d in docs)
    print(f"corpus: {len(docs):,} docstrings, {chars:,} characters", flush=True)
    tok = train_tokenizer(docs, args.vocab)
    save_tokenizer(tok, out, max_len=512)
    data = encode_corpus(tok, docs)
    print(f"corpus: {len(data):,} tokens (vocab {tok.get_vocab_size()})", flush=True)

    model = build_model(args, tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters ({n_params * 2 / 1e6:.2f} MB in bf16)", flush=True)
    bf16 = pick_precision(model, data, args)
    print(f"training with {'bf16 autocast' if bf16 else 'fp32'} for up to "
          f"{args.minutes:g} min / {args.max_steps} steps", flush=True)
    loss, steps, seconds = train(model, data, args, bf16)

    save_model(model, out)
    write_readme(out, args, n_params, len(docs), len(data))
    size = dir_size(out)
    print(f"saved to {out} ({size / 1e6:.2f} MB)", flush=True)
    assert size <= 10 * 1024 * 1024, f"demo model directory too large: {size} bytes"
    show_samples(out)
    print(json.dumps({
        "params": n_params, "corpus_docstrings": len(docs), "corpus_tokens": len(data),
        "final_loss": round(loss, 4), "steps": steps, "train_seconds": round(seconds, 1),
        "total_seconds": round(time.perf_counter() - t_start, 1), "size_bytes": size,
        "precision": "bf16" if bf16 else "fp32"}))


if __name__ == "__main__":
    main()
