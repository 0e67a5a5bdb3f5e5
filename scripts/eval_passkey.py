"""Passkey retrieval on a real model: does sparse KV find what exact attention finds?

Why this script exists: ``eval_kv_selection.py`` measures the importance estimator on synthetic
and captured queries; this one asks the end-to-end question on any Hugging Face Llama/Qwen
directory (or ``demo``). Quest-style prompts (as in Landmark Attention and Quest): a task line,
filler text (one neutral paragraph repeated), "The pass key is NNNNN. Remember it. NNNNN is the
pass key." at a depth of the prompt, and "What is the pass key? The pass key is" at the end; token
ids are joined piece by piece, so every prompt has exactly the target length and the key sits at a
sentence boundary nearest the asked depth. No chat template.

Quest's protocol (``--question decode``, the default): the context up to the question is
prefilled, then each question token is fed as one decode step (a session turn of one token, the
sampled reply dropped with ``Session.keep``), then greedy generation. So sparse selection runs
for the question and the answer, not only for the answer; ``stats.kv["decode_steps"]`` counts
len(question) + new tokens - 1 steps. ``--question prefill`` feeds the whole prompt as one
prefill (the engine's ordinary path: only the generated tokens attend sparsely).

Runs: exact (``kv="exact"``, resident) is the reference; each (budget, estimator) runs with
``kv="sparse"``, ``kv_budget=b``, ``kv_sketch=True`` ("sketch": token-level bound from 2-bit key
codes) or False ("bound": the chunk min/max bound alone). With ``--device-kv-tokens`` (and
``--host-kv-tokens``, ``--offload-dir``) the "spilled" placement runs exact and every sparse
setting again with a device KV room of that many tokens (KV beyond goes to host memory, then
disk): placement must not change the answer. One engine per setting; the same prompts for all.

Per (length, depth, setting): correct (the generated text contains the key's digits), answers
equal to exact (the first number in the text, else its first line), all new tokens equal to
exact, for spilled runs all new tokens equal to the same setting resident, the token share sparse
steps selected and the share of decode layer-steps that ran sparse (a setting whose key sketch ran
off, and the spilled rooms, are named under the table). A human table per question mode, then one
JSON line (totals, rows, and every run with its text, KV stats and times).

Usage: python scripts/eval_passkey.py MODEL_DIR [--lengths 1024,2048,4096,7168] [--depths 0.1,0.5,0.9]
       [--budgets 0.05,0.1,0.2] [--estimators sketch,bound] [--trials 1] [--device cpu] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tierkv from this checkout, installed or not
from bench_common import emit_json  # noqa: E402

import tierkv  # noqa: E402
from tierkv.config import ModelConfig, Policy  # noqa: E402
from tierkv.engine import model_path  # noqa: E402
from tierkv.io.checkpoint import resolve_dtype  # noqa: E402
from tierkv.pipeline.kv import kv_bytes_per_token  # noqa: E402
from tierkv.plan import kv_stored_bytes_per_token, layer_sizes, plan_device, prepared_sizes, reserve_bytes  # noqa: E402

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
ESTIMATORS = {"sketch": True, "bound": False}     # --estimators name -> kv_sketch
QUESTION_MODES = ("decode", "prefill")


# -- prompts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pieces:
    """Token ids of the prompt's fixed parts under one tokenizer (each sentence with its leading space)."""

    bos: tuple[int, ...]
    task: tuple[int, ...]
    sentences: tuple[tuple[int, ...], ...]
    question: tuple[int, ...]
    encode: Callable[[str], tuple[int, ...]]


def tokenize_pieces(tokenizer: Any) -> Pieces:
    """The prompt's parts as token ids; BOS is whatever ``tokenizer.encode`` prepends for this model."""
    def enc(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    with_bos, bare = tokenizer.encode("x"), tokenizer.encode("x", add_special_tokens=False)
    bos = tuple(with_bos[:len(with_bos) - len(bare)])
    return Pieces(bos, enc(TASK), tuple(enc(" " + s) for s in FILLER), enc(" " + QUESTION), enc)


@dataclass(frozen=True)
class Prompt:
    """One passkey prompt: ``context`` is prefilled, ``question`` ends it (fed as decode steps in Quest's protocol)."""

    length: int
    depth: float
    trial: int
    key: int
    context: tuple[int, ...]
    question: tuple[int, ...]
    needle_start: int             # token position of the key sentence's first token
    needle_tokens: int

    @property
    def ids(self) -> list[int]:
        return [*self.context, *self.question]


def passkey(seed: int, length: int, depth: float, trial: int) -> int:
    """A 5-digit key, the same for every setting (and every run) of one (seed, length, depth, trial)."""
    return random.Random(f"passkey/{seed}/{length}/{depth}/{trial}").randint(10000, 99999)


def filler_tokens(sentences: Sequence[Sequence[int]], n: int) -> tuple[list[int], list[int]]:
    """``n`` tokens of the filler paragraph repeated (the last sentence cut) and the sentence starts in them."""
    out: list[int] = []
    starts: list[int] = []
    i = 0
    while len(out) < n:
        starts.append(len(out))
        out.extend(sentences[i % len(sentences)])
        i += 1
    if len(out) == n:
        starts.append(n)          # the needle may follow the last whole sentence
    return out[:n], starts


def build_prompt(pieces: Pieces, length: int, depth: float, key: int, trial: int = 0) -> Prompt:
    """A prompt of exactly ``length`` tokens: BOS, task, filler with the key sentence starting at the
    sentence boundary nearest ``depth * length``, then the question."""
    head = (*pieces.bos, *pieces.task)
    needle = pieces.encode(" " + NEEDLE.format(key=key))
    room = length - len(head) - len(needle) - len(pieces.question)
    if room < 0:
        raise ValueError(f"a {length}-token prompt cannot hold the task, the key sentence and the question "
                         f"({length - room} tokens); use --lengths of at least {length - room}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is not a fraction of the prompt; use values in [0, 1]")
    stream, starts = filler_tokens(pieces.sentences, room)
    before = min(starts, key=lambda s: (abs(len(head) + s - depth * length), s))
    context = (*head, *stream[:before], *needle, *stream[before:])
    assert len(context) + len(pieces.question) == length
    return Prompt(length, depth, trial, key, context, pieces.question, len(head) + before, len(needle))


def build_prompts(tokenizer: Any, lengths: Iterable[int], depths: Iterable[float], trials: int,
                  seed: int) -> list[Prompt]:
    pieces = tokenize_pieces(tokenizer)
    return [build_prompt(pieces, n, d, passkey(seed, n, d, t), t)
            for n in lengths for d in depths for t in range(trials)]


# -- runs ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """One engine setting: exact, or sparse at a budget with an estimator; resident or spilled KV."""

    kv: str                           # "exact" | "sparse"
    budget: float | int | None = None  # kv_budget: a fraction (< 1) of the context or a token count
    estimator: str | None = None      # "sketch" | "bound" (ESTIMATORS)
    placement: str = "resident"       # "resident" | "spilled"

    @property
    def name(self) -> str:
        base = "exact" if self.kv == "exact" else f"sparse {budget_label(self.budget)} {self.estimator}"
        return base if self.placement == "resident" else f"{base} @spilled"

    def load_kwargs(self) -> dict[str, Any]:
        if self.kv == "exact":
            return {"kv": "exact"}
        return {"kv": "sparse", "kv_budget": self.budget, "kv_sketch": ESTIMATORS[self.estimator]}


def budget_label(budget: float | int | None) -> str:
    return f"{budget:.0%}" if isinstance(budget, float) and budget <= 1 else f"{budget}tok"


@dataclass(frozen=True)
class Settings:
    """What every run shares: generation, the question protocol, the engine options, the spilled placement."""

    new_tokens: int = 8
    questions: tuple[str, ...] = ("decode",)
    ignore_eos: bool = False
    device: str | None = None
    dtype: str | None = None
    prefill_chunk_tokens: int | None = 512   # fixed for every run: placement must be the only difference
    chunk_tokens: int | None = None          # None: adaptive per layer
    device_kv_tokens: int | None = None      # the spilled placement's device KV room (tokens)
    host_kv_tokens: int = 0                  # its host KV room (tokens); the rest goes to offload_dir
    offload_dir: str | None = None


def configs_for(budgets: Iterable[float | int], estimators: Iterable[str], placements: Iterable[str]) -> list[RunConfig]:
    """Exact resident first (the reference), then per placement: exact (spilled only) and every sparse setting."""
    out = [RunConfig("exact")]
    for place in placements:
        if place != "resident":
            out.append(RunConfig("exact", placement=place))
        out += [RunConfig("sparse", b, e, place) for b in budgets for e in estimators]
    return out


def engine_kwargs(model: str | Path, cfg: RunConfig, s: Settings) -> dict[str, Any]:
    """``tierkv.load`` arguments of one setting; the spilled placement sizes the budgets with the planner's
    own reserve: every layer on the device, a KV room of ``device_kv_tokens``, ``host_kv_tokens`` on the host."""
    kw: dict[str, Any] = dict(device=s.device, dtype=s.dtype, prefill_chunk_tokens=s.prefill_chunk_tokens,
                              chunk_tokens=s.chunk_tokens, **cfg.load_kwargs())
    if cfg.placement == "resident":
        return kw
    if s.device_kv_tokens is None:
        raise ValueError("the spilled placement needs --device-kv-tokens (and --host-kv-tokens, --offload-dir)")
    conf = ModelConfig.from_dir(model_path(model))
    policy = Policy(**{k: kw[k] for k in ("device", "dtype", "prefill_chunk_tokens", "chunk_tokens", "kv")},
                    kv_budget=kw.get("kv_budget", 0.05), kv_sketch=kw.get("kv_sketch"),
                    kv_device_tokens=s.device_kv_tokens)
    dtype, device_type = resolve_dtype(s.dtype, conf.dtype), plan_device(policy).type
    layer, globals_ = layer_sizes(conf, dtype, None, device_type)
    layer_extra, globals_extra = prepared_sizes(conf, dtype, None, device_type)
    device_mem = globals_ + globals_extra + conf.num_layers * (layer + layer_extra) + \
        reserve_bytes(conf, dtype, policy, s.device_kv_tokens, 1)
    host_mem = s.host_kv_tokens * kv_stored_bytes_per_token(conf, dtype, policy)
    return dict(kw, kv_device_tokens=s.device_kv_tokens, device_mem=device_mem, host_mem=host_mem,
                offload_dir=s.offload_dir)


def kv_rooms(engine: tierkv.Engine) -> dict[str, Any]:
    """The KV rooms the plan left (tokens of one sequence) and whether every layer stayed on the device."""
    plan = engine.plan
    if plan is None:
        return {}
    per_token = kv_bytes_per_token(engine.config, engine.dtype)
    return {"device_kv_tokens": plan.kv_device_bytes // per_token, "host_kv_tokens": plan.kv_host_tokens,
            "layers_on_device": len(plan.device_layers) == engine.config.num_layers}


@dataclass
class Answer:
    """What one run generated, its KV stats (the last turn's, cumulative over the cache) and its times."""

    token_ids: list[int]
    text: str
    kv: dict[str, Any] = field(default_factory=dict)
    prefill_s: float = 0.0
    question_s: float = 0.0
    generate_s: float = 0.0


def answer_decode(engine: tierkv.Engine, p: Prompt, s: Settings) -> Answer:
    """Quest's protocol: prefill ``p.context``, feed each question token as one decode step, generate.

    The first turn's capacity is asked for the whole run (so its cache is never replaced) and it is
    cancelled after its first sample; that sample and each question turn's are dropped with
    ``Session.keep`` (never fed), so the cache holds exactly the prompt and the answer."""
    q = p.question
    with engine.session() as sess:
        t0 = time.perf_counter()
        first = sess.stream(list(p.context), max_new_tokens=len(q) + s.new_tokens, temperature=0.0)
        next(first)
        first.cancel()
        for _ in first:
            pass
        sess.keep(len(p.context))
        t1 = time.perf_counter()
        for tok in q[:-1]:
            sess.generate([tok], max_new_tokens=1, temperature=0.0)
            sess.keep(len(sess.token_ids) - 1)
        t2 = time.perf_counter()
        out = sess.generate([q[-1]], max_new_tokens=s.new_tokens, temperature=0.0, ignore_eos=s.ignore_eos)
        t3 = time.perf_counter()
    return Answer(out.token_ids, out.text, dict(out.stats.kv), t1 - t0, t2 - t1, t3 - t2)


def answer_prefill(engine: tierkv.Engine, p: Prompt, s: Settings) -> Answer:
    """The engine's ordinary path: the whole prompt prefilled, only the new tokens decode."""
    out = engine.generate(p.ids, max_new_tokens=s.new_tokens, temperature=0.0, ignore_eos=s.ignore_eos)
    return Answer(out.token_ids, out.text, dict(out.stats.kv), out.stats.prefill_s, 0.0, out.stats.decode_s)


ANSWER = {"decode": answer_decode, "prefill": answer_prefill}


# -- scoring -------------------------------------------------------------------------------------

def answer_of(text: str) -> str:
    """The answer a reader takes from generated text: its first number, else its first non-empty line."""
    number = re.search(r"\d+", text)
    if number:
        return number.group(0)
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def score(p: Prompt, got: Answer, ref: Answer) -> dict[str, Any]:
    """correct: the text holds the key's digits; agreement with the exact reference: answer and all tokens."""
    return {"correct": str(p.key) in got.text, "answer": answer_of(got.text),
            "answer_agree": answer_of(got.text) == answer_of(ref.text), "tokens_agree": got.token_ids == ref.token_ids}


def kv_summary(kv: dict[str, Any], layers: int) -> dict[str, Any]:
    """The KV stats a passkey row reports (a resident exact cache reports none)."""
    if not kv:
        return {}
    steps, sparse = kv.get("decode_steps", 0), kv.get("sparse_layer_steps", 0)
    keys = ("decode_steps", "sparse_layer_steps", "exact_layer_steps", "selected_fraction", "sketch", "chunk_tokens",
            "host_bytes", "disk_bytes", "estimator_s", "sparse_overflow_steps")
    return {**{k: kv.get(k) for k in keys}, "sparse_step_share": sparse / (steps * layers) if steps else None}


def run_config(engine: tierkv.Engine, cfg: RunConfig, prompts: Sequence[Prompt], s: Settings,
               answers: dict[tuple[RunConfig, int, str], Answer], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Every prompt under every question mode on one engine. ``answers`` holds every run so far, keyed by
    (setting, prompt, mode): the exact resident one is the reference; a spilled run is also compared
    with the same setting resident (placement must not change the tokens)."""
    rooms, out = kv_rooms(engine), []
    for i, p in enumerate(prompts):
        for mode in s.questions:
            got = answers[cfg, i, mode] = ANSWER[mode](engine, p, s)
            resident = answers.get((replace(cfg, placement="resident"), i, mode))
            rec = {"config": cfg.name, "kv_mode": cfg.kv, "budget": cfg.budget, "estimator": cfg.estimator,
                   "placement": cfg.placement, "question": mode, "length": p.length, "depth": p.depth,
                   "trial": p.trial, "key": p.key, "needle_start": p.needle_start, "text": got.text,
                   "new_tokens": len(got.token_ids), **score(p, got, answers[RunConfig("exact"), i, mode]),
                   "tokens_agree_resident": None if cfg.placement == "resident" or resident is None
                   else got.token_ids == resident.token_ids,
                   "kv": kv_summary(got.kv, engine.config.num_layers), "rooms": rooms,
                   "prefill_s": round(got.prefill_s, 3), "question_s": round(got.question_s, 3),
                   "generate_s": round(got.generate_s, 3)}
            out.append(rec)
            log(f"{cfg.name:<26} {mode:<7} len={p.length} depth={p.depth:.2f} trial={p.trial}: "
                f"{'found' if rec['correct'] else 'missed'}{'' if rec['tokens_agree'] else ' (differs from exact)'} "
                f"{got.text!r}")
    return out


def evaluate(model: str | Path, configs: Sequence[RunConfig], lengths: Sequence[int], depths: Sequence[float],
             trials: int, seed: int, s: Settings, log: Callable[[str], None] = lambda m: None) -> list[dict[str, Any]]:
    """Load each setting once and run every prompt; the prompts come from the first engine's tokenizer.
    ``configs[0]`` must be the reference the others are compared with: exact, resident."""
    assert configs and configs[0] == RunConfig("exact"), "the first setting is the exact resident reference"
    prompts: list[Prompt] | None = None
    answers: dict[tuple[RunConfig, int, str], Answer] = {}
    records: list[dict[str, Any]] = []
    for cfg in configs:
        with tierkv.load(model, **engine_kwargs(model, cfg, s)) as engine:
            if prompts is None:
                prompts = make_prompts(engine, lengths, depths, trials, seed, s.new_tokens)
            records += run_config(engine, cfg, prompts, s, answers, log)
    return records


def make_prompts(engine: tierkv.Engine, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int,
                 new_tokens: int) -> list[Prompt]:
    """The prompts under the engine's tokenizer, refused when a length leaves no room for the answer."""
    if engine.tokenizer is None:
        raise ValueError(f"{engine.model_dir} has no tokenizer.json: passkey prompts are text")
    limit = engine.context_limit_tokens
    too_long = [n for n in lengths if n + new_tokens - 1 > limit]
    if too_long:
        raise ValueError(f"--lengths {too_long} plus {new_tokens} new tokens exceed the model's context of {limit} "
                         f"tokens; use lengths up to {limit - new_tokens + 1}")
    return build_prompts(engine.tokenizer, lengths, depths, trials, seed)


# -- report --------------------------------------------------------------------------------------

def summarize(records: Sequence[dict[str, Any]], by: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct value of the ``by`` fields (in first-seen order): counts and shares."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    rows = []
    for key, rs in groups.items():
        share = [r["kv"]["sparse_step_share"] for r in rs if r["kv"].get("sparse_step_share") is not None]
        sel = [r["kv"]["selected_fraction"] for r in rs if r["kv"].get("selected_fraction") is not None]
        placed = [r["tokens_agree_resident"] for r in rs if r["tokens_agree_resident"] is not None]
        rows.append({**dict(zip(by, key)), "runs": len(rs), "correct": sum(r["correct"] for r in rs),
                     "answer_agree": sum(r["answer_agree"] for r in rs),
                     "tokens_agree": sum(r["tokens_agree"] for r in rs),
                     "tokens_agree_resident": sum(placed) if placed else None,
                     "kv_off_device_runs": sum(bool(r["kv"].get("host_bytes") or r["kv"].get("disk_bytes")) for r in rs),
                     # asked for key codes, ran without them (the cache's note says why)
                     "sketch_off": sorted({r["kv"].get("sketch") for r in rs if r["estimator"] == "sketch"} - {"on"}),
                     "selected_fraction": round(sum(sel) / len(sel), 4) if sel else None,
                     "sparse_step_share": round(sum(share) / len(share), 4) if share else None,
                     "rooms": rs[0]["rooms"]})
    return rows


def print_rows(title: str, rows: Sequence[dict[str, Any]], fields: Sequence[str]) -> None:
    """The human table: counts as k/n, shares as percentages, "-" where a column does not apply."""
    def frac(k: int | None, n: int) -> str:
        return "-" if k is None else f"{k}/{n}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    head = "".join(f"{f:<8}" for f in fields) + f"{'config':<28}" + "".join(
        f"{c:>9}" for c in ("correct", "=exact", "=tokens", "=resid", "sel", "sparse"))
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for r in rows:
        n = r["runs"]
        cells = [frac(r["correct"], n), frac(r["answer_agree"], n), frac(r["tokens_agree"], n),
                 frac(r["tokens_agree_resident"], n), pct(r["selected_fraction"]), pct(r["sparse_step_share"])]
        print("".join(f"{r[f]:<8}" for f in fields) + f"{r['config']:<28}" + "".join(f"{c:>9}" for c in cells))


def report(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Print the tables; return the JSON object (totals per setting, rows per length and depth, every run)."""
    order = {c: i for i, c in enumerate(dict.fromkeys(r["config"] for r in records))}
    rows = sorted(summarize(records, ("question", "length", "depth", "config")),
                  key=lambda r: (r["question"], r["length"], r["depth"], order[r["config"]]))
    totals = summarize(records, ("question", "config", "placement"))
    for mode in dict.fromkeys(r["question"] for r in records):
        fed = f"question fed as {'decode steps (Quest)' if mode == 'decode' else 'prefill'}"
        print_rows(f"{fed}: per length and depth", [r for r in rows if r["question"] == mode], ("length", "depth"))
        print_rows(f"{fed}: totals", [r for r in totals if r["question"] == mode], ())
    print("\ncorrect: the new text holds the key; =exact: same answer (first number) as exact resident; =tokens: "
          "every new token equal; =resid: every new token equal to the same setting with resident KV; sel: share of "
          "tokens sparse steps selected; sparse: share of decode layer-steps that ran sparse")
    for r in totals:
        for note in r["sketch_off"] if r["question"] == totals[0]["question"] else ():
            print(f"{r['config']}: key sketch {note}")
        if r["placement"] != "resident" and r["question"] == totals[0]["question"]:
            print(f"{r['config']}: KV rooms (tokens) {r['rooms']}; KV on host or disk at the end in "
                  f"{r['kv_off_device_runs']}/{r['runs']} runs")
    return {"bench": "eval_passkey", **meta, "totals": totals, "rows": rows, "runs": list(records)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda t: tuple(int(x) for x in t.split(","))  # noqa: E731
    floats = lambda t: tuple(float(x) for x in t.split(","))  # noqa: E731
    budgets = lambda t: tuple(int(x) if x.strip().isdigit() else float(x) for x in t.split(","))  # noqa: E731
    words = lambda t: tuple(x.strip() for x in t.split(",") if x.strip())  # noqa: E731
    p.add_argument("model", help="a Hugging Face model directory (Llama/Qwen family), a tierkv store, or 'demo'")
    p.add_argument("--lengths", type=ints, default=(1024, 2048, 4096, 7168), help="prompt lengths in tokens")
    p.add_argument("--depths", type=floats, default=(0.1, 0.5, 0.9), help="key positions, fractions of the prompt")
    p.add_argument("--budgets", type=budgets, default=(0.05, 0.1, 0.2),
                   help="sparse budgets: fractions of the context (< 1) or token counts")
    p.add_argument("--estimators", type=words, default=("sketch", "bound"), help="sketch (key codes) and/or bound")
    p.add_argument("--trials", type=int, default=1, help="keys per (length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens generated after the question")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --new-tokens tokens")
    p.add_argument("--question", choices=("decode", "prefill", "both"), default="decode",
                   help="decode: question tokens fed as decode steps (Quest); prefill: with the prompt")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    p.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=512, help="prefill piece, the same in every run")
    p.add_argument("--chunk-tokens", type=int, default=None, help="KV chunk size (default: adaptive per layer)")
    p.add_argument("--device-kv-tokens", type=int, default=None,
                   help="also run every setting with this device KV room (tokens); the rest spills")
    p.add_argument("--host-kv-tokens", type=int, default=0, help="host KV room of the spilled runs (tokens)")
    p.add_argument("--offload-dir", default=None, help="where the spilled runs' KV goes past the host room")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    unknown = [e for e in args.estimators if e not in ESTIMATORS]
    if unknown:
        p.error(f"--estimators {unknown}: use {', '.join(ESTIMATORS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Settings(new_tokens=args.new_tokens, questions=QUESTION_MODES if args.question == "both" else (args.question,),
                 ignore_eos=args.ignore_eos, device=args.device, dtype=args.dtype,
                 prefill_chunk_tokens=args.prefill_chunk_tokens, chunk_tokens=args.chunk_tokens,
                 device_kv_tokens=args.device_kv_tokens, host_kv_tokens=args.host_kv_tokens,
                 offload_dir=args.offload_dir)
    placements = ("resident",) if args.device_kv_tokens is None else ("resident", "spilled")
    configs = configs_for(args.budgets, args.estimators, placements)
    t0 = time.perf_counter()
    try:
        records = evaluate(args.model, configs, args.lengths, args.depths, args.trials, args.seed, s,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    except (ValueError, tierkv.TierkvError) as exc:       # a setting this model or machine cannot run
        raise SystemExit(f"eval_passkey: {exc}") from None
    meta = {"model": str(args.model), "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
            "settings": {**asdict(replace(s, questions=list(s.questions))), "lengths": list(args.lengths),
                         "depths": list(args.depths), "budgets": list(args.budgets),
                         "estimators": list(args.estimators), "trials": args.trials, "seed": args.seed}}
    out = report(records, meta)
    if args.json is not None:
        args.json.write_text(json.dumps(out, sort_keys=True) + "\n")
    emit_json(out)
    return out


if __name__ == "__main__":
    main()
